"""Property tests on small random problems: every exact solver finds the brute-force optimum.

Problems have L <= 6 layers (brute force enumerates K**L choices), up to 5
options, integer costs <= 50, random allowed masks and tie groups.
"""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitalloc.solvers import (
    AllocationProblem,
    Constraint,
    InfeasibleBudgetError,
    achievable_range,
    solve_dp,
    solve_ilp,
    solve_lagrangian,
)

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
REL = 1e-9


@st.composite
def problems(draw, max_layers=6, max_options=5):
    """(problem, capacity) with capacity anywhere from below the minimum to above the maximum."""
    L = draw(st.integers(1, max_layers))
    K = draw(st.integers(1, max_options))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    integer_losses = draw(st.booleans())  # equal-loss ties stress tie-breaking
    loss = rng.integers(0, 6, (L, K)).astype(float) if integer_losses else rng.random((L, K))
    cost = rng.integers(0, 51, (L, K))
    allowed = rng.random((L, K)) < 0.7
    allowed[np.arange(L), rng.integers(0, K, L)] = True
    ties = _random_ties(rng, L)
    for group in ties:
        shared = allowed[list(group)].all(axis=0)
        shared[rng.integers(0, K)] = True
        allowed[list(group)] = shared
    problem = AllocationProblem(loss, cost, allowed, ties)
    low, high = achievable_range(problem)
    capacity = draw(st.integers(low - 3, high + 3))
    return problem, capacity


def _random_ties(rng, L):
    if L < 2 or rng.random() < 0.4:
        return ()
    perm = rng.permutation(L)
    sizes = rng.integers(2, 4, size=L)
    ties, at = [], 0
    for size in sizes:
        if at + size > L or rng.random() < 0.3:
            break
        ties.append(tuple(int(i) for i in perm[at:at + size]))
        at += size
    return tuple(ties)


def brute_force(problem, capacity, extra=()):
    """Optimal objective by enumeration (None if infeasible)."""
    best = None
    rows = np.arange(problem.num_layers)
    for choice in itertools.product(range(problem.num_options), repeat=problem.num_layers):
        choice = np.array(choice)
        if not problem.mask[rows, choice].all():
            continue
        if any(len(set(choice[list(g)])) > 1 for g in problem.ties):
            continue
        if int(problem.cost[rows, choice].sum()) > capacity:
            continue
        if any(c.violation(choice) > 0 for c in extra):
            continue
        value = problem.loss_of(choice)
        best = value if best is None or value < best else best
    return best


def close(a, b):
    return abs(a - b) <= REL * max(1.0, abs(a), abs(b))


def assert_valid(problem, capacity, sol):
    problem.check_choice(sol.choice)  # allowed options, ties respected
    assert sol.cost == problem.cost_of(sol.choice) <= capacity
    assert sol.lower_bound <= sol.objective + REL * max(1.0, abs(sol.objective))


@SETTINGS
@given(problems())
def test_exact_solvers_match_brute_force(case):
    problem, capacity = case
    optimum = brute_force(problem, capacity)
    if optimum is None:
        for solver in (solve_dp, solve_lagrangian, solve_ilp):
            with pytest.raises(InfeasibleBudgetError):
                solver(problem, capacity)
        return
    solutions = [solve_dp(problem, capacity), solve_ilp(problem, capacity, backend="highs"),
                 solve_ilp(problem, capacity, backend="cbc")]
    for sol in solutions:
        assert_valid(problem, capacity, sol)
        assert sol.status == "optimal" and sol.gap == 0.0, sol.solver
        assert close(sol.objective, optimum), (sol.solver, sol.objective, optimum)


@SETTINGS
@given(problems())
def test_lagrangian_is_feasible_and_brackets_the_optimum(case):
    problem, capacity = case
    optimum = brute_force(problem, capacity)
    if optimum is None:
        return
    sol = solve_lagrangian(problem, capacity)
    assert_valid(problem, capacity, sol)
    assert sol.objective >= optimum - REL * max(1.0, abs(optimum))
    assert sol.lower_bound <= optimum + REL * max(1.0, abs(optimum))
    if sol.status == "optimal":
        assert close(sol.objective, optimum)
    else:
        assert sol.gap > 0


@settings(max_examples=50, deadline=None, derandomize=True)
@given(problems(max_layers=5, max_options=4), st.floats(0.0, 1.0), st.sampled_from(["<=", ">="]))
def test_ilp_with_an_extra_constraint_matches_brute_force(case, fraction, sense):
    problem, capacity = case
    if capacity < achievable_range(problem)[0]:
        return
    rng = np.random.default_rng(problem.num_layers * 31 + capacity)
    coef = rng.integers(0, 20, problem.loss.shape)  # e.g. BOPs: exact integers
    lo = int(np.where(problem.mask, coef, 99).min(axis=1).sum())
    hi = int(np.where(problem.mask, coef, -1).max(axis=1).sum())
    extra = (Constraint("bops", coef, lo + fraction * (hi - lo), sense),)
    optimum = brute_force(problem, capacity, extra)
    for backend in ("highs", "cbc"):
        if optimum is None:
            with pytest.raises(ValueError):  # InfeasibleError
                solve_ilp(problem, capacity, backend=backend, extra=extra)
            continue
        sol = solve_ilp(problem, capacity, backend=backend, extra=extra)
        assert_valid(problem, capacity, sol)
        assert extra[0].violation(sol.choice) == 0
        assert close(sol.objective, optimum), (backend, sol.objective, optimum)
