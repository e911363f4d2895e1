"""One entry point that picks a solver by name."""

from __future__ import annotations

from collections.abc import Sequence

from .dp import solve_dp, solve_lagrangian
from .errors import ProblemError, SolverError
from .ilp import ilp_backends, solve_ilp
from .problem import AllocationProblem, Constraint, Solution

__all__ = ["solve", "METHODS", "SOLVER_METHODS"]

# name -> solver(problem, capacity, extra=..., **options); "auto" picks one of them
SOLVER_METHODS = {"ilp": solve_ilp, "dp": solve_dp, "lagrangian": solve_lagrangian}
METHODS = ("auto", *SOLVER_METHODS)
_ILP_ONLY_OPTIONS = ("backend", "time_limit_s", "mip_gap")


def solve(
    problem: AllocationProblem,
    capacity: int,
    method: str = "auto",
    *,
    extra: Sequence[Constraint] = (),
    **options,
) -> Solution:
    """Solve ``problem`` under ``capacity`` bits with the named method.

    ``"auto"`` uses the ILP with HiGHS when PuLP and highspy import, and
    otherwise the exact DP (dropping ILP-only options such as
    ``time_limit_s``; extra constraints then raise :class:`SolverError`, since
    only the ILP supports them). ``options`` go to the chosen solver:
    :func:`solve_ilp`, :func:`solve_dp` or :func:`solve_lagrangian`.
    """
    if method == "auto":
        if "highs" in ilp_backends():
            return solve_ilp(problem, capacity, extra=extra, **options)
        if extra:
            raise SolverError("extra constraints need the ILP, but PuLP with highspy is not installed")
        options = {k: v for k, v in options.items() if k not in _ILP_ONLY_OPTIONS}
        return solve_dp(problem, capacity, **options)
    if method not in SOLVER_METHODS:
        raise ProblemError(f"method: must be one of {METHODS}, got {method!r}")
    return SOLVER_METHODS[method](problem, capacity, extra=extra, **options)
