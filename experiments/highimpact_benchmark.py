"""High-impact channel ratios by quadratic optimisation (issue 5) on SmolLM2-135M.

Candidates per layer: the split families ``w2g64z+h3r{r}`` and ``w3g64z+h4r{r}`` for
r in {0, 0.02, 0.05, 0.10, 0.15, 0.20} (r = 0 is the plain low format) plus ``w4g64z``
(13 options), channels chosen by ``--saliency``. For each quantizer (RTN, GPTQ) one
measured profile: KL against the 16-bit model for every (layer, option) (the diagonal of
M) and the same-block pair interactions (``--pairs reduced``: each pair once at
w2g64z/w2g64z, scaled to other options by ρ·sqrt(D_a D_b); ``full``: every combination),
all through the resumable runner (checkpoints under --out). At each budget:

* (a) qp:        min δᵀMδ, exact linearised MILP (HiGHS; ``--time-limit``), plus the cvxpy
                 relaxation's solve time/objective for comparison (``qp-relax``)
* (b) separable: the ILP over the same options ignoring the pairs
* (c) fixed-r:   every split layer at the same ratio ``--fixed-ratio`` (ILP over
                 {w2g64z+h3r, w3g64z+h4r, w4g64z})
* (d) no-split:  layer-level allocation only (ILP over {w2g64z, w3g64z, w4g64z})
* (e) uniform:   the smallest uniform standard format not below the budget

WikiText-2 test perplexity (and KL vs 16-bit) on ``--windows`` windows of ``--seq-len``
tokens; calibration from WikiText-2 validation. Budgets are exact bpw over the quantized
layers, with scales, zero-points and channel indices counted. Results:
``<out>/results.json`` and a printed table.

    python experiments/highimpact_benchmark.py                      # full run (hours on 2 CPU cores)
    python experiments/highimpact_benchmark.py --layers 're:layers\\.(0|1)\\.' --windows 4 \\
        --calib-samples 4 --calib-len 128 --kl-samples 1 --quantizers rtn   # smoke test

Profiles, their checkpoints (``profile-<quantizer>.measure-checkpoint.jsonl``, resumable) and
the GPTQ Hessians go under --out; a saved profile made with the same settings is reused.
"""

from __future__ import annotations

import argparse
import sys

from _driver import Bench, add_args


def uniform_plan_any(profile, scheme: str, label: str, quantization: dict):
    """Every layer of the profile in one scheme (need not be a profiled scheme)."""
    from bitalloc.allocator.plan import LayerPlan, Plan
    from bitalloc.kernels.formats import parse_scheme

    s = parse_scheme(scheme)
    layers = {l.fqn: LayerPlan(l.fqn, s.name, (l.out_features, l.in_features),
                               s.storage_bits(l.out_features, l.in_features)) for l in profile.layers}
    bits = sum(lp.bits for lp in layers.values())
    n = sum(l.out_features * l.in_features for l in profile.layers)
    return Plan(model=dict(profile.model), layers=layers, predicted={"bpw": bits / n, "quantized_bits": bits},
                solver={"method": "uniform", "status": "rule"}, label=label, quantization=quantization)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap, out="highimpact", budgets="2.5,3.0,3.5", calib_samples=16, kl_samples=4, kl_stride=4)
    ap.add_argument("--quantizers", default="rtn,gptq")
    ap.add_argument("--lows", default="w2g64z,w3g64z", help="low formats of the split families")
    ap.add_argument("--high-bits", default="3,4", help="high-part bits per low format")
    ap.add_argument("--high-formats", default=None,
                    help="high-part formats per low format (e.g. w3,w4: per-channel symmetric); default: "
                         "--high-bits with the low part's groups and zero-points")
    ap.add_argument("--ratios", default="0,0.02,0.05,0.1,0.15,0.2")
    ap.add_argument("--extra", default="w4g64z", help="other candidate schemes (no split)")
    ap.add_argument("--saliency", default="hessian", choices=("hessian", "obq", "fisher"))
    ap.add_argument("--pairs", default="reduced", choices=("reduced", "full"))
    ap.add_argument("--fixed-ratio", type=float, default=0.05)
    ap.add_argument("--uniform", default="w2g64z,w2g32z,w3g128z,w3g64z,w3g32z,w4g128z,w4g64z",
                    help="uniform baseline family (the smallest not below the budget is used)")
    ap.add_argument("--layers", action="append", default=[], help="include pattern (repeatable; default all)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="MILP time limit per solve (s)")
    ap.add_argument("--workers", type=int, default=None, help="local Ray workers for the measured items")
    ap.add_argument("--packed-eval", action="store_true",
                    help="evaluate through QuantLinear (packed codes) instead of the dequantized weights")
    a = ap.parse_args(argv)

    from bitalloc.allocator import api
    from bitalloc.allocator.solve import quantization_of
    from bitalloc.kernels.formats import parse_scheme, split_families
    from bitalloc.sensitivity.layers import find_layers
    from bitalloc.sensitivity.pairs import block_pairs, pair_item_count

    lows = [x for x in a.lows.split(",") if x]
    hbits = [int(x) for x in a.high_bits.split(",")]
    ratios = [float(x) for x in a.ratios.split(",")]
    highs = [x for x in a.high_formats.split(",")] if a.high_formats else None
    fams = split_families(lows, hbits, ratios, highs=highs)
    extra = [x for x in a.extra.split(",") if x]
    options = [s.name for s in fams] + extra
    plain = [s.name for s in fams if s.ratio == 0] + extra
    fixed = [s.name for s in fams if abs(s.ratio - a.fixed_ratio) < 1e-9] + extra
    if len(fixed) == len(extra):
        print(f"--fixed-ratio {a.fixed_ratio} is not one of --ratios", file=sys.stderr)
        return 2
    fam = [x for x in a.uniform.split(",") if x]

    bench = Bench(a)
    out = bench.out
    layers, _ = find_layers(bench.loaded.model, a.layers, ())
    n_pairs = len(block_pairs(layers))
    counts = {"layers": len(layers), "options": len(options), "single_items": len(layers) * len(options),
              "pairs": n_pairs, "pair_items_reduced": pair_item_count(n_pairs, len(options), "reduced"),
              "pair_items_full": pair_item_count(n_pairs, len(options), "full")}
    print(f"{len(layers)} layers, {len(options)} options ({', '.join(options)}); items per quantizer: "
          f"{counts['single_items']} single + {counts['pair_items_' + a.pairs]} pair ({a.pairs}; "
          f"full would be {counts['pair_items_full']})", flush=True)

    rows, solves = [], []

    def write_results() -> None:
        bench.write({"options": options, "saliency": a.saliency, "pairs": a.pairs, "counts": counts,
                     "weights": "packed QuantLinear" if a.packed_eval else "dequantized", "layers": a.layers,
                     "rows": rows, "solves": solves})

    for quantizer in [q for q in a.quantizers.split(",") if q]:
        name = f"profile-{quantizer}.json"
        ppath = out / name
        prof = bench.profile(name, schemes=options, include=a.layers, ref_schemes=[lows[0]], measured=True,
                             workers=a.workers, saliency=a.saliency, quantizer=quantizer, pairs=a.pairs,
                             pair_ref=lows[0])
        quant = quantization_of(prof)
        plans = {}
        for b in bench.budgets:
            for method, kw in (("qp", dict(method="qp")), ("qp-relax", dict(method="qp-relax")),
                               ("separable", dict(method="separable")),
                               (f"fixed-r{a.fixed_ratio:g}", dict(method="separable", schemes=fixed)),
                               ("no-split", dict(method="separable", schemes=plain))):
                try:
                    plan = api.solve(prof, b, time_limit_s=a.time_limit, profile_path=ppath, **kw)
                except ValueError as e:
                    print(f"{quantizer} {b} {method}: {e}", flush=True)
                    continue
                s = plan.solver
                solves.append({"quantizer": quantizer, "budget": b, "method": method, "status": s["status"],
                               "objective": s["objective"], "diagonal": s.get("diagonal"),
                               "interaction": s.get("interaction"), "gap": s["gap"], "solve_time_s": s["solve_time_s"],
                               "bpw": plan.predicted["bpw"], "schemes": plan.scheme_counts()})
                plans[b, method] = plan
            n = sum(l.out_features * l.in_features for l in prof.layers)
            cap = float(b[:-3]) * n
            sizes = sorted((sum(parse_scheme(u).storage_bits(l.out_features, l.in_features) for l in prof.layers), u)
                           for u in fam)
            pick = next((u for c, u in sizes if c >= cap), sizes[-1][1])
            plans[b, "uniform"] = uniform_plan_any(prof, pick, f"uniform {pick}", quant)
        for (b, method), plan in plans.items():
            plan.save(out / "plans" / f"{quantizer}-{b}-{method}.json")
        # identical choices are evaluated once (qp-relax often equals qp); --chunk models at a time
        res = bench.evaluate({f"{quantizer}/{b}/{m}": p for (b, m), p in plans.items()},
                             hessians=bench.hessians(name) if quantizer == "gptq" else None,
                             packed=a.packed_eval)
        if not rows:
            rows.append({"quantizer": "-", "budget": "-", "method": "fp16", "bpw": 16.0, **res["fp16"]})
        for (b, method), plan in plans.items():
            srow = next((s for s in solves if s["quantizer"] == quantizer and s["budget"] == b
                         and s["method"] == method), {})
            rows.append({"quantizer": quantizer, "budget": b, "method": method, "label": plan.label,
                         "bpw": plan.predicted["bpw"], **res[f"{quantizer}/{b}/{method}"],
                         "objective": srow.get("objective"), "gap": srow.get("gap"),
                         "solve_time_s": srow.get("solve_time_s"), "status": srow.get("status")})
        write_results()  # after each quantizer: a partial run leaves its rows
    write_results()
    print(f"\n{'quant':>5} {'budget':>7} {'method':>14} {'bpw':>7} {'ppl':>9} {'KL':>8} {'objective':>10} "
          f"{'gap':>8} {'solve s':>8}")
    for r in rows:
        f = lambda v, p: "-" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
        print(f"{r['quantizer']:>5} {r['budget']:>7} {r['method']:>14} {r['bpw']:7.3f} {r['ppl']:9.3f} "
              f"{f(r['kl'], 4):>8} {f(r.get('objective'), 5):>10} {f(r.get('gap'), 4):>8} {f(r.get('solve_time_s'), 3):>8}")
    print(f"\nwall: {bench.settings()['wall_s']}; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
