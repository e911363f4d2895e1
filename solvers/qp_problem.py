"""The quadratic allocation problem: an :class:`~solvers.problem.AllocationProblem` plus
pairwise terms between layers, and its form over tie groups (:class:`GroupedQP`) that the
solvers of :mod:`solvers.qp`, :mod:`solvers.qp_relax` and :mod:`solvers.qp_search` work on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType

import numpy as np

from ._grouping import GroupedProblem
from .errors import ProblemError
from .problem import AllocationProblem

__all__ = ["QuadraticProblem", "GroupedQP", "PairKey", "check_qp", "fold_tied_pairs"]

PairKey = tuple[int, int]


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
    def grouped(self) -> GroupedQP:
        """Tie groups collapsed; pairs summed per group pair; all-zero pairs dropped."""
        return GroupedQP.from_problem(self)

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
class GroupedQP:
    """A QuadraticProblem over tie groups.

    ``grouped.loss`` is the linear part per group (the members' losses plus the diagonal
    of pairs inside the group), +inf where not allowed; ``pairs`` holds (g, h, P) with
    g < h and P (K, K), 0 where not allowed, only when P has a nonzero entry.
    """

    grouped: GroupedProblem
    pairs: tuple[tuple[int, int, np.ndarray], ...]

    @classmethod
    def from_problem(cls, qp: QuadraticProblem) -> GroupedQP:
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



def check_qp(qp: object) -> None:
    if not isinstance(qp, QuadraticProblem):
        raise ProblemError(f"qp: expected a QuadraticProblem, got {type(qp).__name__}")



def fold_tied_pairs(qp: QuadraticProblem) -> AllocationProblem:
    """The problem with pairs inside tie groups folded into the loss; other pairs dropped."""
    loss = np.array(qp.problem.loss, copy=True)
    lg = qp.problem.grouped.layer_group
    for (i, j), P in qp.pairs.items():
        if lg[i] == lg[j]:
            loss[i] += np.diag(P)
    p = qp.problem
    return AllocationProblem(loss, p.cost, p.allowed, p.ties, p.names)
