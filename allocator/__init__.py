"""bitalloc's front door: profile -> solve -> plan -> apply -> evaluate.

Importing ``allocator`` is light (no torch, transformers or solver import); the API
functions load what they need on first use.
"""

from __future__ import annotations

import importlib
import sys
import types

_API = {"load", "profile", "load_profile", "solve", "sweep", "apply", "evaluate", "run"}
_OTHER = {"Plan": ".plan", "PlanError": ".plan", "Budget": ".budget", "parse_budget": ".budget",
          "BudgetError": ".budget", "RunConfig": ".config", "load_config": ".config"}

__all__ = sorted(_API | set(_OTHER))


class _Package(types.ModuleType):
    """``allocator.solve`` and ``allocator.evaluate`` are API functions, but also the names of
    submodules (allocator/solve.py, allocator/evaluate.py). Importing a submodule makes Python
    set it as an attribute of the package, which would shadow the function (``allocator.solve``
    became a module once ``allocator.api`` had been imported). The API names are never
    overwritten by a submodule; the submodules stay importable (``from allocator.solve import
    plan_from_choice``, ``importlib.import_module("bitalloc.allocator.solve")``)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name == "__version__":  # one version, read from the installed metadata by the front door
        from bitalloc import __version__

        return __version__
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    if name in _OTHER:
        return getattr(importlib.import_module(_OTHER[name], __name__), name)
    raise AttributeError(f"module 'allocator' has no attribute {name!r}")
