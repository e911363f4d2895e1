"""Allocation problems, extra constraints and solutions as validated value objects.

An allocation problem is a multiple-choice knapsack: every layer picks exactly
one option k, paying ``cost[i, k]`` bits and adding ``loss[i, k]`` to the
objective. Costs are exact integer bit counts (totals reach ~1e10), so every
budget check here is done in integers, never in floats.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ._grouping import GroupedProblem
from .errors import ProblemError

__all__ = [
    "AllocationProblem",
    "Constraint",
    "Solution",
    "OPTIMAL",
    "FEASIBLE",
    "SENSES",
    "achievable_range",
    "as_capacity",
    "with_forbidden",
    "with_pinned",
]

OPTIMAL = "optimal"  # proven optimal (gap <= OPTIMAL_GAP)
FEASIBLE = "feasible"  # within budget, optimality not proven; see Solution.gap
OPTIMAL_GAP = 1e-9  # relative gap below which a solution is reported as optimal
SENSES = ("<=", ">=", "==")

# Costs are summed in int64 inside the solvers; stay well clear of overflow.
_MAX_TOTAL_COST = 2**62


# ----------------------------------------------------------------------------
# Extra constraints
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Constraint:
    """An extra linear constraint ``sum_i coef[i, choice[i]] <sense> rhs``.

    Used for secondary budgets (BOPs, latency) and per-group loss caps
    ("attn loss <= eps"). Integer ``coef`` with an integral ``rhs`` is checked
    exactly, like the bit budget; float coefficients are checked with a
    relative tolerance of ``1e-9``. ``name`` is shown in errors and becomes
    the constraint's name in the ILP.
    """

    name: str
    coef: np.ndarray  # (L, K) int64 or float64
    rhs: float
    sense: str = "<="

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ProblemError(f"Constraint.name: must be a non-empty string, got {self.name!r}")
        coef = np.array(self.coef, copy=True)
        where = f"Constraint {self.name!r}"
        if coef.ndim != 2:
            raise ProblemError(f"{where}.coef: must be 2-D (layers, options), got shape {coef.shape}")
        if coef.dtype.kind in "iu":
            coef = _to_int64(coef, f"{where}.coef")
        elif coef.dtype.kind == "f":
            coef = coef.astype(np.float64)
        else:
            raise ProblemError(f"{where}.coef: must be an int or float array, got dtype {coef.dtype}")
        coef.setflags(write=False)
        object.__setattr__(self, "coef", coef)
        if isinstance(self.rhs, bool) or not isinstance(self.rhs, numbers.Real) or not math.isfinite(self.rhs):
            raise ProblemError(f"{where}.rhs: must be a finite number, got {self.rhs!r}")
        if self.sense not in SENSES:
            raise ProblemError(f"{where}.sense: must be one of {SENSES}, got {self.sense!r}")

    @property
    def exact(self) -> bool:
        """True for integer coefficients: the constraint is checked exactly in integers."""
        return self.coef.dtype.kind == "i"

    @property
    def integer_rhs(self) -> int | None:
        """For integer coefficients, the equivalent integer right-hand side.

        ``lhs <= 10.5`` is ``lhs <= 10`` and ``lhs >= 10.5`` is ``lhs >= 11``;
        ``None`` for float coefficients or an unreachable fractional equality.
        """
        if not self.exact:
            return None
        if self.sense == "<=":
            return math.floor(self.rhs)
        if self.sense == ">=":
            return math.ceil(self.rhs)
        return int(self.rhs) if float(self.rhs).is_integer() else None

    def value(self, choice: np.ndarray) -> int | float:
        """Left-hand side for a (L,) choice: a Python int when exact."""
        terms = self.coef[np.arange(len(choice)), choice]
        if self.coef.dtype.kind == "i":
            return sum(int(t) for t in terms)
        return math.fsum(terms)

    def violation(self, choice: np.ndarray) -> float:
        """How far a choice is outside the constraint (0.0 when satisfied).

        Float constraints get a relative slack of 1e-9 of their magnitude, so
        that sums computed in a different order do not flip the verdict.
        """
        lhs = self.value(choice)
        rhs = self.integer_rhs
        if rhs is not None:
            over = {"<=": lhs - rhs, ">=": rhs - lhs, "==": abs(lhs - rhs)}[self.sense]
            return float(max(over, 0))
        if self.exact:  # fractional equality with integer coefficients
            return abs(lhs - float(self.rhs))
        terms = self.coef[np.arange(len(choice)), choice]
        tol = 1e-9 * (abs(float(self.rhs)) + float(np.abs(terms).sum()))
        diff = float(lhs) - float(self.rhs)
        over = {"<=": diff, ">=": -diff, "==": abs(diff)}[self.sense]
        return max(over - tol, 0.0)

    def check_shape(self, shape: tuple[int, int]) -> None:
        if self.coef.shape != shape:
            raise ProblemError(
                f"Constraint {self.name!r}.coef: shape {self.coef.shape} does not match "
                f"the problem's (layers, options) = {shape}"
            )


# ----------------------------------------------------------------------------
# The problem
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AllocationProblem:
    """One option per layer, minimising total loss under bit budgets.

    Entries where ``allowed`` is False are ignored and may hold anything (NaN
    loss, -1 cost): that is how ragged option lists, pinned layers and
    forbidden options are expressed. Tied layers (``ties``) must pick the same
    option index and must therefore have identical ``allowed`` rows.
    """

    loss: np.ndarray  # (L, K) float64, expected loss increase of layer i with option k
    cost: np.ndarray  # (L, K) int64, exact storage cost in bits
    allowed: np.ndarray | None = None  # (L, K) bool, None = everything allowed
    ties: tuple[tuple[int, ...], ...] = ()
    names: tuple[str, ...] | None = None  # (L,) layer names for messages

    def __post_init__(self) -> None:
        loss = _float_matrix(self.loss)
        shape = loss.shape
        cost = _cost_matrix(self.cost, shape)
        allowed = _allowed_matrix(self.allowed, shape)
        mask = np.ones(shape, dtype=bool) if allowed is None else allowed
        names = _names(self.names, shape[0])
        object.__setattr__(self, "names", names)
        ties = _ties(self.ties, shape[0], self.layer_name)
        object.__setattr__(self, "ties", ties)

        for i in np.flatnonzero(~mask.any(axis=1)):
            raise ProblemError(f"AllocationProblem.allowed: {self.layer_label(i)} has no allowed option")
        bad = mask & ~np.isfinite(loss)
        if bad.any():
            i, k = map(int, np.argwhere(bad)[0])
            raise ProblemError(
                f"AllocationProblem.loss: must be finite for allowed options; "
                f"{self.layer_label(i)} option {k} is {loss[i, k]}"
            )
        bad = mask & (cost < 0)
        if bad.any():
            i, k = map(int, np.argwhere(bad)[0])
            raise ProblemError(
                f"AllocationProblem.cost: bit costs must be non-negative; "
                f"{self.layer_label(i)} option {k} is {cost[i, k]}"
            )
        largest = sum(int(c) for c in np.where(mask, cost, 0).max(axis=1))
        if largest >= _MAX_TOTAL_COST:
            raise ProblemError(f"AllocationProblem.cost: total cost {largest} bits overflows int64 arithmetic")
        _check_tied_allowed(ties, mask, self.layer_label)

        for arr in (loss, cost, mask):
            arr.setflags(write=False)
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "cost", cost)
        object.__setattr__(self, "allowed", allowed)
        object.__setattr__(self, "_mask", mask)

    # -- shape and naming ----------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.loss.shape[0]

    @property
    def num_options(self) -> int:
        return self.loss.shape[1]

    @property
    def mask(self) -> np.ndarray:
        """(L, K) bool: allowed options, with ``None`` expanded to all-True."""
        return self._mask  # type: ignore[attr-defined]

    def layer_name(self, i: int) -> str:
        return self.names[i] if self.names is not None else str(i)

    def layer_label(self, i: int) -> str:
        """'layer 3 (model.layers.0.q_proj)' for messages."""
        i = int(i)
        return f"layer {i} ({self.names[i]})" if self.names is not None else f"layer {i}"

    def layer_index(self, key: int | str) -> int:
        """Index of a layer given as an index or (when ``names`` is set) a name."""
        if isinstance(key, str):
            if self.names is None or key not in self.names:
                raise ProblemError(f"layer: no layer named {key!r}")
            return self.names.index(key)
        if isinstance(key, bool) or not isinstance(key, numbers.Integral):
            raise ProblemError(f"layer: must be an index or a name, got {key!r}")
        if not 0 <= int(key) < self.num_layers:
            raise ProblemError(f"layer: index {key} out of range [0, {self.num_layers})")
        return int(key)

    @cached_property
    def grouped(self) -> GroupedProblem:
        """The problem with tie groups collapsed into super-items."""
        return GroupedProblem.from_problem(self)

    # -- evaluating choices --------------------------------------------------

    def check_choice(self, choice: Sequence[int] | np.ndarray) -> np.ndarray:
        """Validate a choice (allowed options, ties) and return it as (L,) int64."""
        arr = np.asarray(choice)
        if arr.shape != (self.num_layers,) or arr.dtype.kind not in "iu":
            raise ProblemError(f"choice: must be {self.num_layers} integer option indices, got {arr!r}")
        arr = arr.astype(np.int64)
        if ((arr < 0) | (arr >= self.num_options)).any():
            raise ProblemError(f"choice: option indices must be in [0, {self.num_options})")
        bad = np.flatnonzero(~self.mask[np.arange(self.num_layers), arr])
        if bad.size:
            i = int(bad[0])
            raise ProblemError(f"choice: option {arr[i]} is not allowed for {self.layer_label(i)}")
        for group in self.ties:
            if len(set(arr[list(group)].tolist())) > 1:
                raise ProblemError(f"choice: tied layers {list(group)} chose different options")
        return arr

    def cost_of(self, choice: Sequence[int] | np.ndarray) -> int:
        """Exact total cost in bits, as a Python int."""
        arr = self.check_choice(choice)
        return sum(int(c) for c in self.cost[np.arange(self.num_layers), arr])

    def loss_of(self, choice: Sequence[int] | np.ndarray) -> float:
        """Total loss, summed with ``math.fsum`` so it does not depend on order."""
        arr = self.check_choice(choice)
        return math.fsum(self.loss[np.arange(self.num_layers), arr])


# ----------------------------------------------------------------------------
# Solutions
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Solution:
    """A chosen option per layer with its exact cost and proven quality.

    ``objective`` and ``cost`` are recomputed from ``choice`` (fsum and exact
    integers), never taken from a solver. ``lower_bound`` is a proven lower
    bound on the optimum; ``gap = (objective - lower_bound) / |objective|``
    (0.0 when optimal). ``status`` is ``"optimal"`` or ``"feasible"`` (a time
    limit or a gap tolerance stopped the search, or a heuristic was used).
    """

    choice: np.ndarray  # (L,) int64
    objective: float
    cost: int
    status: str
    gap: float
    lower_bound: float
    solver: str
    solve_time_s: float
    capacity: int | None = None  # the primary budget this solves, in bits
    info: Mapping[str, object] = field(default_factory=dict)  # solver-specific details

    def __post_init__(self) -> None:
        choice = np.array(self.choice, dtype=np.int64, copy=True)
        choice.setflags(write=False)
        object.__setattr__(self, "choice", choice)
        if self.status not in (OPTIMAL, FEASIBLE):
            raise ProblemError(f"Solution.status: must be {OPTIMAL!r} or {FEASIBLE!r}, got {self.status!r}")

    @property
    def is_optimal(self) -> bool:
        return self.status == OPTIMAL


def relative_gap(objective: float, lower_bound: float) -> float:
    """Relative optimality gap, 0.0 when the bound meets the objective."""
    diff = objective - lower_bound
    if not diff > 0:
        return 0.0
    return diff / max(abs(objective), abs(lower_bound), 1e-300)


# ----------------------------------------------------------------------------
# Editing problems and budgets
# ----------------------------------------------------------------------------


def with_pinned(problem: AllocationProblem, pins: Mapping[int | str, int]) -> AllocationProblem:
    """A copy of ``problem`` where each given layer can only use the given option.

    Keys are layer indices or names. Pinning one member of a tie group pins
    the whole group (tied layers must share their allowed set).
    """
    mask = problem.mask.copy()
    pinned: dict[int, int] = {}
    for key, option in pins.items():
        i = problem.layer_index(key)
        k = _option_index(problem, option)
        if not problem.mask[i, k]:
            raise ProblemError(f"pins: option {k} of {problem.layer_label(i)} is not allowed, so it cannot be pinned")
        for j in _tie_members(problem, i):
            if pinned.get(j, k) != k:
                raise ProblemError(
                    f"pins: {problem.layer_label(j)} is pinned to both option {pinned[j]} and option {k} "
                    f"(tied layers share one option)"
                )
            pinned[j] = k
    for j, k in pinned.items():
        mask[j] = False
        mask[j, k] = True
    return _with_mask(problem, mask)


def with_forbidden(problem: AllocationProblem, forbidden: Mapping[int | str, Iterable[int]]) -> AllocationProblem:
    """A copy of ``problem`` where the given options are not allowed.

    Forbidding an option of one tied layer forbids it for the whole group.
    Forbidding every option of a layer raises :class:`ProblemError`.
    """
    mask = problem.mask.copy()
    for key, options in forbidden.items():
        i = problem.layer_index(key)
        ks = [_option_index(problem, k) for k in options]
        for j in _tie_members(problem, i):
            mask[j, ks] = False
    return _with_mask(problem, mask)


def achievable_range(problem: AllocationProblem) -> tuple[int, int]:
    """(min_cost, max_cost) in bits over all allowed, tie-respecting choices.

    Budgets below ``min_cost`` are infeasible; budgets above ``max_cost`` buy
    nothing more.
    """
    grouped = problem.grouped
    return grouped.min_total, grouped.max_total


def as_capacity(capacity: numbers.Real, name: str = "capacity") -> int:
    """A budget in bits as an exact Python int.

    Integral types pass through; a real number is floored, which is exact for
    integer costs (``cost <= c`` iff ``cost <= floor(c)``).
    """
    if isinstance(capacity, bool) or not isinstance(capacity, numbers.Real):
        raise ProblemError(f"{name}: must be a number of bits, got {capacity!r}")
    if isinstance(capacity, numbers.Integral):
        return int(capacity)
    if not math.isfinite(float(capacity)):
        raise ProblemError(f"{name}: must be finite, got {capacity!r}")
    return math.floor(capacity)


# ----------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------


def _float_matrix(value: object) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise ProblemError(f"AllocationProblem.loss: must be a numeric (layers, options) array ({exc})") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ProblemError(f"AllocationProblem.loss: must have shape (layers >= 1, options >= 1), got {arr.shape}")
    return arr


def _to_int64(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ProblemError(f"{where}: values overflow int64")
    return arr.astype(np.int64)


def _cost_matrix(value: object, shape: tuple[int, int]) -> np.ndarray:
    arr = np.array(value, copy=True)
    if arr.dtype.kind not in "iu":
        raise ProblemError(
            f"AllocationProblem.cost: must be an integer array of exact bit counts, got dtype {arr.dtype} "
            f"(convert with np.asarray(cost, dtype=np.int64) after rounding)"
        )
    if arr.shape != shape:
        raise ProblemError(f"AllocationProblem.cost: shape {arr.shape} does not match loss shape {shape}")
    return _to_int64(arr, "AllocationProblem.cost")


def _allowed_matrix(value: object, shape: tuple[int, int]) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.array(value, copy=True)
    if arr.shape != shape:
        raise ProblemError(f"AllocationProblem.allowed: shape {arr.shape} does not match loss shape {shape}")
    if arr.dtype != bool:
        if arr.dtype.kind not in "iu" or not np.isin(arr, (0, 1)).all():
            raise ProblemError(f"AllocationProblem.allowed: must be a boolean array, got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def _names(value: object, num_layers: int) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise ProblemError("AllocationProblem.names: must be a sequence of strings, not one string")
    names = tuple(value)  # type: ignore[arg-type]
    if len(names) != num_layers:
        raise ProblemError(f"AllocationProblem.names: expected {num_layers} names, got {len(names)}")
    for n in names:
        if not isinstance(n, str) or not n:
            raise ProblemError(f"AllocationProblem.names: every name must be a non-empty string, got {n!r}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ProblemError(f"AllocationProblem.names: duplicate layer name {dup!r}")
    return names


def _ties(value: object, num_layers: int, name_of) -> tuple[tuple[int, ...], ...]:
    try:
        groups = [tuple(group) for group in value]  # type: ignore[union-attr]
    except TypeError:
        raise ProblemError(f"AllocationProblem.ties: must be a sequence of layer-index groups, got {value!r}") from None
    seen: dict[int, int] = {}
    out = []
    for g, group in enumerate(groups):
        if not group:
            raise ProblemError(f"AllocationProblem.ties: group {g} is empty")
        members = []
        for i in group:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= int(i) < num_layers:
                raise ProblemError(
                    f"AllocationProblem.ties: group {g} has {i!r}, expected layer indices in [0, {num_layers})"
                )
            i = int(i)
            if i in seen:
                raise ProblemError(
                    f"AllocationProblem.ties: layer {i} ({name_of(i)}) appears in tie groups {seen[i]} and {g}; "
                    f"groups must be disjoint (merge them)"
                )
            seen[i] = g
            members.append(i)
        out.append(tuple(members))
    return tuple(out)


def _check_tied_allowed(ties, mask: np.ndarray, label_of) -> None:
    for group in ties:
        first = group[0]
        for j in group[1:]:
            if not np.array_equal(mask[first], mask[j]):
                raise ProblemError(
                    f"AllocationProblem.allowed: tied layers must allow the same options, but "
                    f"{label_of(first)} allows {np.flatnonzero(mask[first]).tolist()} and "
                    f"{label_of(j)} allows {np.flatnonzero(mask[j]).tolist()}"
                )


def _option_index(problem: AllocationProblem, option: object) -> int:
    if isinstance(option, bool) or not isinstance(option, numbers.Integral):
        raise ProblemError(f"option: must be an integer index, got {option!r}")
    if not 0 <= int(option) < problem.num_options:
        raise ProblemError(f"option: index {option} out of range [0, {problem.num_options})")
    return int(option)


def _tie_members(problem: AllocationProblem, i: int) -> tuple[int, ...]:
    return problem.grouped.members[int(problem.grouped.layer_group[i])]


def _with_mask(problem: AllocationProblem, mask: np.ndarray) -> AllocationProblem:
    return AllocationProblem(problem.loss, problem.cost, mask, problem.ties, problem.names)
