"""ILP specifics: extra constraints, tolerance repair, time limits, names, dispatch."""

import numpy as np
import pytest

from bitalloc import solvers
import bitalloc.solvers.dispatch
import bitalloc.solvers.ilp
from bitalloc.solvers import (
    AllocationProblem,
    Constraint,
    InfeasibleBudgetError,
    InfeasibleError,
    ProblemError,
    achievable_range,
    build_ilp,
    ilp_backends,
    solve,
    solve_dp,
    solve_ilp,
    solve_lagrangian,
)

BACKENDS = ["highs", "cbc"]


def grouped_problem(seed=0, layers=24, options=6):
    """Layers 0..11 are 'attn', 12..23 'mlp'; costs in the 1e5-1e6 bit range."""
    rng = np.random.default_rng(seed)
    bits = np.linspace(2, 16, options)
    params = rng.integers(10_000, 100_000, layers)
    cost = (params[:, None] * bits).astype(np.int64) + rng.integers(0, 999, (layers, options))
    loss = rng.lognormal(0, 1, (layers, 1)) * 2.0 ** (-bits) * rng.uniform(0.8, 1.2, (layers, options))
    names = tuple(f"model.layers.{i // 2}.{'attn' if i < 12 else 'mlp'}.proj{i % 2}" for i in range(layers))
    return AllocationProblem(loss, cost, names=names)


def attn_coef(problem):
    """Coefficients of 'total loss of the attn layers'."""
    coef = np.zeros_like(problem.loss)
    coef[:12] = problem.loss[:12]
    return coef


# -- extra constraints -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_loss_cap_is_respected(backend):
    problem = grouped_problem()
    low, high = achievable_range(problem)
    capacity = low + (high - low) // 4
    free = solve_ilp(problem, capacity, backend=backend)
    coef = attn_coef(problem)
    attn_before = Constraint("attn", coef, 1.0).value(free.choice)
    cap = Constraint("attn loss <= eps", coef, rhs=0.5 * attn_before)
    capped = solve_ilp(problem, capacity, backend=backend, extra=(cap,))
    assert capped.status == "optimal"
    assert cap.value(capped.choice) <= cap.rhs
    assert capped.cost <= capacity
    assert capped.objective >= free.objective  # the cap can only cost loss overall


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_secondary_budget_is_exact(backend):
    problem = grouped_problem(1)
    rng = np.random.default_rng(1)
    bops = rng.integers(10**6, 10**8, problem.loss.shape)  # e.g. bit-operations per scheme
    low, high = achievable_range(problem)
    capacity = (low + high) // 2
    free = solve_ilp(problem, capacity, backend=backend)
    limit = Constraint("bops", bops, 1.0).value(free.choice) - 1  # forbid the unconstrained optimum
    sol = solve_ilp(problem, capacity, backend=backend, extra=(Constraint("bops", bops, limit),))
    assert Constraint("bops", bops, limit).value(sol.choice) <= limit
    assert sol.cost <= capacity


@pytest.mark.parametrize("solver", [solve_dp, solve_lagrangian])
def test_single_budget_solvers_reject_extra_constraints(solver):
    problem = grouped_problem()
    cap = Constraint("attn loss", attn_coef(problem), 1.0)
    with pytest.raises(ProblemError, match=r"extra: .*only the primary bit budget.*'attn loss'.*method='ilp'"):
        solver(problem, achievable_range(problem)[1], extra=(cap,))


def test_unreachable_extra_constraint_fails_before_solving():
    problem = grouped_problem()
    coef = attn_coef(problem)
    impossible = Constraint("attn loss", coef, rhs=-1.0)
    with pytest.raises(InfeasibleError, match=r"constraint 'attn loss' \(<= -1\) cannot be met"):
        solve_ilp(problem, achievable_range(problem)[1], extra=(impossible,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_jointly_infeasible_constraints_raise_infeasible_error(backend, tmp_path, monkeypatch):
    # Fits the budget or the BOPs floor, never both (also exercises CBC's crash fallback).
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where scratch files go (Python's and PuLP's)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    problem = AllocationProblem(np.array([[5.0, 1.0], [0.0, 1.0]]), np.array([[21, 41], [23, 4]]))
    bops = Constraint("bops", np.array([[2, 13], [1, 8]]), 12, ">=")
    with pytest.raises(InfeasibleError, match="together with the extra constraints"):
        solve_ilp(problem, 35, backend=backend, extra=(bops,))
    assert list(tmp_path.iterdir()) == []  # CBC's crash leaves no model or solution file behind


def test_extra_constraint_validation():
    problem = grouped_problem()
    c = Constraint("c", np.ones(problem.loss.shape), 1.0)
    with pytest.raises(ProblemError, match="unique"):
        solve_ilp(problem, 10**9, extra=(c, c))
    with pytest.raises(ProblemError, match="Constraint objects"):
        solve_ilp(problem, 10**9, extra=("c",))
    nan = np.ones(problem.loss.shape)
    nan[0, 0] = np.nan
    with pytest.raises(ProblemError, match="finite"):
        solve_ilp(problem, 10**9, extra=(Constraint("c", nan, 1.0),))


def test_infeasible_budget_raises_before_the_solver(monkeypatch):
    problem = grouped_problem()
    monkeypatch.setattr(solvers.ilp, "run_model", lambda *a, **k: pytest.fail("solver was called"))
    low, high = achievable_range(problem)
    with pytest.raises(InfeasibleBudgetError) as info:
        solve_ilp(problem, low - 1)
    assert (info.value.min_achievable, info.value.max_achievable) == (low, high)


# -- exactness under MIP tolerances ------------------------------------------


def just_over(model, choice):
    """``choice`` with one option changed so the scaled cost exceeds the capacity minimally."""
    rows = np.arange(len(choice))
    used = int(model.cost[rows, choice].sum())
    totals = used - model.cost[rows, choice][:, None] + model.cost  # (G, K)
    totals = np.where(model.grouped.mask & (totals > model.capacity), totals, np.iinfo(np.int64).max)
    g, k = np.unravel_index(np.argmin(totals), totals.shape)
    over = choice.copy()
    over[g] = k
    return over


def test_overshooting_rounded_solution_is_tightened_and_resolved(monkeypatch):
    """Simulate a solver accepting x = 0.9999995: its rounded choice is over budget."""
    problem = grouped_problem(2)
    low, high = achievable_range(problem)
    capacity = (low + high) // 2
    real_run = solvers.ilp.run_model
    calls = []

    def sloppy_run(model, *args, **kwargs):
        calls.append(model.capacity)
        result = real_run(model, *args, **kwargs)
        if len(calls) == 1:  # first answer: the optimum with one option swapped to just overshoot
            return solvers.ilp.Result("optimal", just_over(model, result.choice), result.bound, "Optimal")
        return result

    monkeypatch.setattr(solvers.ilp, "run_model", sloppy_run)
    sol = solve_ilp(problem, capacity)
    assert len(calls) == 2 and calls[1] < calls[0]  # re-solved with a tightened budget row
    assert sol.info["tightened"] is True
    assert sol.cost <= capacity
    reference = solve_dp(problem, capacity)
    assert sol.objective >= reference.objective * (1 - 1e-9)
    assert sol.lower_bound <= reference.objective * (1 + 1e-9)


def test_solver_answer_worse_than_warm_start_is_not_trusted(monkeypatch):
    problem = grouped_problem(3)
    low, high = achievable_range(problem)
    capacity = (low + high) // 2

    def wrong_run(model, *args, **kwargs):  # a buggy solver: cheapest options, claims optimal
        cheapest = np.where(model.grouped.mask, model.cost, np.iinfo(np.int64).max).argmin(axis=1)
        return solvers.ilp.Result("optimal", cheapest, None, "Optimal")

    monkeypatch.setattr(solvers.ilp, "run_model", wrong_run)
    sol = solve_ilp(problem, capacity)
    lag = solve_lagrangian(problem, capacity)
    assert sol.objective == lag.objective
    assert sol.status == lag.status


# -- time limits and gaps ----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_limit_returns_a_feasible_solution_with_a_proven_gap(backend):
    rng = np.random.default_rng(5)
    problem = AllocationProblem(rng.random((300, 10)), rng.integers(10**5, 10**7, (300, 10)))
    low, high = achievable_range(problem)
    capacity = low + (high - low) // 10
    sol = solve_ilp(problem, capacity, backend=backend, time_limit_s=0.001)
    assert sol.cost <= capacity
    assert sol.status in ("optimal", "feasible")
    assert sol.lower_bound <= sol.objective
    if sol.status == "feasible":
        assert sol.gap == pytest.approx((sol.objective - sol.lower_bound) / sol.objective)
        assert sol.gap > 0


def test_mip_gap_tolerance_reports_the_true_gap():
    problem = grouped_problem(4)
    low, high = achievable_range(problem)
    sol = solve_ilp(problem, (low + high) // 3, mip_gap=0.05)
    exact = solve_dp(problem, (low + high) // 3)
    assert sol.lower_bound <= exact.objective * (1 + 1e-9) <= sol.objective * (1 + 2e-9)
    assert (sol.status == "optimal") == (sol.gap <= 1e-9)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [(dict(backend="gurobi"), "backend"), (dict(mip_gap=1.5), "mip_gap"), (dict(time_limit_s=0), "time_limit_s")],
)
def test_bad_ilp_options(kwargs, field):
    with pytest.raises(ProblemError, match=field):
        solve_ilp(grouped_problem(), 10**9, **kwargs)


# -- model naming ------------------------------------------------------------


def test_constraint_and_variable_names_are_readable():
    problem = AllocationProblem(
        np.ones((3, 2)), np.array([[1, 2], [3, 4], [5, 6]]), ties=((1, 2),),
        names=("model.q_proj", "model.k_proj", "model.v_proj"),
    )
    cap = Constraint("attn loss <= eps", np.ones((3, 2)), 3.0)
    model = build_ilp(problem, 12, extra=(cap,))
    names = model.constraints() if callable(model.constraints) else model.constraints.values()
    assert {c.name for c in names} == {
        "one_option_model_q_proj",
        "one_option_tie_model_k_proj_model_v_proj",
        "budget_bits",
        "extra_attn_loss_eps",
    }
    assert "x_model_q_proj_0" in {v.name for v in model.variables()}


# -- dispatch ----------------------------------------------------------------


def test_auto_uses_highs_and_falls_back_to_dp(monkeypatch):
    problem = grouped_problem()
    capacity = achievable_range(problem)[1] // 2
    assert "highs" in ilp_backends()
    assert solve(problem, capacity).solver == "ilp/highs"
    monkeypatch.setattr(solvers.dispatch, "ilp_backends", lambda: ())
    sol = solve(problem, capacity, time_limit_s=5.0)  # ILP-only option is dropped for the DP
    assert sol.solver == "dp" and sol.is_optimal
    with pytest.raises(solvers.SolverError, match="need the ILP"):
        solve(problem, capacity, extra=(Constraint("c", np.ones(problem.loss.shape), 99.0),))


def test_unknown_method_is_rejected():
    with pytest.raises(ProblemError, match="method: must be one of"):
        solve(grouped_problem(), 10**9, "magic")
