"""The default (calibrated-proxy) profile's items on Ray: Hessian shards, proxy rows, the Fisher pass.

:func:`sensitivity.build.build_profile` calls these only when a run asks for Ray
(``workers`` / ``ray_address`` / ``RAY_ADDRESS``); in-process profiling never comes here,
except :func:`fisher_step`, which a streamed profile also runs in process. Each step is a
list of idempotent :mod:`sensitivity.runner` items with its own checkpoint beside the
measured one (``<ckpt>.hessians.jsonl`` with its ``.files/`` folder of shard files,
``<ckpt>.proxy.jsonl``, ``<ckpt>.fisher.jsonl``); the reference measurements are ordinary
measured items (``(fqn, ref scheme)``) in the measured checkpoint itself.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import checkpoint_header, make_header
from .hessian_shards import reduce_shards, shard_keys
from .runner import run_items
from .worker import PROXY_ITEM, WorkerSetup

__all__ = ["HESSIAN_CHECKPOINT_SCHEMA", "PROXY_CHECKPOINT_SCHEMA", "on_ray", "n_shards_for", "hessian_header",
           "sharded_statistics", "proxy_rows", "sibling_checkpoint"]

HESSIAN_CHECKPOINT_SCHEMA = "bitalloc.hessian-checkpoint/1"
PROXY_CHECKPOINT_SCHEMA = "bitalloc.proxy-checkpoint/1"
MAX_DEFAULT_SHARDS = 8  # on a cluster without a worker count


def on_ray(workers: int | None, address: str | None) -> bool:
    """Whether a run goes to Ray: a worker count, an address, or ``RAY_ADDRESS``."""
    return bool(workers or address or os.environ.get("RAY_ADDRESS"))


def n_shards_for(workers: int | None, n_rows: int, batch_size: int) -> int:
    """One shard per worker (so the same workers give the same shards), else up to
    ``MAX_DEFAULT_SHARDS``; never more than the mini-batches."""
    n_batches = -(-n_rows // batch_size)
    return max(1, min(workers or MAX_DEFAULT_SHARDS, n_batches))


def hessian_header(setup: WorkerSetup) -> dict:
    """What shard statistics depend on: model, calibration tokens, batching, layers, act formats."""
    config = {
        "calibration": dict(setup.calibration),
        "tokens_sha256": setup.tokens_sha256,
        "batch_size": setup.batch_size,
        "weights": setup.weights,
        "layers": {"include": list(setup.include), "exclude": list(setup.exclude), "quantize_tied": setup.quantize_tied},
        "act_formats": list(setup.act_formats),
        "accumulation": "float64 mean and token count per shard and distinct input",
    }
    return make_header(HESSIAN_CHECKPOINT_SCHEMA, setup, config)


def sibling_checkpoint(checkpoint: str | os.PathLike | None, suffix: str) -> Path | None:
    """The checkpoint of another step beside ``checkpoint`` (its suffix replaced), None without one."""
    return None if checkpoint is None else Path(checkpoint).with_suffix(suffix)


def sharded_statistics(setup: WorkerSetup, n_rows: int, *, workers: int | None, address: str | None,
                       checkpoint: str | os.PathLike | None, dtype: torch.dtype, progress: bool,
                       say: Callable[[str], None]) -> tuple[dict, dict]:
    """fqn -> accumulator from data-parallel shards on Ray (checkpointed beside ``checkpoint``
    as ``.hessians.jsonl`` + ``.hessians.files/``), reduced in shard order; and the run's info."""
    keys = shard_keys(n_rows, n_shards_for(workers, n_rows, setup.batch_size), setup.batch_size)
    ck = sibling_checkpoint(checkpoint, ".hessians.jsonl")
    say(f"hessians: {len(keys)} shard(s) of the {n_rows} calibration rows on Ray"
        + (f"; checkpoint {ck}" if ck else ""))
    with tempfile.TemporaryDirectory(prefix="bitalloc-shards-") as tmp:
        res = run_items(setup, keys, checkpoint=ck, header=hessian_header(setup), workers=workers, address=address,
                        progress=progress, log_fn=say, files_dir=tmp, warmup=False)
        stats = reduce_shards([res.files[k] for k in keys], dtype)  # shard order: deterministic
    res.info["shards"] = [k[1] for k in keys]
    return stats, res.info


def proxy_header(setup: WorkerSetup, names: Sequence[str], hessian_dtype: str, shards: Sequence[str]) -> dict:
    """The measured header's configuration plus what proxy rows also depend on."""
    base = checkpoint_header(setup, names, quantizer=setup.quantizer)
    config = {**base["config"], "hessian_dtype": hessian_dtype, "act_formats": list(setup.act_formats),
              "hessian_shards": list(shards)}
    return make_header(PROXY_CHECKPOINT_SCHEMA, setup, config)


def proxy_rows(setup: WorkerSetup, fqns: Sequence[str], names: Sequence[str], stats: dict, *, workers: int | None,
               address: str | None, checkpoint: str | os.PathLike | None, hessian_dtype: str, shards: Sequence[str],
               progress: bool, say: Callable[[str], None]) -> tuple[np.ndarray, dict]:
    """The ``(L, S)`` proxy table as one item per layer on Ray (the workers get ``stats``
    once); a cell a worker left out (no candidate there) is NaN, as in-process."""
    ck = sibling_checkpoint(checkpoint, ".proxy.jsonl")
    items = [(f, PROXY_ITEM) for f in fqns]
    res = run_items(setup, items, checkpoint=ck, header=proxy_header(setup, names, hessian_dtype, shards),
                    workers=workers, address=address, progress=progress, log_fn=say, shared={"hessians": stats},
                    warmup=False)
    table = np.array([[res.values[k].get(s, np.nan) for s in names] for k in items], dtype=np.float64)  # (L, S)
    return table, res.info


def with_schemes(setup: WorkerSetup, names: Sequence[str], act_formats: Sequence[str], saliency: Any) -> WorkerSetup:
    """``setup`` with the proxy's schemes, activation formats and the driver's saliency vectors."""
    import dataclasses

    sal = {f: v.tolist() for f, v in saliency.items()} if saliency is not None else setup.saliency_values
    return dataclasses.replace(setup, schemes=tuple(names), act_formats=tuple(act_formats), saliency_values=sal)


def fisher_columns(cfg: Any, names: Sequence[str], refs: Sequence[str]) -> list[str]:
    """The schemes the Fisher pass scores: all with the Fisher table, the references for Fisher
    or hybrid references, none otherwise."""
    if cfg.fisher_table:
        return list(names)
    return list(refs) if cfg.ref_method != "measured" else []


def fisher_step(cfg: Any, setup: Any, layers: Sequence[Any], names: Sequence[str], sal: dict, *, context: Any = None,
                shared: Any = None, checkpoint: Any = None, progress: bool = False,
                say: Callable[[str], None] = lambda m: None) -> tuple[list[np.ndarray], dict, dict]:
    """Run the Fisher item for ``setup.fisher_schemes`` (``context``: this process's; else on
    the Ray workers of ``cfg``) with the proxy's split-channel saliency ``sal``; return one
    ``(L, S)`` table per label kind (NaN outside the scored schemes), the pass's info and the
    runner's."""
    import dataclasses

    from .fisher_item import FISHER_CHECKPOINT_SCHEMA, FISHER_KEY, decode_tables

    cols = list(setup.fisher_schemes)
    fsetup = dataclasses.replace(setup, saliency_values={f: v.tolist() for f, v in sal.items()})
    if context is not None:
        context.use(fsetup, sal)
    config = {**checkpoint_header(fsetup, cols, quantizer=cfg.quantizer)["config"], "saliency": cfg.saliency,
              "fisher_labels": setup.fisher_labels, "fisher_seed": setup.fisher_seed,
              "streamed": setup.max_memory is not None, "table": "output-Fisher estimates"}
    res = run_items(fsetup, [FISHER_KEY], checkpoint=sibling_checkpoint(checkpoint, ".fisher.jsonl"),
                    header=make_header(FISHER_CHECKPOINT_SCHEMA, fsetup, config), workers=cfg.workers,
                    address=cfg.ray_address, context=context, progress=progress, log_fn=say, warmup=False,
                    shared=shared)
    tables, counts = decode_tables(res.values[FISHER_KEY], layers, names, cols, setup.fisher_labels)
    info = {"labels": setup.fisher_labels, "seed": setup.fisher_seed, "stride": setup.kl_stride, **counts,
            "schemes": len(cols)}
    where = "streamed" if setup.max_memory is not None else ("in process" if context is not None else "on Ray")
    say(f"fisher estimates: {len(layers)} layers x {len(cols)} schemes from {info['tokens']} positions, {where}, "
        f"in {info['seconds']:.1f} s")
    return tables, info, res.info
