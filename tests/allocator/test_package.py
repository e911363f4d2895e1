"""The package's front door: API names stay functions, importing it stays light."""

from __future__ import annotations

import json
import subprocess
import sys


def test_api_names_are_functions_after_submodule_imports():
    # allocator/solve.py and allocator/evaluate.py share names with API functions; importing
    # them (as allocator.api does) must not turn allocator.solve into a module.
    code = (
        "import allocator, allocator.api, importlib\n"
        "importlib.import_module('allocator.evaluate'); importlib.import_module('allocator.solve')\n"
        "from allocator.solve import plan_from_choice\n"
        "import types\n"
        "for n in ('solve', 'evaluate', 'profile', 'sweep', 'apply', 'run', 'load'):\n"
        "    f = getattr(allocator, n)\n"
        "    assert callable(f) and not isinstance(f, types.ModuleType), (n, f)\n"
        "    assert f is getattr(allocator.api, n), n\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_import_is_light():
    """allocator, sensitivity and solvers import nothing heavy; kernels (the torch layer) only torch."""
    heavy = ("torch", "transformers", "pulp", "ray", "cvxpy", "triton")
    for pkg, allowed in (("allocator", ()), ("sensitivity", ()), ("solvers", ()), ("kernels", ("torch",))):
        code = f"import json, sys, {pkg}; print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert set(got) <= set(allowed), f"importing {pkg} pulled in {got}"
