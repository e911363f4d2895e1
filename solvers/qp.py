"""Allocation with pairwise interaction terms: a binary quadratic programme over one-hot choices.

The layer-wise high-impact ratio optimisation (Pham et al. 2025) models the loss of a
joint choice as ``δᵀ M δ`` over one-hot vectors δ (one option per layer): the diagonal
of M is the measured single-layer loss change of each (layer, option), the off-diagonal
blocks are the interaction ``Δ(a and b) − Δ(a) − Δ(b)`` of two layers in the same
transformer block (zero across blocks). Here that is a :class:`QuadraticProblem`::

    objective(choice) = Σ_i loss[i, k_i] + Σ_{(i, j)} P_ij[k_i, k_j]

with an :class:`~solvers.problem.AllocationProblem` for the diagonal, costs, allowed
options and ties, and a sparse mapping ``{(i, j): P_ij}`` for the pairs.

Three solvers, all returning a :class:`~solvers.problem.Solution` whose ``objective`` is
the true quadratic objective of its choice and whose cost never exceeds the budget:

* :func:`solve_qp_milp` — exact: every product ``x_ik · x_jl`` becomes a continuous
  ``y`` in a transport-polytope (one-hot) linearisation, solved by the same PuLP /
  HiGHS / CBC machinery as :func:`~solvers.ilp.solve_ilp` (exact integer budget check,
  tightening and re-solve on overshoot, warm start, time limit with a proven gap).
* :func:`solve_qp_relaxation` — for scale: a convex relaxation in cvxpy, rounded,
  repaired and improved by local search on the true objective.
* :func:`solve_separable` — the ILP that ignores the pairs, scored with the true
  objective: the baseline the pair terms must beat.

cvxpy is imported only inside :func:`solve_qp_relaxation`; PuLP only when a MILP is solved.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType

import numpy as np

from . import ilp
from ._common import build_solution, prepare
from ._grouping import GroupedProblem, ScaledCosts
from .dp import best_repair, relax_budget
from .errors import ProblemError, SolverError
from .problem import FEASIBLE, OPTIMAL_GAP, AllocationProblem, Solution

__all__ = [
    "QuadraticProblem",
    "solve_qp_milp",
    "solve_qp_relaxation",
    "solve_separable",
    "CONVEXIFY",
]

CONVEXIFY = ("diagonal", "clip")
# Pair moves of the local search look at all pairs of single moves: skip them beyond this many.
_MAX_PAIR_MOVES = 1500
# Safety margin subtracted from the convex relaxation's optimal value (in the scaled units
# the conic solver sees, where coefficients are O(1)) so that solver tolerance cannot turn
# it into an invalid bound. Clarabel's default gap tolerances are 1e-8.
_RELAXATION_BOUND_MARGIN = 1e-6

PairKey = tuple[int, int]


# ----------------------------------------------------------------------------
# The problem
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QuadraticProblem:
    """An allocation problem plus pairwise terms between layers.

    ``problem.loss`` is the diagonal (single-layer loss per option); ``pairs`` maps a
    layer pair ``(i, j)`` with ``i < j`` (indices, or names when ``problem.names`` is set)
    to a (K, K) float array ``P`` with ``P[k, l]`` added to the objective when layer i
    picks option k and layer j option l. Give only the pairs that interact (in practice
    the same-block pairs); absent pairs are zero. Entries for options that are not
    allowed are ignored (and may be NaN); they are stored as 0. Tied layers are handled:
    a pair inside a tie group only contributes its diagonal ``P[k, k]``.
    """

    problem: AllocationProblem
    pairs: Mapping[PairKey, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = self.problem
        if not isinstance(problem, AllocationProblem):
            raise ProblemError(
                f"QuadraticProblem.problem: expected an AllocationProblem, got {type(problem).__name__}"
            )
        if not isinstance(self.pairs, Mapping):
            raise ProblemError(
                f"QuadraticProblem.pairs: must be a mapping {{(i, j): (K, K) array}}, got {type(self.pairs).__name__}"
            )
        K = problem.num_options
        pairs: dict[PairKey, np.ndarray] = {}
        for key, value in self.pairs.items():
            i, j = self._pair_key(key)
            if (i, j) in pairs:
                raise ProblemError(f"QuadraticProblem.pairs: pair ({i}, {j}) is given twice")
            where = f"QuadraticProblem.pairs[({i}, {j})]"
            try:
                P = np.array(value, dtype=np.float64, copy=True)
            except (TypeError, ValueError) as exc:
                raise ProblemError(f"{where}: must be a numeric (K, K) array ({exc})") from None
            if P.shape != (K, K):
                raise ProblemError(f"{where}: shape {P.shape} must be (options, options) = {(K, K)}")
            both = problem.mask[i][:, None] & problem.mask[j][None, :]  # (K, K) allowed combinations
            bad = both & ~np.isfinite(P)
            if bad.any():
                k, l = map(int, np.argwhere(bad)[0])
                raise ProblemError(
                    f"{where}: must be finite for allowed options; entry ({k}, {l}) "
                    f"({problem.layer_label(i)} option {k}, {problem.layer_label(j)} option {l}) is {P[k, l]}"
                )
            P = np.where(both, P, 0.0)
            P.setflags(write=False)
            pairs[i, j] = P
        object.__setattr__(self, "pairs", MappingProxyType(dict(sorted(pairs.items()))))

    def _pair_key(self, key: object) -> PairKey:
        if not isinstance(key, tuple) or len(key) != 2:
            raise ProblemError(f"QuadraticProblem.pairs: key {key!r} must be a pair of layers (i, j) with i < j")
        try:
            i, j = (self.problem.layer_index(k) for k in key)
        except ProblemError as exc:
            raise ProblemError(f"QuadraticProblem.pairs: key {key!r}: {exc}") from None
        if i >= j:
            hint = f"; give P.T under ({j}, {i})" if i > j else ""
            raise ProblemError(f"QuadraticProblem.pairs: key {key!r} must have i < j (got {i}, {j}){hint}")
        return i, j

    @classmethod
    def from_arrays(cls, loss, cost, pairs: Mapping = MappingProxyType({}), *, allowed=None, ties=(),
                    names=None) -> QuadraticProblem:
        """Shorthand for ``QuadraticProblem(AllocationProblem(loss, cost, allowed, ties, names), pairs)``."""
        return cls(AllocationProblem(loss, cost, allowed, ties, names), pairs)

    # -- shape ----------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.problem.num_layers

    @property
    def num_options(self) -> int:
        return self.problem.num_options

    @property
    def is_separable(self) -> bool:
        """True when no pair has a nonzero term: the problem is just ``problem``."""
        return not any(np.any(P != 0) for P in self.pairs.values())

    # -- evaluating choices ---------------------------------------------------

    def cost_of(self, choice: Sequence[int] | np.ndarray) -> int:
        """Exact total cost in bits."""
        return self.problem.cost_of(choice)

    def objective_of(self, choice: Sequence[int] | np.ndarray) -> float:
        """The quadratic objective of a (validated) choice, summed with ``math.fsum``."""
        arr = self.problem.check_choice(choice)
        terms = self.problem.loss[np.arange(self.num_layers), arr].tolist()
        terms += [float(P[arr[i], arr[j]]) for (i, j), P in self.pairs.items()]
        return math.fsum(terms)

    def interaction_of(self, choice: Sequence[int] | np.ndarray) -> float:
        """The pairwise part of the objective alone."""
        arr = self.problem.check_choice(choice)
        return math.fsum(float(P[arr[i], arr[j]]) for (i, j), P in self.pairs.items())

    # -- the grouped form every solver works on --------------------------------

    @cached_property
    def grouped(self) -> _GroupedQP:
        """Tie groups collapsed; pairs summed per group pair; all-zero pairs dropped."""
        return _GroupedQP.from_problem(self)

    @cached_property
    def blocks(self) -> tuple[tuple[int, ...], ...]:
        """Layers connected by nonzero pair terms (or ties), as sorted tuples, ordered by first layer.

        Independent of each other except through the budget; the convex relaxation
        convexifies each block separately.
        """
        grouped = self.grouped
        return tuple(
            tuple(sorted(i for g in comp for i in grouped.grouped.members[g])) for comp in grouped.components
        )


@dataclass(frozen=True, eq=False)
class _GroupedQP:
    """A QuadraticProblem over tie groups.

    ``grouped.loss`` is the linear part per group (the members' losses plus the diagonal
    of pairs inside the group), +inf where not allowed; ``pairs`` holds (g, h, P) with
    g < h and P (K, K), 0 where not allowed, only when P has a nonzero entry.
    """

    grouped: GroupedProblem
    pairs: tuple[tuple[int, int, np.ndarray], ...]

    @classmethod
    def from_problem(cls, qp: QuadraticProblem) -> _GroupedQP:
        base = qp.problem.grouped
        lg = base.layer_group
        linear = np.where(base.mask, base.loss, 0.0)  # (G, K)
        summed: dict[tuple[int, int], np.ndarray] = {}
        for (i, j), P in qp.pairs.items():
            g, h = int(lg[i]), int(lg[j])
            if g == h:  # tied layers share the option: only P[k, k] can occur
                linear[g] += np.diag(P)
                continue
            M = P if g < h else P.T
            key = (min(g, h), max(g, h))
            summed[key] = summed[key] + M if key in summed else M.copy()
        linear = np.where(base.mask, linear, np.inf)
        linear.setflags(write=False)
        pairs = []
        for (g, h), M in sorted(summed.items()):
            M = np.where(base.mask[g][:, None] & base.mask[h][None, :], M, 0.0)
            if np.any(M != 0):
                M.setflags(write=False)
                pairs.append((g, h, M))
        return cls(replace(base, loss=linear), tuple(pairs))

    @property
    def num_groups(self) -> int:
        return self.grouped.num_groups

    @cached_property
    def neighbours(self) -> tuple[tuple[tuple[int, np.ndarray], ...], ...]:
        """Per group g: (h, M) with M[k_g, k_h] the pair term, for every h paired with g."""
        out: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(self.num_groups)]
        for g, h, P in self.pairs:
            out[g].append((h, P))
            out[h].append((g, P.T))
        return tuple(tuple(n) for n in out)

    @cached_property
    def components(self) -> tuple[tuple[int, ...], ...]:
        """Connected components of the pair graph over groups (singletons included)."""
        parent = list(range(self.num_groups))

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for g, h, _ in self.pairs:
            parent[find(g)] = find(h)
        comps: dict[int, list[int]] = {}
        for g in range(self.num_groups):
            comps.setdefault(find(g), []).append(g)
        return tuple(sorted(tuple(c) for c in comps.values()))

    @cached_property
    def magnitude(self) -> float:
        """Scale of the objective's terms, for relative tolerances."""
        finite = np.where(self.grouped.mask, np.abs(self.grouped.loss), 0.0)
        total = float(finite.max(axis=1).sum()) + sum(float(np.abs(P).max()) for _, _, P in self.pairs)
        return total if total > 0 else 1.0

    def value(self, choice: np.ndarray) -> float:
        terms = self.grouped.loss[np.arange(self.num_groups), choice].tolist()
        terms += [float(P[choice[g], choice[h]]) for g, h, P in self.pairs]
        return math.fsum(terms)

    def local(self, choice: np.ndarray) -> np.ndarray:
        """(G, K): the objective terms involving group g if g picked k, the others fixed.

        Changing only group g from ``choice[g]`` to k changes the objective by
        ``local[g, k] - local[g, choice[g]]``. +inf where not allowed.
        """
        out = np.array(self.grouped.loss, dtype=np.float64, copy=True)
        for g, h, P in self.pairs:
            out[g] += P[:, choice[h]]
            out[h] += P[choice[g], :]
        return out


# ----------------------------------------------------------------------------
# Exact: linearised MILP
# ----------------------------------------------------------------------------


def solve_qp_milp(
    qp: QuadraticProblem,
    capacity: int,
    *,
    backend: str = "highs",
    time_limit_s: float | None = None,
    mip_gap: float = 0.0,
) -> Solution:
    """Exact optimum of the quadratic problem by a linearised MILP.

    One binary ``x_gk`` per (group, allowed option) as in :func:`~solvers.ilp.solve_ilp`,
    plus a continuous ``y_ghkl`` in [0, 1] for each product ``x_gk · x_hl`` of a pair
    with a nonzero term, tied to the binaries by the one-hot (transport) constraints
    ``Σ_l y_ghkl = x_gk``, ``Σ_k y_ghkl = x_hl`` — exact for binary x and much tighter
    in the LP relaxation than the three McCormick inequalities it implies.

    Warm-started from a heuristic (Lagrangian on the diagonal, then local search on the
    true objective). Budgets are checked in exact integers with the ILP's tightening
    loop, so the result never exceeds ``capacity``. With ``time_limit_s`` the best
    solution found is returned with status ``"feasible"`` and the solver's proven bound
    (``gap`` inf when the solver proved none). Raises
    :class:`~solvers.errors.InfeasibleBudgetError` below the cheapest allocation.
    """
    started = time.perf_counter()
    _check_qp(qp)
    ilp._check_options(backend, time_limit_s, mip_gap)
    capacity, scaled = prepare(qp.problem, capacity)
    gqp = qp.grouped
    start = _heuristic_start(gqp, scaled)
    model = ilp._Model(gqp.grouped, scaled.cost, scaled.capacity, (), pairs=gqp.pairs)
    deadline = None if time_limit_s is None else started + time_limit_s
    result, first_bound, tightened = ilp._solve_within_budgets(model, backend, deadline, mip_gap, start, capacity)

    proven = result.status == "optimal" and mip_gap == 0.0 and not tightened
    bound = math.inf if proven else (first_bound if first_bound is not None else -math.inf)
    info = {
        "tightened": tightened,
        "backend_status": result.message,
        "pairs": len(gqp.pairs),
        "pair_variables": int(sum(gqp.grouped.mask[g].sum() * gqp.grouped.mask[h].sum() for g, h, _ in gqp.pairs)),
        "start_objective": gqp.value(start),
    }
    return build_solution(qp.problem, result.choice, bound, capacity, f"qp-milp/{backend}", started,
                          optimal_gap=OPTIMAL_GAP, info=info, objective_of=qp.objective_of)


# ----------------------------------------------------------------------------
# For scale: convex relaxation, rounding, repair, local search
# ----------------------------------------------------------------------------


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
    _check_qp(qp)
    if convexify not in CONVEXIFY:
        raise ProblemError(f"convexify: must be one of {CONVEXIFY}, got {convexify!r}")
    if time_limit_s is not None and not (ilp._is_real(time_limit_s) and time_limit_s > 0):
        raise ProblemError(f"time_limit_s: must be a positive number of seconds or None, got {time_limit_s!r}")
    capacity, scaled = prepare(qp.problem, capacity)
    gqp = qp.grouped
    if not gqp.pairs:  # at most pairs inside tie groups, which are linear terms
        sol = ilp.solve_ilp(_fold_tied_pairs(qp), capacity, time_limit_s=time_limit_s)
        return replace(sol, objective=qp.objective_of(sol.choice), solver="qp-relax/ilp",
                       solve_time_s=time.perf_counter() - started,
                       info={**sol.info, "note": "no pair terms: solved exactly as a linear problem"})

    relaxed = _convex_relaxation(gqp, scaled, convexify, time_limit_s, solver)
    start = _heuristic_start(gqp, scaled)
    candidates = {"heuristic": start}
    if relaxed.x is not None:
        x = np.where(gqp.grouped.mask, relaxed.x, -np.inf)
        rounded = x.argmax(axis=1)
        rounded = _repair(gqp, scaled.cost, scaled.capacity, rounded)
        candidates["relaxation"] = _local_search(gqp, scaled.cost, scaled.capacity, rounded)
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


def _convex_relaxation(gqp: _GroupedQP, scaled: ScaledCosts, convexify: str, time_limit_s: float | None,
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


# ----------------------------------------------------------------------------
# The separable baseline
# ----------------------------------------------------------------------------


def solve_separable(qp: QuadraticProblem, capacity: int, **options) -> Solution:
    """The allocation ILP on the diagonal alone, ignoring the pairs, scored with the true objective.

    ``options`` go to :func:`~solvers.ilp.solve_ilp`. ``objective`` is the true quadratic
    objective of the chosen allocation; ``info["separable_objective"]`` the diagonal-only
    objective the ILP minimised. With nonzero pair terms the ILP's bound says nothing
    about the quadratic optimum, so ``lower_bound`` and ``gap`` are NaN and the status
    ``"feasible"``; without them the ILP's result is returned as is.
    """
    started = time.perf_counter()
    _check_qp(qp)
    sol = ilp.solve_ilp(qp.problem, capacity, **options)
    info = {**sol.info, "separable_objective": sol.objective, "separable_status": sol.status}
    elapsed = time.perf_counter() - started
    if qp.is_separable:
        return replace(sol, objective=qp.objective_of(sol.choice), solver=f"separable/{sol.solver}",
                       solve_time_s=elapsed, info=info)
    return replace(sol, objective=qp.objective_of(sol.choice), status=FEASIBLE, gap=math.nan,
                   lower_bound=math.nan, solver=f"separable/{sol.solver}", solve_time_s=elapsed, info=info)


# ----------------------------------------------------------------------------
# Heuristics on the true objective (grouped form, scaled integer costs)
# ----------------------------------------------------------------------------


def _fold_tied_pairs(qp: QuadraticProblem) -> AllocationProblem:
    """The problem with pairs inside tie groups folded into the loss; other pairs dropped."""
    loss = np.array(qp.problem.loss, copy=True)
    lg = qp.problem.grouped.layer_group
    for (i, j), P in qp.pairs.items():
        if lg[i] == lg[j]:
            loss[i] += np.diag(P)
    p = qp.problem
    return AllocationProblem(loss, p.cost, p.allowed, p.ties, p.names)


def _check_qp(qp: object) -> None:
    if not isinstance(qp, QuadraticProblem):
        raise ProblemError(f"qp: expected a QuadraticProblem, got {type(qp).__name__}")


def _heuristic_start(gqp: _GroupedQP, scaled: ScaledCosts) -> np.ndarray:
    """Lagrangian + greedy on the linear part, then local search on the true objective."""
    relax = relax_budget(gqp.grouped, scaled)
    start = best_repair(gqp.grouped, scaled, relax)
    start = _repair(gqp, scaled.cost, scaled.capacity, start)  # only upgrades here: start fits
    return _local_search(gqp, scaled.cost, scaled.capacity, start)


def _repair(gqp: _GroupedQP, cost: np.ndarray, capacity: int, choice: np.ndarray) -> np.ndarray:
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


def _local_search(gqp: _GroupedQP, cost: np.ndarray, capacity: int, choice: np.ndarray,
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


def _best_pair_move(gqp: _GroupedQP, choice: np.ndarray, delta: np.ndarray, dc: np.ndarray, slack: int,
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
