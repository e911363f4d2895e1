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

# -- the one base class of every user-facing error --------------------------------------
# Defined here, before anything else, so every subpackage can derive from it
# (``from .. import BitallocError``) without importing anything heavy; most user errors also
# derive from ValueError, so ``except ValueError`` keeps working. The CLI turns each into
# one line ``bitalloc: error: ...`` and exit code 2. (No root-level ``errors.py``: with the
# clone's root on sys.path that would be importable as a generic top-level ``errors``.)


class BitallocError(Exception):
    """A problem the user can fix (bad input, an unreachable budget, a missing file or
    package); the message says what and where, on one line."""


class MissingDependencyError(BitallocError, ImportError):
    """An optional or broken dependency; the message names the package to install."""

    def __init__(self, package: str, needed_for: str, cause: BaseException | None = None):
        detail = f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})" if cause and str(cause).strip() else ""
        super().__init__(f"{needed_for} needs the Python package {package!r}, which could not be imported{detail}; "
                         f"install it with: pip install {package}")
        self.package = package


def require(module: str, package: str | None = None, needed_for: str = "this step"):
    """Import ``module`` or raise :class:`MissingDependencyError` naming the pip package."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(package or module, needed_for, e) from e



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
    "add_fisher_table": ".allocator.api",
    "selection_fitness": ".allocator.api",
    "select_plan": ".allocator.candidates",
    "candidate_tables": ".allocator.candidates",
    "save_quantized": ".allocator.quantized_io",
    "load_quantized": ".allocator.quantized_io",
    "Plan": ".allocator.plan",
    "PlanError": ".allocator.plan",
    "Budget": ".allocator.budget",
    "BudgetError": ".allocator.budget",
    "parse_budget": ".allocator.budget",
    "RunConfig": ".allocator.config",
    "load_config": ".allocator.config",
    "SensitivityProfile": ".sensitivity.profile",
    "ProfileConfig": ".sensitivity.profile_config",
    "parse_scheme": ".kernels.formats",
    "Client": ".allocator.service.client",
    "ServiceError": ".allocator.service.client",
}

__all__ = sorted([*_EXPORTS, "BitallocError", "MissingDependencyError", "require", "__version__"])


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
