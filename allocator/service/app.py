"""The FastAPI application: routes under ``/v1`` (names fixed; see the README's "Service").

    GET    /v1/health
    POST   /v1/profiles                      202 job (bitalloc profile's fields)
    POST   /v1/profiles/upload               a profile JSON made by the CLI (streamed, validated like `bitalloc solve`)
    GET    /v1/profiles, /v1/profiles/{id}   metadata
    GET    /v1/profiles/{id}/frontier?points=20   budget sweep: JSON, or PNG with Accept: image/png
    GET    /v1/jobs/{id}, DELETE /v1/jobs/{id}    state, progress, result; cancel
    POST   /v1/plans                         201 plan, synchronous, content-addressed
    GET    /v1/plans/{id}                    the plan JSON exactly as `bitalloc solve` writes it
    POST   /v1/exports                       202 job (registered targets only)
    GET    /v1/artifacts/{id}                download

OpenAPI at ``/openapi.json``, interactive docs at ``/docs``.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Body, FastAPI, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from . import db as _db
from .auth import TokenAuth
from .db import Database, default_url, dumps, loads
from .errors import ApiError, BodyTooLarge, install_handlers
from .exports import ExportTarget, available_targets
from .jobs import ACTIVE, JobManager, job_view
from .planning import Planner, profile_meta, profile_text_problem, profile_view
from .schemas import HEX64, JOB_ID, ExportRequest, PlanRequest, ProfileRequest
from .storage import ArtifactStore

__all__ = ["ServiceConfig", "create_app"]

log = logging.getLogger("bitalloc.service")
MiB = 1 << 20


@dataclass(frozen=True)
class ServiceConfig:
    state_dir: str
    db_url: str | None = None
    workers: int = 1
    ray_address: str | None = None
    token_hashes: tuple[str, ...] = ()
    max_body_bytes: int = 8 * MiB  # JSON requests (inline calibration text included)
    max_upload_bytes: int = 1024 * MiB  # profile uploads
    export_targets: tuple[ExportTarget, ...] = ()
    start_jobs: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a positive integer, got {self.workers!r}")
        if self.max_body_bytes < 1024 or self.max_upload_bytes < 1024:
            raise ValueError("body limits must be at least 1024 bytes")


class BodyLimit:
    """Pure ASGI middleware: 413 for a declared Content-Length over the limit; bodies sent
    without one are counted as they stream and stopped at the limit."""

    def __init__(self, app, limit: int, upload_limit: int, upload_path: str = "/v1/profiles/upload"):
        self.app, self.limit, self.upload_limit, self.upload_path = app, limit, upload_limit, upload_path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"] == self.upload_path else self.limit
        declared = None
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = -1
        if declared is not None and (declared < 0 or declared > limit):
            msg = (f"request body is larger than the limit of {limit} bytes" if declared > limit
                   else "invalid Content-Length header")
            data = dumps({"error": msg, "field": "body", "limit_bytes": limit}).encode()
            await send({"type": "http.response.start", "status": 413 if declared > limit else 400,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": data})
            return
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return msg

        return await self.app(scope, counted, send)


def create_app(cfg: ServiceConfig) -> FastAPI:
    store = ArtifactStore(cfg.state_dir)
    db = Database(cfg.db_url or default_url(store.state))
    if cfg.token_hashes:  # the database mirrors the token file (hashes only)
        with db.engine.begin() as c:
            c.execute(_db.tokens.delete())
            for h in cfg.token_hashes:
                c.execute(_db.tokens.insert().values(hash=h, label="token-file", created_at=time.time()))
    targets = available_targets(list(cfg.export_targets))
    planner = Planner(db, store)
    manager = JobManager(db, store, workers=cfg.workers, ray_address=cfg.ray_address, targets=targets)

    def on_done(job: dict, output: Path) -> dict:
        return _store_job_output(db, store, job, output, targets)

    manager.on_done = on_done

    @asynccontextmanager
    async def lifespan(app):
        if cfg.start_jobs:
            manager.start()
        yield
        await run_in_threadpool(manager.stop)
        db.dispose()

    app = FastAPI(title="bitalloc", version=_version(), lifespan=lifespan,
                  description="Mixed-precision bit allocation as a service: profile a model once, ask for plans "
                              "at any budget in milliseconds. Errors are JSON: {\"error\": ..., \"field\": ...}.")
    install_handlers(app)
    app.state.db, app.state.store, app.state.planner, app.state.manager = db, store, planner, manager
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes, upload_limit=cfg.max_upload_bytes)
    app.add_middleware(TokenAuth, hashes=list(cfg.token_hashes))

    job_id = PathParam(pattern=JOB_ID, description="a job id (job_ + 32 hex digits)")
    hex_id = PathParam(pattern=HEX64, description="a sha256 id (64 hex digits)")

    # -- health ----------------------------------------------------------------------------
    @app.get("/v1/health", tags=["service"])
    def health():
        counts = {s: len(db.rows(_db.jobs, where={"state": s})) for s in ACTIVE}
        return {"status": "ok", "version": _version(), "schema_version": db.version(), "jobs": counts,
                "workers": cfg.workers, "ray_address": cfg.ray_address, "auth": bool(cfg.token_hashes),
                "export_targets": sorted(targets)}

    # -- profiles ------------------------------------------------------------------------
    @app.post("/v1/profiles", status_code=202, tags=["profiles"])
    def submit_profile(req: ProfileRequest = Body(...)):
        request = req.model_dump()
        files = {}
        if not isinstance(req.calibration, str):
            text = req.calibration.text.encode("utf-8")
            request["calibration"] = {"text_sha256": hashlib.sha256(text).hexdigest(), "bytes": len(text)}
            files["calibration.txt"] = text
        key = "profile:" + hashlib.sha256(dumps(request).encode()).hexdigest()
        row, dup = manager.submit("profile", request, key, files)
        if row is None:
            raise ApiError(409, f"an identical profiling job is already queued or running: {dup}", "body", job=dup)
        return job_view(row)

    @app.post("/v1/profiles/upload", status_code=201, tags=["profiles"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"type": "object", "description": "a profile JSON (bitalloc profile)"}}}}})
    async def upload_profile(request: Request):
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", "application/octet-stream"):
            raise ApiError(415, f"send the profile file itself as the body (Content-Type application/json), "
                                f"not {ctype!r}", "content-type")
        tmp = store.tmp / f"upload-{uuid.uuid4().hex}.json"
        n = 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in request.stream():
                    n += len(chunk)
                    if n > cfg.max_upload_bytes:
                        raise BodyTooLarge(cfg.max_upload_bytes)
                    f.write(chunk)
            if n == 0:
                raise ApiError(400, "the body is empty: send a profile JSON", "body")
            view, created = await run_in_threadpool(_register_upload, db, store, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return JSONResponse(view, status_code=201 if created else 200)

    @app.get("/v1/profiles", tags=["profiles"])
    def list_profiles(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
        rows = db.rows(_db.profiles, order=_db.profiles.c.created_at, limit=limit, offset=offset)
        return {"profiles": [profile_view(r, None) for r in rows]}

    @app.get("/v1/profiles/{id}", tags=["profiles"])
    def get_profile(id: str = hex_id):
        row = db.one(_db.profiles, id)
        if row is None:
            raise ApiError(404, f"id: no profile {id!r} on this server", "id")
        return profile_view(row, db.one(_db.artifacts, id))

    @app.get("/v1/profiles/{id}/frontier", tags=["profiles"],
             responses={200: {"content": {"application/json": {}, "image/png": {}}}})
    def frontier(request: Request, id: str = hex_id, points: int = Query(20, ge=2, le=200),
                 method: str = Query("dp", pattern="^(ilp|dp|lagrangian)$")):
        res = planner.frontier(id, points, method)
        accept = request.headers.get("accept", "")
        if "image/png" in accept and "application/json" not in accept.split(",")[0]:
            return Response(_frontier_png(res), media_type="image/png")
        return res

    # -- jobs ------------------------------------------------------------------------------
    @app.get("/v1/jobs/{id}", tags=["jobs"])
    def get_job(id: str = job_id):
        row = db.one(_db.jobs, id)
        if row is None:
            raise ApiError(404, f"id: no job {id!r} on this server", "id")
        return job_view(row)

    @app.delete("/v1/jobs/{id}", tags=["jobs"])
    def cancel_job(id: str = job_id):
        row = db.one(_db.jobs, id)
        if row is None:
            raise ApiError(404, f"id: no job {id!r} on this server", "id")
        if row["state"] not in ACTIVE:
            raise ApiError(409, f"job {id} is already {row['state']}; only queued or running jobs can be cancelled",
                           "id", state=row["state"])
        return job_view(manager.cancel(id))

    # -- plans -----------------------------------------------------------------------------
    @app.post("/v1/plans", status_code=201, tags=["plans"])
    def create_plan(req: PlanRequest = Body(...)):
        summary, created = planner.plan(req)
        if isinstance(summary, str):  # stored: the JSON text as it was first answered
            return Response(summary, media_type="application/json", status_code=200)
        return JSONResponse(summary, status_code=201 if created else 200)

    @app.get("/v1/plans/{id}", tags=["plans"], responses={200: {"content": {"application/json": {}}}})
    def get_plan(id: str = hex_id):
        return Response(planner.plan_file(id), media_type="application/json")

    # -- exports ---------------------------------------------------------------------------
    @app.post("/v1/exports", status_code=202, tags=["exports"])
    def submit_export(req: ExportRequest = Body(...)):
        if req.target not in targets:
            have = ", ".join(sorted(targets)) or "none yet"
            raise ApiError(400, f"target: export target {req.target!r} is not available on this server "
                                f"(available: {have})", "target", available=sorted(targets))
        plan = db.one(_db.plans, req.plan)
        if plan is None:
            raise ApiError(404, f"plan: no plan {req.plan!r} on this server", "plan")
        request = {**req.model_dump(), "plan_artifact": plan["artifact_id"]}
        key = "export:" + hashlib.sha256(dumps(request).encode()).hexdigest()
        row, dup = manager.submit("export", request, key)
        if row is None:
            raise ApiError(409, f"an identical export job is already queued or running: {dup}", "body", job=dup)
        return job_view(row)

    # -- artifacts -------------------------------------------------------------------------
    @app.get("/v1/artifacts/{id}", tags=["artifacts"], response_class=FileResponse)
    def get_artifact(id: str = hex_id):
        row = db.one(_db.artifacts, id)
        if row is None or not store.exists(id):
            raise ApiError(404, f"id: no artifact {id!r} on this server", "id")
        return FileResponse(store.path(id), media_type=row["media_type"], filename=row["filename"])

    return app


def _register_upload(db: Database, store: ArtifactStore, tmp: Path) -> tuple[dict, bool]:
    from bitalloc.sensitivity.profile import ProfileError, SensitivityProfile

    try:
        prof = SensitivityProfile.load(tmp)  # exactly what `bitalloc solve` does with its profile argument
    except ProfileError as e:
        msg = str(e).replace(str(tmp), "upload").split(": ", 1)[-1]
        raise ApiError(422, f"not a valid profile: {msg}", "body") from None
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RecursionError) as e:
        raise ApiError(422, f"not a valid profile ({type(e).__name__}: {e})", "body") from None
    problem = profile_text_problem(prof)
    if problem:
        raise ApiError(422, f"not a valid profile: {problem}", "body")
    pid = store.put_file(tmp)
    existed = db.one(_db.profiles, pid) is not None
    db.insert(_db.artifacts, id=pid, kind="profile", media_type="application/json", bytes=tmp.stat().st_size,
              filename=f"profile-{pid[:12]}.json", created_at=time.time())
    db.insert(_db.profiles, **profile_meta(pid, prof, source="upload"))
    return profile_view(db.one(_db.profiles, pid), db.one(_db.artifacts, pid)), not existed


def _store_job_output(db: Database, store: ArtifactStore, job: dict, output: Path, targets: dict) -> dict:
    """A finished job's output into the artifact store (and, for a profile, the profiles table)."""
    if job["kind"] == "profile":
        from bitalloc.sensitivity.profile import SensitivityProfile

        prof = SensitivityProfile.load(output)  # with its sidecar, written beside it by the worker
        data = prof.to_json_bytes()  # stored self-contained: one content-addressed file per profile
        size = len(data)
        pid = store.put_bytes(data)
        db.insert(_db.artifacts, id=pid, kind="profile", media_type="application/json", bytes=size,
                  filename=f"profile-{pid[:12]}.json", created_at=time.time())
        db.insert(_db.profiles, **profile_meta(pid, prof, source="job", job_id=job["id"]))
        return {"profile_id": pid, "artifact": pid}
    req = loads(job["request"])
    files = [p for p in output.rglob("*") if p.is_file()]
    if len(files) == 1:
        name, media = files[0].name, targets[req["target"]].media_type if req["target"] in targets else "application/octet-stream"
        size = files[0].stat().st_size
        aid = store.put_file(files[0], move=True)
    else:
        name, media = f"export-{req['target']}.tar", "application/x-tar"
        aid = store.put_tree(output)
        size = store.path(aid).stat().st_size
    db.insert(_db.artifacts, id=aid, kind="export", media_type=media, bytes=size, filename=name, created_at=time.time())
    return {"artifact": aid, "filename": name, "bytes": size, "target": req["target"], "plan": req["plan"]}


def _frontier_png(res: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(p["bpw"], p["loss_total"]) for p in res["points"] if "bpw" in p]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    if pts:
        ax.plot(*zip(*pts), marker="o")
    ax.set_xlabel("bits per weight (quantized layers, metadata included)")
    ax.set_ylabel(f"predicted loss ({res.get('loss_unit') or 'profile units'})")
    if pts and min(y for _, y in pts) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"frontier of profile {res['profile'][:12]}… ({res['method']})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _version() -> str:
    import bitalloc

    return bitalloc.__version__
