"""Issue 10: one error base for every user-facing error; the CLI prints each as one line.

Argparse's own errors, solver failures (no backend, a time limit without a solution, a DP
too large), missing dependencies and internal bugs all end as a single stderr line."""

from __future__ import annotations

import numpy as np
import pytest

import bitalloc
from bitalloc.allocator import cli
from bitalloc.allocator.cli import main
from bitalloc.solvers import AllocationProblem, SolverError, solve_dp

from test_cli import assert_clean_error, run_cli  # tests/allocator is on sys.path (rootdir-relative import mode)


def _error_classes():
    """Every exception class defined in bitalloc's modules named *Error (or InfeasibleBudget)."""
    import importlib
    import pkgutil
    from pathlib import Path

    root = Path(bitalloc.__file__).parent
    found = {}
    for pkg in ("kernels", "sensitivity", "solvers", "allocator"):
        for info in pkgutil.iter_modules([str(root / pkg)]):
            if info.name.startswith("triton") or info.name in ("ops", "qlinear"):
                continue  # kernel modules that need triton / are not where user errors live
            mod = importlib.import_module(f"bitalloc.{pkg}.{info.name}")
            for name, obj in vars(mod).items():
                if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == mod.__name__:
                    found[f"{mod.__name__}.{name}"] = obj
    return found


def test_every_user_error_derives_from_bitalloc_error():
    classes = _error_classes()
    assert len(classes) >= 15, sorted(classes)
    loose = [n for n, c in classes.items() if not issubclass(c, bitalloc.BitallocError)]
    assert not loose, f"user-facing errors outside BitallocError: {loose}"
    # the ValueError ones stay ValueErrors (callers catching ValueError keep working)
    assert issubclass(bitalloc.BudgetError, ValueError) and issubclass(SolverError, RuntimeError)


@pytest.mark.parametrize("argv,match", [
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["solve"], "the following arguments are required: profile, --budget"),
    (["solve", "p.json", "--budget", "4bpw", "--method", "simplex"], "invalid choice: 'simplex'"),
    (["profile", "--n-samples", "many"], "invalid int value: 'many'"),
    (["eval", "--windows"], "expected one argument"),
    (["--no-such-flag", "run"], "unrecognized arguments: --no-such-flag"),
])
def test_argparse_errors_are_one_line(capsys, argv, match):
    assert main(argv) == 2  # argparse's exit code, returned to in-process callers
    out, err = capsys.readouterr()
    assert out == ""
    assert_clean_error(2, err, match)
    assert "usage:" not in err


def test_solver_failure_is_one_line(capsys, monkeypatch):
    """A SolverError is a RuntimeError, which the CLI used to let through as a traceback."""
    def fails(a):
        raise SolverError("ilp/highs: time limit reached without a solution; raise time_limit_s")

    monkeypatch.setitem(cli.COMMANDS, "solve", fails)
    rc, out, err = run_cli(capsys, "solve", "p.json", "--budget", "4bpw")
    assert_clean_error(rc, err, "ilp/highs: time limit reached without a solution")


def test_missing_dependency_names_the_package(capsys, monkeypatch):
    def boom(a):
        raise ModuleNotFoundError("No module named 'llama_cpp'", name="llama_cpp")

    monkeypatch.setitem(cli.COMMANDS, "solve", boom)
    rc, _, err = run_cli(capsys, "solve", "p.json", "--budget", "4bpw")
    assert_clean_error(rc, err, "pip install llama-cpp-python")


def test_require_raises_a_missing_dependency_error():
    with pytest.raises(bitalloc.MissingDependencyError, match="pip install no-such-pkg") as e:
        bitalloc.require("no_such_module_xyz", "no-such-pkg", "the test")
    assert isinstance(e.value, ImportError) and isinstance(e.value, bitalloc.BitallocError)


def test_internal_error_says_bug_and_writes_the_traceback(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)

    def boom(a):
        raise KeyError("oops")

    monkeypatch.setitem(cli.COMMANDS, "solve", boom)
    rc, _, err = run_cli(capsys, "solve", "p.json", "--budget", "4bpw")
    assert rc == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "internal error (a bug in bitalloc" in lines[0], err
    path = lines[0].rsplit("traceback written to ", 1)[1]
    text = open(path).read()
    assert "Traceback" in text and "KeyError: 'oops'" in text
    with pytest.raises(KeyError):  # --debug shows it instead
        main(["--debug", "solve", "p.json", "--budget", "4bpw"])


def test_dp_refuses_a_front_that_would_not_fit_in_memory():
    """10,000 layers x 16 options grew past 9 GB before; now a SolverError names the size
    before the memory is taken (here with a small limit, so the test stays cheap)."""
    rng = np.random.default_rng(0)
    L, K = 10_000, 16
    cost = np.sort(rng.integers(1_000, 100_000, size=(L, K)), axis=1)
    loss = np.sort(rng.random((L, K)), axis=1)[:, ::-1].copy()
    problem = AllocationProblem(loss, cost)
    capacity = int(cost[:, K // 2].sum())
    with pytest.raises(SolverError, match=r"dp: the Pareto front needs about .* GiB .* over the limit of 0.01 GiB"):
        solve_dp(problem, capacity, max_bytes=10 * 2**20)


def test_dp_memory_limit_does_not_change_small_answers():
    rng = np.random.default_rng(1)
    cost = np.sort(rng.integers(10, 1000, size=(30, 6)), axis=1)
    loss = np.sort(rng.random((30, 6)), axis=1)[:, ::-1].copy()
    problem = AllocationProblem(loss, cost)
    cap = int(cost[:, 3].sum())
    a, b = solve_dp(problem, cap), solve_dp(problem, cap, max_bytes=2**22)
    assert np.array_equal(a.choice, b.choice) and a.objective == b.objective
