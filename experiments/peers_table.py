"""One table of the peers benchmark from several of its result files (issue 14).

``peers_benchmark.py`` writes one ``results.json`` per run; runs that add or re-measure
methods on the same evaluation (same windows, same 16-bit perplexity) are merged here: a
later file's row replaces an earlier file's row of the same (method, budget), and a file's
methods can be renamed on the way (``FILE:old=new,...``). The merged rows go to ``--out`` (the issue's ``results/peers/results.json``) with the
source files listed (each with its profile and settings, the provenance of its rows); the
``allocations*.json`` beside each source are merged the same way beside ``--out``; and the WikiText and Tiny Shakespeare tables are printed as markdown
(lowest perplexity per budget in bold).

    python experiments/peers_table.py results/peers/results-w32-all.json:exllamav3=exllamav3-lowest-base \\
        results/peers/results-w32-default.json --out results/peers/results-18-candidates.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

def merge(sources: list[tuple[Path, dict[str, str]]]) -> dict:
    """The merged results document of ``[(file, {old method name: new name})]``, in order."""
    rows: dict[tuple[str, str], dict] = {}
    head = None
    listed = []  # each source with the profile and settings its rows came from
    for path, rename in sources:
        d = json.loads(path.read_text())
        listed.append({"file": str(path), "renamed": rename, **{k: d.get(k) for k in ("profile", "settings")}})
        if head is None:
            head = d
        else:
            for key in ("windows", "seq_len", "other_windows"):
                assert d["eval"].get(key) == head["eval"].get(key), f"{path}: another evaluation ({key})"
            # float32 sums over other batch compositions move it by ~1e-7 relative; another window set moves it by percents
            assert abs(d["fp16_ppl"] / head["fp16_ppl"] - 1) < 1e-5, f"{path}: another 16-bit perplexity"
        for r in d["rows"]:
            r = {**r, "method": rename.get(r["method"], r["method"]), "source": str(path)}
            rows[(r["method"], r["budget"])] = r
    assert head is not None, "no result files"
    return {**{k: v for k, v in head.items() if k not in ("rows", "profile", "settings")},
            "sources": listed, "rows": list(rows.values())}


def allocations_beside(path: Path) -> Path:
    """``results-X.json`` -> ``allocations-X.json`` (``peers_benchmark.py`` writes the pair side by side)."""
    return path.with_name(path.name.replace("results", "allocations", 1))


def merge_allocations(sources: list[tuple[Path, dict[str, str]]]) -> dict | None:
    """The allocations beside the sources merged like their rows (later plans replace earlier ones,
    methods renamed), on the union of their layers; None when no source has them."""
    plans: dict[str, dict] = {}
    for path, rename in sources:
        beside = allocations_beside(path)
        if not beside.is_file():
            continue
        d = json.loads(beside.read_text())
        for name, plan in d["plans"].items():
            method, budget = name.rsplit("-", 1)  # budgets ("4.5bpw") hold no hyphen
            plans[f"{rename.get(method, method)}-{budget}"] = {
                **plan, "schemes": dict(zip(d["layers"], plan["schemes"]))}
    if not plans:
        return None
    layers = sorted({f for p in plans.values() for f in p["schemes"]})
    return {"schema": "bitalloc.allocations/1", "layers": layers, "plans": {
        name: {**p, "schemes": [p["schemes"].get(f) for f in layers]} for name, p in sorted(plans.items())}}


def table(doc: dict, ppl: str, kl: str) -> str:
    rows = doc["rows"]
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    budgets.sort(key=lambda b: float(b.replace("bpw", "")))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["budget"]): r for r in rows}
    best = {b: min((by[(m, b)][ppl] for m in methods if (m, b) in by and by[(m, b)][ppl] is not None), default=None)
            for b in budgets}
    out = ["| method | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            r = by.get((m, b))
            if r is None or r[ppl] is None:
                cells.append("")
                continue
            p = f"{r[ppl]:.2f}"
            cells.append((f"**{p}**" if r[ppl] == best[b] else p) + f" ({r[kl]:.3f})")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="result files in order, each FILE or FILE:old=new,... (methods renamed)")
    ap.add_argument("--out", default=None, help="merged results file (default: print only)")
    args = ap.parse_args(argv)
    sources = []
    for item in args.files:
        path, _, renames = item.partition(":")
        sources.append((Path(path), dict(r.split("=", 1) for r in renames.split(",") if r)))
    doc = merge(sources)
    print("WikiText-2 perplexity (KL):\n" + table(doc, "ppl", "kl"))
    print("\nTiny Shakespeare perplexity (KL):\n" + table(doc, "other_ppl", "other_kl"))
    if args.out:
        from bitalloc.sensitivity.artifact import write_json

        write_json(Path(args.out), doc, indent=1)
        print(f"\n{len(doc['rows'])} rows -> {args.out}")
        allocations = merge_allocations(sources)
        if allocations is not None:
            write_json(allocations_beside(Path(args.out)), allocations, indent=None)
            print(f"{len(allocations['plans'])} plans -> {allocations_beside(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
