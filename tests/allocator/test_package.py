"""The package's front door: API names stay functions, importing it stays light."""

from __future__ import annotations

import json
import subprocess
import sys


def test_api_names_are_functions_after_submodule_imports():
    # allocator/solve.py and allocator/evaluate.py share names with API functions; importing
    # them (as bitalloc.api does) must not turn bitalloc.solve into a module.
    code = (
        "import bitalloc, bitalloc.allocator as allocator, bitalloc.allocator.api as api, importlib\n"
        "importlib.import_module('bitalloc.allocator.evaluate'); importlib.import_module('bitalloc.allocator.solve')\n"
        "from bitalloc.allocator.solve import plan_from_choice\n"
        "import types\n"
        "for n in ('solve', 'evaluate', 'profile', 'sweep', 'apply', 'run', 'load'):\n"
        "    for front in (bitalloc, allocator):\n"
        "        f = getattr(front, n)\n"
        "        assert callable(f) and not isinstance(f, types.ModuleType), (n, f)\n"
        "        assert f is getattr(api, n), n\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_import_is_light():
    """bitalloc, allocator, sensitivity and solvers import nothing heavy; kernels (the torch layer) only torch."""
    heavy = ("torch", "transformers", "pulp", "ray", "cvxpy", "triton")
    for pkg, allowed in (("bitalloc", ()), ("bitalloc.allocator", ()), ("bitalloc.sensitivity", ()), ("bitalloc.solvers", ()),
                         ("bitalloc.kernels.quant", ("torch",))):
        code = f"import json, sys, {pkg}; print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert set(got) <= set(allowed), f"importing {pkg} pulled in {got}"


def test_evaluate_plans_scores_identical_allocations_once(monkeypatch):
    """Plans with the same layer choices are applied and scored once; chunks bound the copies
    in memory and give the same results as one pass."""
    import torch

    import bitalloc
    from bitalloc.allocator import executor
    from bitalloc.allocator.evaluate import evaluate_plans

    loaded = bitalloc.load("random:llama-tiny", log=None)
    prof = bitalloc.profile(loaded, n_samples=2, seq_len=16, kl_samples=1, schemes=["w2g64z", "w4g128z"],
                             ref_schemes=["w2g64z"], progress=False, log=None)
    a, b = bitalloc.solve(prof, "3bpw"), bitalloc.solve(prof, "16bpw")
    plans = {"a": a, "a-again": a, "b": b}
    applied = []
    real = executor.apply
    monkeypatch.setattr(executor, "apply", lambda *x, **k: applied.append(1) or real(*x, **k))
    windows = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    res = evaluate_plans(loaded, plans, windows, chunk=1, progress=False)
    assert len(applied) == 2
    assert res["a-again"] is res["a"] and set(res) == {"fp16", "a", "a-again", "b"}
    one = evaluate_plans(loaded, plans, windows, progress=False)
    assert {k: v.ppl for k, v in one.items()} == {k: v.ppl for k, v in res.items()}
