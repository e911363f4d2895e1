"""One table of the peers benchmark from several of its result files (issue 14).

``peers_benchmark.py`` writes one ``results.json`` per run; runs that add or re-measure
methods on the same evaluation (same windows, same 16-bit perplexity) are merged here: a
later file's row replaces an earlier file's row of the same (method, budget), and a file's
methods can be renamed on the way (``FILE:old=new,...``). The merged rows go to ``--out`` (the issue's ``results/peers/results.json``) with the
source files listed, and the WikiText and Tiny Shakespeare tables are printed as markdown
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
    for path, rename in sources:
        d = json.loads(path.read_text())
        if head is None:
            head = d
        else:
            for key in ("windows", "seq_len", "other_windows"):
                assert d["eval"].get(key) == head["eval"].get(key), f"{path}: another evaluation ({key})"
            # float32 sums over other batch compositions move it by ~1e-7 relative; another window set moves it by percents
            assert abs(d["fp16_ppl"] / head["fp16_ppl"] - 1) < 1e-5, f"{path}: another 16-bit perplexity"
        for r in d["rows"]:
            r = {**r, "method": rename.get(r["method"], r["method"]), "source": path.name}
            rows[(r["method"], r["budget"])] = r
    assert head is not None, "no result files"
    return {**{k: v for k, v in head.items() if k not in ("rows", "profile", "settings")},
            "sources": [{"file": p.name, "renamed": rn} for p, rn in sources], "rows": list(rows.values())}


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
