"""bitalloc: mixed-precision bit allocation under an exact memory budget.

The front door of the Python API (this file is the ``bitalloc`` package; the four folders
beside it are its subpackages ``bitalloc.kernels``, ``bitalloc.sensitivity``,
``bitalloc.solvers`` and ``bitalloc.allocator``, mapped in pyproject.toml)::

    import bitalloc
    prof = bitalloc.profile("smollm2", out="profile.json")   # the expensive step, once
    plan = bitalloc.solve(prof, "3.5bpw")                     # a Plan; plan.save("plan.json")
    plans = bitalloc.sweep(prof, ["3bpw", "4bpw"])
    qmodel = bitalloc.apply("smollm2", plan)                  # nn.Module with QuantLinear layers
    bitalloc.save_quantized(qmodel, plan, "qmodel/")          # and bitalloc.load_quantized("qmodel/")
    results = bitalloc.evaluate("smollm2", [plan], text="../shared/data/wikitext2-test.txt")
    bitalloc.run("config.toml")                               # the whole batch job

Importing it is light: no torch, transformers or solver backend until a function needs it.
"""

from __future__ import annotations

import importlib

from .errors import BitallocError, MissingDependencyError

# name -> module (relative to this package) that defines it; loaded on first use
_EXPORTS = {
    "load": ".allocator.api",
    "profile": ".allocator.api",
    "load_profile": ".allocator.api",
    "solve": ".allocator.api",
    "sweep": ".allocator.api",
    "apply": ".allocator.api",
    "evaluate": ".allocator.api",
    "run": ".allocator.api",
    "RunResult": ".allocator.api",
    "save_quantized": ".allocator.executor",
    "load_quantized": ".allocator.executor",
    "Plan": ".allocator.plan",
    "PlanError": ".allocator.plan",
    "Budget": ".allocator.budget",
    "BudgetError": ".allocator.budget",
    "parse_budget": ".allocator.budget",
    "RunConfig": ".allocator.config",
    "load_config": ".allocator.config",
    "SensitivityProfile": ".sensitivity.profile",
    "parse_scheme": ".kernels.formats",
}

__all__ = sorted([*_EXPORTS, "BitallocError", "MissingDependencyError", "__version__"])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitalloc")
    except PackageNotFoundError:  # a checkout that was never installed
        return "0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        v = _version()
        globals()["__version__"] = v
        return v
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'bitalloc' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
