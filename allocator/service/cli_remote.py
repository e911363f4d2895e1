"""``bitalloc solve --server URL``: the same command, solved by a bitalloc server."""

from __future__ import annotations

from pathlib import Path

__all__ = ["solve_remote"]


def solve_remote(a, kw: dict):
    """Upload PROFILE if it is a local file (else it is a profile id on the server), ask for the
    plan, and write the server's plan file to ``--out`` byte for byte; returns the Plan."""
    from bitalloc.allocator.plan import Plan

    from .client import Client

    token = Path(a.token_file).read_text().strip().splitlines()[0] if a.token_file else None
    with Client(a.server, token=token) as c:
        pid = c.upload_profile(a.profile)["id"] if Path(a.profile).is_file() else a.profile
        body = {k: v for k, v in kw.items() if v not in (None, {}, [])}
        if "time_limit_s" in body:
            body["time_limit_s"] = float(body["time_limit_s"])
        res = c.solve(pid, a.budget, **body)
        path = c.save_plan(res["id"], a.out)
    return Plan.load(path)
