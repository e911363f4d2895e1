"""Data-parallel Hessians: calibration rows in shards, per-shard statistics, a fixed-order reduction.

A *shard* is a contiguous range of calibration rows ``[a, b)`` whose ends fall on the
profile's mini-batch boundaries, so each shard's forwards see exactly the mini-batches the
single-process pass sees (the same per-token inputs). A worker accumulates, for every
distinct layer input (layers reading one tensor share it, as in :mod:`sensitivity.hessian`),
the float64 mean ``M_s = Σ xᵀx / n_s`` over its shard's tokens and the token count ``n_s``
(and the activation-quantization statistics ``E[xᵀe]``, ``E[eᵀe]`` when asked). The
driver reduces them in shard order, ``H = Σ_s (n_s / N) · M_s`` with ``N = Σ_s n_s``, in
float64, and casts to the profile's Hessian dtype: the same shards give bit-identical
Hessians, whatever order the workers finished in.

A shard is one idempotent runner item ``(SHARD_LAYER, "rows<a>-<b>")``; its value is a
:class:`ShardStats` (numbers for the checkpoint line, tensors for a safetensors file written
atomically beside the checkpoint and referenced by that line; :mod:`sensitivity.runner`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .hessian import HessianAccumulator, collect_input_statistics

__all__ = ["SHARD_LAYER", "ShardStats", "shard_keys", "shard_rows", "compute_shard", "read_shard", "reduce_shards"]

SHARD_LAYER = "@hessians"  # the runner key's "layer" of a Hessian shard item
_ROWS = re.compile(r"^rows(\d+)-(\d+)$")
_FORMAT = "bitalloc.hessian-shard/1"


def shard_keys(n_rows: int, n_shards: int, batch_size: int) -> list[tuple[str, str]]:
    """``n_shards`` (at most one per mini-batch) contiguous row ranges on batch boundaries, as runner keys."""
    assert n_rows >= 1 and n_shards >= 1 and batch_size >= 1, f"bad shard request {n_rows=} {n_shards=} {batch_size=}"
    n_batches = -(-n_rows // batch_size)
    k = min(n_shards, n_batches)
    bounds = [min(n_rows, (i * n_batches // k) * batch_size) for i in range(k + 1)]
    return [(SHARD_LAYER, f"rows{a}-{b}") for a, b in zip(bounds, bounds[1:])]


def shard_rows(scheme: str) -> tuple[int, int]:
    """``"rows<a>-<b>"`` -> ``(a, b)``."""
    m = _ROWS.match(scheme)
    if m is None or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"Hessian shard {scheme!r} is not 'rows<a>-<b>' with a < b")
    return int(m.group(1)), int(m.group(2))


@dataclass
class ShardStats:
    """One shard's statistics per distinct layer input.

    ``index``: fqn -> input key (``"i0"``, ...; shared inputs share a key); ``counts``: key ->
    tokens; ``tensors``: ``"<key>.H"`` and ``"<key>.cross.<a>"`` / ``"<key>.noise.<a>"``,
    each the float64 (in, in) mean over the shard's tokens.
    """

    rows: tuple[int, int]
    index: dict[str, str]
    counts: dict[str, int]
    tensors: dict[str, torch.Tensor]

    @property
    def values(self) -> dict[str, float]:
        """What the checkpoint line records (the tensors go to the file)."""
        return {"rows": float(self.rows[1] - self.rows[0]), "inputs": float(len(self.counts))}

    def save(self, path: str | os.PathLike) -> None:
        """Write the tensors and index to a safetensors file, atomically."""
        from safetensors.torch import save_file

        from .artifact import atomic_path

        meta = {"bitalloc": _FORMAT, "rows": f"{self.rows[0]}-{self.rows[1]}", "index": json.dumps(self.index),
                "counts": json.dumps(self.counts)}
        with atomic_path(Path(path)) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp), metadata=meta)


def read_shard(path: str | os.PathLike) -> ShardStats:
    """A :class:`ShardStats` from a file :meth:`ShardStats.save` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        assert meta.get("bitalloc") == _FORMAT, f"{str(path)!r} is not a bitalloc Hessian shard"
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    a, b = (int(x) for x in meta["rows"].split("-"))
    return ShardStats((a, b), json.loads(meta["index"]), {k: int(v) for k, v in json.loads(meta["counts"]).items()},
                      tensors)


def _rows_of(data: Any, a: int, b: int) -> Any:
    return {k: v[a:b] for k, v in data.items()} if isinstance(data, dict) else data[a:b]


def compute_shard(model: torch.nn.Module, layers: Sequence[Any], data: Any, rows: tuple[int, int], *,
                  batch_size: int, act_formats: Sequence[str] = ()) -> ShardStats:
    """The float64 statistics of calibration rows ``[a, b)`` (``data``: all rows; ``a`` on a batch boundary)."""
    a, b = rows
    assert a % batch_size == 0, f"shard start {a} is not on a batch boundary (batch size {batch_size})"
    accs = collect_input_statistics(model, layers, _rows_of(data, a, b), False, batch_size=batch_size,
                                    dtype=torch.float64, act_formats=act_formats)
    keys: dict[int, str] = {}
    index, counts, tensors = {}, {}, {}
    for fqn, acc in accs.items():
        if id(acc) not in keys:
            key = keys[id(acc)] = f"i{len(keys)}"
            counts[key] = int(acc.nsamples)
            tensors[f"{key}.H"] = acc.H.detach().cpu()  # (in, in) float64
            for fmt in acc.act_formats:
                tensors[f"{key}.cross.{fmt}"] = acc.cross[fmt].detach().cpu()
                tensors[f"{key}.noise.{fmt}"] = acc.noise[fmt].detach().cpu()
        index[fqn] = keys[id(acc)]
    return ShardStats((a, b), index, counts, tensors)


def _shard_header(src: ShardStats | str | os.PathLike) -> tuple[tuple[int, int], dict, dict]:
    """(rows, index, counts) of a shard, from a file's metadata alone (cheap) or the object."""
    if isinstance(src, ShardStats):
        return src.rows, src.index, src.counts
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata() or {}
    assert meta.get("bitalloc") == _FORMAT, f"{str(src)!r} is not a bitalloc Hessian shard"
    a, b = (int(x) for x in meta["rows"].split("-"))
    return (a, b), json.loads(meta["index"]), {k: int(v) for k, v in json.loads(meta["counts"]).items()}


def reduce_shards(shards: Sequence[ShardStats | str | os.PathLike], dtype: torch.dtype = torch.float32
                  ) -> dict[str, HessianAccumulator]:
    """fqn -> accumulator (shared inputs share one) from the shards' statistics (objects or
    files), reduced in the given (shard) order in float64: ``H = Σ_s (n_s / N) · M_s``, then
    cast to ``dtype``. A file is read when its turn comes: one shard's tensors and the sums
    are in memory at a time."""
    assert shards, "no Hessian shards to reduce"
    heads = [_shard_header(s) for s in shards]
    index = heads[0][1]
    totals: dict[str, int] = {}
    for rows, idx, counts in heads:
        assert idx == index, f"shard rows {rows} saw other shared inputs than shard rows {heads[0][0]}"
        for k, n in counts.items():
            totals[k] = totals.get(k, 0) + n
    sums: dict[str, torch.Tensor] = {}
    for src, (_, _, counts) in zip(shards, heads):  # Σ_s (n_s / N) · M_s in shard order
        tensors = src.tensors if isinstance(src, ShardStats) else read_shard(src).tensors
        for name in sorted(tensors):
            key = name.split(".", 1)[0]
            w = counts[key] / totals[key] if totals[key] else 0.0
            t = tensors[name].to(torch.float64)  # (in, in)
            if name not in sums:
                sums[name] = torch.zeros_like(t)
            sums[name].add_(t, alpha=w)
        del tensors
    by_key: dict[str, HessianAccumulator] = {}
    for key in dict.fromkeys(index.values()):
        fmts = sorted(n.split(".", 2)[2] for n in sums if n.startswith(f"{key}.cross."))
        by_key[key] = HessianAccumulator.from_statistics(
            sums[f"{key}.H"].to(dtype), totals[key],
            cross={a: sums[f"{key}.cross.{a}"].to(dtype) for a in fmts},
            noise={a: sums[f"{key}.noise.{a}"].to(dtype) for a in fmts})
    return {fqn: by_key[key] for fqn, key in index.items()}
