"""Budget sweeps and the loss-versus-bits frontier."""

import numpy as np
import pytest

from bitalloc.solvers import (
    AllocationProblem,
    InfeasibleBudgetError,
    ProblemError,
    achievable_range,
    frontier_capacities,
    pareto_frontier,
    sweep,
)


def problem(seed=0, layers=30, options=5):
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 8, 16])[:options]
    params = rng.integers(1_000, 50_000, layers)
    cost = params[:, None] * bits + rng.integers(0, 64, (layers, options))
    loss = rng.lognormal(0, 1, (layers, 1)) * 4.0 ** (-bits) * rng.uniform(0.9, 1.1, (layers, options))
    return AllocationProblem(loss, cost, ties=((0, 1), (2, 3, 4)))


@pytest.mark.parametrize("method", ["ilp", "dp", "lagrangian"])
def test_sweep_keeps_order_and_budgets(method):
    p = problem()
    low, high = achievable_range(p)
    caps = [high, low, (low + high) // 2]
    sols = sweep(p, caps, method)
    assert [s.capacity for s in sols] == caps
    assert all(s.cost <= s.capacity for s in sols)


def test_exact_sweep_is_monotone():
    p = problem(1)
    low, high = achievable_range(p)
    caps = [low + (high - low) * i // 9 for i in range(10)]
    objectives = [s.objective for s in sweep(p, caps, "dp")]
    assert all(a >= b for a, b in zip(objectives, objectives[1:]))


def test_sweep_below_minimum_raises_before_solving():
    p = problem()
    low, high = achievable_range(p)
    with pytest.raises(InfeasibleBudgetError) as info:
        sweep(p, [low, low - 10, low - 5])
    assert (info.value.budget, info.value.min_achievable, info.value.max_achievable) == (low - 10, low, high)


def test_sweep_can_skip_infeasible_budgets():
    p = problem()
    low, _ = achievable_range(p)
    sols = sweep(p, [low - 1, low, low + 1000], "dp", skip_infeasible=True)
    assert [s.capacity for s in sols] == [low, low + 1000]


def test_pareto_frontier_spans_the_achievable_range():
    p = problem(2)
    low, high = achievable_range(p)
    frontier = pareto_frontier(p, n_points=7, method="dp")
    assert [s.capacity for s in frontier] == frontier_capacities(p, 7)
    assert frontier[0].capacity == low and frontier[0].cost == low
    assert frontier[-1].capacity == high
    best = sum(min(p.loss[list(g)].sum(axis=0)) for g in p.grouped.members)
    assert frontier[-1].objective == pytest.approx(best, rel=1e-12)
    objectives = [s.objective for s in frontier]
    assert all(a >= b for a, b in zip(objectives, objectives[1:]))


def test_frontier_capacities_are_exact_and_deduplicated():
    p = AllocationProblem(np.array([[1.0, 0.0]]), np.array([[10**10, 10**10 + 3]]))
    assert frontier_capacities(p, 3) == [10**10, 10**10 + 1, 10**10 + 3]
    assert frontier_capacities(p, 50) == [10**10, 10**10 + 1, 10**10 + 2, 10**10 + 3]
    assert frontier_capacities(p, 1) == [10**10 + 3]
    with pytest.raises(ProblemError, match="n_points"):
        frontier_capacities(p, 0)
