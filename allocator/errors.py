"""The allocator's solve-time errors, in a module of their own so that ``solve`` and
``policy`` (which ``solve`` uses) can both raise them without importing each other."""

from __future__ import annotations

from .. import BitallocError

__all__ = ["AllocationError", "InfeasibleBudget"]


class AllocationError(BitallocError, ValueError):
    """A solve request does not fit the profile (pattern matching nothing, unknown scheme, ...)."""


class InfeasibleBudget(AllocationError):
    """The budget is below the smallest achievable size; the message gives the achievable range."""

    def __init__(self, msg: str, min_bpw: float, max_bpw: float):
        super().__init__(msg)
        self.min_bpw, self.max_bpw = min_bpw, max_bpw
