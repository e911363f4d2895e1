"""Quadratic allocation (pairwise same-block terms): exact MILP, cvxpy relaxation, separable baseline."""

import itertools
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitalloc.solvers import (
    AllocationProblem,
    InfeasibleBudgetError,
    ProblemError,
    QuadraticProblem,
    achievable_range,
    solve_ilp,
    solve_qp_milp,
    solve_qp_relaxation,
    solve_separable,
)
from bitalloc.solvers.ilp import ilp_backends

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
REL = 1e-9


def close(a, b, rel=REL):
    return abs(a - b) <= rel * max(1.0, abs(a), abs(b))


def brute_force(qp: QuadraticProblem, capacity: int) -> float | None:
    """Smallest true objective over every allowed, tie-respecting choice within the budget."""
    best = None
    for choice in itertools.product(range(qp.num_options), repeat=qp.num_layers):
        try:
            cost = qp.cost_of(choice)
        except ProblemError:  # not allowed or breaks a tie
            continue
        if cost <= capacity:
            value = qp.objective_of(choice)
            best = value if best is None else min(best, value)
    return best


def random_qp(rng, L, K, *, masks=True, ties=True, pair_scale=0.5, zero_pairs=False):
    """Random blocks of consecutive layers, pairs inside blocks, small integer costs."""
    loss = rng.random((L, K))
    cost = rng.integers(0, 20, (L, K))
    allowed = np.ones((L, K), dtype=bool)
    if masks:
        allowed = rng.random((L, K)) < 0.75
        allowed[np.arange(L), rng.integers(0, K, L)] = True
    tie_groups = ()
    if ties and L >= 3 and rng.random() < 0.4:
        a, b = (int(i) for i in rng.choice(L, 2, replace=False))
        shared = allowed[a] & allowed[b]
        shared[rng.integers(0, K)] = True
        allowed[[a, b]] = shared
        tie_groups = ((a, b),)
    block = np.concatenate([[0], rng.integers(0, 2, L - 1)]).cumsum()  # random block structure
    pairs = {}
    for i, j in itertools.combinations(range(L), 2):
        if block[i] == block[j] and rng.random() < 0.8:
            P = np.zeros((K, K)) if zero_pairs else rng.normal(size=(K, K)) * pair_scale
            P[~(allowed[i][:, None] & allowed[j][None, :])] = np.nan  # ignored entries may be NaN
            pairs[i, j] = P
    return QuadraticProblem(AllocationProblem(loss, cost, allowed, tie_groups), pairs)


@st.composite
def qp_instances(draw, zero_pairs=False):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    L = int(rng.integers(1, 7))  # uniform (hypothesis' own integers favour tiny sizes)
    K = int(rng.integers(1, 4))
    qp = random_qp(rng, L, K, zero_pairs=zero_pairs)
    low, high = achievable_range(qp.problem)
    return qp, draw(st.integers(low, high + 2))


def midsize(seed=0, blocks=10, per=6, K=4, strength=0.3):
    """L = blocks * per layers with realistic bit costs; every same-block pair interacts."""
    rng = np.random.default_rng(seed)
    L = blocks * per
    bits = np.array([2, 3, 4, 8])[:K]
    params = rng.integers(200_000, 2_000_000, L)
    cost = (params[:, None] * bits).astype(np.int64) + rng.integers(0, 3000, (L, K))
    loss = rng.lognormal(0, 1, L)[:, None] * 4.0 ** (-bits) * rng.uniform(0.8, 1.2, (L, K))
    pairs = {}
    for b in range(blocks):
        for i, j in itertools.combinations(range(b * per, (b + 1) * per), 2):
            pairs[i, j] = strength * rng.normal(size=(K, K)) * np.sqrt(np.outer(loss[i], loss[j]))
    qp = QuadraticProblem.from_arrays(loss, cost, pairs)
    low, high = achievable_range(qp.problem)
    return qp, low + (high - low) // 3


# -- correctness against brute force --------------------------------------------


@SETTINGS
@given(qp_instances())
def test_milp_matches_brute_force_and_heuristics_are_feasible(case):
    qp, capacity = case
    optimum = brute_force(qp, capacity)
    assert optimum is not None

    exact = solve_qp_milp(qp, capacity)
    assert exact.status == "optimal" and exact.gap == 0.0
    assert exact.cost <= capacity and exact.cost == qp.cost_of(exact.choice)
    assert close(exact.objective, optimum), (exact.objective, optimum)
    assert exact.objective == qp.objective_of(exact.choice)

    relaxed = solve_qp_relaxation(qp, capacity)
    assert relaxed.cost <= capacity
    assert relaxed.objective >= optimum - REL * max(1.0, abs(optimum))
    assert relaxed.objective == qp.objective_of(relaxed.choice)
    if not math.isnan(relaxed.lower_bound):  # "diagonal" convexification: a valid bound
        assert relaxed.lower_bound <= optimum + 1e-7 * max(1.0, abs(optimum))

    separable = solve_separable(qp, capacity)
    assert separable.cost <= capacity
    assert separable.objective >= optimum - REL * max(1.0, abs(optimum))
    assert separable.objective == qp.objective_of(separable.choice)


@SETTINGS
@given(qp_instances(zero_pairs=True))
def test_without_pair_terms_all_agree_with_the_ilp(case):
    qp, capacity = case
    assert qp.is_separable
    reference = solve_ilp(qp.problem, capacity)
    for solve in (solve_qp_milp, solve_qp_relaxation, solve_separable):
        sol = solve(qp, capacity)
        assert sol.status == "optimal", solve.__name__
        assert close(sol.objective, reference.objective), (solve.__name__, sol.objective, reference.objective)
        assert sol.cost <= capacity


def test_pair_inside_a_tie_group_counts_its_diagonal():
    loss = np.array([[0.0, 1.0], [0.0, 1.0], [0.5, 0.0]])
    cost = np.array([[1, 2], [1, 2], [1, 2]])
    P = np.array([[5.0, -100.0], [-100.0, 0.0]])  # off-diagonal unreachable for tied layers
    qp = QuadraticProblem(AllocationProblem(loss, cost, ties=((0, 1),)), {(0, 1): P})
    sol = solve_qp_milp(qp, 6)
    assert sol.choice.tolist() == [1, 1, 1] and close(sol.objective, 2.0)
    assert close(sol.objective, brute_force(qp, 6))
    relaxed = solve_qp_relaxation(qp, 6)  # no pair between groups: solved exactly as a linear problem
    assert relaxed.status == "optimal" and close(relaxed.objective, 2.0)
    separable = solve_separable(qp, 6)  # ignores the pair: picks (0, 0, 1), which really costs 5
    assert not qp.is_separable and separable.status == "feasible" and close(separable.objective, 5.0)


def test_objective_of_adds_pair_terms():
    qp = QuadraticProblem.from_arrays(np.zeros((3, 2)), np.ones((3, 2), dtype=np.int64),
                                      {(0, 2): [[1.0, 2.0], [3.0, 4.0]]})
    assert qp.objective_of([1, 0, 0]) == 3.0
    assert qp.interaction_of([0, 0, 1]) == 2.0
    assert qp.blocks == ((0, 2), (1,))


# -- mid-size, time limits, baselines --------------------------------------------


def test_midsize_instance_solves_exactly_in_seconds(capsys):
    qp, capacity = midsize()
    assert qp.num_layers == 60 and len(qp.pairs) == 150
    started = time.perf_counter()
    exact = solve_qp_milp(qp, capacity)
    elapsed = time.perf_counter() - started
    assert exact.status == "optimal" and exact.cost <= capacity
    assert elapsed < 20.0  # ~0.2 s on one core; generous for shared machines
    relaxed = solve_qp_relaxation(qp, capacity)
    separable = solve_separable(qp, capacity)
    assert exact.objective <= relaxed.objective and exact.objective <= separable.objective
    assert relaxed.lower_bound <= exact.objective  # valid bound from the diagonal convexification
    assert relaxed.info["psd_shift"] > 0
    with capsys.disabled():
        print(f"\nmid-size QP (60 layers, 10 blocks, K=4, 2400 pair variables): milp {elapsed:.2f}s "
              f"obj {exact.objective:.5f}; relaxation {relaxed.solve_time_s:.2f}s obj {relaxed.objective:.5f} "
              f"bound {relaxed.lower_bound:.5f}; separable obj {separable.objective:.5f}")


def test_time_limit_returns_feasible_solution_with_gap():
    qp, capacity = midsize(blocks=20, strength=1.0)  # strong interactions: not solved in 0.5 s
    sol = solve_qp_milp(qp, capacity, time_limit_s=0.5)
    assert sol.cost <= capacity
    assert sol.objective == qp.objective_of(sol.choice)
    if sol.status == "feasible":
        assert sol.gap > 0 and sol.lower_bound <= sol.objective
    else:  # a fast machine proved it anyway
        assert sol.gap == 0.0


def test_clip_convexification_reports_no_bound():
    qp, capacity = midsize(blocks=2)
    sol = solve_qp_relaxation(qp, capacity, convexify="clip")
    assert sol.info["psd_shift"] > 0
    assert math.isnan(sol.lower_bound) and math.isnan(sol.gap) and sol.status == "feasible"
    assert sol.cost <= capacity


def test_separable_reports_true_objective_and_no_bound():
    qp, capacity = midsize(blocks=2)
    sol = solve_separable(qp, capacity)
    linear = solve_ilp(qp.problem, capacity)
    assert sol.choice.tolist() == linear.choice.tolist()
    assert close(sol.info["separable_objective"], linear.objective)
    assert close(sol.objective, qp.objective_of(linear.choice))
    assert sol.status == "feasible" and math.isnan(sol.lower_bound) and math.isnan(sol.gap)


@pytest.mark.skipif("cbc" not in ilp_backends(), reason="no CBC")
def test_cbc_backend_agrees():
    qp, capacity = midsize(blocks=2, per=4)
    highs = solve_qp_milp(qp, capacity)
    cbc = solve_qp_milp(qp, capacity, backend="cbc")
    assert close(highs.objective, cbc.objective, 1e-7) and cbc.cost <= capacity


# -- errors -------------------------------------------------------------------------


@pytest.mark.parametrize("solve", [solve_qp_milp, solve_qp_relaxation, solve_separable])
def test_infeasible_budget_names_the_achievable_range(solve):
    qp, _ = midsize(blocks=1, per=3)
    low, high = achievable_range(qp.problem)
    with pytest.raises(InfeasibleBudgetError) as err:
        solve(qp, low - 1)
    assert err.value.min_achievable == low and err.value.max_achievable == high


def test_budget_above_the_maximum_picks_the_best_options():
    qp, _ = midsize(blocks=1, per=3)
    low, high = achievable_range(qp.problem)
    sol = solve_qp_milp(qp, high + 10**9)
    assert sol.status == "optimal" and sol.cost <= high


BASE = AllocationProblem(np.zeros((3, 2)), np.ones((3, 2), dtype=np.int64), names=("a", "b", "c"))


@pytest.mark.parametrize(
    "pairs, match",
    [
        ({(0, 1): np.zeros((2, 3))}, r"pairs\[\(0, 1\)\]: shape"),
        ({(0, 1): [[0.0, np.nan], [0.0, 0.0]]}, r"pairs\[\(0, 1\)\]: must be finite"),
        ({(0, 1): [[0.0, np.inf], [0.0, 0.0]]}, r"must be finite"),
        ({(0, 1): [["x", 1], [0, 0]]}, r"pairs\[\(0, 1\)\]: must be a numeric"),
        ({(1, 0): np.zeros((2, 2))}, r"must have i < j"),
        ({(1, 1): np.zeros((2, 2))}, r"must have i < j"),
        ({(0, 3): np.zeros((2, 2))}, r"pairs: key \(0, 3\).*out of range"),
        ({(0,): np.zeros((2, 2))}, r"pair of layers"),
        ({0: np.zeros((2, 2))}, r"pair of layers"),
        ({("a", "zz"): np.zeros((2, 2))}, r"no layer named 'zz'"),
        ({(0, 1): np.zeros((2, 2)), ("a", "b"): np.zeros((2, 2))}, r"given twice"),
        ([((0, 1), np.zeros((2, 2)))], r"QuadraticProblem.pairs: must be a mapping"),
    ],
)
def test_bad_pairs_raise_problem_error(pairs, match):
    with pytest.raises(ProblemError, match=match):
        QuadraticProblem(BASE, pairs)


def test_bad_arguments_raise_problem_error():
    with pytest.raises(ProblemError, match="QuadraticProblem.problem"):
        QuadraticProblem(np.zeros((2, 2)), {})
    qp = QuadraticProblem(BASE, {("a", "c"): np.ones((2, 2))})
    assert list(qp.pairs) == [(0, 2)]
    with pytest.raises(ProblemError, match="qp: expected a QuadraticProblem"):
        solve_qp_milp(BASE, 3)
    with pytest.raises(ProblemError, match="convexify"):
        solve_qp_relaxation(qp, 3, convexify="magic")
    with pytest.raises(ProblemError, match="time_limit_s"):
        solve_qp_relaxation(qp, 3, time_limit_s=-1)
    with pytest.raises(ProblemError, match="time_limit_s"):
        solve_qp_milp(qp, 3, time_limit_s=0)
    with pytest.raises(ProblemError, match="capacity"):
        solve_qp_milp(qp, "3")


def test_ignored_entries_may_be_nan_and_are_stored_as_zero():
    allowed = np.array([[True, False], [True, True]])
    problem = AllocationProblem(np.zeros((2, 2)), np.ones((2, 2), dtype=np.int64), allowed)
    qp = QuadraticProblem(problem, {(0, 1): [[1.0, 2.0], [np.nan, np.nan]]})
    assert qp.pairs[0, 1].tolist() == [[1.0, 2.0], [0.0, 0.0]]
    assert not qp.pairs[0, 1].flags.writeable


def test_import_solvers_does_not_load_cvxpy_pulp_or_torch():
    code = "import sys; from bitalloc import solvers; print(','.join(m for m in ('cvxpy', 'pulp', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
