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
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
SCHEMES = "w2g64z,w3,w3g128z,w3g64z,w4,w4g128z,w4g64z,w5g128z,w6g128z,w8"
GROUPS = [
    {"name": "attn", "match": ["*.self_attn.*"], "metric": "kl", "exclude_positions": [0]},
    {"name": "mlp", "match": ["*.mlp.*"], "metric": "sqnr"},
]


def _group_bits(plan, grouping: dict[str, list[str]]) -> dict[str, float]:
    """Bits per weight of each group's layers in the plan."""
    out = {}
    for g, fqns in grouping.items():
        lps = [plan.layers[f] for f in fqns if f in plan.layers]
        n = sum(lp.shape[0] * lp.shape[1] for lp in lps)
        out[g] = sum(lp.bits for lp in lps) / n if n else 0.0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--ref-schemes", default="w2g64z,w3g128z,w4g128z")
    ap.add_argument("--budgets", default="3.0,3.5")
    ap.add_argument("--layers", action="append", default=[], help="include pattern (repeatable; default all)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--kl-samples", type=int, default=2)
    ap.add_argument("--kl-stride", type=int, default=4)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--attn-weight", type=float, default=4.0)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "groups"))
    a = ap.parse_args(argv)

    import torch

    import bitalloc
    from bitalloc.allocator import api
    from bitalloc.allocator.evaluate import windows_from_file
    from bitalloc.sensitivity.calibration import CalibrationSpec
    from bitalloc.sensitivity.build import build_profile

    from _data import wikitext_files

    files = wikitext_files(a.data)
    if files is None:
        return 2
    valid, test = files
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    schemes = [s for s in a.schemes.split(",") if s]
    refs = [s for s in a.ref_schemes.split(",") if s]
    budgets = [f"{float(b):g}bpw" for b in a.budgets.split(",")]
    t0 = time.perf_counter()

    loaded = bitalloc.load(a.model, log=None)
    spec = CalibrationSpec("file", str(valid), a.calib_samples, a.calib_len, 0)
    common = dict(schemes=schemes, calibration=spec, include=a.layers, ref_schemes=refs, progress=False,
                  kl_samples=a.kl_samples, kl_stride=a.kl_stride, log_fn=lambda m: None)
    t = time.perf_counter()
    prof1 = build_profile(loaded, **common)
    t_one = time.perf_counter() - t
    t = time.perf_counter()
    prof2 = build_profile(loaded, groups=GROUPS, **common)
    t_two = time.perf_counter() - t
    prof1.save(out / "profile-1group.json")
    prof2.save(out / "profile-2groups.json")
    grouping = {g: list(v["layers"]) for g, v in prof2.metadata["groups"].items()}
    n_par = {g: sum(l.n_params for l in prof2.layers if l.fqn in set(fq)) for g, fq in grouping.items()}
    frac = {g: n / sum(n_par.values()) for g, n in n_par.items()}
    print(f"{prof2.n_layers} layers x {len(schemes)} schemes; profile 1 group {t_one:.0f}s, 2 groups {t_two:.0f}s; "
          f"groups {', '.join(f'{g} {len(v)} layers {frac[g]:.2f} of weights' for g, v in grouping.items())}",
          flush=True)

    plans, notes = {}, []
    for b in budgets:
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

    windows = windows_from_file(loaded.tokenizer, test, a.seq_len, a.windows)
    t = time.perf_counter()
    keyed = {f"{b}/{m}": plan for (b, m), plan in plans.items()}
    alias = {k: api._allocation_key(p) for k, p in keyed.items()}
    print(f"{len(plans)} plans, {len(set(alias.values()))} distinct allocations to evaluate", flush=True)
    # identical allocations are scored once; at most 6 quantized copies in memory at a time
    res = api._evaluate_plans(loaded, keyed, windows, chunk=6, progress=False)
    t_eval = time.perf_counter() - t

    rows = [{"budget": "-", "policy": "fp16", "bpw": 16.0, "ppl": res["fp16"].ppl, "kl": 0.0}]
    for (b, m), plan in plans.items():
        r = res[f"{b}/{m}"]
        loss = {k: float(v) for k, v in plan.predicted.get("loss", {}).items()} if isinstance(
            plan.predicted.get("loss"), dict) else {"kl": float(plan.predicted.get("loss", 0.0))}
        same = next(k for k, v in alias.items() if v == alias[f"{b}/{m}"])
        rows.append({"budget": b, "policy": m, "same_allocation_as": same if same != f"{b}/{m}" else None,
                     "bpw": plan.predicted["bpw"], "ppl": r.ppl, "kl": r.kl,
                     "top1": r.top1_agree, "predicted_loss": loss, "group_bpw": _group_bits(plan, grouping),
                     "schemes": plan.scheme_counts()})
    result = {
        "model": a.model, "schemes": schemes, "ref_schemes": refs, "groups": GROUPS,
        "group_fraction_of_weights": frac,
        "calibration": {"file": str(valid), "samples": a.calib_samples, "len": a.calib_len,
                        "kl_samples": a.kl_samples, "kl_stride": a.kl_stride},
        "eval": {"file": str(test), "windows": a.windows, "seq_len": a.seq_len},
        "layers": a.layers, "rows": rows, "notes": notes,
        "wall_s": {"profile_1group": round(t_one, 1), "profile_2groups": round(t_two, 1), "eval": round(t_eval, 1),
                   "total": round(time.perf_counter() - t0, 1)},
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    gs = list(grouping)
    print(f"\n{'budget':>7} {'policy':34} {'bpw':>6} {'ppl':>9} {'KL':>7} "
          + " ".join(f"{g + ' bpw':>9}" for g in gs) + " " + " ".join(f"{'pred ' + g:>10}" for g in gs) + f" {'pred 1grp':>10}")
    for r in rows[1:]:
        pl = r["predicted_loss"]
        print(f"{r['budget']:>7} {r['policy']:34} {r['bpw']:6.3f} {r['ppl']:9.3f} {r['kl']:7.4f} "
              + " ".join(f"{r['group_bpw'][g]:9.3f}" for g in gs) + " "
              + " ".join(f"{pl.get(g, float('nan')):10.4g}" for g in gs) + (f" {next(iter(pl.values())):10.4g}" if len(pl) == 1 else f" {'-':>10}"))
    print(f"fp16 ppl {rows[0]['ppl']:.3f}; wall {result['wall_s']}; -> {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
