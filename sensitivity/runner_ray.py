"""The Ray backend of the measured run: one actor per worker, items pulled dynamically
(``IN_FLIGHT_PER_ACTOR`` in flight each), lost actors replaced and their items re-queued.

Inside :func:`kept_workers` (a whole profile on Ray) the live actors outlast a call: the
next step re-configures them (``configure``: a new context around the model they already
loaded and fingerprinted) instead of starting new ones that load it again.

Ray is imported only when a run asks for it (``workers=N`` or a cluster address).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from typing import Any, Iterator

from .errors import RunnerError
from .streamed_items import context_for
from .worker import Key, WorkerSetup

__all__ = ["IN_FLIGHT_PER_ACTOR", "check_ray_address", "kept_workers", "keeping_workers", "run_ray"]

IN_FLIGHT_PER_ACTOR = 2


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """A quick TCP check that ``host:port`` answers; a :class:`RunnerError` if it does not."""
    if address in ("auto", "local"):
        return
    hp = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hp.rpartition(":")
    if not sep or not port.isdigit():
        raise RunnerError(f"Ray address {address!r} must look like HOST:PORT (or ray://HOST:PORT)")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise RunnerError(f"cannot reach the Ray cluster at {address!r} ({e.strerror or type(e).__name__})") from None


def _same_model(a: WorkerSetup, b: WorkerSetup) -> bool:
    """Whether a context for ``b`` may reuse the model a context for ``a`` loaded and checked:
    the same files, weights and fingerprint, both whole or both streamed under one limit."""
    return (a.max_memory == b.max_memory and a.model == b.model and a.weights == b.weights
            and a.fingerprint_sha256 is not None and a.fingerprint_sha256 == b.fingerprint_sha256)


def _next_context(old: Any, new: WorkerSetup, shared: Any) -> tuple[Any, bool]:
    """A kept worker's context for its next step, on ``old``'s model when it is the same one
    (a streamed model passes to the new context, which then closes it); ``old`` is closed."""
    same = _same_model(old.setup, new)
    streamed = same and new.max_memory is not None
    if streamed:
        old.own = False  # its model passes on: close() below frees only its walk and reference
    if hasattr(old, "close"):  # a streamed context's stored block outputs go before the next step's
        old.close()
    if streamed:
        ctx = context_for(new, shared=shared, sm=old.sm)
        ctx.own = True
    else:
        ctx = context_for(new, shared=shared, loaded=old.loaded if same else None)
    return ctx, same


def _actor_class(ray):
    @ray.remote(max_restarts=0, max_task_retries=0)
    class MeasureWorker:
        def __init__(self, setup: dict, threads: int, shared: Any = None, warmup: bool = True) -> None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import torch

            torch.set_num_threads(max(1, int(threads)))
            self.ctx = context_for(WorkerSetup.from_dict(setup), shared=shared)
            self.steps = 1  # runner calls this actor has served (more inside kept_workers)
            self.reused_model = False
            if warmup:
                self.ctx.warmup()

        def configure(self, setup: dict, shared: Any = None, warmup: bool = True) -> dict:
            """A kept worker's next step: a new context, on the model already loaded when it is the same."""
            old, self.ctx = self.ctx, None
            self.ctx, self.reused_model = _next_context(old, WorkerSetup.from_dict(setup), shared)
            del old
            self.steps += 1
            if warmup:
                self.ctx.warmup()
            return self.info()

        def ready(self) -> dict:
            return self.info()

        def evaluate(self, fqn: str, scheme: str) -> Any:
            return self.ctx.evaluate(fqn, scheme)

        def info(self) -> dict:
            return {**self.ctx.info(), "step": self.steps, "reused_model": self.reused_model}

    return MeasureWorker


class _Kept:
    """Live actors between the runner calls of a :func:`kept_workers` block."""

    def __init__(self) -> None:
        self.idle: list = []  # actor handles, each set up by an earlier call
        self.key: tuple | None = None  # (workers, address, threads per worker) they were started for
        self.started_ray = False

    def take(self, key: tuple) -> list:
        """The idle actors started for ``key`` (others are ended: another shape of run)."""
        if key != self.key:
            self.end()
            return []
        out, self.idle = self.idle, []
        return out

    def give(self, key: tuple, handles: list) -> None:
        self.key, self.idle = key, list(handles)

    def end(self) -> None:
        if self.idle:
            import ray

            for h in self.idle:
                with contextlib.suppress(Exception):
                    ray.kill(h, no_restart=True)
        self.idle, self.key = [], None


_STATE = threading.local()  # .kept: the open kept_workers block of this thread (service jobs run in threads)


def _kept() -> _Kept | None:
    return getattr(_STATE, "kept", None)


@contextlib.contextmanager
def kept_workers() -> Iterator[None]:
    """Ray runner calls inside the block keep their live workers for the next call.

    A profile on Ray runs several steps (Hessian shards, proxy rows, measurements), each a
    :func:`run_ray` call; without this block each starts actors that load and fingerprint
    the model again (8-10 s a worker for a 1 B model). Inside it, the next call
    re-configures the same actors. Ray started by a call inside the block is shut down when
    the block ends, with the actors. Nested blocks are one block.
    """
    if _kept() is not None:
        yield
        return
    kept = _STATE.kept = _Kept()
    try:
        yield
    finally:
        _STATE.kept = None
        kept.end()
        if kept.started_ray:
            import ray

            ray.shutdown()


def keeping_workers() -> bool:
    """Whether a :func:`kept_workers` block is open."""
    return _kept() is not None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    lines = [x for x in s.splitlines() if x.strip()]
    # Ray wraps the remote traceback; the cause is on its last line
    return (lines[-1] if lines else type(e).__name__)[:500]


def run_ray(setup, todo, record, bar, info, *, workers, address, threads_per_worker, max_item_failures,
             stall_timeout_s, wait_all_ready, say, shared=None, warmup=True) -> None:
    if address:
        check_ray_address(address)
    try:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    except ImportError:  # pragma: no cover - ray is a dependency
        raise RunnerError("the Ray runner needs the 'ray' package (pip install ray)") from None
    started = False
    t_init = time.perf_counter()
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, object_store_memory=128 * 1024 * 1024)
        except Exception as e:  # noqa: BLE001 - any failure to start/connect is one error line
            raise RunnerError(f"cannot start or connect to Ray{f' at {address!r}' if address else ''}: {_first_line(e)}") from None
        started = True
    kept = _kept()
    if kept is not None and started:  # the block shuts Ray down at its end, not this call
        kept.started_ray, started = True, False
    info["ray_init_s"] = round(time.perf_counter() - t_init, 3)
    reuse: list = []  # kept workers not yet handed an item
    actors: dict[int, Any] = {}  # actor id -> handle
    try:
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
            info["workers"] = workers
        if threads_per_worker is None:
            threads_per_worker = max(1, (os.cpu_count() or 1) // workers) if not address else 1
        info["threads_per_worker"] = threads_per_worker
        Worker = _actor_class(ray)
        setup_d = setup.to_dict()
        shared_ref = ray.put(shared) if shared is not None else None  # once, read by every worker
        kept_key = (workers, address, threads_per_worker)
        reuse = kept.take(kept_key) if kept is not None else []
        info["reused_workers"] = len(reuse)

        ready_refs: dict[Any, int] = {}  # ready() ref -> actor id
        live: set[int] = set()
        in_flight: dict[Any, tuple[int, Key]] = {}  # evaluate ref -> (actor id, key)
        load: dict[int, int] = {}
        queue = deque(todo)
        failures: dict[Key, int] = {}
        next_id = [0]
        startup_failures = [0]
        worker_info: dict[int, dict] = {}

        def spawn() -> None:
            aid = next_id[0]
            next_id[0] += 1
            if reuse:  # a kept worker: its next setup, on the model it holds
                h = reuse.pop()
                ready_refs[h.configure.remote(setup_d, shared_ref, warmup)] = aid
            else:
                h = Worker.options(num_cpus=1).remote(setup_d, threads_per_worker, shared_ref, warmup)
                ready_refs[h.ready.remote()] = aid
            actors[aid] = h
            load[aid] = 0

        def lose(aid: int, why: str) -> None:
            if aid not in actors:
                return
            info["actor_failures"] += 1
            live.discard(aid)
            h = actors.pop(aid)
            for ref, (a, key) in list(in_flight.items()):
                if a == aid:
                    del in_flight[ref]
                    queue.appendleft(key)  # skipped at dispatch if it finished meanwhile
                    info["resubmitted"] += 1
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            say(f"worker {aid} lost ({why}); {len(live)} live, re-queued its items")
            if info["actor_failures"] > 4 * workers + len(todo):
                raise RunnerError(f"too many lost workers ({info['actor_failures']}); last: {why}")
            spawn()  # a replacement; it joins when (if) the cluster has room for it

        t_start = time.perf_counter()
        t_first = None
        for _ in range(workers):
            spawn()
        last_progress = time.monotonic()
        remaining = set(todo)
        while remaining:
            for aid in list(live) if (not wait_all_ready or "startup_s" in info) else ():
                while load[aid] < IN_FLIGHT_PER_ACTOR and queue:
                    key = queue.popleft()
                    if key not in remaining:
                        continue
                    in_flight[actors[aid].evaluate.remote(*key)] = (aid, key)
                    load[aid] += 1
                    if t_first is None:
                        t_first = time.perf_counter()
            waiting = list(ready_refs) + list(in_flight)
            if not waiting:
                raise RunnerError("no Ray workers left to run the remaining items")
            done_refs, _ = ray.wait(waiting, num_returns=1, timeout=5.0)
            if not done_refs:
                if time.monotonic() - last_progress > stall_timeout_s:
                    raise RunnerError(f"no progress for {stall_timeout_s:.0f} s ({len(live)} live workers, "
                                      f"{len(remaining)} items left); is the cluster big enough?")
                continue
            ref = done_refs[0]
            if ref in ready_refs:
                aid = ready_refs.pop(ref)
                try:
                    worker_info[aid] = ray.get(ref)
                    live.add(aid)
                    if len(live) == workers and "startup_s" not in info:
                        info["startup_s"] = round(time.perf_counter() - t_start, 3)  # all workers loaded
                    last_progress = time.monotonic()
                except RayTaskError as e:  # the worker's setup raised: the same everywhere
                    raise RunnerError(f"Ray worker setup failed: {_first_line(e)}") from None
                except RayActorError as e:
                    startup_failures[0] += 1
                    if startup_failures[0] > 2 * workers + 2:
                        raise RunnerError(f"Ray workers keep dying at startup: {_first_line(e)}") from None
                    lose(aid, f"died at startup: {_first_line(e)}")
                continue
            aid, key = in_flight.pop(ref)
            if aid in load:
                load[aid] -= 1
            try:
                v = ray.get(ref)
            except RayTaskError as e:
                raise RunnerError(f"item {key} failed: {_first_line(e)}") from None
            except RayActorError as e:
                failures[key] = failures.get(key, 0) + 1
                if failures[key] > max_item_failures:
                    raise RunnerError(f"item {key} lost its worker {failures[key]} times; giving up") from None
                queue.appendleft(key)
                info["resubmitted"] += 1
                lose(aid, _first_line(e))
                continue
            last_progress = time.monotonic()
            if key in remaining:
                remaining.discard(key)
                record(key, v)
                bar.update()
        info["measure_s"] = round(time.perf_counter() - (t_first or t_start), 3)  # first item out to last back
        # per-worker statistics (peak RSS etc.) from the workers still alive
        refs = {aid: actors[aid].info.remote() for aid in live}
        for aid, r in refs.items():
            try:
                worker_info[aid] = ray.get(r, timeout=30)
            except (RayActorError, GetTimeoutError):
                pass
        info["worker_info"] = [worker_info[a] for a in sorted(worker_info)]
        if kept is not None:  # the live ones, and those still starting, wait for the block's next call
            starting = sorted(a for a in ready_refs.values() if a in actors)
            kept.give(kept_key, [actors.pop(a) for a in sorted(live) + starting])
    finally:
        for h in reuse + list(actors.values()):  # none left after a clean end inside kept_workers
            with contextlib.suppress(Exception):
                ray.kill(h, no_restart=True)
        if started:
            ray.shutdown()
