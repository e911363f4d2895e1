"""Preparation and result building shared by every solver."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from ._grouping import ScaledCosts
from .errors import InfeasibleBudgetError, ProblemError, SolverError
from .problem import (
    FEASIBLE,
    OPTIMAL,
    AllocationProblem,
    Constraint,
    Solution,
    as_capacity,
    relative_gap,
)

__all__ = ["prepare", "reject_extra", "build_solution"]


def reject_extra(extra: Sequence[Constraint], solver: str) -> None:
    """Single-budget solvers must refuse extra constraints rather than ignore them."""
    if extra:
        names = ", ".join(repr(getattr(c, "name", c)) for c in extra)
        raise ProblemError(
            f"extra: {solver} supports only the primary bit budget, got {len(extra)} extra "
            f"constraint(s) ({names}); use solve_ilp / method='ilp' for extra constraints"
        )


def prepare(problem: AllocationProblem, capacity: int) -> tuple[int, ScaledCosts]:
    """Exact capacity plus scaled costs; raise before any solving if the budget is infeasible."""
    if not isinstance(problem, AllocationProblem):
        raise ProblemError(f"problem: expected an AllocationProblem, got {type(problem).__name__}")
    capacity = as_capacity(capacity)
    grouped = problem.grouped
    if capacity < grouped.min_total:
        raise InfeasibleBudgetError(capacity, grouped.min_total, grouped.max_total)
    return capacity, grouped.scaled_costs(capacity)


def build_solution(
    problem: AllocationProblem,
    group_choice: np.ndarray,
    lower_bound: float,
    capacity: int,
    solver: str,
    started: float,
    *,
    optimal_gap: float,
    info: dict | None = None,
    objective_of: Callable[[np.ndarray], float] | None = None,
) -> Solution:
    """Build a Solution, recomputing objective and cost exactly from the choice.

    ``lower_bound`` is clipped to the objective (a float bound computed in a
    different summation order can overshoot by an ulp); the status is
    ``"optimal"`` when the relative gap is at most ``optimal_gap``. A NaN
    ``lower_bound`` means "no valid bound": the gap is NaN and the status
    ``"feasible"``; ``-inf`` gives an infinite gap. ``objective_of`` replaces
    ``problem.loss_of`` (e.g. a quadratic objective, see ``solvers.qp``).
    """
    choice = problem.grouped.expand(group_choice)
    objective = (objective_of or problem.loss_of)(choice)
    cost = problem.cost_of(choice)
    if cost > capacity:  # a bug, never a tolerance issue: all checks are in integers
        raise SolverError(f"{solver}: internal error, solution costs {cost} bits > capacity {capacity}")
    lower_bound = float(lower_bound)
    if math.isnan(lower_bound):
        return Solution(choice, objective, cost, FEASIBLE, math.nan, math.nan, solver,
                        time.perf_counter() - started, capacity, info or {})
    lower_bound = min(lower_bound, objective)
    gap = math.inf if lower_bound == -math.inf else relative_gap(objective, lower_bound)
    status = OPTIMAL if gap <= optimal_gap else FEASIBLE
    if status == OPTIMAL:
        lower_bound, gap = objective, 0.0
    return Solution(choice, objective, cost, status, gap, lower_bound, solver,
                    time.perf_counter() - started, capacity, info or {})
