"""Tie groups collapsed into super-items: the form every solver works on.

Tied layers must choose the same option index, so a tie group behaves exactly
like one layer whose loss and cost are the sums over its members. Collapsing
them up front (instead of adding equality constraints) makes every solver
smaller and removes a whole class of tolerance problems in the ILP.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

__all__ = ["GroupedProblem", "ScaledCosts", "identifiers"]


class ProblemArrays(Protocol):
    """What grouping reads of a problem (``problem.AllocationProblem`` has it all); a
    protocol, so this module needs no import of ``problem`` (which imports it)."""

    loss: np.ndarray  # (L, K)
    cost: np.ndarray  # (L, K)
    mask: np.ndarray  # (L, K)
    ties: tuple[tuple[int, ...], ...]

    @property
    def num_layers(self) -> int: ...

    def layer_name(self, i: int) -> str: ...


@dataclass(frozen=True)
class ScaledCosts:
    """Budget row rewritten as ``sum(cost) <= capacity`` with small integers.

    ``cost = offset_g + unit * cost_scaled`` for every allowed entry, where
    ``offset_g`` is the cheapest option of group g. Subtracting the offsets and
    dividing by the common ``unit`` (a gcd) is exact, keeps the numbers the
    solvers see small, and turns "minimum remaining cost" into zero.
    """

    cost: np.ndarray  # (G, K) int64, 0 where not allowed
    capacity: int  # scaled capacity; may be negative (infeasible)
    offset: int  # sum of per-group minimum costs, in bits
    unit: int  # bits per scaled unit


@dataclass(frozen=True, eq=False)
class GroupedProblem:
    """An allocation problem with every tie group merged into one item.

    Untied layers are groups of one. Groups are ordered by their first layer.
    """

    members: tuple[tuple[int, ...], ...]  # G groups partitioning range(L)
    labels: tuple[str, ...]  # (G,) human-readable labels
    loss: np.ndarray  # (G, K) float64, +inf where not allowed
    cost: np.ndarray  # (G, K) int64, 0 where not allowed
    mask: np.ndarray  # (G, K) bool, allowed options
    layer_group: np.ndarray  # (L,) int64, group of each layer

    @classmethod
    def from_problem(cls, problem: ProblemArrays) -> GroupedProblem:
        members = _partition(problem.num_layers, problem.ties)
        layer_group = np.empty(problem.num_layers, dtype=np.int64)
        for g, group in enumerate(members):
            layer_group[list(group)] = g
        mask = np.stack([problem.mask[group[0]] for group in members])  # (G, K)
        loss = np.stack([problem.loss[list(group)].sum(axis=0) for group in members])
        cost = np.stack([problem.cost[list(group)].sum(axis=0) for group in members])
        loss = np.where(mask, loss, np.inf)
        cost = np.where(mask, cost, 0).astype(np.int64)
        labels = tuple(_group_label(problem, group) for group in members)
        for arr in (loss, cost, mask, layer_group):
            arr.setflags(write=False)
        return cls(members, labels, loss, cost, mask, layer_group)

    @property
    def num_groups(self) -> int:
        return len(self.members)

    @cached_property
    def min_cost(self) -> np.ndarray:  # (G,) int64
        return np.where(self.mask, self.cost, np.iinfo(np.int64).max).min(axis=1)

    @cached_property
    def max_cost(self) -> np.ndarray:  # (G,) int64
        return np.where(self.mask, self.cost, -1).max(axis=1)

    @property
    def min_total(self) -> int:
        return sum(int(c) for c in self.min_cost)

    @property
    def max_total(self) -> int:
        return sum(int(c) for c in self.max_cost)

    def reduce(self, coef: np.ndarray) -> np.ndarray:
        """Sum a per-layer (L, K) coefficient table into per-group (G, K) rows."""
        out = np.zeros((self.num_groups, coef.shape[1]), dtype=coef.dtype)
        np.add.at(out, self.layer_group, coef)
        return np.where(self.mask, out, 0)

    def expand(self, group_choice: np.ndarray) -> np.ndarray:
        """(G,) option per group -> (L,) option per layer."""
        return np.asarray(group_choice, dtype=np.int64)[self.layer_group]

    def group_loss(self, group_choice: np.ndarray) -> float:
        return math.fsum(self.loss[np.arange(self.num_groups), group_choice])

    def scaled_costs(self, capacity: int) -> ScaledCosts:
        offset = self.min_total
        shifted = np.where(self.mask, self.cost - self.min_cost[:, None], 0)
        unit = int(np.gcd.reduce(shifted.ravel())) if shifted.size else 0
        unit = unit or 1
        scaled = shifted // unit
        scaled.setflags(write=False)
        return ScaledCosts(scaled, (int(capacity) - offset) // unit, offset, unit)


def _partition(num_layers: int, ties: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """Tie groups plus singletons, ordered by first member."""
    tied = {i for group in ties for i in group}
    groups = [tuple(group) for group in ties] + [(i,) for i in range(num_layers) if i not in tied]
    return tuple(sorted(groups, key=min))


def _group_label(problem: ProblemArrays, group: tuple[int, ...]) -> str:
    parts = [problem.layer_name(i) for i in group]
    if len(parts) == 1:
        return parts[0]
    if len(parts) > 3:
        parts = parts[:2] + [f"and_{len(parts) - 2}_more"]
    return "tie_" + "_".join(parts)


_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")


def identifiers(raw: list[str], max_len: int = 80) -> list[str]:
    """Solver-safe, unique versions of human-readable names.

    LP file formats reject spaces, dots and operators, and PuLP refuses
    duplicate names; sanitising can create duplicates ("a.b" and "a_b"), so
    collisions get their position appended.
    """
    out: list[str] = []
    seen: set[str] = set()
    for pos, name in enumerate(raw):
        ident = _UNSAFE.sub("_", name).strip("_")[:max_len] or f"item{pos}"
        if ident in seen:
            ident = f"{ident}_{pos}"
        seen.add(ident)
        out.append(ident)
    return out
