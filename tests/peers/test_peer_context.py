"""PeerContext: quantized weights go in and come back bit for bit; KL is zero unquantized."""

from __future__ import annotations

import torch


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_swapped_restores_weights_and_kl(tiny_ctx):
    ctx = tiny_ctx
    before = _params(ctx.model)
    ref = ctx.reference()
    assert ctx.kl(ref) < 1e-9, "the unquantized model has KL 0 to itself"
    with ctx.swapped([0] * ctx.n_layers):
        w = ctx.module(0).weight.detach()
        assert torch.equal(w, ctx.quantized(0, 0)), "layer 0 holds its 2-bit weight inside the block"
        kl2 = ctx.kl(ref)
    with ctx.swapped({0: ctx.n_schemes - 1}):
        kl8_one = ctx.kl(ref)
    after = _params(ctx.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "weights restored bit for bit"
    assert kl2 > 1e-4 > abs(kl8_one), f"all-2-bit ({kl2}) hurts, one 8-bit layer ({kl8_one}) hardly"
    assert ctx.forwards == 3 * len(ref.batches)


def test_swapped_restores_on_error(tiny_ctx):
    ctx = tiny_ctx
    before = ctx.module(1).weight.detach().clone()
    try:
        with ctx.swapped({1: 0}):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert torch.equal(ctx.module(1).weight.detach(), before)


def test_quantized_cache_is_bounded(tiny_ctx):
    from bitalloc.sensitivity.peer_context import PeerContext, WeightCache

    ctx = tiny_ctx
    room = ctx.weight(0).numel() * 4 * 2  # room for two layer-0-sized tensors
    small = PeerContext(ctx.model, ctx.layers, ctx.schemes, ctx.batches, weights=WeightCache(room))
    assert small.cache_bytes == room, "a given cache's bound is the context's"
    for j in range(small.n_schemes):
        small.quantized(0, j)
    assert small.weights.nbytes <= room and len(small.weights) == 2, "the least recently used are dropped"
    assert torch.equal(small.quantized(0, 0), ctx.quantized(0, 0))


def test_weight_cache_shared_by_contexts(tiny_ctx, monkeypatch):
    """Contexts over the same layers, schemes and quantizer share one cache: the second one
    quantizes nothing the first already did; a context of other schemes is refused it."""
    import pytest

    import bitalloc.sensitivity.peer_context as pc

    ctx = tiny_ctx
    shared = pc.WeightCache()
    a = pc.PeerContext(ctx.model, ctx.layers, ctx.schemes, ctx.batches, weights=shared)
    b = pc.PeerContext(ctx.model, ctx.layers, ctx.schemes, ctx.batches[:1], weights=shared)
    wq = a.quantized(1, 2)
    calls = []
    real = pc.quantize_layer_weight
    monkeypatch.setattr(pc, "quantize_layer_weight", lambda *x, **k: calls.append(x) or real(*x, **k))
    assert b.quantized(1, 2) is wq and not calls, "the second context reuses the first one's weight"
    b.quantized(1, 3)
    assert len(calls) == 1 and len(shared) == 2
    with pytest.raises(ValueError, match="other layers, schemes"):
        pc.PeerContext(ctx.model, ctx.layers, ctx.schemes[:2], ctx.batches, weights=shared)


def test_sub_blocks_partition_attention_and_mlp(tiny_ctx):
    from bitalloc.sensitivity.peer_context import PeerScores, sub_blocks

    groups = sub_blocks(tiny_ctx.layers)
    names = [[tiny_ctx.layers[i].fqn.split(".", 3)[-1] for i in g] for g in groups]
    # 2 blocks x (attention q,k,v,o ; mlp gate,up,down) + lm_head alone
    assert len(groups) == 5, names
    assert sorted(len(g) for g in groups) == [1, 3, 3, 4, 4]
    PeerScores("x", [[0.0] * 4] * 5, groups)


def test_fitness_ranks_whole_plans(tiny_ctx):
    import numpy as np

    ctx = tiny_ctx
    fit = ctx.fitness([ctx.batches[:1], ctx.batches])
    low, high = np.zeros(ctx.n_layers, int), np.full(ctx.n_layers, ctx.n_schemes - 1)
    a, b = fit([low, high], 0)
    assert a > b >= -1e-9, (a, b)
    (c,) = fit([low], 1)
    assert c > 0 and ctx.forwards == 2 * 1 + len(ctx.batches)
