"""Do pair terms help once they are informative? Fisher pair terms with standard errors (issue 14).

Issue 5's measured pair terms were noise (one 512-token row per joint item, an interaction
being the difference of three such measurements). :mod:`bitalloc.sensitivity.fisher_pairs`
estimates every same-block interaction at every scheme combination from the Fisher model of
the KL instead: one backward per calibration row, ``--rows`` rows of ``--seq-len`` tokens
(default 128 × 512 = 65k tokens, four times the profile's calibration), a standard error per
term and positive-part James–Stein shrinkage toward zero. This script

1. computes the projections on the profile's model, quantizer and schemes (cached under
   ``--work`` as safetensors);
2. reports how many pair terms the rows resolve (``|I| > 2 se``), the distribution of the
   same-scheme correlations ρ, and how the Fisher model's single-layer KL ranks against the
   profile's table (Spearman over layers, per scheme);
3. solves each budget three ways on the profile's own table: ``separable`` (the ILP, scored
   with the pairs), ``fisher-qp`` (the exact MILP with the shrunk Fisher pairs) and
   ``fisher-qp-raw`` (unshrunk), and writes the plans' schemes to
   ``--out/allocations-fisher-pairs.json`` and a summary to ``--out/fisher-pairs.json``.

The plans are then compared on held-out text, paired window by window::

    python experiments/fisher_pairs.py --profile /tmp/s30/profile-both.json --work /tmp/fp
    python experiments/paired_eval.py --profile /tmp/s30/profile-both.json \\
      --allocations experiments/results/pairs/allocations-fisher-pairs.json \\
      --pair 2.5bpw:fisher-qp:separable --pair 3bpw:fisher-qp:separable \\
      --text wikitext2-test.txt:32 --text tinyshakespeare.txt:32 --out experiments/results/pairs/paired-fisher.json

``--quick``: 16 rows (for trying changes). Seeds are fixed (``--seed``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _projections(a, prof, work: Path):
    """The Fisher projections for the profile (cached under ``work``)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from bitalloc.sensitivity.fisher_pairs import FisherProjections

    path, meta = work / f"projections-r{a.rows}-s{a.seed}.safetensors", work / f"projections-r{a.rows}-s{a.seed}.json"
    if path.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        return FisherProjections(load_file(str(path))["s"], int(info["tokens"]), info)
    import bitalloc
    from bitalloc.allocator.context import calibration_spec, peer_context, profile_calibration
    from bitalloc.sensitivity.fisher_pairs import fisher_projections

    loaded = bitalloc.load(prof.model.get("spec", "smollm2"), log=None)
    c = prof.calibration
    seq_len = a.seq_len or int(c["seq_len"])
    data = profile_calibration(loaded, prof, n_samples=a.rows, seq_len=seq_len, seed=a.seed)  # the text, more rows
    ctx, _ = peer_context(loaded, prof, data=data, profile_path=a.profile, what="Fisher pairs", cache_bytes=64 << 20)
    spec = calibration_spec(c["path"] if c["source"] == "file" else "generated", a.rows, seq_len, a.seed)
    proj = fisher_projections(ctx, seed=a.seed, progress=True)
    work.mkdir(parents=True, exist_ok=True)
    save_file({"s": np.ascontiguousarray(proj.s)}, str(path))
    info = {**proj.info, "calibration": {**spec.__dict__}}
    meta.write_text(json.dumps(info, indent=1))
    return FisherProjections(proj.s, proj.n_tokens, info)


def _rank_agreement(prof, proj) -> dict:
    """Spearman over layers between the Fisher model's single-layer KL and the profile's table, per scheme."""
    import numpy as np
    from scipy.stats import spearmanr

    F, D = proj.layer_kl(), np.asarray(prof.table(next(iter(prof.tables))))
    out = {}
    for j, s in enumerate(prof.schemes):
        if np.ptp(F[:, j]) > 0 and np.ptp(D[:, j]) > 0:
            out[s] = float(spearmanr(F[:, j], D[:, j]).statistic)
    return out


def _finite(x):
    """A number JSON can hold (a solver's gap is inf when nothing bounds it)."""
    return x if x is None or math.isfinite(x) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", required=True, help="a profile (its model, calibration source, schemes, quantizer)")
    ap.add_argument("--rows", type=int, default=128, help="calibration rows for the projections")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the profile's)")
    ap.add_argument("--budgets", default="2.5bpw,3bpw")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per MILP")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/bitalloc-fisher-pairs")
    ap.add_argument("--out", default=str(HERE / "results" / "pairs"))
    ap.add_argument("--quick", action="store_true", help="16 rows")
    a = ap.parse_args(argv)
    if a.quick:
        a.rows = 16
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np

    import bitalloc
    from bitalloc.allocator import api
    from bitalloc.sensitivity.artifact import write_json
    from bitalloc.sensitivity.fisher_pairs import fisher_pairs_field
    from bitalloc.sensitivity.pairs import block_pairs

    from _driver import budget_names, write_allocations

    prof = bitalloc.load_profile(a.profile)
    work, out = Path(a.work), Path(a.out)
    proj = _projections(a, prof, work)
    print(f"projections: {proj.rows} rows, {proj.n_tokens} tokens, {proj.info.get('seconds', 0):.0f} s")
    pairs = block_pairs(prof.layers)
    fields = {shrink: fisher_pairs_field(prof, proj, pairs, shrink=shrink) for shrink in (True, False)}
    stats = fields[True]["fisher"]
    print(f"{len(pairs)} same-block pairs, {stats['terms']} terms: {stats['resolved_2se']} resolved (|I| > 2 se, "
          f"{stats['resolved_2se'] / max(1, stats['terms']):.1%}); same-scheme rho (shrunk): {stats['rho_same_scheme']}")
    ranks = _rank_agreement(prof, proj)
    print("Spearman(Fisher single-layer KL, profile table) per scheme: "
          + ", ".join(f"{s} {r:.2f}" for s, r in ranks.items()))

    plans_dir = work / f"plans-r{a.rows}-s{a.seed}"  # plans cached with the projections they were solved on
    plans_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for b in budget_names(a.budgets):
        for name, method, shrink in (("separable", "separable", True), ("fisher-qp", "qp", True),
                                     ("fisher-qp-raw", "qp", False)):
            path = plans_dir / f"{name}-{b}.json"
            if path.is_file():
                plan = bitalloc.Plan.load(path)
            else:
                plan = api.solve(replace(prof, pairs=fields[shrink]), b, method=method, time_limit_s=a.time_limit)
                plan.save(path)
            s = plan.solver
            secs = s.get("solve_time_s")
            rows.append({"method": name, "budget": b, "bpw": plan.predicted["bpw"],
                         "objective": s.get("objective"), "diagonal": s.get("diagonal"), "interaction": s.get("interaction"),
                         "status": s.get("status"), "gap": _finite(s.get("gap")), "solve_s": secs,
                         "schemes": {f: lp.scheme for f, lp in plan.layers.items()}})
            print(f"{b:>7} {name:<14} bpw {plan.predicted['bpw']:.3f} objective {s.get('objective')} "
                  f"interaction {s.get('interaction')} {s.get('status')} ({secs or 0:.1f} s)", flush=True)
    for r in rows:
        sep = next(x for x in rows if x["budget"] == r["budget"] and x["method"] == "separable")
        r["layers_changed"] = sum(r["schemes"][f] != sep["schemes"][f] for f in sep["schemes"])
    out.mkdir(parents=True, exist_ok=True)
    write_allocations(plans_dir, out / "allocations-fisher-pairs.json")
    summary = {"schema": "bitalloc.fisher-pairs/1", "profile": a.profile, "settings": vars(a),
               "projections": proj.info, "pairs": len(pairs),
               **{k: {x: v for x, v in fields[shrink]["fisher"].items() if x not in proj.info}  # the statistics
                  for k, shrink in (("shrunk", True), ("raw", False))},
               "spearman_fisher_vs_table": ranks,
               "rows": [{k: v for k, v in r.items() if k != "schemes"} for r in rows],
               "interaction_ranges": {
                   k: [float(np.min([np.min(v) for v in f["terms"].values()])),
                       float(np.max([np.max(v) for v in f["terms"].values()]))]
                   for k, f in (("shrunk", fields[True]), ("raw", fields[False]))}}
    write_json(out / "fisher-pairs.json", summary)
    for r in summary["rows"]:
        print(f"{r['budget']:>7} {r['method']:<14} layers changed vs separable: {r['layers_changed']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
