"""One job, in its own process: ``python -m bitalloc.allocator.service.worker JOB_DIR``.

The job manager (:mod:`.jobs`) starts this with the job's folder, which holds
``job.json`` (what to run) and, for a profile, the inline calibration text. The process
runs the job through the public API (``bitalloc.profile``, or an export target's function)
and reports on its original stdout, one JSON object a line::

    {"event": "progress", "done": 12, "total": 42}
    {"event": "done", "output": "JOB_DIR/profile.json"}
    {"event": "error", "error": "one line", "user_error": true}

Everything else it prints goes to stderr (the manager sends that to ``JOB_DIR/worker.log``).
A measured profile keeps its resumable checkpoint in the job folder
(``profile.measure-checkpoint.jsonl``): when the server dies and starts again, the same job
runs this again and only the missing items are measured. The process exits when its
parent (the server) is gone, and holds an exclusive lock on the job folder so that two
processes never write the same checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

__all__ = ["main"]

# a profile's stages as its log lines announce them (progress of a non-measured profile: done of 5)
_STAGES = re.compile(r"^(loaded |\d+ layers selected|calibration:|hessians:|proxy:)")


class _Reporter:
    def __init__(self, fd: int):
        self.out = os.fdopen(fd, "w", buffering=1)
        self.lock = threading.Lock()
        self.last = 0.0
        self.done, self.total = 0, None

    def emit(self, **event) -> None:
        with self.lock:
            self.out.write(json.dumps(event) + "\n")
            self.out.flush()

    def progress(self, done: int, total: int | None, force: bool = False) -> None:
        now = time.monotonic()
        if (done, total) == (self.done, self.total) and not force:
            return
        self.done, self.total = done, total
        if force or now - self.last >= 0.25:
            self.last = now
            self.emit(event="progress", done=done, total=total)


def _watch_parent(ppid: int) -> None:
    while True:
        if os.getppid() != ppid:  # the server is gone: stop (a restart resumes this job)
            os._exit(3)
        time.sleep(0.5)


def _count_items(ckpt: Path) -> int:
    try:
        with open(ckpt, "rb") as f:
            return max(0, sum(1 for line in f if line.endswith(b"\n")) - 1)  # minus the header line
    except FileNotFoundError:
        return 0


def _run_profile(job_dir: Path, spec: dict, rep: _Reporter) -> str:
    import bitalloc

    req = dict(spec["request"])
    cal = req.pop("calibration")
    calibration = "generated" if cal == "generated" else str(job_dir / "calibration.txt")
    out = job_dir / "profile.json"
    measured = bool(req.get("measured"))
    ckpt = job_dir / "profile.measure-checkpoint.jsonl"
    state = {"total": None, "stage": 0}
    stop = threading.Event()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        m = re.match(r"measuring (\d+) items", msg)
        if m:
            state["total"] = int(m.group(1))
        elif not measured and _STAGES.match(msg):
            state["stage"] += 1
            rep.progress(min(state["stage"], 5), 5)

    def poll() -> None:
        while not stop.wait(0.5):
            if state["total"]:
                rep.progress(_count_items(ckpt), state["total"])

    kw = {k: v for k, v in req.items() if k != "model"}  # None is meaningful (kl_samples: all rows)
    if kw.get("groups"):
        kw["groups"] = [{k: v for k, v in g.items() if v is not None} for g in kw["groups"]]
    if spec.get("ray_address"):  # every profile's items (Hessian shards, proxy rows, measurements) on that cluster
        kw["ray_address"] = spec["ray_address"]
    if measured:
        threading.Thread(target=poll, daemon=True).start()
    else:
        rep.progress(0, 5, force=True)
    try:
        bitalloc.profile(req["model"], calibration=calibration, out=out, progress=False, log=log, **kw)
    finally:
        stop.set()
    if state["total"]:
        rep.progress(state["total"], state["total"], force=True)
    else:
        rep.progress(5, 5, force=True)
    return str(out)


def _run_export(job_dir: Path, spec: dict, rep: _Reporter) -> str:
    import importlib

    from bitalloc.allocator.plan import Plan

    plan = Plan.load(spec["plan_path"])
    mod, _, fn = spec["target"]["run"].partition(":")
    target = getattr(importlib.import_module(mod), fn)
    out = job_dir / "export"
    if out.exists():  # a rerun after a restart starts the export again from nothing
        import shutil

        shutil.rmtree(out)
    out.mkdir()
    req = spec["request"]
    rep.progress(0, 1, force=True)
    target(plan, out, model=req.get("model") or plan.model.get("spec"), **(req.get("options") or {}))
    rep.progress(1, 1, force=True)
    return str(out)


RUNNERS = {"profile": _run_profile, "export": _run_export}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    t0 = time.monotonic()
    job_dir = Path(argv[0])
    fd = os.dup(1)  # the event channel; anything printed goes to stderr from here on
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    rep = _Reporter(fd)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    lock = open(job_dir / ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # a leftover process of this job (server killed) must be gone first
    try:
        spec = json.loads((job_dir / "job.json").read_text())
        output = RUNNERS[spec["kind"]](job_dir, spec, rep)
    except BaseException as e:  # noqa: BLE001 - reported to the manager, one line
        if isinstance(e, KeyboardInterrupt):
            raise
        import traceback

        traceback.print_exc()
        text = str(e).strip().replace(f"{job_dir}{os.sep}", "")  # the request's own names, not the server's paths
        # the request's fault: bitalloc's checks (BitallocError is a ValueError) and bad values;
        # an OSError here is the server's (requests name no paths), as is anything else
        rep.emit(event="error", error=f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": "),
                 user_error=isinstance(e, ValueError))
        return 1
    rep.emit(event="done", output=output, usage=_usage(t0))
    return 0


def _usage(t0: float) -> dict:
    """What the job cost this process: CPU seconds (user + system), peak RSS, wall seconds."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
            "wall_s": round(time.monotonic() - t0, 2)}


if __name__ == "__main__":
    sys.exit(main())
