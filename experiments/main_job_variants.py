"""Where the main job's time goes, and what cheaper proxy calibrations cost in plan quality.

The default profile calibrates the Hessian proxy with end-to-end KL measurements of every
layer at reference schemes (210 layers x R references, each a forward from the layer's block
to the logits on ``kl_samples`` calibration rows). This script compares, on the default run's
own evaluation (held-out self-generated text, 8 x 256 tokens, seed 1234; or a text file), the
3.0 / 3.5 / 4.0 bpw plans of several calibrations:

- the profiles given with ``--profile NAME=PATH`` (e.g. the default run's, kl_samples 2) and
  profiles it builds with ``--build NAME=KL_SAMPLES`` (default references, default schemes);
- for each, reference subsets given with ``--refs`` (the subset's columns of the measured
  ``kl_ref``, so a subset costs no new measurements and shows what measuring fewer costs).

    python experiments/main_job_variants.py --profile before=bitalloc-out/profile.json \
        --build rows1=1 --refs w2g64z,w3g128z,w4g128z --refs w2g64z,w3g128z --out experiments/results/main-job/variants.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import bitalloc
from bitalloc.allocator.api import _evaluate_plans, eval_windows
from bitalloc.sensitivity.proxy import calibrate_proxy


def with_refs(prof, refs: list[str]):
    """The profile's calibrated table recomputed from a subset of its measured references."""
    cols = [prof.ref_schemes.index(r) for r in refs]
    idx = [prof.schemes.index(r) for r in refs]
    table, scales = calibrate_proxy(prof.proxy, prof.kl_ref[:, cols], idx)
    return dataclasses.replace(prof, tables={"all": table}, kl_ref=prof.kl_ref[:, cols], ref_schemes=list(refs),
                               scales=scales)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--profile", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--build", action="append", default=[], metavar="NAME=KL_SAMPLES")
    ap.add_argument("--refs", action="append", default=[], help="comma-separated reference subset (repeatable)")
    ap.add_argument("--budgets", default="3bpw,3.5bpw,4bpw")
    ap.add_argument("--text", default="generated")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="experiments/results/main-job/variants.json")
    a = ap.parse_args()

    loaded = bitalloc.load(a.model, log=None)
    profiles, build_s = {}, {}
    for item in a.profile:
        name, path = item.split("=", 1)
        profiles[name] = bitalloc.load_profile(path)
    for item in a.build:
        name, k = item.split("=", 1)
        t0 = time.perf_counter()
        profiles[name] = bitalloc.profile(loaded, kl_samples=int(k), progress=False, log=None,
                                          out=Path(a.out).with_name(f"profile-{name}.json"))
        build_s[name] = round(time.perf_counter() - t0, 1)
    plans, rows = {}, []
    for pname, prof in profiles.items():
        subsets = [s.split(",") for s in a.refs] or [list(prof.ref_schemes)]
        for refs in subsets:
            if not set(refs) <= set(prof.ref_schemes):
                continue
            p = with_refs(prof, refs)
            for b in a.budgets.split(","):
                key = f"{pname}|{'+'.join(refs)}|{b}"
                plans[key] = bitalloc.solve(p, b)
    windows, wdesc = eval_windows(loaded, a.text, a.windows, a.seq_len)
    res = _evaluate_plans(loaded, plans, windows, progress=False)
    for key, plan in plans.items():
        pname, refs, b = key.split("|")
        prof = profiles[pname]
        r = res[key]
        rows.append({"profile": pname, "kl_samples": prof.metadata["options"]["kl_samples"], "refs": refs,
                     "measure_s": prof.metadata["wall_s"]["measure"], "budget": b, "bpw": round(plan.bpw, 4),
                     "ppl": round(r.ppl, 3), "kl": round(r.kl, 4), "top1": round(r.top1_agree, 4)})
    print(f"eval: {wdesc}; fp16 ppl {res['fp16'].ppl:.3f}")
    print(f"{'profile':10} {'rows':>4} {'refs':28} {'measure s':>9} {'budget':>7} {'bpw':>6} {'ppl':>8} {'KL':>7} {'top1':>6}")
    for r in rows:
        print(f"{r['profile']:10} {r['kl_samples']:>4} {r['refs']:28} {r['measure_s']:>9.1f} {r['budget']:>7} "
              f"{r['bpw']:>6.3f} {r['ppl']:>8.3f} {r['kl']:>7.4f} {r['top1']:>6.3f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"eval": wdesc, "fp16_ppl": res["fp16"].ppl, "build_s": build_s, "rows": rows},
                              indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
