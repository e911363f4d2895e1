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
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from ._common import build_solution, prepare
from ._grouping import GroupedProblem, identifiers
from .dp import best_repair, relax_budget
from .errors import InfeasibleError, ProblemError, SolverError
from .problem import OPTIMAL_GAP, AllocationProblem, Constraint, Solution

__all__ = ["solve_ilp", "build_ilp", "ilp_backends", "BACKENDS"]

BACKENDS = ("highs", "cbc")
_MAX_TIGHTENINGS = 5
# CBC's default cutoff increment (1e-5) ignores small improvements, and its
# default SOS preprocessing returns wrong "optimal" answers on small
# multiple-choice knapsacks (CBC 2.10.3 bundled with PuLP; coin-or/Cbc#283).
_CBC_OPTIONS = (f"increment {OPTIMAL_GAP}", "preprocess off")
_CBC_FALLBACK_OPTIONS = (f"increment {OPTIMAL_GAP}",)


def ilp_backends() -> tuple[str, ...]:
    """The ILP backends usable in this environment (subset of ``BACKENDS``)."""
    return tuple(b for b in BACKENDS if _backend_error(b) is None)


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
    _check_options(backend, time_limit_s, mip_gap)
    capacity, scaled = prepare(problem, capacity)
    grouped = problem.grouped
    rows = _extra_rows(problem, tuple(extra))
    _check_extra_reachable(rows)
    relax = relax_budget(grouped, scaled)  # bound of the budget-only relaxation: valid with extra rows too
    start = best_repair(grouped, scaled, relax)
    if any(row.violation(start) > 0 for row in rows):
        start = None

    model = _Model(grouped, scaled.cost, scaled.capacity, rows)
    deadline = None if time_limit_s is None else started + time_limit_s
    result, first_bound, tightened = _solve_within_budgets(model, backend, deadline, mip_gap, start, capacity)

    proven = result.status == "optimal" and mip_gap == 0.0 and not tightened
    bounds = [relax.lower_bound] + ([first_bound] if first_bound is not None else [])
    objective_bound = math.inf if proven else max(bounds)
    info = {"tightened": tightened, "backend_status": result.message}
    return build_solution(problem, result.choice, objective_bound, capacity, f"ilp/{backend}", started,
                          optimal_gap=OPTIMAL_GAP, info=info)


def _solve_within_budgets(model: _Model, backend: str, deadline: float | None, mip_gap: float,
                          start: np.ndarray | None, capacity: int) -> tuple[_Result, float | None, bool]:
    """Solve, re-check the rounded choice exactly, tighten and re-solve on overshoot.

    Returns the accepted result, the lower bound of the first (untightened)
    solve — later solves bound a stricter problem — and whether tightening
    happened. Falls back to the warm start (feasible for the original budgets)
    when the solver stops without a solution.
    """
    objective = _Objective.for_model(model, start)
    fallback = start
    first_bound, tightened = None, False
    for _ in range(_MAX_TIGHTENINGS + 1):
        result = _run(model, backend, deadline, mip_gap, start, objective)
        if result.status == "infeasible":
            if not tightened or fallback is None:
                _raise_infeasible(model.rows, tightened, capacity)
            result = _Result("feasible", fallback, None, "tightened model infeasible; returning the warm start")
        if result.choice is None:
            if fallback is None:
                raise SolverError(f"ilp/{backend}: {result.message}; raise time_limit_s")
            result = _Result("feasible", fallback, None, f"{result.message}; returning the warm start")
        if first_bound is None:
            first_bound = result.bound
        tighter = model.overshoot(result.choice)
        if tighter is None:
            return _no_worse_than(result, fallback, model), first_bound, tightened
        model, tightened = tighter, True
        if start is not None and model.cost[np.arange(len(start)), start].sum() > model.capacity:
            start = None
    if fallback is not None:
        return _Result("feasible", fallback, None, "rounding kept overshooting; returning the warm start"), \
            first_bound, True
    raise SolverError(f"ilp/{backend}: rounded solutions kept violating a budget after {_MAX_TIGHTENINGS} tightenings")


def _no_worse_than(result: _Result, fallback: np.ndarray | None, model: _Model) -> _Result:
    """Guard against solver bugs: never return worse than the (feasible) warm start."""
    if fallback is None:
        return result
    found, known = model.value(result.choice), model.value(fallback)
    if found - known <= 1e-12 * max(abs(found), abs(known)):
        return result
    return _Result("feasible", fallback, None, f"{result.message}; the solver's answer was worse than the warm start")


def build_ilp(problem: AllocationProblem, capacity: int, *, extra: Sequence[Constraint] = ()):
    """The PuLP model :func:`solve_ilp` solves first, for inspection or export.

    E.g. ``build_ilp(p, cap).writeLP("alloc.lp")``. Variables are
    ``x_<group>_<option>``; constraints ``one_option_<group>``,
    ``budget_bits`` and ``extra_<name>``. Costs are in scaled units (see
    ``ScaledCosts``) and the objective is shifted and scaled (see ``_Objective``).
    """
    import pulp

    capacity, scaled = prepare(problem, capacity)
    rows = _extra_rows(problem, tuple(extra))
    model = _Model(problem.grouped, scaled.cost, scaled.capacity, rows)
    prob, _, _ = _build(model, pulp, None, _Objective.for_problem(problem.grouped, None))
    return prob


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------


def _check_options(backend: str, time_limit_s: float | None, mip_gap: float) -> None:
    if backend not in BACKENDS:
        raise ProblemError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    if time_limit_s is not None and not (_is_real(time_limit_s) and time_limit_s > 0):
        raise ProblemError(f"time_limit_s: must be a positive number of seconds or None, got {time_limit_s!r}")
    if not (_is_real(mip_gap) and 0.0 <= mip_gap < 1.0):
        raise ProblemError(f"mip_gap: must be a relative gap in [0, 1), got {mip_gap!r}")
    err = _backend_error(backend)
    if err is not None:
        raise SolverError(f"backend {backend!r} is not available: {err}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@lru_cache(maxsize=None)
def _backend_error(backend: str) -> str | None:
    """None when the backend works here, else why not (cached: probing spawns nothing heavy)."""
    try:
        import pulp
    except ImportError:
        return "PuLP is not installed (pip install pulp)"
    if backend == "highs":
        try:
            import highspy  # noqa: F401
        except ImportError:
            return "highspy is not installed (pip install highspy)"
        return None
    if not _cbc_solver_class(pulp)(msg=False).available():
        return "no CBC executable found (install coinor-cbc or use backend='highs')"
    return None


# ----------------------------------------------------------------------------
# Extra constraints as reduced rows
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
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


def _extra_rows(problem: AllocationProblem, extra: tuple[Constraint, ...]) -> tuple[_Row, ...]:
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
        rows.append(_Row(c.name, ident, coef, rhs, c.sense, exact, low, high, c, grouped.layer_group))
    return tuple(rows)


def _check_extra_reachable(rows: tuple[_Row, ...]) -> None:
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


def _raise_infeasible(rows: tuple[_Row, ...], tightened: bool, capacity: int) -> None:
    if not rows:
        raise SolverError(
            f"ilp: solver reported the budget of {capacity} bits infeasible"
            + (" after tightening for rounding" if tightened else "")
        )
    names = ", ".join(repr(r.name) for r in rows)
    raise InfeasibleError(
        f"no allocation meets the budget of {capacity} bits together with the extra constraints ({names})"
    )


# ----------------------------------------------------------------------------
# The model and its exactness checks
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Model:
    """Everything needed to build the MIP; ``overshoot`` returns a tightened copy."""

    grouped: GroupedProblem
    cost: np.ndarray  # (G, K) int64 scaled bit costs
    capacity: int  # scaled capacity (possibly tightened)
    rows: tuple[_Row, ...]
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

    def overshoot(self, group_choice: np.ndarray) -> _Model | None:
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
class _Result:
    status: str  # "optimal" | "feasible" | "infeasible" | "no_solution"
    choice: np.ndarray | None  # (G,) option per group
    bound: float | None  # proven lower bound on the (unscaled) objective
    message: str


@dataclass(frozen=True)
class _Objective:
    """The MIP objective ``(loss - floor_g) / scale``, which has the same minimisers.

    Pairwise terms (``_Model.pairs``) are divided by ``scale`` too.

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
    def for_problem(cls, grouped: GroupedProblem, reference: np.ndarray | None) -> _Objective:
        floor = grouped.loss.min(axis=1)  # (G,)
        excess = np.where(grouped.mask, grouped.loss - floor[:, None], 0.0)  # (G, K)
        scale = 0.0
        if reference is not None:
            scale = float(excess[np.arange(grouped.num_groups), reference].sum())
        return cls(floor, scale if scale > 0 else float(excess.max()) or 1.0)

    @classmethod
    def for_model(cls, model: _Model, reference: np.ndarray | None) -> _Objective:
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


def _build(model: _Model, pulp, start: np.ndarray | None, objective_map: _Objective):
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


def _add_pairs(prob, pulp, model: _Model, variables, objective: list, objective_map: _Objective, start):
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


def _extra_constraint(pulp, variables, row: _Row, rhs: float):
    """Float rows are scaled to O(1) coefficients; integer rows are kept exact."""
    divisor = 1.0 if row.exact else (float(np.abs(row.coef).max()) or 1.0)
    expr = _row_expr(pulp, variables, row.coef, divisor)
    bound = rhs / divisor
    return {"<=": expr <= bound, ">=": expr >= bound, "==": expr == bound}[row.sense]


def _run(model: _Model, backend: str, deadline: float | None, mip_gap: float, start, objective: _Objective) -> _Result:
    """Build and solve the model once with the chosen backend.

    ``mip_gap`` applies to the shifted objective (loss above each group's
    floor), which is stricter than a gap on the total loss.
    """
    import pulp

    remaining = None if deadline is None else max(deadline - time.perf_counter(), 0.01)
    prob, variables, pair_variables = _build(model, pulp, start if backend == "cbc" else None, objective)
    if backend == "highs":
        start_values = _start_values(variables, start, model.pairs, pair_variables)
        solver = _highs_solver_class(pulp)(start=start_values, msg=False, timeLimit=remaining,
                                           gapRel=mip_gap, gapAbs=0.0, mip_feasibility_tolerance=1e-9)
        _solve_or_raise(prob, solver, backend)
        status, bound, message = solver.outcome
    else:
        status, message = _run_cbc(prob, pulp, remaining, mip_gap, start is not None)
        bound = None
    choice = _read_choice(variables) if status in ("optimal", "feasible") else None
    return _Result(status, choice, None if bound is None else objective.unscale(bound), message)


def _run_cbc(prob, pulp, time_limit: float | None, mip_gap: float, warm_start: bool) -> tuple[str, str]:
    """Solve with CBC without preprocessing; fall back to preprocessing if CBC crashes.

    The bundled CBC 2.10.3 segfaults writing its solution file when it finds
    the problem infeasible with preprocessing off. The rerun with default
    preprocessing then gives the infeasibility verdict; should it find a
    solution instead, that solution is not trusted to be optimal.
    """
    def attempt(options):
        solver = _cbc_solver_class(pulp)(msg=False, timeLimit=time_limit, gapRel=mip_gap, gapAbs=0.0,
                                         warmStart=warm_start, options=list(options))
        prob.solve(solver)
        return _read_cbc_status(prob, pulp)

    try:
        return attempt(_CBC_OPTIONS)
    except pulp.PulpSolverError:
        pass
    try:
        status, message = attempt(_CBC_FALLBACK_OPTIONS)
    except pulp.PulpSolverError as exc:
        raise SolverError(f"ilp/cbc: {exc}") from exc
    if status == "optimal":
        status = "feasible"  # from the preprocessing CBC gets wrong; re-bounded by the caller
    return status, f"{message} (after a CBC crash without preprocessing)"


def _solve_or_raise(prob, solver, backend: str) -> None:
    import pulp

    try:
        prob.solve(solver)
    except pulp.PulpSolverError as exc:
        raise SolverError(f"ilp/{backend}: {exc}") from exc


def _start_values(variables, start, pairs=(), pair_variables=()) -> dict[str, float] | None:
    if start is None:
        return None
    values = {x.name: float(k == start[g]) for g, xs in enumerate(variables) for k, x in xs.items()}
    for (g, h, _), ys in zip(pairs, pair_variables):
        values.update({y.name: float((k, l) == (start[g], start[h])) for (k, l), y in ys.items()})
    return values


def _read_choice(variables) -> np.ndarray:
    """(G,) the option whose binary is largest in each group (robust to 0.9999995)."""
    choice = np.empty(len(variables), dtype=np.int64)
    for g, xs in enumerate(variables):
        choice[g] = max(xs, key=lambda k: xs[k].varValue or 0.0)
    return choice


def _read_cbc_status(prob, pulp) -> tuple[str, str]:
    """Map PuLP's CBC solution status to (status, message)."""
    sol_status = prob.sol_status
    message = pulp.LpSolution.get(sol_status, str(sol_status))
    if sol_status == pulp.LpSolutionOptimal:
        return "optimal", message
    if sol_status == pulp.LpSolutionIntegerFeasible:
        return "feasible", message
    if sol_status in (pulp.LpSolutionInfeasible, pulp.LpSolutionUnbounded) or prob.status == pulp.LpStatusInfeasible:
        return "infeasible", pulp.LpStatus.get(prob.status, message)
    return "no_solution", f"CBC stopped without a solution ({message})"


# ----------------------------------------------------------------------------
# Backend classes (built lazily: PuLP and highspy are optional imports)
# ----------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _highs_solver_class(pulp):
    """pulp.HiGHS plus a warm start and a status reader that knows every HiGHS status.

    PuLP's own status table misses newer HiGHS statuses (solution limit,
    memory limit) and reads solution values even when there are none.
    """
    import highspy

    _swallow_highs_banner(highspy)
    feasible = int(highspy.SolutionStatus.kSolutionStatusFeasible)
    statuses = highspy.HighsModelStatus

    class _HiGHS(pulp.HiGHS):
        def __init__(self, start: dict[str, float] | None = None, **kwargs):
            super().__init__(**kwargs)
            self.start = start
            self.outcome = ("no_solution", None, "not run")

        def callSolver(self, lp):
            if self.start is not None:
                values = [0.0] * len(lp.variables())
                for var in lp.variables():
                    values[var.index] = self.start.get(var.name, 0.0)
                solution = highspy.HighsSolution()
                solution.col_value = values
                lp.solverModel.setSolution(solution)
            lp.solverModel.run()

        def findSolutionValues(self, lp):
            model = lp.solverModel
            status = model.getModelStatus()
            info = model.getInfo()
            has_solution = int(info.primal_solution_status) == feasible
            if has_solution:
                values = model.getSolution().col_value
                for var in lp.variables():
                    var.varValue = values[var.index]
            message = model.modelStatusToString(status)
            if status == statuses.kOptimal and has_solution:
                self.outcome = ("optimal", float(info.mip_dual_bound), message)
                return pulp.LpStatusOptimal, pulp.LpSolutionOptimal
            if status in (statuses.kInfeasible, statuses.kUnboundedOrInfeasible):
                self.outcome = ("infeasible", None, message)
                return pulp.LpStatusInfeasible, pulp.LpSolutionInfeasible
            if has_solution:
                bound = float(info.mip_dual_bound)
                self.outcome = ("feasible", bound if math.isfinite(bound) else None, message)
                return pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible
            self.outcome = ("no_solution", None, f"HiGHS stopped without a solution ({message})")
            return pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound

    return _HiGHS


def _swallow_highs_banner(highspy) -> None:
    """Create the process's first Highs object with C-level stdout sent to /dev/null.

    HiGHS prints a copyright banner to stdout when the first Highs object is
    created, before ``output_flag`` can be switched off; that would corrupt
    machine-readable output (a CLI printing JSON plans). Later objects are silent.
    """
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no usable stdout: nothing to protect
        highspy.Highs()
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _cbc_solver_class(pulp):
    """A system CBC (COIN_CMD) when installed, else the binary bundled with PuLP.

    ``PULP_CBC_CMD`` warns that it is deprecated for PuLP 4.0; the warning is
    about packaging, not behaviour, so it is silenced here.
    """

    def make(**kwargs):
        if pulp.COIN_CMD(msg=False).available():
            return pulp.COIN_CMD(**kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return pulp.PULP_CBC_CMD(**kwargs)

    return make
