"""The measured-table runner: (layer, scheme) work items, in-process or on Ray, checkpointed.

A *work item* is one (layer fqn, scheme name): quantize that layer alone with that scheme,
run the calibration batches, and measure the metric against the 16-bit model
(:func:`sensitivity.proxy.measure_item`). Items are idempotent and independent, so they
can run anywhere, in any order, more than once; the value of an item is a dict
``metric name -> float`` (one entry today; metric groups add more).

Everything a worker needs is one plain, JSON-able :class:`WorkerSetup` (model spec,
calibration description and token ids, KL options, metric name, layer selection, the
expected model fingerprint). A :class:`WorkerContext` rebuilds the model, the calibration
batches and the reference pass from it once, then evaluates items.

Three modes, one code path (:func:`run_items`), identical results:

* in-process (default; Ray is never imported): one context in this process;
* ``workers=N``: a local Ray instance (``ray.init(num_cpus=N)``), one actor per worker,
  each loading the model once and using ``cpu_count // N`` torch threads;
* ``address=ADDR`` (or the ``RAY_ADDRESS`` environment variable): an existing cluster.

Items are pulled dynamically (two in flight per actor); results stream back and are
appended to a :class:`Checkpoint` (JSONL, flushed and fsynced per line) as they arrive.
An actor that dies (its process or its whole node lost) has its in-flight items queued
again for the others, and a replacement actor is started where resources allow. A killed
run resumes from the checkpoint: the same command again skips every finished item.

The pieces: :mod:`sensitivity.worker` (setup and context), :mod:`sensitivity.checkpoint`,
:mod:`sensitivity.runner_ray` (the Ray backend); this module is the run loop, and every
public name of those modules stays importable from here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT_SCHEMA, Checkpoint, check_finite, checkpoint_header, item_file_name
from .errors import CheckpointError, RunnerError
from .runner_ray import IN_FLIGHT_PER_ACTOR, check_ray_address, run_ray
from .streamed_items import context_for
from .worker import PAIR_SEP, WORKER_METRICS, Key, WorkerContext, WorkerSetup

__all__ = [
    "CHECKPOINT_SCHEMA",
    "IN_FLIGHT_PER_ACTOR",
    "PAIR_SEP",
    "WORKER_METRICS",
    "RunnerError",
    "CheckpointError",
    "WorkerSetup",
    "WorkerContext",
    "Checkpoint",
    "ItemResults",
    "RunResult",
    "checkpoint_header",
    "run_items",
    "check_ray_address",
]

log = logging.getLogger("bitalloc.sensitivity")


@dataclass
class ItemResults:
    """Values of every requested item and how the run went."""

    values: dict[Key, dict]
    info: dict
    files: dict[Key, Path] = field(default_factory=dict)  # items whose value was saved to a file

    def table(self, fqns: Sequence[str], schemes: Sequence[str], metric: str = "kl"):
        import numpy as np

        out = np.full((len(fqns), len(schemes)), np.nan, dtype=np.float64)
        for i, f in enumerate(fqns):
            for j, s in enumerate(schemes):
                v = self.values.get((f, s))
                if v is not None and metric in v:
                    out[i, j] = v[metric]
        return out


RunResult = ItemResults  # the old name; bitalloc.RunResult (allocator.api) is the batch job's result


class _Progress:
    def __init__(self, enabled: bool, total: int, initial: int, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="item", smoothing=0.1)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_items(
    setup: WorkerSetup,
    items: Iterable[Key],
    *,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
    header: dict | None = None,
    workers: int | None = None,
    address: str | None = None,
    context: WorkerContext | None = None,
    threads_per_worker: int | None = None,
    progress: bool = True,
    on_result: Callable[[Key, dict], None] | None = None,
    max_item_failures: int = 3,
    stall_timeout_s: float = 600.0,
    wait_all_ready: bool = False,
    log_fn: Callable[[str], None] | None = None,
    files_dir: str | os.PathLike | None = None,
    shared: Any = None,
    warmup: bool = True,
) -> ItemResults:
    """Evaluate every (layer fqn, scheme name) item; values come back as a dict per item.

    ``checkpoint`` (a :class:`Checkpoint` or a path; a path needs ``header``, default
    :func:`checkpoint_header` of ``setup`` with the items' schemes) holds finished items:
    they are skipped, new ones appended as they arrive. Mode: ``address`` (or env
    ``RAY_ADDRESS``) -> that Ray cluster; ``workers=N`` -> a local Ray instance with N
    actors; neither -> in-process (``context`` if given, else one built from ``setup``;
    Ray is not imported). ``on_result(key, values)`` is called for each new result.
    ``wait_all_ready``: on Ray, hand out items only once every worker has loaded (for
    timing; by default the first ready worker starts at once).

    An item may return an object with ``values`` (numbers, for the checkpoint line) and
    ``save(path)`` (a Hessian shard, :mod:`sensitivity.hessian_shards`): the driver saves it
    atomically in the checkpoint's ``files_dir`` (else in ``files_dir``), records the line
    with the file's sha256, and lists it in ``ItemResults.files``. ``shared``: passed once to
    every Ray worker's context (``WorkerContext(shared=...)``, e.g. the reduced Hessians);
    ``warmup=False``: Ray workers skip the warm-up measurement (which computes the reference pass).
    """
    say = log_fn or log.info
    items = list(dict.fromkeys((str(f), str(s)) for f, s in items))
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and workers is not None and workers < 1:
        raise RunnerError(f"workers must be a positive integer, got {workers!r}")
    if not address and workers is not None and (not isinstance(workers, int) or workers < 1):
        raise RunnerError(f"workers must be a positive integer, got {workers!r}")
    mode = "ray-cluster" if address else ("ray-local" if workers else "in-process")

    ckpt = checkpoint
    if ckpt is not None and not isinstance(ckpt, Checkpoint):
        schemes = list(dict.fromkeys(s for _, s in items))
        ckpt = Checkpoint(ckpt, header or checkpoint_header(setup, schemes))
    done: dict[Key, dict] = ckpt.load() if ckpt is not None else {}
    if ckpt is not None and (ckpt.dropped_tail or ckpt.duplicates or ckpt.lost_files):
        say(f"checkpoint {ckpt.path}: {len(done)} items"
            + (", a torn last line dropped" if ckpt.dropped_tail else "")
            + (f", {ckpt.lost_files} item(s) whose file is gone run again" if ckpt.lost_files else "")
            + (f", {ckpt.duplicates} duplicate line(s) ignored" if ckpt.duplicates else ""))
    todo = [k for k in items if k not in done]
    values = {k: done[k] for k in items if k in done}
    info = {"mode": mode, "workers": None if mode == "in-process" else workers, "address": address,
            "items": len(items), "resumed": len(values), "computed": 0, "resubmitted": 0, "actor_failures": 0,
            "checkpoint": str(ckpt.path) if ckpt is not None else None}
    if values:
        say(f"resuming: {len(values)} of {len(items)} items already in {ckpt.path}")
    t0 = time.perf_counter()

    files: dict[Key, Path] = dict(ckpt.files) if ckpt is not None else {}

    def record(key: Key, v: Any) -> None:
        if key in values:  # a duplicate (e.g. a resubmitted item that also finished): first wins
            return
        path = None
        if hasattr(v, "save"):  # a large value: its file first (atomic), then the line naming it
            path = ckpt.file_for(key) if ckpt is not None else _file_in(files_dir, key)
            v.save(path)
            files[key] = path
            v = v.values
        check_finite(key, v, "measured")  # never merged, never checkpointed
        values[key] = v
        info["computed"] += 1
        if ckpt is not None:
            ckpt.append(key, v, file=path)
        if on_result is not None:
            on_result(key, v)

    bar = _Progress(progress, len(items), len(values), f"measure ({mode})")
    try:
        if todo:
            if mode == "in-process":
                ctx = context or context_for(setup, shared=shared)
                for key in todo:
                    record(key, ctx.evaluate(*key))
                    bar.update()
                info["worker_info"] = [ctx.info()]
            else:
                run_ray(setup, todo, record, bar, info, workers=workers, address=address,
                         threads_per_worker=threads_per_worker, max_item_failures=max_item_failures,
                         stall_timeout_s=stall_timeout_s, wait_all_ready=wait_all_ready, say=say,
                         shared=shared, warmup=warmup)
    finally:
        bar.close()
        if ckpt is not None and not isinstance(checkpoint, Checkpoint):
            ckpt.close()
    info["wall_s"] = round(time.perf_counter() - t0, 3)
    if info["computed"] and info["wall_s"] > 0:
        info["items_per_s"] = round(info["computed"] / info["wall_s"], 4)
    missing = [k for k in items if k not in values]
    if missing:
        raise RunnerError(f"{len(missing)} item(s) were not measured, e.g. {missing[0]}")
    return ItemResults(values, info, files)


def _file_in(folder: str | os.PathLike | None, key: Key) -> Path:
    """Where an item's file goes without a checkpoint: ``folder`` (required then)."""
    if folder is None:
        raise RunnerError(f"item {key} returns a file but the run has neither a checkpoint nor files_dir")
    return Path(folder) / item_file_name(key)
