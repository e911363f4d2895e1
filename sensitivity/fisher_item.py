"""The output-Fisher pass as one runner item (issue 17): in process, on a Ray worker holding the
model whole (:class:`~sensitivity.worker.WorkerContext`) or streamed
(:class:`~sensitivity.streamed_items.StreamedContext`, :mod:`sensitivity.stream_fisher`).

The pass is one forward and one backward per batch over the Fisher rows; it does not split
into independent items without changing the sampled labels' random stream, so it is one item,
checkpointed like every runner item (``<checkpoint stem>.fisher.jsonl``). Its value is a flat
``{"<fqn>\\t<scheme>\\t<label kind>": estimate, "@tokens": ..., ...}``: numbers only, what a
checkpoint line holds. :func:`~sensitivity.profile_ray.fisher_step` is the driver's side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["FISHER_ITEM", "FISHER_KEY", "FISHER_CHECKPOINT_SCHEMA", "encode_tables", "decode_tables"]

FISHER_ITEM = "@fisher"
FISHER_KEY = ("@fisher", FISHER_ITEM)
FISHER_CHECKPOINT_SCHEMA = "bitalloc.fisher-checkpoint/1"
_CELL = "\t"
_COUNTS = ("tokens", "rows", "batches")


def encode_tables(layers: Sequence[Any], schemes: Sequence[str], labels: str, tables: Sequence[np.ndarray],
                  info: dict) -> dict[str, float]:
    """The item's value: one cell per (layer, scheme, label kind) and the pass's counts as ``@`` keys."""
    from .fisher_refs import label_kinds

    cells = {}
    for kind, table in zip(label_kinds(labels), tables):
        for i, layer in enumerate(layers):
            cells.update({f"{layer.fqn}{_CELL}{s}{_CELL}{kind}": float(v) for s, v in zip(schemes, table[i])})
    flat = {**{k: info[k] for k in (*_COUNTS, "seconds")}, **info.get("streamed", {})}
    cells.update({f"@{k}": float(v) for k, v in flat.items()})
    return cells


def decode_tables(cells: dict, layers: Sequence[Any], names: Sequence[str], schemes: Sequence[str],
                  labels: str) -> tuple[list[np.ndarray], dict]:
    """:func:`encode_tables` undone: one ``(L, S)`` table per label kind over ``names`` (NaN
    outside ``schemes``), and the pass's counts (``tokens``, ``rows``, ``batches``, ``seconds``
    and, streamed, the walk's)."""
    from .fisher_refs import label_kinds

    kinds = label_kinds(labels)
    tables = [np.full((len(layers), len(names)), np.nan) for _ in kinds]
    col = {n: j for j, n in enumerate(names)}
    for k, kind in enumerate(kinds):
        for i, layer in enumerate(layers):
            for c in schemes:
                tables[k][i, col[c]] = cells[f"{layer.fqn}{_CELL}{c}{_CELL}{kind}"]
    info = {**{k: int(cells[f"@{k}"]) for k in _COUNTS}, "seconds": cells["@seconds"]}
    streamed = {k[1:]: int(v) for k, v in cells.items() if k.startswith("@") and k[1:] not in (*_COUNTS, "seconds")}
    if streamed:
        info["streamed"] = streamed
    return tables, info
