"""Solve times of the quadratic allocation at SmolLM2-135M's shape (synthetic losses).

210 layers (30 blocks x 7), the highimpact benchmark's 13 options with their exact
storage bits, a diagonal D that falls with bits and ratio (random per layer), and the
reduced pair model M_ab = rho_ab sqrt(D_a D_b) for the 21 same-block pairs of each block
(rho ~ U(-0.3, 0.6)). Prints MILP / relaxation / separable objective, gap and time per budget.

    python experiments/qp_scale.py [--time-limit 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", default="2.5,3.0,3.5")
    a = ap.parse_args(argv)
    from bitalloc.kernels.formats import split_families, parse_scheme
    from bitalloc.solvers import QuadraticProblem, solve_qp_milp, solve_qp_relaxation, solve_separable

    opts = split_families() + [parse_scheme("w4g64z")]
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down
    rng = np.random.default_rng(a.seed)
    L = 30 * len(shapes)
    cost = np.array([[s.storage_bits(*shapes[i % 7]) for s in opts] for i in range(L)], dtype=np.int64)
    eff_bits = np.array([s.weight.bits + (s.ratio * (s.high.bits - s.weight.bits) if s.high else 0) for s in opts])
    scale = rng.lognormal(0, 1, size=L)[:, None]
    D = scale * 2.0 ** (-2 * (eff_bits[None, :] - 2)) * rng.uniform(0.9, 1.1, size=(L, len(opts)))
    pairs = {}
    for b in range(30):
        for i, j in combinations(range(7 * b, 7 * b + 7), 2):
            pairs[i, j] = rng.uniform(-0.3, 0.6) * np.outer(np.sqrt(D[i]), np.sqrt(D[j]))
    qp = QuadraticProblem.from_arrays(D, cost, pairs)
    n = sum(o * i for o, i in shapes) * 30
    print(f"{L} layers x {len(opts)} options, {len(pairs)} pairs")
    for bpw in [float(x) for x in a.budgets.split(",")]:
        cap = int(bpw * n)
        for name, fn in (("qp-milp", lambda: solve_qp_milp(qp, cap, time_limit_s=a.time_limit)),
                         ("qp-relax", lambda: solve_qp_relaxation(qp, cap, time_limit_s=a.time_limit)),
                         ("separable", lambda: solve_separable(qp, cap))):
            t = time.perf_counter()
            try:
                s = fn()
            except ValueError as e:
                print(f"{bpw:>4} {name:>9}: {e}")
                continue
            print(f"{bpw:>4} {name:>9}: objective {s.objective:.6f} status {s.status:>8} gap {s.gap:.2e} "
                  f"time {time.perf_counter() - t:.2f} s  bpw {s.cost / n:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
