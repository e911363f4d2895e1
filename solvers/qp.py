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

The problem type lives in :mod:`solvers.qp_problem`, the relaxation in
:mod:`solvers.qp_relax` and the shared heuristics in :mod:`solvers.qp_search`; every
public name is importable from here.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

from ._common import build_solution, prepare
from .ilp import solve_ilp, solve_within_budgets
from .ilp_backends import check_options
from .ilp_model import Model
from .problem import FEASIBLE, OPTIMAL_GAP, Solution
from .qp_problem import GroupedQP, PairKey, QuadraticProblem, check_qp
from .qp_relax import CONVEXIFY, solve_qp_relaxation
from .qp_search import heuristic_start

__all__ = [
    "QuadraticProblem",
    "GroupedQP",
    "PairKey",
    "solve_qp_milp",
    "solve_qp_relaxation",
    "solve_separable",
    "CONVEXIFY",
]


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
    check_qp(qp)
    check_options(backend, time_limit_s, mip_gap)
    capacity, scaled = prepare(qp.problem, capacity)
    gqp = qp.grouped
    start = heuristic_start(gqp, scaled)
    model = Model(gqp.grouped, scaled.cost, scaled.capacity, (), pairs=gqp.pairs)
    deadline = None if time_limit_s is None else started + time_limit_s
    result, first_bound, tightened = solve_within_budgets(model, backend, deadline, mip_gap, start, capacity)

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



def solve_separable(qp: QuadraticProblem, capacity: int, **options) -> Solution:
    """The allocation ILP on the diagonal alone, ignoring the pairs, scored with the true objective.

    ``options`` go to :func:`~solvers.ilp.solve_ilp`. ``objective`` is the true quadratic
    objective of the chosen allocation; ``info["separable_objective"]`` the diagonal-only
    objective the ILP minimised. With nonzero pair terms the ILP's bound says nothing
    about the quadratic optimum, so ``lower_bound`` and ``gap`` are NaN and the status
    ``"feasible"``; without them the ILP's result is returned as is.
    """
    started = time.perf_counter()
    check_qp(qp)
    sol = solve_ilp(qp.problem, capacity, **options)
    info = {**sol.info, "separable_objective": sol.objective, "separable_status": sol.status}
    elapsed = time.perf_counter() - started
    if qp.is_separable:
        return replace(sol, objective=qp.objective_of(sol.choice), solver=f"separable/{sol.solver}",
                       solve_time_s=elapsed, info=info)
    return replace(sol, objective=qp.objective_of(sol.choice), status=FEASIBLE, gap=math.nan,
                   lower_bound=math.nan, solver=f"separable/{sol.solver}", solve_time_s=elapsed, info=info)
