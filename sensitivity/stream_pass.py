"""The Hessian pass over a streamed model, block-major (issue 17).

:class:`BlockWalk` walks the calibration batches through the blocks of a
:class:`~sensitivity.streaming.StreamedModel` one block at a time: block ``b`` is read once,
every batch goes through it from the stored outputs of block ``b-1`` (kept in memory up to
``keep_bytes``, written to a scratch folder past that), and its outputs replace them. The
walk is resumable: :meth:`BlockWalk.statistics` of a later unit continues from where it
stands, so a worker handed units in order (:mod:`sensitivity.streamed_items`) runs each
block once. The peak is one block, its Hessians and the stored activations, never the
whole model.

Results equal the in-memory pass bit for bit. Every block runs inside the model's own
forward, earlier blocks replayed from the stored outputs (as reference measurements replay
them), so masks, rotary tables and per-layer arguments are the model's own. Each layer's
accumulator sees the batches in the same order.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ._forward import forward, replay_blocks, tree_clone
from .hessian import HessianAccumulator, InputHooks, hook_only
from .layers import LayerInfo
from .streaming import StreamedModel, StreamingError

__all__ = ["ActivationStore", "BlockWalk", "block_output", "free_accumulators", "layers_by_unit"]


class _Spilled(NamedTuple):
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


class ActivationStore:
    """One block's outputs per batch: in memory up to ``keep_bytes``, files in ``folder`` past it."""

    def __init__(self, keep_bytes: int, folder: Path, tag: str) -> None:
        self.keep, self.folder, self.tag = keep_bytes, folder, tag
        self.items: dict[int, Any] = {}
        self.kept = 0
        self.spilled = 0

    def put(self, k: int, x: Any) -> None:
        if isinstance(x, torch.Tensor) and self.kept + x.nbytes > self.keep:
            path = self.folder / f"{self.tag}-{k}.bin"
            x.detach().contiguous().view(torch.uint8).numpy().tofile(path)
            self.items[k] = _Spilled(path, x.dtype, tuple(x.shape))
            self.spilled += x.nbytes
            return
        self.items[k] = tree_clone(x)
        self.kept += x.nbytes if isinstance(x, torch.Tensor) else 0

    def get(self, k: int) -> Any:
        x = self.items[k]
        if isinstance(x, _Spilled):
            return torch.from_numpy(np.fromfile(x.path, dtype=np.uint8)).view(x.dtype).reshape(x.shape)
        return x

    def clear(self) -> None:
        for x in self.items.values():
            if isinstance(x, _Spilled):
                x.path.unlink(missing_ok=True)
        self.items.clear()


class _Stop(BaseException):  # control flow, not an error: no ``except Exception`` on the way may swallow it
    def __init__(self, output: Any) -> None:
        self.output = output


def block_output(base: torch.nn.Module, blocks: Sequence[torch.nn.Module], b: int, batch: dict, *,
                 grad: bool = False) -> Any:
    """Block ``b``'s output on ``batch``: the model's own forward (``base``), stopped once the block
    has run (the later blocks and the head never run). ``grad``: with gradients on (the graph
    kept, what a backward through the block needs), else without."""
    def stop(module, args, output):
        raise _Stop(output)

    handle = blocks[b].register_forward_hook(stop)
    try:
        if grad:
            with torch.enable_grad():
                base(**{k: v for k, v in batch.items() if k != "logits_to_keep"}, use_cache=False)
        else:
            forward(base, batch)
    except _Stop as s:
        return s.output
    finally:
        handle.remove()
    raise StreamingError(f"block {b} never ran in the model's forward")


def layers_by_unit(sm: StreamedModel, layers: Sequence[LayerInfo]) -> dict[int, list[LayerInfo]]:
    """unit index -> its layers, in forward order; a layer outside the blocks and the LM head
    is refused (the pass cannot replay up to it)."""
    by_unit: dict[int, list[LayerInfo]] = {}
    for layer in layers:
        by_unit.setdefault(sm.unit_of(layer.fqn), []).append(layer)
    head_u = _head_unit(sm)
    for u in by_unit:
        if u not in sm.block_units and u != head_u:
            raise StreamingError(f"layer {by_unit[u][0].fqn!r} sits outside the blocks and the LM head; "
                                 "block streaming cannot replay up to it")
    return dict(sorted(by_unit.items()))


def _head_unit(sm: StreamedModel) -> int | None:
    head = sm.model.get_output_embeddings()
    return next((u for u, (_, m) in enumerate(sm.units) if m is head), None)


class BlockWalk:
    """The calibration batches walked through the blocks, one block at a time (module docstring).

    ``next``: the block the walk runs next; the stored outputs are block ``next - 1``'s.
    :meth:`close` removes the scratch folder.
    """

    def __init__(self, sm: StreamedModel, batches: list[dict], *, keep_bytes: int = 256 << 20,
                 scratch: str | Path | None = None, keep_history: bool = False) -> None:
        self.sm, self.batches, self.keep = sm, batches, keep_bytes
        # keep_history: every block's outputs stay (``history[b]``; ``keep_bytes`` in memory each),
        # what a backward pass block by block needs (sensitivity.stream_fisher)
        self.keep_history = keep_history
        self.history: list[ActivationStore] = []
        base = getattr(sm.model, getattr(sm.model, "base_model_prefix", ""), None)
        if not isinstance(base, torch.nn.Module):
            raise StreamingError(f"{type(sm.model).__name__} has no base model to run the blocks in")
        self.base = base
        self.folder = Path(tempfile.mkdtemp(prefix="bitalloc-stream-", dir=scratch))
        self.next = 0
        self.prev: ActivationStore | None = None
        self.kept = self.spilled = 0  # the most any block's outputs kept in memory / spilled (bytes)
        self.blocks_run = 0

    def _replayed(self, before: int, k: int):
        """Blocks ``0..before-1`` return block ``before-1``'s stored output for batch ``k`` (the
        embedding is then not read either: :meth:`StreamedModel._before`)."""
        return replay_blocks(self.sm.blocks, before, self.prev.get(k)) if before else contextlib.nullcontext()

    def restart(self) -> None:
        if self.prev is not None:
            self.prev.clear()
        for outs in self.history:
            outs.clear()
        self.prev, self.next, self.history = None, 0, []

    @torch.no_grad()
    def run_block(self, hooks: InputHooks | None = None) -> None:
        """Run block ``next`` over every batch (under ``hooks``); its outputs become the stored ones."""
        sm, b = self.sm, self.next
        assert b < len(sm.blocks), f"the walk is past the last block ({b})"
        outs = ActivationStore(self.keep, self.folder, f"b{b}")
        try:
            with sm.hold(sm.block_units[b]):
                for k, batch in enumerate(self.batches):
                    with (hooks.batch(batch.get("attention_mask")) if hooks is not None else contextlib.nullcontext()), \
                            self._replayed(b, k):
                        outs.put(k, block_output(self.base, sm.blocks, b, batch))
        finally:
            sm.release_all()
        if self.keep_history:
            self.history.append(outs)
        elif self.prev is not None:
            self.prev.clear()
        self.prev, self.next = outs, b + 1
        self.kept, self.spilled = max(self.kept, outs.kept), max(self.spilled, outs.spilled)
        self.blocks_run += 1

    @torch.no_grad()
    def _run_head(self, hooks: InputHooks, head_u: int) -> None:
        """The head's input: the final norm of the last block's output, for every batch."""
        sm = self.sm
        try:
            with sm.hold(head_u):
                for k, batch in enumerate(self.batches):
                    with hooks.batch(batch.get("attention_mask")), self._replayed(len(sm.blocks), k):
                        out = forward(self.base, batch)
                        hook_only(sm.units[head_u][1], out.last_hidden_state)
        finally:
            sm.release_all()

    def statistics(self, u: int, layers: list[LayerInfo], *, dtype: torch.dtype = torch.float32,
                   act_formats: Sequence[str] = ()) -> dict[str, HessianAccumulator]:
        """fqn -> accumulator of unit ``u``'s ``layers`` over every batch. The walk runs on to
        ``u`` (from the start when it is past it). Hold ``u`` around this call and the use of
        its result to read the unit once."""
        sm = self.sm
        target = sm.block_units.index(u) if u in sm.block_units else len(sm.blocks)
        if u not in sm.block_units and u != _head_unit(sm):
            raise StreamingError(f"unit {sm.units[u][0]!r} is neither a block nor the LM head")
        if self.next > target:
            self.restart()
        while self.next < target:
            self.run_block()
        hooks = InputHooks(sm.model, layers, dtype=dtype, act_formats=act_formats)
        try:
            if target < len(sm.blocks):
                self.run_block(hooks)
            else:
                self._run_head(hooks, u)
            return hooks.results()
        finally:
            hooks.remove()

    def info(self) -> dict:
        return {"activations_kept_bytes": int(self.kept), "activations_spilled_bytes": int(self.spilled)}

    def close(self) -> None:
        self.restart()
        shutil.rmtree(self.folder, ignore_errors=True)


def free_accumulators(accs: dict[str, HessianAccumulator]) -> None:
    """Free a unit's accumulators (layers sharing an input share one: each freed once)."""
    for acc in {id(a): a for a in accs.values()}.values():
        acc.free()
