"""Budget sweeps: one problem, many capacities, a loss-versus-bits frontier."""

from __future__ import annotations

from collections.abc import Sequence

from .dispatch import solve
from .errors import InfeasibleBudgetError, ProblemError
from .problem import AllocationProblem, Constraint, Solution, achievable_range, as_capacity

__all__ = ["sweep", "pareto_frontier", "frontier_capacities"]


def sweep(
    problem: AllocationProblem,
    capacities: Sequence[int],
    method: str = "auto",
    *,
    skip_infeasible: bool = False,
    extra: Sequence[Constraint] = (),
    **options,
) -> list[Solution]:
    """Solve the same problem at every capacity, in the order given.

    Capacities below the smallest achievable cost raise
    :class:`InfeasibleBudgetError` (for the smallest such capacity, with the
    achievable range) before anything is solved; with ``skip_infeasible=True``
    they are left out instead, so the result can be shorter than
    ``capacities`` — each Solution carries its ``capacity``.
    """
    caps = [as_capacity(c, f"capacities[{i}]") for i, c in enumerate(capacities)]
    low, high = achievable_range(problem)
    too_small = [c for c in caps if c < low]
    if too_small and not skip_infeasible:
        raise InfeasibleBudgetError(min(too_small), low, high)
    return [solve(problem, c, method, extra=extra, **options) for c in caps if c >= low]


def frontier_capacities(problem: AllocationProblem, n_points: int) -> list[int]:
    """``n_points`` evenly spaced integer capacities from the min to the max achievable cost.

    Exact integer arithmetic (no float linspace) so both ends are hit exactly;
    duplicates (tiny ranges) are removed.
    """
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 1:
        raise ProblemError(f"n_points: must be a positive integer, got {n_points!r}")
    low, high = achievable_range(problem)
    if n_points == 1:
        return [high]
    caps = [low + (high - low) * i // (n_points - 1) for i in range(n_points)]
    return sorted(set(caps))


def pareto_frontier(
    problem: AllocationProblem,
    n_points: int = 20,
    method: str = "auto",
    *,
    extra: Sequence[Constraint] = (),
    **options,
) -> list[Solution]:
    """Solutions at evenly spaced capacities between the min and max achievable cost."""
    return sweep(problem, frontier_capacities(problem, n_points), method, extra=extra, **options)
