"""Exceptions raised by :mod:`solvers`.

User mistakes (a malformed problem, an impossible budget) are ``ValueError``
subclasses so that front ends can turn them into a one-line message and exit
code 2; failures of the optimisation machinery itself are ``RuntimeError``.
"""

from __future__ import annotations
from .. import BitallocError

__all__ = [
    "ProblemError",
    "InfeasibleError",
    "InfeasibleBudgetError",
    "SolverError",
]


class ProblemError(BitallocError, ValueError):
    """An allocation problem (or an argument describing one) is malformed.

    The message always starts with the offending field, e.g.
    ``"AllocationProblem.cost: ..."`` or ``"capacity: ..."``.
    """


class InfeasibleError(BitallocError, ValueError):
    """No choice of options satisfies every constraint."""


class InfeasibleBudgetError(InfeasibleError):
    """The primary bit budget is below the cheapest achievable allocation.

    A budget *above* the most expensive allocation is never an error (the
    solver simply picks the lowest-loss options), but ``max_achievable`` is
    still reported so that callers can tell users the useful range.
    """

    def __init__(self, budget: int, min_achievable: int, max_achievable: int) -> None:
        self.budget = int(budget)
        self.min_achievable = int(min_achievable)
        self.max_achievable = int(max_achievable)
        super().__init__(
            f"budget of {self.budget} bits is below the smallest achievable "
            f"{self.min_achievable} bits (largest useful: {self.max_achievable} bits)"
        )

    def __reduce__(self):  # keep the attributes when pickled (e.g. across Ray workers)
        return (type(self), (self.budget, self.min_achievable, self.max_achievable))


class SolverError(BitallocError, RuntimeError):
    """A solver failed, ran out of time without a solution, or hit a size limit."""
