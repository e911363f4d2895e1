"""Plans and frontiers from stored profiles: the synchronous, millisecond part of the service.

A plan request is solved with the same machinery as ``bitalloc solve``
(:func:`bitalloc.allocator.solve.solve`) and written as the same JSON (``Plan.to_dict``,
indent 1), except that the plan's ``profile`` reference holds the profile's id and sha256
instead of a local path. Plans are content-addressed by their request: the plan id is the
sha256 of the canonical request (every field, defaults filled in), so the same request
returns the same id and the stored plan, solved once.

Loaded profiles are kept in a small LRU cache (parsing a SmolLM2 profile costs far more
than solving it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections import OrderedDict

from . import db as _db
from .db import Database, dumps, loads
from .errors import ApiError
from .schemas import PlanRequest
from .storage import ArtifactStore

__all__ = ["Planner", "plan_id", "profile_meta"]

PLAN_REQUEST_SCHEMA = "bitalloc.plan-request/1"


def _request_dict(req: PlanRequest) -> dict:
    """The request as stored and hashed; the default table is left out, so plan ids of requests
    made before the field existed stay the same."""
    d = req.model_dump()
    if d.get("table") == "profile":
        d.pop("table")
    return d


def plan_id(req: PlanRequest) -> str:
    return hashlib.sha256(dumps({"schema": PLAN_REQUEST_SCHEMA, **_request_dict(req)}).encode()).hexdigest()


def profile_meta(pid: str, prof, *, source: str, job_id: str | None = None) -> dict:
    """The profile's row in the database."""
    md = prof.metadata or {}
    return dict(id=pid, model_spec=str(prof.model.get("spec", "")), model_sha256=_text((prof.fingerprint or {}).get("sha256")),
                n_layers=prof.n_layers, schemes=dumps(list(prof.schemes)), groups=dumps(sorted(prof.tables)),
                table_kind=_text(md.get("table")), source=source, job_id=job_id, created_at=time.time())


def _text(v) -> str | None:
    """A profile's free-form value as the TEXT column holds it (PostgreSQL will not cast a number)."""
    return None if v is None else v if isinstance(v, str) else dumps(v)


def profile_text_problem(prof) -> str | None:
    """What in an (uploaded) profile no database text column can hold: a NUL character, which
    PostgreSQL refuses (SQLite would store it); None when all is well."""
    meta = profile_meta("", prof, source="upload")
    for col, field in (("model_spec", "model.spec"), ("model_sha256", "model.fingerprint.sha256"),
                       ("table_kind", "metadata.table")):
        if meta[col] is not None and "\x00" in meta[col]:
            return f"{field} contains a NUL character"
    return None


def profile_view(row: dict, artifact: dict | None) -> dict:
    return {"id": row["id"], "model": {"spec": row["model_spec"], "sha256": row["model_sha256"]},
            "n_layers": row["n_layers"], "schemes": loads(row["schemes"]), "groups": loads(row["groups"]),
            "table": row["table_kind"], "source": row["source"], "job_id": row["job_id"], "created_at": row["created_at"],
            "bytes": artifact["bytes"] if artifact else None, "artifact": row["id"]}


class Planner:
    def __init__(self, db: Database, store: ArtifactStore, *, cache_size: int = 4, max_concurrent: int = 4):
        self.db, self.store = db, store
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._solves = threading.BoundedSemaphore(max_concurrent)  # CPU-bound: do not thrash the cores
        self._frontiers: OrderedDict[tuple, dict] = OrderedDict()

    # -- profiles ------------------------------------------------------------------------
    def profile(self, pid: str, field: str = "profile"):
        with self._lock:
            if pid in self._cache:
                self._cache.move_to_end(pid)
                return self._cache[pid]
            lk = self._loading.setdefault(pid, threading.Lock())
        with lk:  # one load per profile, however many requests wait for it
            with self._lock:
                if pid in self._cache:
                    return self._cache[pid]
            if self.db.one(_db.profiles, pid) is None:
                raise ApiError(404, f"{field}: no profile {pid!r} on this server", field)
            from bitalloc.sensitivity.profile import SensitivityProfile

            prof = SensitivityProfile.load(self.store.path(pid))
            with self._lock:
                self._cache[pid] = prof
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            return prof

    # -- plans ---------------------------------------------------------------------------
    def plan(self, req: PlanRequest) -> tuple[dict, bool]:
        """(the POST answer, created): the stored answer (its JSON text, served as it is) when
        this request was solved before, else a dict."""
        pid = plan_id(req)
        row = self.db.one(_db.plans, pid)
        if row is not None:
            return row["summary"], False
        prof = self.profile(req.profile)
        _check_request(prof, req)
        from bitalloc.allocator.solve import AllocationError, InfeasibleBudget, solve

        kw = dict(method=req.method, backend=req.backend, time_limit_s=req.time_limit_s, schemes=req.schemes,
                  pins=req.pins or None, forbid=req.forbid or None, group_weights=req.group_weights,
                  group_limits=req.group_limits, group_shares=req.group_shares, group_norm=req.group_norm)
        from bitalloc.allocator.candidates import tagged, with_table

        try:
            tabled = with_table(prof, req.table)
        except ValueError as e:  # a calibration the profile lacks: the message names the ones it has
            raise ApiError(422, f"table: {e}", "table") from None
        with self._solves:
            try:
                plan = tagged(solve(tabled, req.budget, **kw), req.table)
            except InfeasibleBudget as e:
                raise ApiError(422, f"budget: {e}", "budget", min_bpw=e.min_bpw, max_bpw=e.max_bpw) from None
            except AllocationError as e:
                raise ApiError(422, str(e), _guess_field(str(e))) from None
        plan = dataclasses.replace(plan, profile={"schema": prof.schema_version, "id": req.profile,
                                                  "sha256": req.profile})
        text = json.dumps(plan.file_dict(), indent=1)  # exactly what Plan.save (bitalloc solve) writes
        aid = self.store.put_bytes(text.encode())
        self.db.insert(_db.artifacts, id=aid, kind="plan", media_type="application/json", bytes=len(text.encode()),
                       filename=f"plan-{pid[:12]}.json", created_at=time.time())
        summary = {"id": pid, "profile": req.profile, "artifact": aid, "label": plan.label, "budget": plan.budget,
                   "layers": {f: lp.scheme for f, lp in plan.layers.items()}, "predicted": plan.predicted,
                   "solver": {k: plan.solver.get(k) for k in ("method", "solver", "status", "objective", "gap",
                                                              "solve_time_s", "capacity_bits", "used_bits")}}
        if not self.db.insert(_db.plans, id=pid, profile_id=req.profile, artifact_id=aid, request=dumps(_request_dict(req)),
                              summary=dumps(summary), created_at=time.time()):
            return self.db.one(_db.plans, pid)["summary"], False  # a concurrent twin got there first
        return summary, True

    def plan_file(self, pid: str) -> bytes:
        row = self.db.one(_db.plans, pid)
        if row is None:
            raise ApiError(404, f"id: no plan {pid!r} on this server", "id")
        return self.store.path(row["artifact_id"]).read_bytes()

    # -- frontier ------------------------------------------------------------------------
    def frontier(self, pid: str, points: int, method: str) -> dict:
        key = (pid, points, method)
        with self._lock:
            if key in self._frontiers:
                return self._frontiers[key]
        prof = self.profile(pid, "id")
        from bitalloc.allocator.budget import Budget
        from bitalloc.allocator.arrays import build_problem
        from bitalloc.allocator.solve import AllocationError, solve
        from bitalloc.solvers import achievable_range
        from bitalloc.solvers.sweep import frontier_capacities

        problem = build_problem(prof)
        lo, hi = achievable_range(problem)
        out = []
        t0 = time.perf_counter()
        with self._solves:
            for cap in frontier_capacities(problem, points):
                try:
                    plan = solve(prof, Budget("bytes", cap / 8, "layers", f"layers:{cap}bits"), method=method)
                except AllocationError as e:
                    out.append({"capacity_bits": cap, "error": str(e)})
                    continue
                p = plan.predicted
                out.append({"capacity_bits": cap, "bpw": p["bpw"], "quantized_bytes": p["quantized_bytes"],
                            "total_bytes": p["total_bytes"], "loss_total": p["loss_total"], "loss": p["loss"],
                            "status": plan.solver.get("status"), "schemes": plan.scheme_counts()})
        res = {"profile": pid, "method": method, "points": out, "loss_unit": prof.metadata.get("loss_units"),
               "min_bpw": lo / max(1, _n_weights(prof)), "max_bpw": hi / max(1, _n_weights(prof)),
               "solve_s": round(time.perf_counter() - t0, 3)}
        with self._lock:
            self._frontiers[key] = res
            while len(self._frontiers) > 32:
                self._frontiers.popitem(last=False)
        return res


def _n_weights(prof) -> int:
    return int(sum(l.out_features * l.in_features for l in prof.layers))


def _guess_field(msg: str) -> str | None:
    m = msg.lower()
    if "no scheme left" in m:
        return "forbid"
    for word, field in (("group", "group_weights"), ("pattern", "pins"), ("pins", "pins"), ("forbid", "forbid"),
                        ("scheme", "schemes"), ("method", "method"), ("budget", "budget")):
        if word in m:
            return field
    return None


def _check_request(prof, req: PlanRequest) -> None:
    """What only the profile can say: patterns that match nothing, schemes it lacks, unknown groups."""
    from bitalloc.kernels.formats import parse_scheme
    from bitalloc.sensitivity.patterns import match_pattern

    if req.model_sha256 and req.model_sha256 != (prof.fingerprint or {}).get("sha256"):
        raise ApiError(409, f"model_sha256: profile {req.profile[:12]}… is for another model "
                            f"({prof.model.get('spec')}, weights sha256 {(prof.fingerprint or {}).get('sha256', '?')[:12]}…)",
                       "model_sha256")
    have = set(prof.schemes)

    def scheme(name: str, field: str) -> None:
        if parse_scheme(name).name not in have:
            raise ApiError(422, f"{field}: scheme {name!r} is not in the profile (profiled: {', '.join(prof.schemes)})",
                           field)

    def pattern(p: str, field: str) -> None:
        if not any(match_pattern(p, l.fqn) for l in prof.layers):
            raise ApiError(422, f"{field}: pattern {p!r} matches no layer of the profile", field)

    for i, s in enumerate(req.schemes or ()):
        scheme(s, f"schemes[{i}]")
    for p, s in req.pins.items():
        pattern(p, f"pins.{p}")
        scheme(s, f"pins.{p}")
    for p, ss in req.forbid.items():
        pattern(p, f"forbid.{p}")
        for s in ss:
            scheme(s, f"forbid.{p}")
    for name in ("group_weights", "group_limits", "group_shares"):
        unknown = sorted(set(getattr(req, name) or {}) - set(prof.tables))
        if unknown:
            raise ApiError(422, f"{name}: unknown metric group(s) {unknown}; the profile has {sorted(prof.tables)}", name)
    if req.method in ("qp", "qp-relax", "separable") and not prof.pairs:
        raise ApiError(422, f"method: {req.method!r} needs pair terms in the profile; use 'ilp'", "method")
