"""Jobs: profiling and export requests, run by worker processes, surviving restarts.

A job is a row in the database (``queued`` -> ``running`` -> ``done`` | ``failed`` |
``cancelled``) and a folder ``STATE/jobs/<id>/``. ``--workers N`` dispatcher threads each
claim the oldest queued job (an atomic ``UPDATE ... WHERE state = 'queued'``) and run it in
a fresh process (:mod:`.worker`; never in a request handler), reading its progress events
into the row. With ``--ray-address`` a profile's items run on that cluster (Hessian shards, proxy rows
and measurements; checkpointed in the job folder).

Nothing is lost to a crash: the worker dies with the server (``PR_SET_PDEATHSIG`` and a
parent watch), and on start-up every job still marked ``running`` is queued again; a
measured profile then resumes from its checkpoint in the job folder, so the finished
profile equals an uninterrupted run. Finished jobs, profiles and plans are rows and
content-addressed files, written before the job is marked done.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from . import db as _db
from .db import Database, dumps, loads
from .storage import ArtifactStore

__all__ = ["JobManager", "job_view", "ACTIVE", "FINAL", "new_job_id"]

log = logging.getLogger("bitalloc.service")
ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


def job_view(row: dict) -> dict:
    return {
        "id": row["id"], "kind": row["kind"], "state": row["state"],
        "progress": {"done": row["progress_done"], "total": row["progress_total"], "eta_s": row["eta_s"]},
        "error": row["error"], "error_kind": row.get("error_kind"),  # a failed job's: "input" | "internal"
        "result": loads(row["result"]), "request": loads(row["request"]),
        "attempts": row["attempts"], "created_at": row["created_at"], "started_at": row["started_at"],
        "finished_at": row["finished_at"],
    }


def _die_with_parent() -> None:  # preexec_fn: the worker gets SIGKILL when the server goes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker's own parent watch still ends it


class JobManager:
    def __init__(self, db: Database, store: ArtifactStore, *, workers: int = 1, ray_address: str | None = None,
                 targets: dict | None = None, on_done=None, python: str = sys.executable):
        self.db, self.store = db, store
        self.n_workers = workers
        self.ray_address = ray_address
        self.targets = targets if targets is not None else {}
        self.on_done = on_done  # (job row, output path) -> result dict; set by the app
        self.python = python
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        for i in range(self.n_workers):
            t = threading.Thread(target=self._loop, name=f"bitalloc-job-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def recover(self) -> list[str]:
        """Jobs a previous server left ``running``: cancelled if that was asked, else queued again."""
        again = []
        for row in self.db.rows(_db.jobs, where={"state": "running"}):
            if row["cancel_requested"]:
                self._finish(row["id"], "cancelled", error="cancelled")
                continue
            self.db.update(_db.jobs, row["id"], where={"state": "running"}, state="queued", eta_s=None)
            again.append(row["id"])
        if again:
            log.warning("re-queued %d job(s) left running by a previous server: %s", len(again), ", ".join(again))
        return again

    def stop(self, timeout: float = 10.0) -> None:
        """Stop dispatching and end running workers; their jobs stay ``running`` and resume on the next start."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()

    def wake(self) -> None:
        self._wake.set()

    # -- requests ----------------------------------------------------------------------------
    def submit(self, kind: str, request: dict, dedupe_key: str, files: dict[str, bytes] | None = None):
        """Insert a queued job; returns (row, None), or (None, existing id) for an active duplicate."""
        for _ in range(3):
            jid = new_job_id()
            d = self.store.job_dir(jid)
            d.mkdir(parents=True, exist_ok=False)
            for name, data in (files or {}).items():
                from bitalloc.sensitivity.artifact import write_bytes

                write_bytes(d / name, data)
            ok = self.db.insert(_db.jobs, id=jid, kind=kind, state="queued", request=dumps(request),
                                dedupe_key=dedupe_key, created_at=time.time(), attempts=0, cancel_requested=0)
            if ok:
                self.wake()
                return self.db.one(_db.jobs, jid), None
            _rmtree(d)
            dup = self.db.rows(_db.jobs, where={"dedupe_key": dedupe_key})
            if dup:
                return None, dup[0]["id"]
        raise RuntimeError("could not insert the job")  # pragma: no cover - a key freed and taken again twice

    def cancel(self, jid: str) -> dict | None:
        row = self.db.one(_db.jobs, jid)
        if row is None or row["state"] in FINAL:
            return row
        self.db.update(_db.jobs, jid, cancel_requested=1)
        if self.db.update(_db.jobs, jid, where={"state": "queued"}, state="cancelled", dedupe_key=None,
                          finished_at=time.time(), error="cancelled"):
            return self.db.one(_db.jobs, jid)
        with self._lock:
            p = self._procs.get(jid)
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for _ in range(600):  # the dispatcher thread records the end
            row = self.db.one(_db.jobs, jid)
            if row["state"] in FINAL:
                break
            time.sleep(0.05)
        return row

    # -- dispatch ----------------------------------------------------------------------------
    def _claim(self) -> dict | None:
        for row in self.db.rows(_db.jobs, where={"state": "queued"}, order=_db.jobs.c.created_at, limit=8):
            if self.db.update(_db.jobs, row["id"], where={"state": "queued"}, state="running",
                              started_at=time.time(), attempts=row["attempts"] + 1, error=None,
                              error_kind=None):
                return self.db.one(_db.jobs, row["id"])
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._claim()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the dispatcher
                log.exception("claiming a job failed")
                job = None
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001
                log.exception("job %s failed in the manager", job["id"])
                self._finish(job["id"], "failed", error=f"internal error: {type(e).__name__}: {e}",
                             error_kind="internal")

    def _spec(self, job: dict) -> dict:
        req = loads(job["request"])
        spec = {"kind": job["kind"], "request": req, "ray_address": self.ray_address}
        if job["kind"] == "export":
            spec["plan_path"] = str(self.store.path(req["plan_artifact"]))
            spec["target"] = {"run": self.targets[req["target"]].run}
        return spec

    def _run(self, job: dict) -> None:
        jid = job["id"]
        d = self.store.job_dir(jid)
        from bitalloc.sensitivity.artifact import write_json

        write_json(d / "job.json", self._spec(job), indent=1)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(d / "worker.log", "ab") as logf:
            proc = subprocess.Popen([self.python, "-m", "bitalloc.allocator.service.worker", str(d)],
                                    stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=_die_with_parent, cwd=str(d))
        with self._lock:
            self._procs[jid] = proc
        if (self.db.one(_db.jobs, jid) or {}).get("cancel_requested"):  # cancelled while it was starting
            proc.terminate()
        t0, first = time.monotonic(), None
        output, error, user_error, usage = None, None, False, None
        try:
            for raw in proc.stdout:
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                if ev.get("event") == "progress":
                    done, total = ev.get("done"), ev.get("total")
                    if first is None:
                        first = (done, time.monotonic())
                    eta = None
                    if total and done is not None and done > first[0]:
                        rate = (done - first[0]) / max(1e-6, time.monotonic() - first[1])
                        eta = round((total - done) / rate, 1)
                    self.db.update(_db.jobs, jid, where={"state": "running"}, progress_done=done,
                                   progress_total=total, eta_s=eta)
                elif ev.get("event") == "done":
                    output, usage = ev.get("output"), ev.get("usage")
                elif ev.get("event") == "error":
                    error, user_error = ev.get("error"), bool(ev.get("user_error"))
            rc = proc.wait()
        finally:
            with self._lock:
                self._procs.pop(jid, None)
        if self._stop.is_set() and output is None:
            return  # the server is stopping: the job stays running and resumes on the next start
        row = self.db.one(_db.jobs, jid)
        if row["cancel_requested"] and output is None:
            self._finish(jid, "cancelled", error="cancelled")
            return
        if rc == 0 and output is not None:
            result = self.on_done(row, Path(output)) if self.on_done else {"output": output}
            if usage:
                result["worker"] = usage  # this attempt's process: cpu_s, peak_rss_mb, wall_s
            self._finish(jid, "done", result=result, eta_s=0.0)
            log.info("job %s done in %.1fs: %s", jid, time.monotonic() - t0, result)
            return
        why = error or f"the worker process ended with exit code {rc} (see the server's jobs/{jid}/worker.log)"
        self._finish(jid, "failed", error=why, error_kind="input" if error and user_error else "internal")

    def _finish(self, jid: str, state: str, *, error: str | None = None, result: dict | None = None, **extra) -> None:
        vals = dict(state=state, dedupe_key=None, finished_at=time.time(), error=error, **extra)
        if result is not None:
            vals["result"] = dumps(result)
        self.db.update(_db.jobs, jid, **vals)


def _rmtree(d: Path) -> None:
    import shutil

    shutil.rmtree(d, ignore_errors=True)
