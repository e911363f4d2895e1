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
experiments/results/measured-vs-proxy/{results.json,allocations.json,profile-measured.json,plans/}
(plans/ and the profile are regenerated, not committed; allocations.json has each plan's schemes).

    python experiments/measured_vs_proxy.py --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from _driver import Bench, add_args, table, write_allocations

SCHEMES = "w2g64z,w3,w3g128,w3g128z,w4,w4g128,w4g128z,w5g128z,w8"
COLUMNS = (("table", "table", ""), ("budget", "budget", ""), ("bpw", "bpw", ".3f"), ("ppl", "ppl", ".3f"),
           ("kl", "KL", ".4f"), ("other_ppl", "Shakespeare ppl", ".3f"), ("same_allocation_as", "same as", ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap, out="measured-vs-proxy", budgets="3bpw,3.5bpw,4bpw", kl_samples=2, kl_stride=4)
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--ref-schemes", default="w2g64z,w3g128z,w4g128z", help="references of the calibrated proxy")
    ap.add_argument("--workers", type=int, default=None, help="local Ray workers (default: in-process)")
    ap.add_argument("--layers", "--include", dest="layers", action="append", default=[],
                    help="layer pattern to include (repeatable; smoke tests)")
    a = ap.parse_args(argv)

    from bitalloc.allocator import api
    from bitalloc.sensitivity.calibrate import calibrate_proxy

    bench = Bench(a)
    schemes = [s for s in a.schemes.split(",") if s]
    refs = [s for s in a.ref_schemes.split(",") if s]
    prof = bench.profile("profile-measured.json", schemes=schemes, ref_schemes=refs, include=a.layers,
                         measured=True, workers=a.workers)
    measured = prof.tables["all"]
    ref_idx = [prof.schemes.index(r) for r in refs]
    calibrated, _ = calibrate_proxy(prof.proxy, measured[:, ref_idx], ref_idx)
    variants = {"measured": measured, "calibrated-proxy": calibrated, "uncalibrated-proxy": prof.proxy}

    plans, meta = {}, []
    for name, tab in variants.items():
        p = dataclasses.replace(prof, tables={"all": tab})
        for b in bench.budgets:
            key = f"{name}@{b}"
            plan = dataclasses.replace(api.solve(p, b), label=key)
            plan.save(bench.out / "plans" / f"{name}-{b}.json")
            plans[key] = plan
            meta.append((key, name, b, plan))
    res = bench.evaluate(plans)
    rows = [{"table": "fp16", "budget": "-", "bpw": 16.0, **res["fp16"]}]
    for key, name, b, plan in meta:
        rows.append({"table": name, "budget": b, "bpw": plan.predicted["bpw"], **res[key],
                     "predicted_loss_measured_units": float(sum(
                         measured[i, prof.schemes.index(plan.layers[f].scheme)] for i, f in enumerate(prof.fqns)))})
    write_allocations(bench.out / "plans", bench.out / "allocations.json")
    bench.write({"schemes": schemes, "ref_schemes": refs, "workers": a.workers, "layers": a.layers,
                 "measure": prof.metadata.get("measure"), "rows": rows})
    print("\n" + table(rows, COLUMNS))
    print(f"wall {bench.settings()['wall_s']}; -> {bench.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
