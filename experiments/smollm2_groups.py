"""Metric-group policies on SmolLM2-135M (issue 3): what each solver policy does to a plan.

Two profiles over the same schemes, calibration and Hessians:

* one group (every layer judged by next-token KL): the default allocation;
* two groups, after MixDQ: attention projections (``*.self_attn.*``) judged by next-token
  KL with the first position excluded (the BOS/attention-sink token, whose activations
  are outliers), MLP projections (``*.mlp.*``) by the SQNR loss of the final hidden state.

From the two-group profile, at each budget: one ILP over both groups normalised by their
summed loss at the reference scheme (``ref``) and by their range (``range``); the same with
the attention group weighted ×4; a per-group limit (attention predicted loss ≤ half of what
the unweighted plan predicts); MixDQ-style budget shares (each group gets the budget in
proportion to its parameters, solved separately). Every plan is evaluated on WikiText-2
test perplexity and KL to the 16-bit model (``--windows`` × ``--seq-len`` tokens), with
its per-group predicted loss and bits per group, so the table shows where each policy
moves bits. Calibration from WikiText-2 validation.

    python experiments/smollm2_groups.py                         # ~15 min on 2 CPU cores
    python experiments/smollm2_groups.py --budgets 3.5 --windows 4 --layers 're:layers\\.(0|1)\\.'   # smoke

Writes experiments/results/groups/results.json (and the two profiles) and prints a table.
"""

from __future__ import annotations

import argparse

from _driver import Bench, add_args

SCHEMES = "w2g64z,w3,w3g128z,w3g64z,w4,w4g128z,w4g64z,w5g128z,w6g128z,w8"
GROUPS = [
    {"name": "attn", "match": ["*.self_attn.*"], "metric": "kl", "exclude_positions": [0]},
    {"name": "mlp", "match": ["*.mlp.*"], "metric": "sqnr"},
]


def group_bits(plan, grouping: dict[str, list[str]]) -> dict[str, float]:
    """Bits per weight of each group's layers in the plan."""
    out = {}
    for g, fqns in grouping.items():
        lps = [plan.layers[f] for f in fqns if f in plan.layers]
        n = sum(lp.shape[0] * lp.shape[1] for lp in lps)
        out[g] = sum(lp.bits for lp in lps) / n if n else 0.0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap, out="groups", budgets="3.0,3.5", calib_samples=16, kl_samples=2, kl_stride=4)
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--ref-schemes", default="w2g64z,w3g128z,w4g128z")
    ap.add_argument("--layers", action="append", default=[], help="include pattern (repeatable; default all)")
    ap.add_argument("--attn-weight", type=float, default=4.0)
    a = ap.parse_args(argv)

    import bitalloc

    bench = Bench(a)
    schemes = [s for s in a.schemes.split(",") if s]
    refs = [s for s in a.ref_schemes.split(",") if s]
    common = dict(schemes=schemes, include=a.layers, ref_schemes=refs)
    prof1 = bench.profile("profile-1group.json", **common)
    prof2 = bench.profile("profile-2groups.json", groups=GROUPS, **common)
    grouping = {g: list(v["layers"]) for g, v in prof2.metadata["groups"].items()}
    n_par = {g: sum(l.n_params for l in prof2.layers if l.fqn in set(fq)) for g, fq in grouping.items()}
    frac = {g: n / sum(n_par.values()) for g, n in n_par.items()}
    print(f"{prof2.n_layers} layers x {len(schemes)} schemes; groups "
          f"{', '.join(f'{g} {len(v)} layers {frac[g]:.2f} of weights' for g, v in grouping.items())}", flush=True)

    plans, notes = {}, []
    for b in bench.budgets:
        plans[b, "1 group: kl"] = bitalloc.solve(prof1, b)
        base = bitalloc.solve(prof2, b, group_norm="ref")
        plans[b, "2 groups: ref norm"] = base
        plans[b, "2 groups: range norm"] = bitalloc.solve(prof2, b, group_norm="range")
        plans[b, f"2 groups: attn x{a.attn_weight:g}"] = bitalloc.solve(
            prof2, b, group_norm="ref", group_weights={"attn": a.attn_weight, "mlp": 1.0})
        eps = 0.5 * float(base.predicted["loss"]["attn"])
        try:
            plans[b, f"2 groups: attn loss <= {eps:.3g}"] = bitalloc.solve(
                prof2, b, group_norm="ref", group_limits={"attn": eps})
        except ValueError as e:
            notes.append(f"{b} limit: {e}")
            print(f"{b} limit: {e}", flush=True)
        plans[b, "2 groups: shares " + "/".join(f"{frac[g]:.2f}" for g in grouping)] = bitalloc.solve(
            prof2, b, group_shares=frac)

    # identical allocations are scored once; at most --chunk quantized copies in memory at a time
    res = bench.evaluate({f"{b}/{m}": plan for (b, m), plan in plans.items()})
    rows = [{"budget": "-", "policy": "fp16", "bpw": 16.0, **res["fp16"]}]
    for (b, m), plan in plans.items():
        loss = {k: float(v) for k, v in plan.predicted.get("loss", {}).items()} if isinstance(
            plan.predicted.get("loss"), dict) else {"kl": float(plan.predicted.get("loss", 0.0))}
        rows.append({"budget": b, "policy": m, "bpw": plan.predicted["bpw"], **res[f"{b}/{m}"],
                     "predicted_loss": loss, "group_bpw": group_bits(plan, grouping),
                     "schemes": plan.scheme_counts()})
    bench.write({"schemes": schemes, "ref_schemes": refs, "groups": GROUPS, "group_fraction_of_weights": frac,
                 "layers": a.layers, "rows": rows, "notes": notes})
    gs = list(grouping)
    print(f"\n{'budget':>7} {'policy':34} {'bpw':>6} {'ppl':>9} {'KL':>7} "
          + " ".join(f"{g + ' bpw':>9}" for g in gs) + " " + " ".join(f"{'pred ' + g:>10}" for g in gs)
          + f" {'pred 1grp':>10}")
    for r in rows[1:]:
        pl = r["predicted_loss"]
        print(f"{r['budget']:>7} {r['policy']:34} {r['bpw']:6.3f} {r['ppl']:9.3f} {r['kl']:7.4f} "
              + " ".join(f"{r['group_bpw'][g]:9.3f}" for g in gs) + " "
              + " ".join(f"{pl.get(g, float('nan')):10.4g}" for g in gs)
              + (f" {next(iter(pl.values())):10.4g}" if len(pl) == 1 else f" {'-':>10}"))
    print(f"fp16 ppl {rows[0]['ppl']:.3f}; wall {bench.settings()['wall_s']}; -> {bench.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
