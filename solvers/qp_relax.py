"""For scale: a convex (cvxpy) relaxation of the quadratic problem, rounded, repaired and
improved by local search on the true objective (see :func:`solve_qp_relaxation`).

cvxpy is imported only inside :func:`solve_qp_relaxation`.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace

import numpy as np

from ._common import build_solution, prepare
from ._grouping import ScaledCosts
from .errors import ProblemError
from .ilp import solve_ilp
from .ilp_backends import is_real
from .problem import OPTIMAL_GAP, Solution
from .qp_problem import GroupedQP, QuadraticProblem, check_qp, fold_tied_pairs
from .qp_search import heuristic_start, local_search, repair

__all__ = ["solve_qp_relaxation", "CONVEXIFY"]

CONVEXIFY = ("diagonal", "clip")
# Safety margin subtracted from the convex relaxation's optimal value (in the scaled units
# the conic solver sees, where coefficients are O(1)) so that solver tolerance cannot turn
# it into an invalid bound. Clarabel's default gap tolerances are 1e-8.
_RELAXATION_BOUND_MARGIN = 1e-6


def solve_qp_relaxation(
    qp: QuadraticProblem,
    capacity: int,
    *,
    time_limit_s: float | None = None,
    convexify: str = "diagonal",
    solver: str | None = None,
) -> Solution:
    """Heuristic solution from a convex (cvxpy) relaxation, with a lower bound when valid.

    The one-hot choice is relaxed to ``x ∈ [0, 1]^(options)`` with ``Σ_k x_gk = 1`` per
    layer and the budget row; the objective is ``cᵀx + xᵀQx`` with Q the symmetrised
    pair terms (zero diagonal, so Q is indefinite whenever a pair term is nonzero). Q only
    needs to be convex on the directions the one-hot constraints leave free (``ZᵀQZ`` with
    Z a basis of per-layer zero-sum vectors), and it is made so block by block (connected
    components of the pair graph, i.e. transformer blocks), in one of two ways
    (``convexify``):

    * ``"diagonal"`` (default): add ``diag(d)`` (d ≥ 0, uniform or proportional to the
      rows' pair weight, whichever is smaller in total) and subtract d from the linear
      term. Since ``x² = x`` for binary x this leaves the objective unchanged at every
      integer point, so it is a true relaxation and its optimum is a valid lower bound
      (lowered by a small margin for the conic solver's tolerance).
    * ``"clip"``: eigenvalue clipping of ``ZᵀQZ`` to its PSD part. This changes the
      objective, so the convex problem is only an approximation: when any clipping was
      needed the lower bound and the gap are reported as NaN.

    ``info["psd_shift"]`` reports the convexification, in loss units: the largest ``d_i``
    ("diagonal") or the largest clipped ``−λ_min`` ("clip"); 0 when no shift was needed. The
    fractional optimum is rounded (argmax per layer), repaired to the budget (greedy
    downgrades with the least true-objective increase per bit, then greedy upgrades while
    the budget allows) and improved by local search (single-layer changes and changes of
    two layers at once, on the true objective). The heuristic warm start of
    :func:`solve_qp_milp` is polished the same way and the better of the two returned.
    The cost never exceeds ``capacity``; status is ``"optimal"`` only when the bound
    meets the objective. Without any nonzero pair term the problem is linear and is
    solved exactly by :func:`~solvers.ilp.solve_ilp` instead.

    ``solver`` names a cvxpy solver (default CLARABEL when installed); ``time_limit_s``
    is passed to CLARABEL / OSQP as their time limit (other solvers ignore it). If the
    relaxation does not solve, the heuristic start is returned with a NaN bound.
    """
    started = time.perf_counter()
    check_qp(qp)
    if convexify not in CONVEXIFY:
        raise ProblemError(f"convexify: must be one of {CONVEXIFY}, got {convexify!r}")
    if time_limit_s is not None and not (is_real(time_limit_s) and time_limit_s > 0):
        raise ProblemError(f"time_limit_s: must be a positive number of seconds or None, got {time_limit_s!r}")
    capacity, scaled = prepare(qp.problem, capacity)
    gqp = qp.grouped
    if not gqp.pairs:  # at most pairs inside tie groups, which are linear terms
        sol = solve_ilp(fold_tied_pairs(qp), capacity, time_limit_s=time_limit_s)
        return replace(sol, objective=qp.objective_of(sol.choice), solver="qp-relax/ilp",
                       solve_time_s=time.perf_counter() - started,
                       info={**sol.info, "note": "no pair terms: solved exactly as a linear problem"})

    relaxed = _convex_relaxation(gqp, scaled, convexify, time_limit_s, solver)
    start = heuristic_start(gqp, scaled)
    candidates = {"heuristic": start}
    if relaxed.x is not None:
        x = np.where(gqp.grouped.mask, relaxed.x, -np.inf)
        rounded = x.argmax(axis=1)
        rounded = repair(gqp, scaled.cost, scaled.capacity, rounded)
        candidates["relaxation"] = local_search(gqp, scaled.cost, scaled.capacity, rounded)
    picked = min(candidates, key=lambda name: (gqp.value(candidates[name]), name != "relaxation"))
    info = {
        "convexify": convexify,
        "psd_shift": relaxed.shift,
        "relaxation_status": relaxed.status,
        "relaxation_bound": relaxed.bound,
        "picked": picked,
        **{f"{name}_objective": gqp.value(c) for name, c in candidates.items()},
    }
    return build_solution(qp.problem, candidates[picked], relaxed.bound, capacity, f"qp-relax/{convexify}", started,
                          optimal_gap=OPTIMAL_GAP, info=info, objective_of=qp.objective_of)


@dataclass(frozen=True)
class _Relaxed:
    x: np.ndarray | None  # (G, K) fractional optimum, 0 where not allowed; None when unsolved
    bound: float  # valid lower bound on the true optimum, NaN when none
    shift: float  # largest diagonal shift ("diagonal") or clipped -λ_min ("clip"), in loss units
    status: str


def _convex_relaxation(gqp: GroupedQP, scaled: ScaledCosts, convexify: str, time_limit_s: float | None,
                       solver: str | None) -> _Relaxed:
    """Solve the convexified relaxation (see :func:`solve_qp_relaxation`) with cvxpy.

    Per block (component of the pair graph): Q the symmetric pair matrix of its variables,
    x0 the one-hot centre (1/m on each of a layer's m allowed options) and Z an orthonormal
    basis of the vectors that sum to zero on every layer, so ``Zᵀx0 = 0`` and every x with
    one-hot sums satisfies ``x − x0 = ZZᵀx``. For ``M = Q + diag(d)``:

        xᵀQx = xᵀMx − dᵀx                          (binary x: x² = x)
        xᵀMx = −x0ᵀMx0 + 2 (Mx0)ᵀx + xᵀ Z (ZᵀMZ) Zᵀ x   (one-hot sums)

    "diagonal" picks d ≥ 0 with ``ZᵀMZ ⪰ 0`` (``_diagonal_shift``); "clip" uses d = 0 and
    clips the eigenvalues of ``ZᵀQZ``. The last term is ``‖F x‖²``, ``F = Λ^½ (ZU)ᵀ`` from
    ``ZᵀMZ = UΛUᵀ``; the rest is linear plus a constant.
    """
    import cvxpy as cp
    import scipy.sparse as sp

    mask = gqp.grouped.mask
    G, K = mask.shape
    n = int(mask.sum())
    pos = np.full((G, K), -1, dtype=np.int64)
    pos[mask] = np.arange(n)

    # Objective in scaled units, as the MILP: (loss - floor_g) / scale and pairs / scale.
    floor = np.where(mask, gqp.grouped.loss, np.inf).min(axis=1)  # (G,)
    excess = np.where(mask, gqp.grouped.loss - floor[:, None], 0.0)
    scale = max(float(excess.max()), max(float(np.abs(P).max()) for _, _, P in gqp.pairs))
    scale = scale if scale > 0 else 1.0
    c = excess[mask] / scale  # (n,)
    constant = 0.0

    x = cp.Variable(n)
    quad_terms = []
    shift = 0.0
    comp_of = {g: comp for comp in gqp.components for g in comp}
    by_comp: dict[tuple[int, ...], list] = {}
    for g, h, P in gqp.pairs:
        by_comp.setdefault(comp_of[g], []).append((g, h, P))
    for comp, pairs in by_comp.items():
        idx = np.concatenate([pos[g, mask[g]] for g in comp])  # global positions of the block's variables
        at = {int(p): a for a, p in enumerate(idx)}
        Q = np.zeros((idx.size, idx.size))
        for g, h, P in pairs:
            rows = [at[int(p)] for p in pos[g, mask[g]]]
            cols = [at[int(p)] for p in pos[h, mask[h]]]
            half = P[np.ix_(mask[g], mask[h])] / (2.0 * scale)
            Q[np.ix_(rows, cols)] += half
            Q[np.ix_(cols, rows)] += half.T
        sizes = [int(mask[g].sum()) for g in comp]
        x0 = np.concatenate([np.full(m, 1.0 / m) for m in sizes])  # (n_b,)
        Z = _zero_sum_basis(sizes)  # (n_b, n_b - len(comp)), orthonormal
        if Z.shape[1] == 0:  # every layer of the block has a single option: the pairs are constants
            constant += float(x0 @ Q @ x0)
            continue
        R = Z.T @ Q @ Z
        if convexify == "diagonal":
            d = _diagonal_shift(Q, Z)  # (n_b,) >= 0 with Zᵀ(Q + diag(d))Z ⪰ 0
            shift = max(shift, float(d.max()) * scale)
            M = Q + np.diag(d)  # the -dᵀx part goes to the linear term
            lam, U = np.linalg.eigh(Z.T @ M @ Z)
            lam = np.clip(lam, 0.0, None)  # rounding noise only: the shift makes it PSD
            c[idx] -= d
        else:
            lam, U = np.linalg.eigh(R)
            shift = max(shift, max(0.0, -float(lam.min())) * scale)
            lam = np.clip(lam, 0.0, None)
            M = Q
        Mx0 = M @ x0
        c[idx] += 2.0 * Mx0
        constant -= float(x0 @ Mx0)
        keep = lam > 1e-12 * max(float(np.abs(lam).max()) if lam.size else 0.0, 1e-300)
        if keep.any():
            F = np.sqrt(lam[keep])[:, None] * (Z @ U[:, keep]).T  # (r, n_b)
            quad_terms.append(cp.sum_squares(F @ x[idx]))

    groups_of = np.repeat(np.arange(G), mask.sum(axis=1))  # group of each variable (row-major order)
    onehot = sp.csr_matrix((np.ones(n), (groups_of, np.arange(n))), shape=(G, n))
    cost = scaled.cost[mask].astype(np.float64)
    norm = max(float(cost.max()), 1.0)
    constraints = [x >= 0, x <= 1, onehot @ x == 1, (cost / norm) @ x <= scaled.capacity / norm]
    problem = cp.Problem(cp.Minimize(c @ x + sum(quad_terms)), constraints)

    name = solver if solver is not None else ("CLARABEL" if "CLARABEL" in cp.installed_solvers() else None)
    options = {}
    if time_limit_s is not None and name in ("CLARABEL", "OSQP"):
        options["time_limit"] = float(time_limit_s)
    try:
        with warnings.catch_warnings():  # an inaccurate solve is reported in the status instead
            warnings.simplefilter("ignore", UserWarning)
            problem.solve(solver=name, **options)
    except cp.error.SolverError as exc:
        return _Relaxed(None, math.nan, shift, f"solver error: {exc}")
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or x.value is None:
        return _Relaxed(None, math.nan, shift, str(problem.status))
    values = np.zeros((G, K))
    values[mask] = x.value
    bound = math.nan
    if problem.status == cp.OPTIMAL and (convexify == "diagonal" or shift == 0.0):
        value = float(problem.value) + constant
        bound = (value - _RELAXATION_BOUND_MARGIN * (1.0 + abs(value))) * scale + math.fsum(floor)
    return _Relaxed(values, bound, shift, str(problem.status))


def _diagonal_shift(Q: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """A small d >= 0 with ``Zᵀ(Q + diag(d))Z ⪰ 0``.

    Tries a uniform shift and one weighted by the Gershgorin row weights ``Σ_j |Q_ij|``
    (which keeps the shift small on layers whose pair terms are small); for each the
    smallest factor that works is minus the smallest generalised eigenvalue of
    ``(ZᵀQZ, ZᵀWZ)``. Keeps the one with the smaller total, since the relaxation loses at
    most ``Σ_i d_i (x_i − x_i²) <= Σ_i d_i / 4`` against the true objective.
    """
    import scipy.linalg

    R = Z.T @ Q @ Z
    best = None
    row = np.abs(Q).sum(axis=1)
    for w in (np.ones(Q.shape[0]), row + 1e-9 * max(float(row.max()), 1e-300)):  # w > 0: ZᵀWZ ≻ 0
        s = -float(scipy.linalg.eigh(R, Z.T @ (w[:, None] * Z), eigvals_only=True)[0])
        d = max(s, 0.0) * (1.0 + 1e-9) * w
        if best is None or d.sum() < best.sum():
            best = d
    return best


def _zero_sum_basis(sizes: list[int]) -> np.ndarray:
    """Block-diagonal orthonormal basis of {d : each block of d sums to 0} (Helmert blocks)."""
    n = sum(sizes)
    cols = []
    start = 0
    for m in sizes:
        for j in range(1, m):  # Helmert: (1, ..., 1, -j, 0, ...) / sqrt(j (j + 1))
            v = np.zeros(n)
            v[start:start + j] = 1.0
            v[start + j] = -float(j)
            cols.append(v / math.sqrt(j * (j + 1)))
        start += m
    return np.stack(cols, axis=1) if cols else np.zeros((n, 0))
