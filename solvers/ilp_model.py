"""The ILP model of a multiple-choice knapsack: extra-constraint rows, the model with its
exact overshoot check, the scaled objective, and the PuLP problem built from them.

Solving it is :mod:`solvers.ilp_backends`; the solve loop (re-check, tighten, re-solve) is
:mod:`solvers.ilp`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ._grouping import GroupedProblem, identifiers
from .errors import InfeasibleError, ProblemError, SolverError
from .problem import AllocationProblem, Constraint

__all__ = ["Row", "extra_rows", "check_extra_reachable", "raise_infeasible", "Model", "Result", "Objective",
           "build_model", "start_values", "read_choice"]


@dataclass(frozen=True)
class Row:
    """One extra constraint over groups: ``sum coef[g, choice[g]] <sense> rhs``."""

    name: str
    ident: str  # solver-safe name
    coef: np.ndarray  # (G, K) int64 or float64, 0 where not allowed
    rhs: float  # an int when exact
    sense: str
    exact: bool  # integer coefficients and rhs: kept unscaled, checked exactly
    low: float  # smallest achievable left-hand side
    high: float  # largest achievable left-hand side
    constraint: Constraint  # the per-layer original, for exact checks
    layer_group: np.ndarray  # (L,) group of each layer

    def violation(self, group_choice: np.ndarray) -> float:
        """Violation of the original per-layer constraint (exact when integer)."""
        return self.constraint.violation(np.asarray(group_choice)[self.layer_group])


def extra_rows(problem: AllocationProblem, extra: tuple[Constraint, ...]) -> tuple[Row, ...]:
    names = []
    for c in extra:
        if not isinstance(c, Constraint):
            raise ProblemError(f"extra: expected Constraint objects, got {type(c).__name__}")
        c.check_shape(problem.loss.shape)
        names.append(c.name)
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ProblemError(f"extra: constraint names must be unique, got duplicates {sorted(dup)}")
    grouped = problem.grouped
    rows = []
    for c, ident in zip(extra, identifiers(names)):
        if not np.isfinite(c.coef[problem.mask]).all():
            raise ProblemError(f"Constraint {c.name!r}.coef: must be finite for allowed options")
        coef = grouped.reduce(np.where(problem.mask, c.coef, 0).astype(c.coef.dtype))  # (G, K)
        low = float(np.where(grouped.mask, coef, np.inf).min(axis=1).sum())
        high = float(np.where(grouped.mask, coef, -np.inf).max(axis=1).sum())
        exact = c.integer_rhs is not None
        rhs = c.integer_rhs if exact else float(c.rhs)
        rows.append(Row(c.name, ident, coef, rhs, c.sense, exact, low, high, c, grouped.layer_group))
    return tuple(rows)


def check_extra_reachable(rows: tuple[Row, ...]) -> None:
    """Fail early, with a useful message, on an extra constraint that no choice meets on its own."""
    for row in rows:
        lo, hi, rhs = row.low, row.high, row.rhs
        if (row.sense == "<=" and lo > rhs) or (row.sense == ">=" and hi < rhs) or (
            row.sense == "==" and not lo <= rhs <= hi
        ):
            raise InfeasibleError(
                f"constraint {row.name!r} ({row.sense} {rhs:g}) cannot be met: over the allowed options "
                f"its value ranges over [{lo:g}, {hi:g}]"
            )


def raise_infeasible(rows: tuple[Row, ...], tightened: bool, capacity: int) -> None:
    if not rows:
        raise SolverError(
            f"ilp: solver reported the budget of {capacity} bits infeasible"
            + (" after tightening for rounding" if tightened else "")
        )
    names = ", ".join(repr(r.name) for r in rows)
    raise InfeasibleError(
        f"no allocation meets the budget of {capacity} bits together with the extra constraints ({names})"
    )


@dataclass(frozen=True)
class Model:
    """Everything needed to build the MIP; ``overshoot`` returns a tightened copy."""

    grouped: GroupedProblem
    cost: np.ndarray  # (G, K) int64 scaled bit costs
    capacity: int  # scaled capacity (possibly tightened)
    rows: tuple[Row, ...]
    rhs: tuple[float, ...] = ()  # per extra row (possibly tightened); defaults to row.rhs
    original_capacity: int | None = None
    # Pairwise terms of a quadratic objective (solvers.qp): (g, h, P) with g < h and
    # P (K, K) float, 0 where an option is not allowed; adds P[choice[g], choice[h]].
    pairs: tuple[tuple[int, int, np.ndarray], ...] = ()

    def __post_init__(self) -> None:
        if not self.rhs:
            object.__setattr__(self, "rhs", tuple(r.rhs for r in self.rows))
        if self.original_capacity is None:
            object.__setattr__(self, "original_capacity", self.capacity)

    def value(self, group_choice: np.ndarray) -> float:
        """The (unscaled) objective of a group choice, pairwise terms included."""
        terms = self.grouped.loss[np.arange(self.grouped.num_groups), group_choice].tolist()
        terms += [float(P[group_choice[g], group_choice[h]]) for g, h, P in self.pairs]
        return math.fsum(terms)

    def overshoot(self, group_choice: np.ndarray) -> Model | None:
        """None if the choice meets every original constraint, else a tightened model."""
        used = int(self.cost[np.arange(len(group_choice)), group_choice].sum())
        over_budget = used - self.original_capacity
        violations = [row.violation(group_choice) for row in self.rows]
        if over_budget <= 0 and not any(violations):
            return None
        capacity = self.capacity - max(over_budget, 0)
        rhs = list(self.rhs)
        for j, (row, v) in enumerate(zip(self.rows, violations)):
            if v > 0:
                if row.sense == "==":
                    raise SolverError(f"ilp: rounded solution violates equality constraint {row.name!r} by {v:g}")
                step = v if row.exact else v + 1e-9 * max(abs(row.rhs), 1e-300)
                rhs[j] += -step if row.sense == "<=" else step
        return replace(self, capacity=capacity, rhs=tuple(rhs))


@dataclass(frozen=True)
class Result:
    status: str  # "optimal" | "feasible" | "infeasible" | "no_solution"
    choice: np.ndarray | None  # (G,) option per group
    bound: float | None  # proven lower bound on the (unscaled) objective
    message: str


@dataclass(frozen=True)
class Objective:
    """The MIP objective ``(loss - floor_g) / scale``, which has the same minimisers.

    Pairwise terms (``Model.pairs``) are divided by ``scale`` too.

    MIP solvers compare objectives with absolute tolerances (CBC ignores
    improvements below its cutoff increment, 1e-5 by default; HiGHS prunes
    with absolute tolerances too). Losses are often ~1e-6 while the part that
    depends on the choice is smaller still, so the constant ``sum(floor_g)``
    (each group's smallest loss) is removed and the rest scaled so that the
    warm start's excess over it is 1.
    """

    floor: np.ndarray  # (G,) smallest allowed loss per group
    scale: float

    @classmethod
    def for_problem(cls, grouped: GroupedProblem, reference: np.ndarray | None) -> Objective:
        floor = grouped.loss.min(axis=1)  # (G,)
        excess = np.where(grouped.mask, grouped.loss - floor[:, None], 0.0)  # (G, K)
        scale = 0.0
        if reference is not None:
            scale = float(excess[np.arange(grouped.num_groups), reference].sum())
        return cls(floor, scale if scale > 0 else float(excess.max()) or 1.0)

    @classmethod
    def for_model(cls, model: Model, reference: np.ndarray | None) -> Objective:
        """As ``for_problem``; with pairwise terms the scale is the warm start's linear excess
        plus the magnitude of its pair terms (pair terms can be negative, so their sum alone
        could cancel to ~0), falling back to the largest coefficient."""
        if not model.pairs:
            return cls.for_problem(model.grouped, reference)
        grouped = model.grouped
        floor = grouped.loss.min(axis=1)  # (G,)
        excess = np.where(grouped.mask, grouped.loss - floor[:, None], 0.0)  # (G, K)
        scale = 0.0
        if reference is not None:
            scale = float(excess[np.arange(grouped.num_groups), reference].sum())
            scale += sum(abs(float(P[reference[g], reference[h]])) for g, h, P in model.pairs)
        if not scale > 0:
            scale = max(float(excess.max()), max(float(np.abs(P).max()) for _, _, P in model.pairs))
        return cls(floor, scale if scale > 0 else 1.0)

    def coef(self, loss: float, g: int) -> float:
        return (loss - float(self.floor[g])) / self.scale

    def pair_coef(self, value: float) -> float:
        return float(value) / self.scale

    def unscale(self, value: float) -> float:
        return value * self.scale + math.fsum(self.floor)


def build_model(model: Model, pulp, start: np.ndarray | None, objective_map: Objective):
    """The PuLP problem and its binaries, one {option: variable} dict per group.

    With pairwise terms (``model.pairs``) it also adds the linearised products, see
    ``_add_pairs``; their variables are returned as a third item (empty otherwise).
    """
    grouped = model.grouped
    prob = pulp.LpProblem("bitalloc_mckp", pulp.LpMinimize)
    objective, variables = [], []
    for g, ident in enumerate(identifiers(list(grouped.labels))):
        ks = np.flatnonzero(grouped.mask[g])
        xs = {int(k): _binary(prob, pulp, f"x_{ident}_{k}") for k in ks}
        variables.append(xs)
        objective += [(x, objective_map.coef(grouped.loss[g, k], g)) for k, x in xs.items()]
        prob.addConstraint(pulp.LpAffineExpression([(x, 1) for x in xs.values()]) == 1, f"one_option_{ident}")
        if start is not None:
            for k, x in xs.items():
                x.setInitialValue(1 if k == start[g] else 0)
    pair_variables = _add_pairs(prob, pulp, model, variables, objective, objective_map, start)
    prob.setObjective(pulp.LpAffineExpression(objective))
    prob.addConstraint(_row_expr(pulp, variables, model.cost) <= model.capacity, "budget_bits")
    for row, rhs in zip(model.rows, model.rhs):
        prob.addConstraint(_extra_constraint(pulp, variables, row, rhs), f"extra_{row.ident}")
    return prob, variables, pair_variables


def _add_pairs(prob, pulp, model: Model, variables, objective: list, objective_map: Objective, start):
    """Linearise each pairwise product ``x_gk · x_hl`` into a continuous ``y_g_h_k_l`` in [0, 1].

    For two one-hot groups the products form a transport polytope: ``Σ_l y_g_h_k_l = x_gk``
    (``pair_<g>_<h>_row_<k>``) and ``Σ_k y_g_h_k_l = x_hl`` (``pair_<g>_<h>_col_<l>``). With
    ``y >= 0`` these imply the standard McCormick inequalities (``y <= x_gk``, ``y <= x_hl``,
    ``y >= x_gk + x_hl - 1``) and give a much tighter LP relaxation; with binary ``x`` they
    force ``y_g_h_k_l = x_gk · x_hl`` exactly. A pair gets a y for every allowed (k, l), so
    that the equalities hold; pairs whose terms are all zero are never passed here.
    Returns one {(k, l): variable} dict per pair, in ``model.pairs`` order.
    """
    out = []
    for g, h, P in model.pairs:
        ks, ls = list(variables[g]), list(variables[h])
        ys = {(k, l): prob.add_variable(f"y_{g}_{h}_{k}_{l}", lowBound=0, upBound=1) for k in ks for l in ls}
        objective += [(y, objective_map.pair_coef(P[k, l])) for (k, l), y in ys.items() if P[k, l] != 0]
        for k in ks:
            terms = [(ys[k, l], 1) for l in ls] + [(variables[g][k], -1)]
            prob.addConstraint(pulp.LpAffineExpression(terms) == 0, f"pair_{g}_{h}_row_{k}")
        for l in ls:
            terms = [(ys[k, l], 1) for k in ks] + [(variables[h][l], -1)]
            prob.addConstraint(pulp.LpAffineExpression(terms) == 0, f"pair_{g}_{h}_col_{l}")
        if start is not None:
            for (k, l), y in ys.items():
                y.setInitialValue(1 if (k, l) == (start[g], start[h]) else 0)
        out.append(ys)
    return out


def _binary(prob, pulp, name: str):
    """A binary variable; PuLP >= 3.3 wants it created through the problem."""
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, cat=pulp.LpBinary)
    return pulp.LpVariable(name, cat=pulp.LpBinary)


def _row_expr(pulp, variables, coef: np.ndarray, divisor: float = 1.0):
    terms = [(x, _number(coef[g, k], divisor)) for g, xs in enumerate(variables) for k, x in xs.items() if coef[g, k]]
    return pulp.LpAffineExpression(terms)


def _number(value, divisor: float):
    return int(value) if divisor == 1.0 and float(value).is_integer() else float(value) / divisor


def _extra_constraint(pulp, variables, row: Row, rhs: float):
    """Float rows are scaled to O(1) coefficients; integer rows are kept exact."""
    divisor = 1.0 if row.exact else (float(np.abs(row.coef).max()) or 1.0)
    expr = _row_expr(pulp, variables, row.coef, divisor)
    bound = rhs / divisor
    return {"<=": expr <= bound, ">=": expr >= bound, "==": expr == bound}[row.sense]


def start_values(variables, start, pairs=(), pair_variables=()) -> dict[str, float] | None:
    if start is None:
        return None
    values = {x.name: float(k == start[g]) for g, xs in enumerate(variables) for k, x in xs.items()}
    for (g, h, _), ys in zip(pairs, pair_variables):
        values.update({y.name: float((k, l) == (start[g], start[h])) for (k, l), y in ys.items()})
    return values

def read_choice(variables) -> np.ndarray:
    """(G,) the option whose binary is largest in each group (robust to 0.9999995)."""
    choice = np.empty(len(variables), dtype=np.int64)
    for g, xs in enumerate(variables):
        choice[g] = max(xs, key=lambda k: xs[k].varValue or 0.0)
    return choice
