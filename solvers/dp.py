"""Single-budget solvers without an LP engine: exact Pareto DP and Lagrangian.

Both work on the problem with tie groups collapsed (see ``_grouping``) and
with costs rewritten as small integers above each group's cheapest option
(``ScaledCosts``), which is exact.

* :func:`solve_lagrangian` relaxes the budget with a multiplier λ: every group
  independently picks ``argmin loss + λ·cost``. The best λ is found by
  bisection, a greedy repair/fill turns the hull solution into a good feasible
  one, and the dual value gives a proven lower bound. Cost: ~60 passes over
  the (G, K) table, so it scales to any size.
* :func:`solve_dp` is exact: a dynamic programme over the Pareto front of
  (cost, loss) partial solutions. Bit costs are far too large for a dense DP
  over capacity, but the number of non-dominated partial solutions stays
  small, especially after pruning with the Lagrangian bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._common import build_solution, prepare, reject_extra
from ._grouping import GroupedProblem, ScaledCosts
from .errors import ProblemError, SolverError
from .problem import AllocationProblem, Constraint, Solution, relative_gap

__all__ = ["solve_dp", "solve_lagrangian", "DEFAULT_MAX_FRONT", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_FRONT = 2_000_000
# Memory the DP may hold: the back-pointers of every kept partial solution (all groups) plus
# one step's candidates. At 10,000 layers x 16 options an unbounded front grew past 9 GB.
DEFAULT_MAX_BYTES = 2 * 2**30
_KEPT_BYTES = 8  # per kept partial solution: int32 parent + int32 option
_CAND_BYTES = 48  # per candidate of one step: cost, loss, bound, index, sort keys
LAGRANGIAN_OPTIMAL_GAP = 1e-12


# ----------------------------------------------------------------------------
# Public solvers
# ----------------------------------------------------------------------------


def solve_lagrangian(
    problem: AllocationProblem, capacity: int, *, extra: Sequence[Constraint] = ()
) -> Solution:
    """Fast heuristic with a proven bound: Lagrangian relaxation + greedy repair.

    Returns the best of the repaired hull solutions on both sides of the
    optimal multiplier. ``lower_bound`` is the Lagrangian dual bound (equal to
    the LP relaxation bound for one budget); ``status`` is ``"optimal"`` only
    when the bound meets the objective (relative gap <= 1e-12).
    """
    started = time.perf_counter()
    reject_extra(extra, "solve_lagrangian")
    capacity, scaled = prepare(problem, capacity)
    relax = relax_budget(problem.grouped, scaled)
    best = best_repair(problem.grouped, scaled, relax)
    info = {"multiplier_per_bit": relax.best_lam / scaled.unit}
    return build_solution(problem, best, relax.lower_bound, capacity, "lagrangian", started,
                          optimal_gap=LAGRANGIAN_OPTIMAL_GAP, info=info)


def solve_dp(
    problem: AllocationProblem,
    capacity: int,
    *,
    extra: Sequence[Constraint] = (),
    max_front: int = DEFAULT_MAX_FRONT,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Solution:
    """Exact optimum for the single-budget problem by a Pareto-front DP.

    Fast for hundreds of layers (tens of ms for 210 x 12); the front grows
    with the number of near-equivalent partial solutions, so for thousands of
    layers prefer :func:`solve_ilp` or :func:`solve_lagrangian`. Raises
    :class:`SolverError` (suggesting those) if a front grows beyond
    ``max_front`` partial solutions, or its memory (back-pointers of every kept partial
    solution plus one step's candidates) would pass ``max_bytes``, instead of silently
    approximating or running the machine out of memory.
    """
    started = time.perf_counter()
    reject_extra(extra, "solve_dp")
    if max_front < 1:
        raise ProblemError(f"max_front: must be >= 1, got {max_front}")
    if max_bytes < 1:
        raise ProblemError(f"max_bytes: must be >= 1, got {max_bytes}")
    capacity, scaled = prepare(problem, capacity)
    grouped = problem.grouped
    relax = relax_budget(grouped, scaled)
    incumbent = best_repair(grouped, scaled, relax)
    objective = grouped.group_loss(incumbent)
    if relative_gap(objective, relax.lower_bound) > 0.0:
        found = _pareto_dp(grouped, scaled, relax, upper_bound=objective, max_front=max_front, max_bytes=max_bytes)
        if found is not None and grouped.group_loss(found) < objective:
            incumbent = found
    objective = grouped.group_loss(incumbent)
    return build_solution(problem, incumbent, objective, capacity, "dp", started, optimal_gap=math.inf)


# ----------------------------------------------------------------------------
# Lagrangian relaxation
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Relaxation:
    """Result of maximising the Lagrangian dual over λ (in scaled cost units)."""

    feasible: np.ndarray  # (G,) hull choice at lam_hi, cost <= capacity
    infeasible: np.ndarray | None  # (G,) hull choice at lam_lo, cost > capacity (None if λ=0 fits)
    lower_bound: float  # best dual value found
    best_lam: float  # multiplier attaining it


def _hull_pick(loss: np.ndarray, cost: np.ndarray, lam: float) -> np.ndarray:
    """(G,) argmin over options of ``loss + lam * cost``, cheapest among ties.

    Breaking ties towards the cheaper option makes the picked total cost a
    non-increasing function of λ, which the bisection relies on.
    """
    vals = loss + lam * cost  # (G, K), +inf where not allowed
    best = vals.min(axis=1, keepdims=True)
    return np.where(vals <= best, cost, np.inf).argmin(axis=1)


def _dual_value(loss: np.ndarray, cost: np.ndarray, lam: float, capacity: int) -> float:
    """g(λ) = Σ_g min_k (loss + λ cost) − λ·capacity, a lower bound for every λ ≥ 0."""
    return math.fsum((loss + lam * cost).min(axis=1)) - lam * capacity


def relax_budget(grouped: GroupedProblem, scaled: ScaledCosts) -> Relaxation:
    """Maximise the dual by bisection on λ over the bit patterns of doubles.

    Positive doubles order like their int64 bit patterns, so bisecting on the
    bits reaches two adjacent doubles (the exact breakpoint, to float
    precision) in at most ~62 steps, whatever the scale of the losses.
    """
    loss, cost, cap = grouped.loss, scaled.cost.astype(np.float64), scaled.capacity
    rows = np.arange(grouped.num_groups)

    def total(choice: np.ndarray) -> int:
        return int(scaled.cost[rows, choice].sum())

    pick = _hull_pick(loss, cost, 0.0)
    if total(pick) <= cap:
        return Relaxation(pick, None, _dual_value(loss, cost, 0.0, cap), 0.0)

    finite = np.where(grouped.mask, loss, np.nan)
    spread = float(np.nanmax(np.nanmax(finite, axis=1) - np.nanmin(finite, axis=1)))
    lam_hi = 2.0 * spread  # scaled costs differ by >= 1, so every breakpoint is <= spread
    feasible = _hull_pick(loss, cost, lam_hi)
    for _ in range(64):  # only float trouble gets past the first try
        if total(feasible) <= cap:
            break
        lam_hi *= 2.0
        feasible = _hull_pick(loss, cost, lam_hi)
    else:
        raise SolverError("lagrangian: no multiplier makes the hull solution fit the budget")
    lam_lo, infeasible = 0.0, pick

    lo_bits, hi_bits = _bits(lam_lo), _bits(lam_hi)
    while hi_bits - lo_bits > 1:
        mid_bits = (lo_bits + hi_bits) // 2
        lam = _from_bits(mid_bits)
        choice = _hull_pick(loss, cost, lam)
        if total(choice) <= cap:
            hi_bits, feasible = mid_bits, choice
        else:
            lo_bits, infeasible = mid_bits, choice
    lam_lo, lam_hi = _from_bits(lo_bits), _from_bits(hi_bits)
    g_lo, g_hi = _dual_value(loss, cost, lam_lo, cap), _dual_value(loss, cost, lam_hi, cap)
    best_lam, bound = (lam_lo, g_lo) if g_lo >= g_hi else (lam_hi, g_hi)
    return Relaxation(feasible, infeasible, bound, best_lam)


def _bits(x: float) -> int:
    return int(np.float64(x).view(np.int64))


def _from_bits(b: int) -> float:
    return float(np.int64(b).view(np.float64))


# ----------------------------------------------------------------------------
# Greedy repair and fill
# ----------------------------------------------------------------------------


def best_repair(grouped: GroupedProblem, scaled: ScaledCosts, relax: Relaxation) -> np.ndarray:
    """Best feasible choice reachable greedily from the hull solutions."""
    candidates = [_fill(grouped.loss, scaled.cost, relax.feasible.copy(), scaled.capacity)]
    if relax.infeasible is not None:
        repaired = _drop(grouped.loss, scaled.cost, relax.infeasible.copy(), scaled.capacity)
        candidates.append(_fill(grouped.loss, scaled.cost, repaired, scaled.capacity))
    return min(candidates, key=grouped.group_loss)


def _fill(loss: np.ndarray, cost: np.ndarray, choice: np.ndarray, capacity: int) -> np.ndarray:
    """Spend leftover budget on the upgrades with the best loss decrease per bit."""
    rows = np.arange(len(choice))
    slack = capacity - int(cost[rows, choice].sum())
    while True:
        gain = loss[rows, choice][:, None] - loss  # (G, K), -inf where not allowed
        extra = cost - cost[rows, choice][:, None]  # (G, K) int64
        ok = (gain > 0) & (extra <= slack)
        if not ok.any():
            return choice
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(extra > 0, gain / extra, np.inf)
        g, k = np.unravel_index(np.argmax(np.where(ok, ratio, -np.inf)), ok.shape)
        choice[g] = k
        slack -= int(extra[g, k])


def _drop(loss: np.ndarray, cost: np.ndarray, choice: np.ndarray, capacity: int) -> np.ndarray:
    """Downgrade until within budget, losing the least loss per bit saved."""
    rows = np.arange(len(choice))
    excess = int(cost[rows, choice].sum()) - capacity
    while excess > 0:
        penalty = loss - loss[rows, choice][:, None]  # (G, K), +inf where not allowed
        saving = cost[rows, choice][:, None] - cost  # (G, K) int64
        ok = (saving > 0) & np.isfinite(penalty)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ok, penalty / saving, np.inf)
        g, k = np.unravel_index(np.argmin(ratio), ratio.shape)
        if not ok[g, k]:  # cannot happen when capacity >= the cheapest choice
            raise SolverError("lagrangian: repair found no cheaper option to drop to")
        choice[g] = k
        excess -= int(saving[g, k])
    return choice


# ----------------------------------------------------------------------------
# Exact Pareto-front DP
# ----------------------------------------------------------------------------


def _pareto_dp(
    grouped: GroupedProblem,
    scaled: ScaledCosts,
    relax: Relaxation,
    *,
    upper_bound: float,
    max_front: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray | None:
    """Exact search over non-dominated (cost, loss) partial solutions.

    After each group the front keeps, for every reachable cost, only partial
    solutions with strictly lower loss than every cheaper one. Two exact
    prunings keep it small: a partial solution must fit the capacity (costs are
    offset so the cheapest completion costs 0), and its Lagrangian completion
    bound ``loss + Σ_{h>g} min(loss_h + λ cost_h) − λ (capacity − cost)`` must
    not exceed the incumbent's loss. Returns ``None`` when the bound prunes
    everything, i.e. the incumbent is already optimal.
    """
    loss, cost, cap = grouped.loss, scaled.cost, scaled.capacity
    lam = relax.best_lam
    per_group = (loss + lam * cost).min(axis=1)  # (G,)
    remaining = np.concatenate([np.cumsum(per_group[::-1])[::-1][1:], [0.0]])  # (G,) Σ over later groups
    magnitude = float(np.where(grouped.mask, np.abs(loss), 0.0).max(axis=1).sum())
    threshold = upper_bound + 1e-9 * (magnitude + abs(upper_bound))

    front_cost = np.zeros(1, dtype=np.int64)  # (n,) sorted ascending
    front_loss = np.zeros(1, dtype=np.float64)  # (n,) strictly descending
    parents: list[np.ndarray] = []
    options: list[np.ndarray] = []
    kept = 0  # partial solutions whose back-pointers are stored
    for g in range(grouped.num_groups):
        ks = np.flatnonzero(grouped.mask[g])  # (m,)
        _check_memory(kept * _KEPT_BYTES + front_cost.size * ks.size * _CAND_BYTES, max_bytes, g, grouped.num_groups,
                      kept, front_cost.size * ks.size)
        cand_cost = (front_cost[:, None] + cost[g, ks][None, :]).ravel()  # (n*m,)
        cand_loss = (front_loss[:, None] + loss[g, ks][None, :]).ravel()
        bound = cand_loss + remaining[g] - lam * (cap - cand_cost)
        idx = np.flatnonzero((cand_cost <= cap) & (bound <= threshold))
        if idx.size == 0:
            return None
        idx = idx[np.lexsort((cand_loss[idx], cand_cost[idx]))]
        idx = idx[_non_dominated(cand_loss[idx])]
        if idx.size > max_front:
            raise SolverError(
                f"dp: Pareto front grew to {idx.size} partial solutions (> max_front={max_front}) "
                f"at group {g} of {grouped.num_groups}; use solve_ilp (method='ilp') or solve_lagrangian"
            )
        parents.append((idx // ks.size).astype(np.int32))
        options.append(ks[idx % ks.size].astype(np.int32))
        kept += idx.size
        front_cost, front_loss = cand_cost[idx], cand_loss[idx]
    return _backtrack(parents, options, int(np.argmin(front_loss)))


def _check_memory(need: int, max_bytes: int, g: int, n_groups: int, kept: int, candidates: int) -> None:
    """Refuse, naming the size, before a step whose memory would pass ``max_bytes``."""
    if need > max_bytes:
        raise SolverError(
            f"dp: the Pareto front needs about {need / 2**30:.2f} GiB at group {g} of {n_groups} "
            f"({kept} kept partial solutions, {candidates} candidates), over the limit of "
            f"{max_bytes / 2**30:.2f} GiB; use method='ilp' or method='lagrangian' for a problem this size")


def _non_dominated(sorted_loss: np.ndarray) -> np.ndarray:
    """Mask of entries (sorted by cost, then loss) that beat every cheaper entry."""
    keep = np.empty(sorted_loss.size, dtype=bool)
    keep[0] = True
    keep[1:] = sorted_loss[1:] < np.minimum.accumulate(sorted_loss)[:-1]
    return keep


def _backtrack(parents: list[np.ndarray], options: list[np.ndarray], last: int) -> np.ndarray:
    choice = np.empty(len(parents), dtype=np.int64)
    at = last
    for g in range(len(parents) - 1, -1, -1):
        choice[g] = options[g][at]
        at = int(parents[g][at])
    return choice
