"""Multiple-choice knapsack as an integer linear programme, through PuLP.

Formulation (tie groups already collapsed into one item each, see
``_grouping``): one binary ``x_<group>_<k>`` per allowed option, the
constraints ``one_option_<group>`` (exactly one option per group),
``budget_bits`` (exact integer bit costs) and one ``extra_<name>`` row per
extra constraint; minimise total loss.

MIP solvers accept ``x = 0.9999995`` as integral, so with costs of 1e7 bits a
rounded solution can overshoot the budget by a few bits. Costs are therefore
rewritten exactly as small integers (``ScaledCosts``: cheapest option
subtracted, divided by the gcd), and after every solve the rounded choice is
re-checked in exact integers; on overshoot the budget row is tightened by the
overshoot and the model re-solved. A returned solution never exceeds a budget.

The model is built in :mod:`solvers.ilp_model` and solved by a backend of
:mod:`solvers.ilp_backends`; this module holds the solve loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from ._common import build_solution, prepare
from .dp import best_repair, relax_budget
from .errors import SolverError
from .ilp_backends import BACKENDS, ILP_BACKENDS, check_options, ilp_backends, run_model
from .ilp_model import Model, Objective, Result, build_model, check_extra_reachable, extra_rows, raise_infeasible
from .problem import OPTIMAL_GAP, AllocationProblem, Constraint, Solution

__all__ = ["solve_ilp", "build_ilp", "ilp_backends", "solve_within_budgets", "ILP_BACKENDS", "BACKENDS"]

_MAX_TIGHTENINGS = 5


def solve_ilp(
    problem: AllocationProblem,
    capacity: int,
    *,
    backend: str = "highs",
    time_limit_s: float | None = None,
    mip_gap: float = 0.0,
    extra: Sequence[Constraint] = (),
) -> Solution:
    """Solve to proven optimality (or to ``mip_gap``) with HiGHS or CBC.

    ``time_limit_s`` bounds the whole call; when it stops the search the best
    solution found is returned with status ``"feasible"`` and its proven gap.
    The search is warm-started from the Lagrangian heuristic, so a time limit
    still returns a good solution whenever that heuristic satisfies the extra
    constraints. Raises :class:`InfeasibleBudgetError` before solving when the
    budget is below the cheapest allocation, :class:`InfeasibleError` when the
    extra constraints cannot be met, and :class:`SolverError` on solver failure.
    """
    started = time.perf_counter()
    check_options(backend, time_limit_s, mip_gap)
    capacity, scaled = prepare(problem, capacity)
    grouped = problem.grouped
    rows = extra_rows(problem, tuple(extra))
    check_extra_reachable(rows)
    relax = relax_budget(grouped, scaled)  # bound of the budget-only relaxation: valid with extra rows too
    start = best_repair(grouped, scaled, relax)
    if any(row.violation(start) > 0 for row in rows):
        start = None

    model = Model(grouped, scaled.cost, scaled.capacity, rows)
    deadline = None if time_limit_s is None else started + time_limit_s
    result, first_bound, tightened = solve_within_budgets(model, backend, deadline, mip_gap, start, capacity)

    proven = result.status == "optimal" and mip_gap == 0.0 and not tightened
    bounds = [relax.lower_bound] + ([first_bound] if first_bound is not None else [])
    objective_bound = math.inf if proven else max(bounds)
    info = {"tightened": tightened, "backend_status": result.message}
    return build_solution(problem, result.choice, objective_bound, capacity, f"ilp/{backend}", started,
                          optimal_gap=OPTIMAL_GAP, info=info)


def solve_within_budgets(model: Model, backend: str, deadline: float | None, mip_gap: float,
                          start: np.ndarray | None, capacity: int) -> tuple[Result, float | None, bool]:
    """Solve, re-check the rounded choice exactly, tighten and re-solve on overshoot.

    Returns the accepted result, the lower bound of the first (untightened)
    solve — later solves bound a stricter problem — and whether tightening
    happened. Falls back to the warm start (feasible for the original budgets)
    when the solver stops without a solution.
    """
    objective = Objective.for_model(model, start)
    fallback = start
    first_bound, tightened = None, False
    for _ in range(_MAX_TIGHTENINGS + 1):
        result = run_model(model, backend, deadline, mip_gap, start, objective)
        if result.status == "infeasible":
            if not tightened or fallback is None:
                raise_infeasible(model.rows, tightened, capacity)
            result = Result("feasible", fallback, None, "tightened model infeasible; returning the warm start")
        if result.choice is None:
            if fallback is None:
                raise SolverError(f"ilp/{backend}: {result.message}; raise time_limit_s")
            result = Result("feasible", fallback, None, f"{result.message}; returning the warm start")
        if first_bound is None:
            first_bound = result.bound
        tighter = model.overshoot(result.choice)
        if tighter is None:
            return _no_worse_than(result, fallback, model), first_bound, tightened
        model, tightened = tighter, True
        if start is not None and model.cost[np.arange(len(start)), start].sum() > model.capacity:
            start = None
    if fallback is not None:
        return Result("feasible", fallback, None, "rounding kept overshooting; returning the warm start"), \
            first_bound, True
    raise SolverError(f"ilp/{backend}: rounded solutions kept violating a budget after {_MAX_TIGHTENINGS} tightenings")


def _no_worse_than(result: Result, fallback: np.ndarray | None, model: Model) -> Result:
    """Guard against solver bugs: never return worse than the (feasible) warm start."""
    if fallback is None:
        return result
    found, known = model.value(result.choice), model.value(fallback)
    if found - known <= 1e-12 * max(abs(found), abs(known)):
        return result
    return Result("feasible", fallback, None, f"{result.message}; the solver's answer was worse than the warm start")


def build_ilp(problem: AllocationProblem, capacity: int, *, extra: Sequence[Constraint] = ()):
    """The PuLP model :func:`solve_ilp` solves first, for inspection or export.

    E.g. ``build_ilp(p, cap).writeLP("alloc.lp")``. Variables are
    ``x_<group>_<option>``; constraints ``one_option_<group>``,
    ``budget_bits`` and ``extra_<name>``. Costs are in scaled units (see
    ``ScaledCosts``) and the objective is shifted and scaled (see ``Objective``).
    """
    import pulp

    capacity, scaled = prepare(problem, capacity)
    rows = extra_rows(problem, tuple(extra))
    model = Model(problem.grouped, scaled.cost, scaled.capacity, rows)
    prob, _, _ = build_model(model, pulp, None, Objective.for_problem(problem.grouped, None))
    return prob
