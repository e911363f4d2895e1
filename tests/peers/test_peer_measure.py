"""Measurement-based peer scores (HIGGS, ModelOpt kl_div, exllamav2, exllamav3) on the tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_restored(model, before):
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights restored bit for bit"


def _index(ctx, suffix):
    return next(i for i, la in enumerate(ctx.layers) if la.fqn.endswith(suffix))


def _fresh_ctx(ctx):
    from bitalloc.sensitivity.peer_context import PeerContext

    return PeerContext(ctx.model, ctx.layers, list(ctx.schemes), ctx.batches)


# ---------------------------------------------------------------------------------------
# HIGGS


def test_higgs_recovers_a_known_linear_response(tiny_ctx, monkeypatch):
    """With a loss that is exactly Σ c_l t_l², the noise-injection fit returns α_l = c_l."""
    from bitalloc.sensitivity.peer_measure import score_higgs

    ctx = tiny_ctx
    c = np.arange(1, ctx.n_layers + 1, dtype=np.float64) * 1e-3

    def fake_kl(reference, first_block=None):
        ctx.forwards += 1
        total = 0.0
        for i in range(ctx.n_layers):
            w0 = ctx.weight(i)
            w = ctx.module(i).weight.detach().float()
            total += c[i] * float((w - w0).pow(2).sum() / w0.pow(2).sum())
        return total

    monkeypatch.setattr(ctx, "kl", fake_kl)
    s = score_higgs(ctx, noise_wbits=(2, 3, 4), draws=2)
    alpha = np.array(s.info["alpha"])
    assert np.allclose(alpha, c, rtol=1e-4), f"alpha {alpha} != {c}"
    assert max(s.info["residual_rms"]) < 1e-9, s.info["residual_rms"]
    t2 = np.array(s.info["t2"])
    assert np.allclose(s.table, alpha[:, None] * t2), "table = alpha * t^2"
    assert (np.diff(t2, axis=1) < 0).all(), "relative error falls as bits rise (w2 > w3 > w4 > w8)"
    assert s.info["kl_forwards"] == ctx.n_layers * 3 * 2
    assert s.groups is None and s.table.shape == (ctx.n_layers, ctx.n_schemes)


def test_higgs_alpha_grows_with_a_scaled_up_layer(tiny_ctx):
    """Relative noise in a 10x larger down_proj perturbs the residual 10x more: α grows > 10x."""
    from bitalloc.sensitivity.peer_measure import score_higgs

    ctx = tiny_ctx
    i = _index(ctx, "layers.0.mlp.down_proj")
    before = _state(ctx.model)
    a0 = score_higgs(ctx, noise_wbits=(3, 4)).info["alpha"]
    _assert_restored(ctx.model, before)
    assert all(a > 0 for a in a0), f"noise in any layer raises the KL: {a0}"
    with torch.no_grad():
        ctx.module(i).weight.mul_(10.0)
    scaled = _fresh_ctx(ctx)  # the old context keeps the unscaled weights as its originals
    s1 = score_higgs(scaled, noise_wbits=(3, 4, 5))
    a1, r2 = s1.info["alpha"], s1.info["r2"]
    assert a1[i] > 10 * a0[i], f"alpha of the scaled layer {a1[i]} vs {a0[i]}"
    assert r2[i] > 0.9, f"the KL change is linear in t^2 for the scaled layer (r2 {r2[i]})"


# ---------------------------------------------------------------------------------------
# ModelOpt kl_div


def test_modelopt_groups_follow_their_grouping_rules(tiny_ctx):
    from bitalloc.sensitivity.peer_measure import modelopt_groups

    groups = modelopt_groups(tiny_ctx.layers)
    names = [sorted(tiny_ctx.layers[i].fqn.rsplit(".", 1)[-1] for i in g) for g in groups]
    assert names.count(["k_proj", "q_proj", "v_proj"]) == 2, names
    assert names.count(["gate_proj", "up_proj"]) == 2, names
    assert names.count(["o_proj"]) == 2 and names.count(["down_proj"]) == 2 and ["lm_head"] in names, names
    assert len(groups) == 9


def test_modelopt_kl_scores_one_group_alone(tiny_ctx):
    from bitalloc.sensitivity.peer_measure import score_modelopt_kl

    ctx = tiny_ctx
    before = _state(ctx.model)
    s = score_modelopt_kl(ctx)
    _assert_restored(ctx.model, before)
    G, S = s.table.shape
    assert (G, S) == (9, ctx.n_schemes)
    assert s.info["kl_forwards"] == G * S * len(ctx.batches), "one (replayed) pass per group, scheme and batch"
    assert (np.diff(s.table, axis=1) <= 0).all(), "running min: a larger scheme never scores worse"
    assert (s.table[:, -1] < 0.05 * s.table[:, 0]).all(), "w8 alone is near lossless next to w2"
    # an item equals the KL of a full forward with that group quantized (prefix replay is exact)
    ref = ctx.reference(replay=False)
    members = s.groups[0]
    with ctx.swapped({i: 0 for i in members}):
        direct = ctx.kl(ref)
    assert abs(direct - s.info["raw"][0][0]) <= 1e-6 * max(1.0, direct), (direct, s.info["raw"][0][0])


def test_modelopt_kl_rows_option_limits_the_calibration(tiny_ctx):
    from bitalloc.sensitivity.peer_measure import score_modelopt_kl

    s = score_modelopt_kl(tiny_ctx, rows=2, groups="layers")
    assert s.info["rows"] == 2 and s.info["tokens"] == 2 * 32
    assert s.table.shape == (tiny_ctx.n_layers, tiny_ctx.n_schemes)
    assert s.info["kl_forwards"] == tiny_ctx.n_layers * tiny_ctx.n_schemes * 1


# ---------------------------------------------------------------------------------------
# exllamav2


def _hook_input(module, store):
    return module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach().clone()))


def _hook_output(module, store):
    return module.register_forward_hook(lambda m, a, out: store.append((out[0] if isinstance(out, tuple)
                                                                        else out).detach().clone()))


def _rfn_sum(yq, y):
    return float(((yq - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1)).sum())


def _whole_model_rfn(ctx, members, j, attach):
    """Mean per-row rfn of a tensor seen in full forwards with ``members`` at scheme ``j``."""
    from bitalloc.sensitivity._forward import forward

    total, rows = 0.0, 0
    for batch in ctx.batches:
        ref, q = [], []
        h = attach(ref)
        forward(ctx.model, batch)
        h.remove()
        h = attach(q)
        with ctx.swapped({i: j for i in members}):
            forward(ctx.model, batch)
        h.remove()
        total += _rfn_sum(q[0], ref[0])
        rows += batch["input_ids"].shape[0]
    return total / rows


def test_exllamav2_rfn_matches_the_sub_block_output_in_the_model(tiny_ctx):
    from bitalloc.sensitivity.peer_measure import score_exllamav2

    ctx = tiny_ctx
    before = _state(ctx.model)
    s = score_exllamav2(ctx)
    _assert_restored(ctx.model, before)
    assert (s.table[:, -1] < 0.01).all(), f"w8 is near lossless: {s.table[:, -1]}"
    assert (np.diff(s.table, axis=1) < 0).all(), "rfn grows as bits fall"
    assert s.info["kl_forwards"] == 0 and s.info["model_forwards"] == 1, "the rows are captured in one batch"
    names = [ctx.layers[g[0]].fqn for g in s.groups]
    blk = ctx.model.model.layers[0]
    # attention of block 0: X + A_q is the input of the post-attention norm
    g_attn = names.index("model.layers.0.self_attn.q_proj")
    want = _whole_model_rfn(ctx, s.groups[g_attn], 0, lambda st: _hook_input(blk.post_attention_layernorm, st))
    assert abs(want - s.table[g_attn, 0]) < 1e-5, (want, s.table[g_attn, 0])
    # MLP of block 0: the block's output (attention in 16-bit)
    g_mlp = names.index("model.layers.0.mlp.gate_proj")
    want = _whole_model_rfn(ctx, s.groups[g_mlp], 1, lambda st: _hook_output(blk, st))
    assert abs(want - s.table[g_mlp, 1]) < 1e-5, (want, s.table[g_mlp, 1])
    # lm_head alone: its own output
    g_head = names.index("lm_head")
    want = _whole_model_rfn(ctx, s.groups[g_head], 0, lambda st: _hook_output(ctx.model.lm_head, st))
    assert abs(want - s.table[g_head, 0]) < 1e-5, (want, s.table[g_head, 0])


def test_exllamav2_a_dominant_residual_lowers_rfn(tiny_ctx):
    """Scaling the embeddings up makes the residual dominate block 0's attention output."""
    from bitalloc.sensitivity.peer_measure import score_exllamav2

    ctx = tiny_ctx
    r0 = score_exllamav2(ctx).table[0, 0]
    with torch.no_grad():
        ctx.model.model.embed_tokens.weight.mul_(100.0)
    r1 = score_exllamav2(_fresh_ctx(ctx), rows=2).table[0, 0]
    assert r1 < 0.1 * r0, f"rfn with a 100x residual {r1} vs {r0}"


# ---------------------------------------------------------------------------------------
# exllamav3


def test_exllamav3_delta_kl_relative_to_the_base(tiny_ctx):
    from bitalloc.sensitivity.peer_measure import exllamav3_groups, score_exllamav3

    ctx = tiny_ctx
    before = _state(ctx.model)
    s = score_exllamav3(ctx)
    _assert_restored(ctx.model, before)
    assert s.info["base_index"] == 0 and s.info["base"] == "w2g32z", "default base: the smallest scheme"
    assert (s.table[:, 0] == 0).all(), "ΔKL at the base scheme is 0"
    G = len(s.groups)
    assert s.info["kl_forwards"] == (1 + G * (ctx.n_schemes - 1)) * len(ctx.batches)
    # an item by hand: group 0 at w8 in the all-w2 model
    ref = ctx.reference(replay=False)
    a = [0] * ctx.n_layers
    with ctx.swapped(a):
        base = ctx.kl(ref)
    for i in s.groups[0]:
        a[i] = 3
    with ctx.swapped(a):
        item = ctx.kl(ref)
    assert abs((item - base) - s.table[0, 3]) < 1e-9
    assert s.info["base_kl"] == pytest.approx(base, rel=1e-9)
    # near-lossless base: quantizing any one group to 2 bits costs KL
    s8 = score_exllamav3(ctx, base="w8")
    assert s8.info["base_index"] == 3 and (s8.table[:, 3] == 0).all()
    assert (s8.table[:, 0] > 0).all() and (s8.table[:, 0] > s8.table[:, 2]).all(), s8.table
    assert [len(g) for g in exllamav3_groups(ctx.layers, 3)].count(2) == 4, "k+v and gate+up per block"
    assert len(exllamav3_groups(ctx.layers, 1)) == 3, "level 1: a group per block, lm_head alone"


def test_exllamav2_mixed_options_raise_v_o_and_down(tiny_ctx):
    from bitalloc.sensitivity.peer_measure import score_exllamav2

    ctx = tiny_ctx
    plain = score_exllamav2(ctx)
    s = score_exllamav2(ctx, mixed=True)
    assert np.allclose(s.table, plain.table), "the uniform table does not change with mixed=True"
    mixes = s.info["mixed_options"]
    S = ctx.n_schemes
    # per block: attention (v; v+o) and MLP (down), each at S-1 adjacent scheme pairs
    assert len(mixes) == 2 * 3 * (S - 1), len(mixes)
    for m in mixes:
        members = s.groups[m["group"]]
        leaves = [ctx.layers[i].fqn.rsplit(".", 1)[-1] for i in members]
        lo = min(m["schemes"])
        raised = {leaf for leaf, j in zip(leaves, m["schemes"]) if j > lo}
        assert raised in ({"v_proj"}, {"v_proj", "o_proj"}, {"down_proj"}), (leaves, m["schemes"])
        # raising part of a sub-block lands between its uniform low and high rfn
        hi = max(m["schemes"])
        assert plain.table[m["group"], hi] <= m["rfn"] <= plain.table[m["group"], lo] + 1e-12, m
    assert s.info["module_forwards"] == len(s.groups) * S + len(mixes), "one module run per option (rows stacked)"


def test_exllamav2_on_gpt2_conv1d_matches_the_model():
    """GPT-2 (Conv1D, fused c_attn): the attention rfn equals the one seen at ln_2's input."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sensitivity"))
    from sens_helpers import VOCAB, make_gpt2

    from bitalloc.sensitivity.calibration import as_batches
    from bitalloc.sensitivity.layers import find_layers
    from bitalloc.sensitivity.peer_context import PeerContext
    from bitalloc.sensitivity.peer_measure import score_exllamav2

    model = make_gpt2()
    layers, _ = find_layers(model)
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    ctx = PeerContext(model, layers, ["w2g32z", "w8"], as_batches(ids, 2))
    s = score_exllamav2(ctx)
    g = next(k for k, grp in enumerate(s.groups) if layers[grp[0]].fqn.startswith("transformer.h.0.attn"))
    blk = model.transformer.h[0]
    want = _whole_model_rfn(ctx, s.groups[g], 0, lambda st: _hook_input(blk.ln_2, st))
    assert abs(want - s.table[g, 0]) < 1e-5, (want, s.table[g, 0])
    assert (s.table[:, 1] < s.table[:, 0]).all()
