"""Allocation solvers: pick one option per layer under exact bit budgets.

Pure numpy in, chosen option indices out. Nothing here knows about neural
networks, and nothing here imports torch or the other bitalloc packages
(PuLP and highspy are imported only when an ILP is solved).

Typical use::

    problem = AllocationProblem(loss, cost, ties=((0, 1),))
    low, high = achievable_range(problem)
    solution = solve(problem, capacity)          # ILP with HiGHS, or exact DP
    frontier = pareto_frontier(problem, n_points=20)

With pairwise (same-block) interaction terms::

    qp = QuadraticProblem(problem, pairs={(0, 1): P01})   # P01 (K, K)
    exact = solve_qp_milp(qp, capacity)                    # linearised MILP
    fast = solve_qp_relaxation(qp, capacity)               # cvxpy relaxation + repair
"""

from .dispatch import METHODS, solve
from .dp import solve_dp, solve_lagrangian
from .errors import InfeasibleBudgetError, InfeasibleError, ProblemError, SolverError
from .ilp import BACKENDS, build_ilp, ilp_backends, solve_ilp
from .problem import (
    FEASIBLE,
    OPTIMAL,
    AllocationProblem,
    Constraint,
    Solution,
    achievable_range,
    as_capacity,
    with_forbidden,
    with_pinned,
)
from .qp import QuadraticProblem, solve_qp_milp, solve_qp_relaxation, solve_separable
from .sweep import frontier_capacities, pareto_frontier, sweep

__all__ = [
    "AllocationProblem",
    "BACKENDS",
    "Constraint",
    "FEASIBLE",
    "InfeasibleBudgetError",
    "InfeasibleError",
    "METHODS",
    "OPTIMAL",
    "ProblemError",
    "QuadraticProblem",
    "Solution",
    "SolverError",
    "achievable_range",
    "build_ilp",
    "as_capacity",
    "frontier_capacities",
    "ilp_backends",
    "pareto_frontier",
    "solve",
    "solve_dp",
    "solve_ilp",
    "solve_lagrangian",
    "solve_qp_milp",
    "solve_qp_relaxation",
    "solve_separable",
    "sweep",
    "with_forbidden",
    "with_pinned",
]
