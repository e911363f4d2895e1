"""The ILP backends: HiGHS (through highspy) and CBC, behind PuLP; option checks, one solve
of a built model, and the status readers.

PuLP and highspy are imported only when a model is solved or a backend probed.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import tempfile
import time
import warnings
from functools import lru_cache

from .errors import ProblemError, SolverError
from .ilp_model import Model, Objective, Result, build_model, read_choice, start_values
from .problem import OPTIMAL_GAP

__all__ = ["ILP_BACKENDS", "BACKENDS", "ilp_backends", "check_options", "is_real", "backend_error", "run_model"]

ILP_BACKENDS = ("highs", "cbc")
BACKENDS = ILP_BACKENDS  # the old name (solvers.BACKENDS); the profiling runner's are RUNNER_BACKENDS
# CBC's default cutoff increment (1e-5) ignores small improvements, and its
# default SOS preprocessing returns wrong "optimal" answers on small
# multiple-choice knapsacks (CBC 2.10.3 bundled with PuLP; coin-or/Cbc#283).
_CBC_OPTIONS = (f"increment {OPTIMAL_GAP}", "preprocess off")
_CBC_FALLBACK_OPTIONS = (f"increment {OPTIMAL_GAP}",)


def ilp_backends() -> tuple[str, ...]:
    """The ILP backends usable in this environment (subset of ``ILP_BACKENDS``)."""
    return tuple(b for b in ILP_BACKENDS if backend_error(b) is None)


def check_options(backend: str, time_limit_s: float | None, mip_gap: float) -> None:
    if backend not in ILP_BACKENDS:
        raise ProblemError(f"backend: must be one of {ILP_BACKENDS}, got {backend!r}")
    if time_limit_s is not None and not (is_real(time_limit_s) and time_limit_s > 0):
        raise ProblemError(f"time_limit_s: must be a positive number of seconds or None, got {time_limit_s!r}")
    if not (is_real(mip_gap) and 0.0 <= mip_gap < 1.0):
        raise ProblemError(f"mip_gap: must be a relative gap in [0, 1), got {mip_gap!r}")
    err = backend_error(backend)
    if err is not None:
        raise SolverError(f"backend {backend!r} is not available: {err}")


def is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@lru_cache(maxsize=None)
def backend_error(backend: str) -> str | None:
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


def run_model(model: Model, backend: str, deadline: float | None, mip_gap: float, start, objective: Objective) -> Result:
    """Build and solve the model once with the chosen backend.

    ``mip_gap`` applies to the shifted objective (loss above each group's
    floor), which is stricter than a gap on the total loss.
    """
    import pulp

    remaining = None if deadline is None else max(deadline - time.perf_counter(), 0.01)
    prob, variables, pair_variables = build_model(model, pulp, start if backend == "cbc" else None, objective)
    if backend == "highs":
        initial = start_values(variables, start, model.pairs, pair_variables)
        solver = _highs_solver_class(pulp)(start=initial, msg=False, timeLimit=remaining,
                                           gapRel=mip_gap, gapAbs=0.0, mip_feasibility_tolerance=1e-9)
        _solve_or_raise(prob, solver, backend)
        status, bound, message = solver.outcome
    else:
        status, message = _run_cbc(prob, pulp, remaining, mip_gap, start is not None)
        bound = None
    choice = read_choice(variables) if status in ("optimal", "feasible") else None
    return Result(status, choice, None if bound is None else objective.unscale(bound), message)

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
        # CBC's model and solution files go to a folder of their own: PuLP deletes them after a
        # solve but not after the crash below, which left *-pulp.mps / .sol files in /tmp
        with tempfile.TemporaryDirectory(prefix="bitalloc-cbc-") as tmp:
            solver.tmpDir = tmp
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
