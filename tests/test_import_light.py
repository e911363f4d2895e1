"""Importing the packages must stay light: no torch for solvers, no heavy imports at all for allocator."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "pkg,forbidden",
    [
        ("allocator", ["torch", "transformers", "pulp", "ray", "triton", "cvxpy"]),
        ("solvers", ["torch", "transformers", "ray", "triton"]),
        ("kernels", ["transformers", "triton", "ray"]),
        ("sensitivity", ["transformers", "ray", "triton"]),
    ],
)
def test_import_is_light(pkg, forbidden):
    code = f"import sys, {pkg}; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {pkg} pulled in {out}"
