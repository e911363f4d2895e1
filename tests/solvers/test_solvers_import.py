"""solvers/ is pure numpy: importing it must not pull in torch or the other packages."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules_after_import(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_solvers_does_not_import_torch_or_siblings():
    loaded = _modules_after_import("from bitalloc import solvers")
    assert "torch" not in loaded
    for sibling in ("kernels", "sensitivity", "allocator"):
        assert f"bitalloc.{sibling}" not in loaded and sibling not in loaded


def test_solving_does_not_import_torch():
    loaded = _modules_after_import(
        "import numpy as np; from bitalloc import solvers; "
        "p = solvers.AllocationProblem(np.ones((2, 2)), np.array([[1, 2], [3, 4]])); "
        "solvers.solve(p, 6); solvers.solve_dp(p, 6)"
    )
    assert "torch" not in loaded


def test_solving_prints_nothing_to_stdout():
    """CLIs print JSON plans to stdout: solver banners and logs must not leak into it."""
    code = (
        "import numpy as np; from bitalloc import solvers; "
        "p = solvers.AllocationProblem(np.ones((2, 2)), np.array([[1, 2], [3, 4]])); "
        "solvers.solve_ilp(p, 6, backend='highs'); solvers.solve_ilp(p, 6, backend='cbc')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout == ""
