"""Do a few calibration rows resolve the selection's choice? (issue 14; calibration text only)

``select_plan`` measures each candidate calibration's plan end to end (KL to the 16-bit
model on the last ``select_rows`` calibration rows) and keeps the lowest. Where candidates
differ by less than that measurement's noise, the choice is a coin toss, and a refinement
that chases the same rows fits their noise. This script measures every candidate plan of
each budget on two disjoint sets of calibration rows (A: rows n-2k..n-k-1; B: the last k,
the rows the selection uses with ``select_rows = k``) and says whether B's best is A's
best. It never looks at the evaluation text.

    python experiments/peers_benchmark.py ... --fisher-labels both     # writes the profile below
    python experiments/selection_noise.py --profile /tmp/peers_bench/w32x512/profile-fisher8-both.json

Summary in ``experiments/results/peers/selection-noise.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", required=True, help="a SmolLM2 profile with both Fisher tables (fisher_labels both)")
    ap.add_argument("--budgets", default="2.5bpw,3bpw,3.5bpw,4bpw,4.5bpw")
    ap.add_argument("--rows", type=int, default=4, help="rows per set (the selection's select_rows)")
    ap.add_argument("--out", default=str(HERE / "results" / "peers" / "selection-noise.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    from scipy.stats import spearmanr

    from bitalloc.allocator import api
    from bitalloc.allocator.candidates import select_plan
    from bitalloc.sensitivity.artifact import write_json

    prof = api.load_profile(a.profile)
    loaded = api.load(prof.model["spec"])
    k = a.rows
    assert prof.calibration["n_samples"] >= 2 * k, f"two sets of {k} calibration rows need {2 * k}"
    fit_a = api.selection_fitness(loaded, prof, rows=k, skip=k)  # rows n-2k .. n-k-1
    fit_b = api.selection_fitness(loaded, prof, rows=k)  # the last k: what select_rows = k measures
    out = {"schema": "bitalloc.selection-noise/1", "profile": a.profile, "rows_per_set": k, "budgets": {}}
    print(f"{'budget':>7} {'plans':>5} {'spearman':>8} {'B-best rank on A':>16} {'A best':>8} {'B-best on A':>11}")
    for budget in a.budgets.split(","):
        seen: dict[bytes, tuple[float, float]] = {}

        def fit(chs):
            va, vb = fit_a(chs), fit_b(chs)
            seen.update({c.tobytes(): (x, y) for c, x, y in zip(chs, va, vb)})
            return vb

        plan = select_plan(prof, budget, fit, refine=0)
        A = np.array([v[0] for v in seen.values()])
        B = np.array([v[1] for v in seen.values()])
        ib = int(np.argmin(B))
        rank = int((A < A[ib]).sum()) + 1
        rho = float(spearmanr(A, B).correlation)
        print(f"{budget:>7} {len(A):>5} {rho:>8.3f} {rank:>16} {A.min():>8.4f} {A[ib]:>11.4f}", flush=True)
        out["budgets"][budget] = {"plans": len(A), "spearman": rho, "b_best_rank_on_a": rank, "a_best": float(A.min()),
                                  "b_best_on_a": float(A[ib]), "chosen_on_b": plan.solver["select"]["chosen"],
                                  "a": A.tolist(), "b": B.tolist()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out), out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
