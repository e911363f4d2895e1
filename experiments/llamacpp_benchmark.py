"""bitalloc GGUFs vs llama.cpp's own presets on SmolLM2-135M, every file built by
``llama_model_quantize`` and every perplexity computed by llama.cpp (issue 13).

* the F32 source: SmolLM2's shipped GGUF (Q4_1 blocks, Q8_0 embedding) requantized to F32
  by llama.cpp (lossless), the same source for every file;
* the presets (Q4_0, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, Q8_0, ...) without and with
  the importance matrix bitalloc's profile wrote (diag of its Hessians: llama.cpp's
  definition, from the same calibration tokens);
* for each preset, a bitalloc plan with a whole-file budget equal to the preset's file
  size (``<bytes>B``), from the llama.cpp-target profile with (or without) the imatrix,
  exported by ``llama_model_quantize`` with per-tensor overrides;
* Q4_1 reproduces SmolLM2's shipped blocks exactly: reported separately, never a win.

Phases (each row is cached under --work, so phases can run as their inputs become ready):

    python experiments/llamacpp_benchmark.py --phase presets          # no profile needed
    python experiments/llamacpp_benchmark.py --phase presets-imatrix  # needs the imatrix profile
    python experiments/llamacpp_benchmark.py --phase bitalloc         # needs both profiles
    python experiments/llamacpp_benchmark.py --phase pairs            # preset+imatrix then bitalloc, per preset
    python experiments/llamacpp_benchmark.py --phase report           # results.json, plans, table
    python experiments/llamacpp_benchmark.py --phase paired --presets Q8_0 --other-windows 32 --drop q5_1
                                                                      # window-by-window ratio, bootstrap interval

The profiles are made with ``bitalloc profile --target llamacpp`` (see experiments/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _data import DATA, wikitext_files  # noqa: E402

RESULTS = HERE / "results" / "llamacpp"
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")


def windows(args):
    """(WikiText-2 test windows, Tiny Shakespeare windows or None): the same token ids for every file."""
    from transformers import AutoTokenizer

    from bitalloc.allocator.evaluate import windows_from_file
    from bitalloc.sensitivity.ggml import model_gguf_path

    src = model_gguf_path("smollm2")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
    _, test = wikitext_files(args.data)
    other = Path(args.data) / "tinyshakespeare.txt"
    win_other = (windows_from_file(tok, other, args.seq_len, args.other_windows)
                 if args.other_windows and other.is_file() else None)
    return windows_from_file(tok, test, args.seq_len, args.windows), win_other


def source(work: Path) -> Path:
    from bitalloc.allocator import llamacpp as lc
    from bitalloc.sensitivity.ggml import model_gguf_path

    p = work / "src-f32.gguf"
    if not p.is_file():
        lc.f32_source(model_gguf_path("smollm2"), p)
    return p


def row_path(work: Path, name: str) -> Path:
    return work / "rows" / f"{name}.json"


def save_row(work: Path, row: dict) -> None:
    from bitalloc.sensitivity.artifact import write_json

    write_json(row_path(work, row["name"]), row, indent=1)
    other = f"  shakespeare {row['ppl_shakespeare']:.4f}" if "ppl_shakespeare" in row else ""
    print(f"{row['name']:<32} {row['kind']:<9} {row['file_bytes']:>10} B  ppl {row['ppl']:.4f}{other}  "
          f"({row.get('eval_s', 0):.0f} s)", flush=True)


def evaluate(gguf: Path, win) -> dict:
    """Perplexity by llama.cpp on WikiText-2 test and (where asked) on Tiny Shakespeare, text of
    another kind than the WikiText calibration."""
    from bitalloc.allocator import llamacpp as lc

    t = time.perf_counter()
    main, other = win
    out = {"ppl": lc.perplexity(gguf, main)["ppl"]}
    if other is not None:
        out["ppl_shakespeare"] = lc.perplexity(gguf, other)["ppl"]
    out["eval_s"] = time.perf_counter() - t
    return out


def imatrix_of(profile_path: Path):
    from bitalloc.sensitivity.ggml import read_imatrix

    md = json.loads(profile_path.read_text())["metadata"]
    return read_imatrix(md["imatrix"]["path"])


def phase_presets(args, imatrix: bool, with_q41: bool = True) -> None:
    from bitalloc.allocator import llamacpp as lc

    work = Path(args.work)
    src = source(work)
    win = windows(args)
    im = imatrix_of(Path(args.profile_imatrix)) if imatrix else None
    for preset in args.presets + (["Q4_1"] if with_q41 else []):
        name = f"{preset}{'+imatrix' if imatrix else ''}"
        if row_path(work, name).is_file():
            continue
        out = work / f"{name}.gguf"
        lc.preset_gguf(src, out, preset, imatrix=im)
        ev = evaluate(out, win)
        types = lc.gguf_tensor_types(out)
        mix = {}
        for t in types.values():
            mix[t] = mix.get(t, 0) + 1
        save_row(work, {"name": name, "kind": "preset", "file_bytes": os.path.getsize(out), **ev,
                        "imatrix": imatrix, "types": mix,
                        **({"note": "reproduces SmolLM2's shipped Q4_1 blocks: not a win"} if preset == "Q4_1" else {})})
        out.unlink()


def phase_bitalloc(args, only_imatrix: bool = False) -> None:
    from bitalloc.allocator import api
    from bitalloc.allocator import llamacpp as lc

    work = Path(args.work)
    win = windows(args)
    for imatrix, prof_path in ((False, args.profile_plain), (True, args.profile_imatrix)):
        if only_imatrix and not imatrix:
            continue
        if not Path(prof_path).is_file():
            print(f"skip (no profile {prof_path})")
            continue
        prof = api.load_profile(prof_path)
        # --drop q5_1: solve without those schemes (q5_1 has the shipped Q4_1's block layout, so it
        # reproduces SmolLM2's stored weights almost exactly; see experiments/README.md)
        schemes = [s for s in prof.schemes if s not in args.drop] if args.drop else None
        tag = f"-no-{'-'.join(args.drop)}" if args.drop else ""
        for preset in args.presets:
            pname = f"{preset}{'+imatrix' if imatrix else ''}"
            name = f"bitalloc{tag}<={pname}"
            if row_path(work, name).is_file() or not row_path(work, pname).is_file():
                continue
            target = json.loads(row_path(work, pname).read_text())
            twin = _same_plan_row(work, target["file_bytes"], args.drop, prof_path)
            if twin is not None:  # same profile, budget and schemes: the same plan and file, measured once
                save_row(work, {**twin, "name": name, "against_preset_imatrix": imatrix, "same_file_as": twin["name"]})
                continue
            plan = api.solve(prof, f"{target['file_bytes']}B", profile_path=prof_path, schemes=schemes)
            plan_file = work / "plans" / f"{name.replace('<=', '_le_')}.json"
            plan.save(plan_file)
            out = work / "bitalloc.gguf"
            r = lc.export_gguf(plan, out)
            assert r["bytes"] == plan.predicted["gguf"]["file_bytes"], (r, plan.predicted)
            ev = evaluate(out, win)
            # the imatrix flag says what this file was built with (the profile's), which may differ from
            # the preset it is measured against (--profile-plain may name the imatrix profile)
            used = bool((prof.metadata or {}).get("imatrix"))
            save_row(work, {"name": name, "kind": "bitalloc", "file_bytes": r["bytes"], **ev, "imatrix": used,
                            "against_preset_imatrix": imatrix, "schemes_dropped": list(args.drop),
                            "budget_bytes": target["file_bytes"], "predicted_file_bytes": plan.predicted["gguf"]["file_bytes"],
                            "types": plan.scheme_counts(), "predicted_loss": plan.predicted["loss_total"],
                            "plan": plan_file.name, "profile": str(prof_path)})
            out.unlink()


def _same_plan_row(work: Path, budget: int, drop: list, prof_path) -> dict | None:
    """A bitalloc row already measured for the same budget, dropped schemes and profile."""
    for p in sorted((work / "rows").glob("bitalloc*.json")):
        r = json.loads(p.read_text())
        if (r.get("budget_bytes") == budget and r.get("schemes_dropped", []) == list(drop)
                and r.get("profile", str(prof_path)) == str(prof_path) and "same_file_as" not in r):
            return r
    return None


def phase_pairs(args) -> None:
    """Preset with the imatrix, then bitalloc at its file size, one preset after another
    (so a run cut short still has complete pairs)."""
    saved = list(args.presets)
    for preset in saved:
        args.presets = [preset]
        phase_presets(args, True, with_q41=False)
        phase_bitalloc(args, only_imatrix=True)
    args.presets = saved


def _published_schemes(name: str) -> dict | None:
    """The committed plan of a bitalloc row (``results/llamacpp/allocations.json``) as
    ``{layer: scheme}``, if any (the file lists the layer names once, sorted)."""
    f = RESULTS / "allocations.json"
    if not f.is_file():
        return None
    d = json.loads(f.read_text())
    rec = d["plans"].get(name)
    return None if rec is None else dict(zip(d["layers"], rec["schemes"], strict=True))


def phase_paired(args) -> None:
    """Each preset (with the imatrix; without it with ``--plain-presets``) against bitalloc's
    file at its size (built with the imatrix), window by window.

    Both files are rebuilt from the F32 source (the bitalloc plan re-solved from the profile,
    and compared with the committed plan of the same name); llama.cpp scores each window, and
    :func:`bitalloc.allocator.llamacpp.compare_files` gives the perplexity ratio bitalloc / preset with
    its 95 % bootstrap interval over windows. An interval that holds 1 means the text does not tell the
    two files apart."""
    from bitalloc.allocator import api
    from bitalloc.allocator import llamacpp as lc

    work = Path(args.work)
    src = source(work)
    texts = dict(zip(("wikitext2-test", "tinyshakespeare"), windows(args)))
    texts = {t: w for t, w in texts.items() if w is not None}
    prof = api.load_profile(args.profile_imatrix)
    im = imatrix_of(Path(args.profile_imatrix))
    schemes = [s for s in prof.schemes if s not in args.drop] if args.drop else None
    tag = f"-no-{'-'.join(args.drop)}" if args.drop else ""
    rows = []
    for preset in args.presets:
        pname = preset if args.plain_presets else f"{preset}+imatrix"
        name = f"bitalloc{tag}_le_{pname}"  # bitalloc's file is built with the imatrix either way
        pfile, bfile = work / f"{pname}.gguf", work / "bitalloc-paired.gguf"
        lc.preset_gguf(src, pfile, preset, imatrix=None if args.plain_presets else im)
        size = os.path.getsize(pfile)
        plan = api.solve(prof, f"{size}B", profile_path=args.profile_imatrix, schemes=schemes)
        r = lc.export_gguf(plan, bfile)
        assert r["bytes"] == plan.predicted["gguf"]["file_bytes"] <= size, (r, size)
        published = _published_schemes(name)
        # None: no committed plan of this name (a row measured on its twin's file, same_file_as)
        same = None if published is None else published == {f: lp.scheme for f, lp in plan.layers.items()}
        for t, w in texts.items():
            t0 = time.perf_counter()
            pre, bit = lc.compare_files([pfile, bfile], w)  # the preset first: bit["vs_first"] is bitalloc / preset
            st = bit["vs_first"]
            rows.append({"preset": pname, "preset_imatrix": not args.plain_presets, "bitalloc": name,
                         "same_plan_as_published": same, "text": t,
                         "preset_bytes": size, "bitalloc_bytes": r["bytes"], "ppl_bitalloc": bit["ppl"],
                         "ppl_preset": pre["ppl"], **st, "eval_s": time.perf_counter() - t0})
            print(f"{pname:<16} {t:<16} bitalloc {bit['ppl']:.4f} ({r['bytes']} B) preset {pre['ppl']:.4f} ({size} B)  "
                  f"ratio {st['ratio']:.4f} [{st['lo']:.4f}, {st['hi']:.4f}]  bitalloc wins {st['a_wins']}/{st['windows']}"
                  f"  (plan {({True: '= published', False: 'differs from published'}).get(same, 'not published')})",
                  flush=True)
        pfile.unlink()
        bfile.unlink()
        _save_paired(args, prof, texts, tag, [r for r in rows if r["preset"] == pname])  # after every preset


def _save_paired(args, prof, texts, tag: str, rows: list) -> None:
    """Write (or extend) the paired results: rows of presets measured again replace the old ones
    (same profile only; another profile's file is replaced)."""
    from bitalloc.sensitivity.artifact import write_json

    out = Path(args.paired_out) if args.paired_out else RESULTS / f"paired{tag}.json"
    if out.is_file():
        old = json.loads(out.read_text())
        if old.get("profile") == str(args.profile_imatrix):
            done = {r["preset"] for r in rows}
            rows = [r for r in old["rows"] if r["preset"] not in done] + rows
    write_json(out, {
        "schema": "bitalloc.llamacpp-paired/1", "profile": str(args.profile_imatrix), "dropped": list(args.drop),
        "imatrix_sha256": (prof.metadata.get("imatrix") or {}).get("sha256"),
        "calibration_tokens_sha256": prof.calibration.get("tokens_sha256"),
        "seq_len": args.seq_len, "windows": {t: len(w) for t, w in texts.items()},
        "bootstrap": {"draws": 10_000, "seed": 0}, "computed_by": "llama.cpp (llama-cpp-python, logits_all)",
        "rows": rows}, indent=1)


def phase_report(args) -> None:
    from bitalloc.sensitivity.artifact import write_json

    work = Path(args.work)
    rows = [json.loads(p.read_text()) for p in sorted((work / "rows").glob("*.json"))]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "plans").mkdir(exist_ok=True)
    for p in (work / "plans").glob("*.json"):  # small plans: drop the per-layer high-channel lists (none here)
        d = json.loads(p.read_text())
        write_json(RESULTS / "plans" / p.name, d, indent=1)
    from _driver import write_allocations

    write_allocations(RESULTS / "plans", RESULTS / "allocations.json")  # plans/ itself is not committed
    keys = ("name", "kind", "file_bytes", "ppl", "imatrix")
    write_json(RESULTS / "results.json", {
        "schema": "bitalloc.llamacpp-benchmark/2", "model": "smollm2 (SmolLM2-135M-Instruct GGUF, F32 source)",
        "eval": {"text": "wikitext2-test.txt", "windows": args.windows, "seq_len": args.seq_len,
                 "other_text": "tinyshakespeare.txt", "other_windows": args.other_windows,
                 "computed_by": "llama.cpp (llama-cpp-python 0.3.36, logits_all)"},
        "rows": [{k: r[k] for k in keys} | ({"ppl_shakespeare": r["ppl_shakespeare"]} if "ppl_shakespeare" in r else {})
                 for r in rows], "details": rows}, indent=1)
    by = {r["name"]: r for r in rows}
    tags = sorted({r["name"].split("<=")[0] for r in rows if r["kind"] == "bitalloc"})

    def cell(r, key):
        return "" if r is None or key not in r else format(r[key], ".4f")

    def win(b, p):
        if b is None:
            return ""
        ok = b["file_bytes"] <= p["file_bytes"] and b["ppl"] < p["ppl"]
        if "ppl_shakespeare" in b and "ppl_shakespeare" in p:
            return ("yes" if ok else "no") + " / " + ("yes" if b["ppl_shakespeare"] < p["ppl_shakespeare"] else "no")
        return "yes" if ok else "no"

    print("| preset | imatrix | preset bytes | preset ppl (wiki / shakespeare) | "
          + " | ".join(f"{t} bytes | {t} ppl (wiki / shakespeare) | win (wiki / shakespeare)" for t in tags) + " |")
    print("|---|---|---:|---:|" + "---:|---:|---|" * len(tags))
    for imatrix in (False, True):
        for preset in args.presets + ["Q4_1"]:
            pname = f"{preset}{'+imatrix' if imatrix else ''}"
            p = by.get(pname)
            if p is None:
                continue
            cols = []
            for t in tags:
                b = by.get(f"{t}<={pname}")
                w = "(reproduces the shipped weights; not a win)" if preset == "Q4_1" else win(b, p)
                cols.append(f"{'' if b is None else b['file_bytes']} | {cell(b, 'ppl')} / {cell(b, 'ppl_shakespeare')} | {w}")
            print(f"| {preset} | {'yes' if imatrix else 'no'} | {p['file_bytes']} | {cell(p, 'ppl')} / "
                  f"{cell(p, 'ppl_shakespeare')} | " + " | ".join(cols) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", required=True, choices=("presets", "presets-imatrix", "bitalloc", "pairs", "paired", "report"))
    ap.add_argument("--work", default="/tmp/llamacpp_bench", help="work folder (GGUFs, cached rows; not committed)")
    ap.add_argument("--profile-imatrix", default="/tmp/llamacpp_bench/profile-imatrix.json")
    ap.add_argument("--profile-plain", default="/tmp/llamacpp_bench/profile-plain.json")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--data", default=str(DATA if DATA.is_dir() else HERE.parents[2] / "shared" / "data"),
                    help="folder with wikitext2-{valid,test}.txt (default ../shared/data beside the repository)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--other-windows", type=int, default=8,
                    help="Tiny Shakespeare windows per file (0: WikiText only)")
    ap.add_argument("--drop", default="", help="schemes the bitalloc plans may not use (e.g. q5_1)")
    ap.add_argument("--plain-presets", action="store_true",
                    help="--phase paired: build the presets without the importance matrix")
    ap.add_argument("--paired-out", default=None,
                    help="--phase paired: the JSON to write (default results/llamacpp/paired[-no-DROP].json)")
    args = ap.parse_args()
    args.presets = [p for p in args.presets.split(",") if p]
    args.drop = [d for d in args.drop.split(",") if d]
    if wikitext_files(args.data) is None:
        return 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    {"presets": lambda: phase_presets(args, False), "presets-imatrix": lambda: phase_presets(args, True),
     "bitalloc": lambda: phase_bitalloc(args), "pairs": lambda: phase_pairs(args),
     "paired": lambda: phase_paired(args), "report": lambda: phase_report(args)}[args.phase]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
