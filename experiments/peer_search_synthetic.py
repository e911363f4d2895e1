"""The peers' searches on synthetic tables at SmolLM2-135M's shape (no model, no quality claim).

210 layers (30 blocks x 7: q k v o gate up down) with the exact storage bits of
w2g32z, w3g32z, w4g32z, w8; a random per-layer error table that falls with bits. Part 1:
each separable search's objective (Σ table), its gap to the exact optimum (pareto_dp)
and its time. Part 2: a non-separable synthetic fitness (the separable part + random
pairwise interactions within each block); bitalloc's ``refine`` (warm-started from the
separable optimum, guided by the separable table) against EvoPress's ``evolve`` from the
same start: the best fitness reached after a number of fitness evaluations.

    python experiments/peer_search_synthetic.py [--seed 0] [--bpw 3.5] [--seeds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SCHEMES = ["w2g32z", "w3g32z", "w4g32z", "w8"]


def instance(seed: int, bpw: float):
    from bitalloc.kernels.formats import parse_scheme

    rng = np.random.default_rng(seed)
    L = 30 * len(SHAPES)
    schemes = [parse_scheme(s) for s in SCHEMES]
    cost = np.array([[s.storage_bits(*SHAPES[i % 7]) for s in schemes] for i in range(L)], dtype=np.int64)
    bits = np.array([2, 3, 4, 8])
    scale = rng.lognormal(0, 1, size=L)[:, None]
    table = scale * 2.0 ** (-2 * (bits[None, :] - 2)) * rng.uniform(0.9, 1.1, size=(L, 4))  # (L, S)
    numel = np.array([SHAPES[i % 7][0] * SHAPES[i % 7][1] for i in range(L)])
    return cost, table, int(numel.sum() * bpw)


def separable(cost, table, cap, seed):
    from bitalloc.solvers.peer_search import anneal_exllamav2, greedy_exllamav3, minimax_threshold, pareto_dp

    base = cost.argmin(axis=1)
    runs = {
        "pareto_dp (AutoRound/HIGGS)": lambda: pareto_dp(table, cost, cap),
        "minimax_threshold (ModelOpt kl)": lambda: minimax_threshold(table, cost, cap),
        "anneal_exllamav2 (defaults)": lambda: anneal_exllamav2(table, cost, cap, seed=seed),
        "greedy_exllamav3": lambda: greedy_exllamav3(table - table[np.arange(len(cost)), base][:, None], cost, cap,
                                                     base),
    }
    rows, opt = [], None
    for name, fn in runs.items():
        t0 = time.perf_counter()
        choice, _ = fn()
        dt = time.perf_counter() - t0
        obj = float(table[np.arange(len(cost)), choice].sum())
        opt = obj if opt is None else opt
        used = int(cost[np.arange(len(cost)), choice].sum())
        rows.append({"search": name, "objective": obj, "gap_pct": 100 * (obj - opt) / opt, "seconds": dt,
                     "bits_used_pct": 100 * used / cap})
    return rows


def nonseparable(cost, table, cap, seed, checkpoints=(25, 50, 100, 200, 400)):
    from bitalloc.solvers.evolve import evolve, refine
    from bitalloc.solvers.peer_search import pareto_dp

    rng = np.random.default_rng(seed + 1)
    L = len(cost)
    rows = np.arange(L)
    coupling = np.zeros((L, L))
    for b in range(30):  # within-block interactions, both signs
        idx = np.arange(7 * b, 7 * b + 7)
        coupling[np.ix_(idx, idx)] = np.triu(rng.uniform(-0.3, 0.6, (7, 7)), 1)
    amp = np.sqrt(table)  # (L, S)

    def fitness(choices, stage):
        out = []
        for c in choices:
            a = amp[rows, c]
            out.append(float(table[rows, c].sum() + a @ coupling @ a))
        return out

    start, _ = pareto_dp(table, cost, cap)
    n = max(checkpoints)
    t0 = time.perf_counter()
    _, ref = refine(fitness, cost, cap, start, evaluations=n, hint=table)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, evo = evolve(fitness, cost, cap, start, generations=n // 23 + 1, offspring=16, stages=(4, 2, 1), seed=seed)
    t_evo = time.perf_counter() - t0

    def at(history, k):
        got = [f for e, f in history if e <= k]
        return got[-1] if got else float("nan")

    f0 = fitness([start], 0)[0]
    out = []
    for k in checkpoints:
        out.append({"evaluations": k, "refine": at(ref["history"], k), "evolve": at(evo["history"], k)})
    return f0, out, {"refine_s": t_ref, "evolve_s": t_evo, "refine_status": ref["status"],
                     "refine_evaluations": ref["evaluations"], "evolve_evaluations": evo["evaluations"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bpw", type=float, default=3.5)
    ap.add_argument("--seeds", type=int, default=5, help="instances for part 2 (seed, seed+1, ...)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "peer-search" / "synthetic.json"))
    a = ap.parse_args(argv)
    import bitalloc
    from bitalloc.sensitivity.artifact import write_json

    cost, table, cap = instance(a.seed, a.bpw)
    rows = separable(cost, table, cap, a.seed)
    print(f"{len(cost)} layers x {len(SCHEMES)} schemes, capacity {cap} bits ({a.bpw} bpw of weights)")
    print(f"{'search':34} {'objective':>11} {'gap %':>8} {'bits %':>8} {'seconds':>8}")
    for r in rows:
        print(f"{r['search']:34} {r['objective']:11.5f} {r['gap_pct']:8.3f} {r['bits_used_pct']:8.3f} "
              f"{r['seconds']:8.3f}")
    part2 = []
    for seed in range(a.seed, a.seed + a.seeds):
        c2, t2, cap2 = instance(seed, a.bpw)
        f0, curve, info = nonseparable(c2, t2, cap2, seed)
        part2.append({"seed": seed, "start": f0, "curve": curve, **info})
        print(f"\nseed {seed}: non-separable fitness, start (separable optimum) = {f0:.5f}; "
              "best fitness after N evaluations")
        print(f"{'N':>6} {'refine':>11} {'evolve':>11}")
        for r in curve:
            print(f"{r['evaluations']:6d} {r['refine']:11.5f} {r['evolve']:11.5f}")
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in info.items()})
    for k in range(len(part2[0]["curve"])):
        n = part2[0]["curve"][k]["evaluations"]
        wins = sum(p["curve"][k]["refine"] < p["curve"][k]["evolve"] for p in part2)
        g_ref = np.mean([p["start"] - p["curve"][k]["refine"] for p in part2])
        g_evo = np.mean([p["start"] - p["curve"][k]["evolve"] for p in part2])
        print(f"N={n:4d}: refine lower than evolve on {wins}/{len(part2)} seeds; "
              f"mean fitness gain over the start: refine {g_ref:.4f}, evolve {g_evo:.4f}")
    write_json(a.out, {"schema": "bitalloc.experiments.peer_search_synthetic/1", "bitalloc": bitalloc.__version__,
                       "command": " ".join(["python", "experiments/peer_search_synthetic.py", *(argv or sys.argv[1:])]),
                       "seed": a.seed, "bpw": a.bpw, "capacity_bits": cap, "separable": rows,
                       "nonseparable": part2}, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
