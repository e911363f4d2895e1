"""AllocationProblem, Constraint and Solution validation; problem editing helpers."""

import numpy as np
import pytest

from bitalloc.solvers import (
    AllocationProblem,
    Constraint,
    InfeasibleBudgetError,
    ProblemError,
    Solution,
    achievable_range,
    as_capacity,
    solve,
    solve_dp,
    solve_ilp,
    solve_lagrangian,
    with_forbidden,
    with_pinned,
)

LOSS = np.array([[3.0, 2.0, 1.0], [6.0, 4.0, 0.5], [1.0, 0.5, 0.25], [2.0, 1.0, 0.0]])
COST = np.array([[10, 20, 40], [10, 20, 40], [5, 10, 20], [7, 14, 28]])


def make(**overrides):
    kwargs = dict(loss=LOSS, cost=COST)
    kwargs.update(overrides)
    return AllocationProblem(**kwargs)


# -- validation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(loss=np.ones(3)), "AllocationProblem.loss"),
        (dict(loss=np.zeros((0, 3))), "AllocationProblem.loss"),
        (dict(loss=np.where(np.eye(4, 3, dtype=bool), np.nan, LOSS)), "AllocationProblem.loss"),
        (dict(loss=np.full((4, 3), np.inf)), "AllocationProblem.loss"),
        (dict(cost=COST.astype(float)), "AllocationProblem.cost"),
        (dict(cost=COST[:3]), "AllocationProblem.cost"),
        (dict(cost=-COST), "AllocationProblem.cost"),
        (dict(cost=np.full((4, 3), 2**62)), "AllocationProblem.cost"),
        (dict(allowed=np.ones((4, 2), bool)), "AllocationProblem.allowed"),
        (dict(allowed=np.full((4, 3), 0.5)), "AllocationProblem.allowed"),
        (dict(allowed=np.eye(4, 3, dtype=bool)), "AllocationProblem.allowed"),  # layer 3 has nothing
        (dict(ties=((0, 5),)), "AllocationProblem.ties"),
        (dict(ties=((0, 1), (1, 2))), "AllocationProblem.ties"),
        (dict(ties=((),)), "AllocationProblem.ties"),
        (dict(ties=((0, True),)), "AllocationProblem.ties"),
        (dict(ties=5), "AllocationProblem.ties"),
        (dict(names=("a", "b")), "AllocationProblem.names"),
        (dict(names=("a", "b", "c", "a")), "AllocationProblem.names"),
        (dict(names="abcd"), "AllocationProblem.names"),
    ],
)
def test_bad_problem_names_the_field(overrides, field):
    with pytest.raises(ProblemError, match=field):
        make(**overrides)


def test_problem_error_is_a_value_error():
    assert issubclass(ProblemError, ValueError)
    assert issubclass(InfeasibleBudgetError, ValueError)


def test_tied_layers_with_different_allowed_sets_are_rejected_with_both_sets():
    allowed = np.ones((4, 3), bool)
    allowed[1, 2] = False
    with pytest.raises(ProblemError, match=r"tied layers .* allows \[0, 1, 2\] .* allows \[0, 1\]"):
        make(allowed=allowed, ties=((0, 1),))


def test_disallowed_entries_may_hold_anything():
    allowed = np.ones((4, 3), bool)
    allowed[0, 2] = False
    loss = LOSS.copy()
    loss[0, 2] = np.nan
    cost = COST.copy()
    cost[0, 2] = -1
    problem = make(loss=loss, cost=cost, allowed=allowed)
    assert problem.mask[0].tolist() == [True, True, False]


def test_problem_copies_and_freezes_arrays():
    loss = LOSS.copy()
    problem = make(loss=loss, cost=COST.astype(np.int32))
    loss[0, 0] = 99.0
    assert problem.loss[0, 0] == 3.0
    assert problem.cost.dtype == np.int64
    with pytest.raises(ValueError):
        problem.loss[0, 0] = 1.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(name="", coef=np.ones((4, 3)), rhs=1.0), "Constraint.name"),
        (dict(name="c", coef=np.ones(3), rhs=1.0), "coef"),
        (dict(name="c", coef=np.array([["a"]]), rhs=1.0), "coef"),
        (dict(name="c", coef=np.ones((4, 3)), rhs=float("nan")), "rhs"),
        (dict(name="c", coef=np.ones((4, 3)), rhs=1.0, sense="<"), "sense"),
    ],
)
def test_bad_constraint_names_the_field(kwargs, field):
    with pytest.raises(ProblemError, match=field):
        Constraint(**kwargs)


def test_constraint_with_wrong_shape_is_rejected_by_the_ilp():
    bad = Constraint("bops", np.ones((4, 2), dtype=np.int64), 10)
    with pytest.raises(ProblemError, match="Constraint 'bops'.coef: shape"):
        solve_ilp(make(), 100, extra=(bad,))


def test_integer_constraint_rhs_is_exact():
    c = Constraint("bops", np.ones((4, 3), dtype=np.int64), 3.5)
    assert c.integer_rhs == 3
    assert Constraint("bops", c.coef, 3.5, ">=").integer_rhs == 4
    choice = np.zeros(4, dtype=np.int64)
    assert c.value(choice) == 4 and c.violation(choice) == 1.0


@pytest.mark.parametrize("capacity", ["100", None, True, float("inf"), float("nan")])
def test_bad_capacity_is_rejected(capacity):
    with pytest.raises(ProblemError, match="capacity"):
        solve_dp(make(), capacity)


def test_float_capacity_is_floored_exactly():
    assert as_capacity(100.9) == 100
    assert as_capacity(np.int64(7)) == 7
    assert solve_dp(make(), 60.99).capacity == 60


# -- achievable range and infeasible budgets ---------------------------------


def test_achievable_range_is_exact_and_respects_ties_and_mask():
    assert achievable_range(make()) == (32, 128)
    allowed = np.ones((4, 3), bool)
    allowed[0, 0] = False
    assert achievable_range(make(allowed=allowed)) == (42, 128)
    big = AllocationProblem(np.zeros((3, 2)), np.full((3, 2), 10**10) + np.array([0, 1]))
    assert achievable_range(big) == (3 * 10**10, 3 * 10**10 + 3)


@pytest.mark.parametrize("method", ["ilp", "dp", "lagrangian"])
def test_budget_below_minimum_raises_with_range(method):
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(make(), 31, method)
    err = info.value
    assert (err.budget, err.min_achievable, err.max_achievable) == (31, 32, 128)
    assert str(err) == "budget of 31 bits is below the smallest achievable 32 bits (largest useful: 128 bits)"


@pytest.mark.parametrize("method", ["ilp", "dp", "lagrangian"])
def test_budget_above_maximum_picks_lowest_loss(method):
    sol = solve(make(), 10**12, method)
    assert sol.choice.tolist() == [2, 2, 2, 2]
    assert sol.is_optimal and sol.cost == 128


def test_exactly_minimum_budget_is_feasible():
    sol = solve_dp(make(), 32)
    assert sol.cost == 32 and sol.choice.tolist() == [0, 0, 0, 0]


def test_infeasible_budget_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(InfeasibleBudgetError(1, 2, 3)))
    assert (err.budget, err.min_achievable, err.max_achievable) == (1, 2, 3)


# -- pinned, forbidden, ties -------------------------------------------------


@pytest.mark.parametrize("method", ["ilp", "dp", "lagrangian"])
def test_pinned_and_forbidden_options_are_respected(method):
    problem = make(names=("q", "k", "v", "o"))
    problem = with_pinned(problem, {"q": 0, 3: 1})
    problem = with_forbidden(problem, {"k": [2], 2: [0]})
    sol = solve(problem, 1000, method)
    assert sol.choice[0] == 0 and sol.choice[3] == 1
    assert sol.choice[1] != 2 and sol.choice[2] != 0
    assert sol.choice.tolist() == [0, 1, 2, 1]


@pytest.mark.parametrize("method", ["ilp", "dp", "lagrangian"])
def test_tied_layers_share_an_option(method):
    # Alone, layer 0 wants option 2 and layer 1 option 0; tied, the sum decides.
    loss = np.array([[5.0, 4.0, 0.0], [0.0, 3.0, 9.0], [1.0, 0.5, 0.0]])
    cost = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    problem = AllocationProblem(loss, cost, ties=((0, 1),))
    sol = solve(problem, 9, method)
    assert sol.choice[0] == sol.choice[1] == 0
    assert sol.choice[2] == 2


def test_pinning_a_tied_layer_pins_its_group():
    problem = with_pinned(make(ties=((0, 2),)), {0: 1})
    assert problem.mask[2].tolist() == [False, True, False]
    with pytest.raises(ProblemError, match="pinned to both"):
        with_pinned(make(ties=((0, 2),)), {0: 1, 2: 2})


def test_forbidding_a_tied_layer_option_forbids_it_for_the_group():
    problem = with_forbidden(make(ties=((0, 2),)), {2: [0]})
    assert problem.mask[0].tolist() == [False, True, True]


def test_editing_errors_are_clear():
    problem = make(names=("q", "k", "v", "o"))
    with pytest.raises(ProblemError, match="no layer named 'x'"):
        with_pinned(problem, {"x": 0})
    with pytest.raises(ProblemError, match="option: index 3 out of range"):
        with_pinned(problem, {0: 3})
    with pytest.raises(ProblemError, match=r"layer 1 \(k\) has no allowed option"):
        with_forbidden(problem, {"k": [0, 1, 2]})
    forbidden = with_forbidden(problem, {0: [1]})
    with pytest.raises(ProblemError, match="not allowed, so it cannot be pinned"):
        with_pinned(forbidden, {0: 1})


# -- choices and solutions ---------------------------------------------------


def test_cost_of_is_exact_for_huge_costs():
    cost = np.array([[2**53 + 1, 1], [2**53 + 1, 1]], dtype=np.int64)
    problem = AllocationProblem(np.zeros((2, 2)), cost)
    assert problem.cost_of([0, 0]) == 2**54 + 2  # float64 would give 2**54


def test_check_choice_rejects_disallowed_and_untied():
    problem = with_forbidden(make(ties=((0, 1),)), {3: [2]})
    with pytest.raises(ProblemError, match="not allowed"):
        problem.check_choice([0, 0, 0, 2])
    with pytest.raises(ProblemError, match="tied layers"):
        problem.check_choice([0, 1, 0, 0])


def test_solution_is_immutable():
    sol = solve_dp(make(), 60)
    with pytest.raises(ValueError):
        sol.choice[0] = 1
    with pytest.raises(AttributeError):
        sol.cost = 0  # type: ignore[misc]
    with pytest.raises(ProblemError, match="Solution.status"):
        Solution(sol.choice, 0.0, 0, "done", 0.0, 0.0, "x", 0.0)


def test_solution_reports_exact_cost_and_fsum_objective():
    import time

    for solver in (solve_dp, solve_lagrangian, solve_ilp):
        t0 = time.perf_counter()
        sol = solver(make(), 70)
        wall = time.perf_counter() - t0
        assert isinstance(sol.cost, int)
        assert sol.cost == make().cost_of(sol.choice) <= 70
        assert sol.objective == make().loss_of(sol.choice)
        assert 0 < sol.solve_time_s <= wall and sol.capacity == 70  # the solver's own clock, inside the call
