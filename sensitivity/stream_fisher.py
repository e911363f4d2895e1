"""The output-Fisher pass over a streamed model: forward, then backward, one block at a time (issue 17).

:mod:`sensitivity.fisher_refs` estimates each (layer, scheme)'s KL from one forward and one
backward pass over the whole model: ``½ (1/N) Σ G² ⊙ (X ΔWᵀ)²``, with each layer's scored
inputs ``X`` and squared output gradients ``G²``. A model larger than its memory limit
(:class:`~sensitivity.streaming.StreamedModel`) cannot hold that graph, so here the pass is
cut at the block boundaries, as gradient checkpointing cuts it:

1. forward: the Fisher rows walk the blocks (:class:`~sensitivity.stream_pass.BlockWalk`
   with ``keep_history``), every block's outputs kept (in memory up to a share of the
   limit, spilled to files past it);
2. the head: the last block's output as a leaf, the final norm, the LM head, the labels
   (sampled from the model or the text's own) and the loss give ``∂loss/∂h`` of the last
   block's output, per label kind;
3. backward, last block first: each block is read, run again from its stored input (a leaf)
   with gradients on, and ``torch.autograd.grad`` from its output's gradient gives its
   input's gradient (the previous block's output gradient) and its layers' output
   gradients; the block's ``X`` and ``G²`` are scored against every scheme at once and
   freed, and the block is dropped.

The peak is one block, its graph for one batch, the stored block outputs and one block's
``X`` / ``G²``; never the whole model. The rows, batches, labels (one generator, batches in
order) and arithmetic are :meth:`FisherStats.collect`'s, so the tables equal the in-memory
pass's (``tests/sensitivity/test_stream_fisher.py`` states the tolerance).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ._forward import replay_blocks
from .streaming import StreamedModel, StreamingError

__all__ = ["streamed_fisher_tables"]


def _hidden(x: Any) -> torch.Tensor:
    """A block's hidden state: the output itself, or the first element of an output tuple."""
    h = x if isinstance(x, torch.Tensor) else x[0]
    assert isinstance(h, torch.Tensor) and h.dim() == 3, f"a block output is not (batch, seq, hidden): {type(x).__name__}"
    return h


class _Scorer:
    """Each layer's ``X`` / ``G²`` parts as the batches come (``xs``, ``gs[kind]``, keyed by layer
    index), scored into ``out`` ``(K, L, R)`` and freed a unit at a time."""

    def __init__(self, net, layers, schemes, saliency, quantizer, n_kinds: int) -> None:
        self.net, self.layers, self.schemes = net, layers, schemes
        self.saliency, self.quantizer = saliency, quantizer
        self.xs: dict[int, list] = {i: [] for i in range(len(layers))}
        self.gs = [{i: [] for i in range(len(layers))} for _ in range(n_kinds)]
        self.out = np.zeros((n_kinds, len(layers), len(schemes)), dtype=np.float64)  # (K, L, R)

    def score(self, idxs: Sequence[int], n: int) -> None:
        """Score layers ``idxs`` (their unit held) from the positions gathered, ``n`` in all."""
        from .fisher_refs import FisherStats, join_parts, score_into

        joined: dict[tuple, torch.Tensor] = {}  # q/k/v (gate/up) appended one input tensor: one join
        x = {i: join_parts(self.xs[i], joined) for i in idxs if self.xs[i]}
        g2 = [{i: torch.cat(g[i]) for i in idxs if g[i]} for g in self.gs]
        stats = FisherStats(x, g2, n, {})
        score_into(self.out, stats, self.net, self.layers, idxs, self.schemes, quantizer=self.quantizer,
                   saliency=self.saliency)
        stats.free()
        for i in idxs:
            self.xs[i] = []
            for g in self.gs:
                g[i] = []


@torch.enable_grad()
def streamed_fisher_tables(
    sm: StreamedModel,
    layers: Sequence[Any],
    data: torch.Tensor,
    schemes: Sequence[Any],
    *,
    saliency: Mapping[str, Any] | None = None,
    quantizer: str = "rtn",
    stride: int = 1,
    labels: str = "sampled",
    seed: int = 0,
    memory: int | None = None,
    batch_tokens: int = 512,
    keep_bytes: int = 256 << 20,
    progress: bool = False,
) -> tuple[tuple[np.ndarray, ...], dict]:
    """:func:`~sensitivity.fisher_refs.fisher_ref_tables` of a streamed model (module docstring):
    one ``(L, R)`` table per label kind and info. ``keep_bytes``: the block outputs kept in
    memory, all blocks together (the rest spilled to files); ``saliency``: fqn -> the split
    channels' saliency (the proxy's). Layers outside the blocks other than the LM head are refused."""
    from .calibration import as_batches
    from .fisher_refs import (FISHER_LABELS, LayerTaps, append_scored, fisher_rows, head_grads, label_kinds,
                              label_loss, scored_mask)
    from .logits import chunk_rows, split_head
    from .proxy import as_scheme, module_at, progress_bar
    from .stream_pass import BlockWalk, block_output, layers_by_unit

    if labels not in FISHER_LABELS:
        raise ValueError(f"labels must be one of {FISHER_LABELS}, got {labels!r}")
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        raise ValueError("Fisher estimates need a causal LM's token ids (n, seq), not an encoder batch")
    t0 = time.perf_counter()
    schemes = [as_scheme(s) for s in schemes]
    kinds = label_kinds(labels)
    last = len(kinds) - 1
    net, blocks = sm.model, sm.blocks
    nb = len(blocks)
    by_unit = layers_by_unit(sm, layers)
    pos = {id(layer): i for i, layer in enumerate(layers)}
    T = int(data.shape[1])
    rows = fisher_rows(layers, tuple(data.shape), stride, labels, memory)
    batches = as_batches(data[:rows], max(1, int(batch_tokens) // max(1, T)))
    masks = [scored_mask(b["input_ids"], b.get("attention_mask"), stride) for b in batches]  # (B, T) each
    n = sum(int(m.sum()) for m in masks)  # every scored position, what each estimate is averaged over
    split = split_head(net, batches[0])  # read before the walk: the model's own logits on a few tokens
    if split is None:
        raise StreamingError(f"{type(net).__name__}'s LM head does not split off its body: the streamed Fisher "
                             "pass needs logits = head(final hidden state)")
    head = split.head
    vocab = int(getattr(head, "out_features", 0) or 0)
    step = chunk_rows(vocab, 4) if vocab else 0
    mods = [module_at(net, layer.fqn) for layer in layers]
    head_u = next((u for u, (_, m) in enumerate(sm.units) if m is head), None)
    head_idx = [i for i, m in enumerate(mods) if m is head]
    scorer = _Scorer(net, layers, schemes, saliency, quantizer, len(kinds))
    walk = BlockWalk(sm, batches, keep_bytes=max(1, int(keep_bytes) // max(1, nb)), keep_history=True)
    flags = {p: p.requires_grad for p in net.parameters()}
    try:
        for p in net.parameters():
            p.requires_grad_(False)
        for _ in progress_bar(range(nb), progress, "fisher forward"):
            walk.run_block()
        # the head: ∂loss/∂(last block's output) per label kind and batch
        gen = torch.Generator().manual_seed(seed)
        grad = [[None] * len(batches) for _ in kinds]
        with contextlib.ExitStack() as held:
            # the final norm and the head stay read in while their graph is used: a unit dropped
            # after its forward (placeholder weights) would turn its backward to zeros
            embed = net.get_input_embeddings()
            for u, (_, m) in enumerate(sm.units):
                if u not in sm.block_units and (m is not embed or u == head_u):
                    held.enter_context(sm.hold(u))
            for k, batch in enumerate(batches):
                ids, mask, keep_bt = batch["input_ids"], batch.get("attention_mask"), masks[k]
                stored = walk.history[-1].get(k)
                leaf = _hidden(stored).clone().requires_grad_(True)
                chunked = vocab > 0 and step < ids.shape[0] * T
                taps = LayerTaps(mods, only=head_idx) if head_idx and not chunked else None
                try:
                    with replay_blocks(blocks, nb, stored, leaf):
                        kw = {key: v for key, v in batch.items() if key != "logits_to_keep"}
                        hidden = split.body(**kw, use_cache=False).last_hidden_state  # (B, T, d), normed
                    logits = None if chunked else head(hidden)  # (B, T, V)
                finally:
                    if taps is not None:
                        taps.remove()
                head_grads_k = []  # per kind: the tapped head's output gradient
                for kk, kind in enumerate(kinds):
                    if chunked:
                        g_hidden, head_rows = head_grads(head, hidden.detach(), ids, mask, kind, gen, step, keep_bt,
                                                         bool(head_idx))
                        (grad[kk][k],) = torch.autograd.grad(hidden, [leaf], grad_outputs=g_hidden,
                                                             retain_graph=kk < last)
                        for i in head_idx:  # the head's own rows, gathered chunk by chunk
                            if kk == 0:
                                scorer.xs[i].append(head_rows[0])
                            scorer.gs[kk][i].append(head_rows[1])
                    else:
                        loss = label_loss(logits, logits[:, :-1].to(torch.float32), ids, mask, kind, gen)
                        targets = [leaf] + ([taps.outputs[i] for i in head_idx] if taps else [])
                        got = torch.autograd.grad(loss, targets, allow_unused=True, retain_graph=kk < last)
                        grad[kk][k] = got[0]
                        head_grads_k.append(got[1:])
                        del loss
                if taps is not None:  # the tapped head's rows, as the in-memory pass appends them
                    append_scored(layers, head_idx, taps.inputs, head_grads_k, keep_bt, scorer.xs, scorer.gs)
                del hidden, leaf, logits
            if head_idx:
                scorer.score(head_idx, n)
        # backward, last block first
        for b in progress_bar(range(nb - 1, -1, -1), progress, "fisher backward", nb):
            u = sm.block_units[b]
            mine = [pos[id(layer)] for layer in by_unit.get(u, [])]
            prev_grad = [[None] * len(batches) for _ in kinds]
            try:
                with sm.hold(u):
                    for k, batch in enumerate(batches):
                        taps = LayerTaps(mods, only=mine)
                        leaf = None
                        try:
                            if b:
                                stored = walk.history[b - 1].get(k)
                                leaf = _hidden(stored).clone().requires_grad_(True)
                                replay = replay_blocks(blocks, b, stored, leaf)
                            else:  # block 0 reads the embedding, which needs no gradient
                                replay = contextlib.nullcontext()
                            with replay:
                                y = _hidden(block_output(walk.base, blocks, b, batch, grad=True))
                        finally:
                            taps.remove()
                        idx = sorted(taps.outputs)
                        targets = ([leaf] if leaf is not None else []) + [taps.outputs[i] for i in idx]
                        per_kind = []
                        for kk in range(len(kinds)):
                            got = torch.autograd.grad(y, targets, grad_outputs=grad[kk][k], allow_unused=True,
                                                      retain_graph=kk < last)
                            if leaf is not None:
                                prev_grad[kk][k], got = got[0], got[1:]
                            per_kind.append(got)
                        append_scored(layers, idx, taps.inputs, per_kind, masks[k], scorer.xs, scorer.gs)
                        del y, targets, per_kind, taps, leaf
                    if mine:
                        scorer.score(mine, n)
            finally:
                sm.release_all()
            grad = prev_grad
            if b:
                walk.history[b].clear()  # this block's outputs are no longer needed
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        streamed = {"blocks_run": walk.blocks_run, **walk.info()}
        walk.close()
    info = {"labels": labels, "seed": seed, "tokens": n, "stride": stride, "rows": rows, "batches": len(batches),
            "seconds": round(time.perf_counter() - t0, 3), "streamed": streamed}
    return tuple(scorer.out), info
