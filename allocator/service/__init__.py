"""The allocation service, ``bitalloc serve``: profile once, plans on request, over HTTP.

One module per job: :mod:`.app` (FastAPI routes), :mod:`.schemas` (request bodies),
:mod:`.errors` (JSON errors), :mod:`.db` (SQLAlchemy tables and versioned migrations),
:mod:`.storage` (content-addressed artifact files), :mod:`.jobs` (the job manager) and
:mod:`.worker` (one job in its own process), :mod:`.planning` (plans and frontiers from
stored profiles), :mod:`.exports` (export targets by name), :mod:`.auth` (bearer tokens),
:mod:`.server` (``bitalloc serve``) and :mod:`.client` (``bitalloc.Client``).

Importing this package is light; FastAPI, SQLAlchemy and uvicorn load with the modules
that need them.
"""

from __future__ import annotations

__all__ = ["Client", "ServiceError", "serve"]


def __getattr__(name: str):
    if name in ("Client", "ServiceError"):
        from . import client

        return getattr(client, name)
    if name == "serve":
        from .server import serve

        return serve
    raise AttributeError(name)
