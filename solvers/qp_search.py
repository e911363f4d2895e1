"""Heuristics on the true quadratic objective (grouped form, scaled integer costs): the
warm start, budget repair and best-improvement local search shared by the MILP and the
relaxation of :mod:`solvers.qp`.
"""

from __future__ import annotations

import numpy as np

from ._grouping import ScaledCosts
from .dp import best_repair, relax_budget
from .errors import SolverError
from .qp_problem import GroupedQP

__all__ = ["heuristic_start", "repair", "local_search"]

# Pair moves of the local search look at all pairs of single moves: skip them beyond this many.
_MAX_PAIR_MOVES = 1500


def heuristic_start(gqp: GroupedQP, scaled: ScaledCosts) -> np.ndarray:
    """Lagrangian + greedy on the linear part, then local search on the true objective."""
    relax = relax_budget(gqp.grouped, scaled)
    start = best_repair(gqp.grouped, scaled, relax)
    start = repair(gqp, scaled.cost, scaled.capacity, start)  # only upgrades here: start fits
    return local_search(gqp, scaled.cost, scaled.capacity, start)

def repair(gqp: GroupedQP, cost: np.ndarray, capacity: int, choice: np.ndarray) -> np.ndarray:
    """Downgrade until within budget, then upgrade while the budget allows (true objective).

    Downgrades pick the least objective increase per bit saved; upgrades the largest
    objective decrease per extra bit. Costs and capacity are exact integers.
    """
    choice = np.array(choice, dtype=np.int64, copy=True)
    rows = np.arange(gqp.num_groups)
    tol = 1e-12 * gqp.magnitude
    while int(cost[rows, choice].sum()) > capacity:
        local = gqp.local(choice)
        penalty = local - local[rows, choice][:, None]  # (G, K), +inf where not allowed
        saving = cost[rows, choice][:, None] - cost
        ok = (saving > 0) & np.isfinite(penalty)
        if not ok.any():  # cannot happen when capacity >= the cheapest choice
            raise SolverError("qp: repair found no cheaper option to drop to")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ok, penalty / np.where(ok, saving, 1), np.inf)
        g, k = np.unravel_index(np.argmin(ratio), ratio.shape)
        choice[g] = k
    while True:
        local = gqp.local(choice)
        slack = capacity - int(cost[rows, choice].sum())
        gain = local[rows, choice][:, None] - local  # (G, K), -inf where not allowed
        extra = cost - cost[rows, choice][:, None]
        ok = (gain > tol) & (extra <= slack)
        if not ok.any():
            return choice
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(extra > 0, gain / np.where(extra > 0, extra, 1), np.inf)
        g, k = np.unravel_index(np.argmax(np.where(ok, ratio, -np.inf)), ok.shape)
        choice[g] = k

def local_search(gqp: GroupedQP, cost: np.ndarray, capacity: int, choice: np.ndarray,
                  max_moves: int | None = None) -> np.ndarray:
    """Best-improvement local search within the budget on the true objective.

    Moves: change one layer's option; when none improves, change two layers at once
    (e.g. upgrade one and downgrade another, which a full budget needs). Every accepted
    move lowers the objective by more than a relative 1e-12, so the search ends.
    """
    choice = np.array(choice, dtype=np.int64, copy=True)
    G, K = gqp.grouped.mask.shape
    rows = np.arange(G)
    tol = 1e-12 * gqp.magnitude
    max_moves = 20 * G * K if max_moves is None else max_moves
    for _ in range(max_moves):
        local = gqp.local(choice)
        delta = local - local[rows, choice][:, None]  # (G, K), +inf where not allowed, 0 at the choice
        dc = cost - cost[rows, choice][:, None]
        slack = capacity - int(cost[rows, choice].sum())
        single = np.where(np.isfinite(delta) & (dc <= slack), delta, np.inf)
        g, k = np.unravel_index(np.argmin(single), single.shape)
        if single[g, k] < -tol:
            choice[g] = k
            continue
        move = _best_pair_move(gqp, choice, delta, dc, slack, tol)
        if move is None:
            break
        (g, k), (h, l) = move
        choice[g], choice[h] = k, l
    return choice

def _best_pair_move(gqp: GroupedQP, choice: np.ndarray, delta: np.ndarray, dc: np.ndarray, slack: int,
                    tol: float):
    """The best improving simultaneous change of two groups within the budget, or None."""
    G, K = delta.shape
    cand = np.isfinite(delta)
    cand[np.arange(G), choice] = False
    ga, ka = np.nonzero(cand)  # (n,) candidate single moves
    n = ga.size
    if n < 2 or n > _MAX_PAIR_MOVES:
        return None
    d, c = delta[ga, ka], dc[ga, ka]
    total = d[:, None] + d[None, :]
    ok = (c[:, None] + c[None, :] <= slack) & (ga[:, None] < ga[None, :])
    if not ok.any():
        return None
    at = {}
    for a in range(n):
        at.setdefault(int(ga[a]), []).append(a)
    for g, h, P in gqp.pairs:  # both groups change: the pair term is counted right only once
        ia, ib = at.get(g), at.get(h)
        if not ia or not ib:
            continue
        kg, kh = ka[ia], ka[ib]
        cg, ch = choice[g], choice[h]
        corr = P[np.ix_(kg, kh)] - P[kg, ch][:, None] - P[cg, kh][None, :] + P[cg, ch]
        total[np.ix_(ia, ib)] += corr
    total = np.where(ok, total, np.inf)
    a, b = np.unravel_index(np.argmin(total), total.shape)
    if not total[a, b] < -tol:
        return None
    return (int(ga[a]), int(ka[a])), (int(ga[b]), int(ka[b]))
