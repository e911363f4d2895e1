"""Importing the packages must stay light: no torch for solvers, no heavy imports at all for the front door."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module,forbidden",
    [
        ("bitalloc", ["torch", "transformers", "pulp", "ray", "triton", "cvxpy", "numpy"]),
        ("bitalloc.allocator", ["torch", "transformers", "pulp", "ray", "triton", "cvxpy"]),
        ("bitalloc.solvers", ["torch", "transformers", "ray", "triton"]),
        ("bitalloc.kernels.formats", ["torch", "transformers", "triton", "ray"]),
        ("bitalloc.kernels.quant", ["transformers", "triton", "ray"]),
        ("bitalloc.sensitivity", ["transformers", "ray", "triton"]),
    ],
)
def test_import_is_light(module, forbidden):
    code = f"import sys, {module}; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {module} pulled in {out}"
