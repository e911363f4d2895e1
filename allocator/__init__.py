"""bitalloc's front door: profile -> solve -> plan -> apply -> evaluate.

Importing ``allocator`` is light (no torch, transformers or solver import); the API
functions load what they need on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {"load", "profile", "load_profile", "solve", "sweep", "apply", "evaluate", "run"}
_OTHER = {"Plan": ".plan", "PlanError": ".plan", "Budget": ".budget", "parse_budget": ".budget",
          "BudgetError": ".budget", "RunConfig": ".config", "load_config": ".config"}

__all__ = sorted(_API | set(_OTHER))


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    if name in _OTHER:
        return getattr(importlib.import_module(_OTHER[name], __name__), name)
    raise AttributeError(f"module 'allocator' has no attribute {name!r}")
