"""The gradient-based peer scores (HAWQ-V3, ModelOpt gradient, AutoRound) on hand-built cases."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bitalloc.sensitivity import peer_grad as pg

SCHEMES = ["w2g32z", "w3g32z", "w4g32z", "w8"]
GAIN = 10.0  # branch A's output is multiplied by GAIN: Hessian / Fisher x GAIN², weight gradient x GAIN


class TwoBranch(torch.nn.Module):
    """logits = head(h + GAIN·A h + B h), h = emb(ids); A and B hold the same weight.

    L depends on A and B only through GAIN·A + B, so at any point ∇²_A L = GAIN² ∇²_B L,
    ∂L/∂(A h) = GAIN ∂L/∂(B h) and ∂L/∂A = GAIN ∂L/∂B: A must score higher at every scheme.
    L is convex in A (cross entropy is convex in the logits, which are linear in A)."""

    def __init__(self, vocab: int = 64, d: int = 32, gain: float = GAIN):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb = torch.nn.Embedding(vocab, d)
        self.a = torch.nn.Linear(d, d, bias=False)
        self.b = torch.nn.Linear(d, d, bias=False)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, d, generator=g))
            self.a.weight.copy_(torch.randn(d, d, generator=g) * 0.02)
            self.b.weight.copy_(self.a.weight)
            self.head.weight.copy_(torch.randn(vocab, d, generator=g) * 0.1)
        self.gain = gain

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)  # (B, T, d)
        return SimpleNamespace(logits=self.head(h + self.gain * self.a(h) + self.b(h)))  # (B, T, V)


@pytest.fixture
def branch_ctx():
    from bitalloc.sensitivity.calibration import as_batches
    from bitalloc.sensitivity.layers import find_layers
    from bitalloc.sensitivity.peer_context import PeerContext

    model = TwoBranch().eval()
    layers, _ = find_layers(model)
    assert [layer.fqn for layer in layers] == ["a", "b", "head"], [layer.fqn for layer in layers]
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    return PeerContext(model, layers, list(SCHEMES), as_batches(ids, 2))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()]


def _assert_restored(model, before):
    sd, flags = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), f"{k} changed by the scorer"
    assert [p.requires_grad for p in model.parameters()] == flags, "requires_grad flags not restored"


# ----------------------------------------------------------------------------- HAWQ-V3

def test_hutchinson_matches_exact_trace_on_quadratic():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, generator=g)
    a = m @ m.t() + torch.diag(torch.arange(12.0))  # (12, 12) SPD
    w1 = torch.randn(8, requires_grad=True, generator=g)
    w2 = torch.randn(4, requires_grad=True, generator=g)
    w = torch.cat([w1, w2])
    loss = 0.5 * w @ a @ w  # Hessian = a: blocks a[:8, :8], a[8:, 8:]
    s = pg.hutchinson_samples(loss, [w1, w2], 400, torch.Generator().manual_seed(1))  # (400, 2)
    exact = [float(a[:8, :8].trace()), float(a[8:, 8:].trace())]
    for p in range(2):
        est, se = s[:, p].mean(), s[:, p].std(ddof=1) / math.sqrt(len(s))
        assert abs(est - exact[p]) < 4 * se, f"block {p}: Hutchinson {est:.2f} ± {se:.2f} vs exact {exact[p]:.2f}"
        assert se < 0.1 * exact[p], f"block {p}: standard error {se:.2f} too large to test anything"


def _exact_trace(ctx, i):
    """tr(∇²_{W_i} L) of the mean loss over the batches, by the full Hessian of W_i."""
    mod = ctx.module(i)
    w0 = mod.weight.detach().clone()

    def f(w):
        total = 0.0
        for batch in ctx.batches:
            h = ctx.model.emb(batch["input_ids"])
            z = h + ctx.model.gain * (h @ (w if mod is ctx.model.a else ctx.model.a.weight).t()) \
                + h @ (w if mod is ctx.model.b else ctx.model.b.weight).t()
            logits = ctx.model.head(z)
            total = total + torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))
        return total / len(ctx.batches)

    hess = torch.autograd.functional.hessian(f, w0)  # (out, in, out, in)
    return float(hess.reshape(w0.numel(), w0.numel()).trace())


def test_hawq_trace_within_stderr_and_high_gain_layer_scores_higher(branch_ctx):
    before = _state(branch_ctx.model)
    r = pg.score_hawq_v3(branch_ctx, n_probes=32, per_layer=True)
    _assert_restored(branch_ctx.model, before)
    tr, se = np.array(r.info["trace"]), np.array(r.info["trace_stderr"])
    exact_b = _exact_trace(branch_ctx, 1)  # tr(∇²_A L) = GAIN² tr(∇²_B L) exactly
    for i, exact in ((0, GAIN**2 * exact_b), (1, exact_b)):
        assert abs(tr[i] - exact) < 4 * se[i], f"layer {i}: trace {tr[i]:.4g} ± {se[i]:.2g}, exact {exact:.4g}"
        assert se[i] < 0.2 * exact, f"layer {i}: standard error {se[i]:.2g} too large to test anything"
    assert tr[0] / tr[1] == pytest.approx(GAIN**2, rel=0.3), f"trace ratio {tr[0] / tr[1]:.1f}, expected ~{GAIN**2}"
    assert np.all(r.table[0] > r.table[1]), f"A must score higher at every scheme: {r.table[:2]}"
    sq = np.array(r.info["delta_w_sq"])
    assert np.all(np.diff(sq[0]) < 0), f"‖ΔW‖² must fall with bits: {sq[0]}"
    assert r.info["hvps"] == 2 * 3 * 32 and r.info["forwards"] == 2 * 3, r.info


def test_hawq_joint_probes_rank_the_high_gain_layer(branch_ctx):
    r = pg.score_hawq_v3(branch_ctx, n_probes=32)
    assert r.table.shape == (3, 4)
    assert np.all(r.table[0] > r.table[1]), f"joint probes: A must score higher: {r.table[:2]}"
    assert r.info["hvps"] == 2 * 32 and r.info["backwards"] == 2, r.info


def test_hawq_on_tiny_llama_restores_and_reports(tiny_ctx):
    from bitalloc.sensitivity.peer_context import PeerContext

    ctx = PeerContext(tiny_ctx.model, tiny_ctx.layers, tiny_ctx.schemes, tiny_ctx.batches[:1])
    before = _state(ctx.model)
    r = pg.score_hawq_v3(ctx, n_probes=2)
    _assert_restored(ctx.model, before)
    assert r.table.shape == (ctx.n_layers, ctx.n_schemes)
    assert np.all(np.isfinite(r.table)) and np.all(np.isfinite(r.info["trace_stderr"]))
    assert r.info["hvps"] == 2 and r.info["forwards"] == 1, r.info


# ----------------------------------------------------------------------------- ModelOpt gradient

def test_modelopt_high_gain_layer_scores_gain_squared(branch_ctx):
    r = pg.score_modelopt_gradient(branch_ctx, group=False, monotone=False)
    raw = np.array(r.info["per_layer_raw"])
    assert np.allclose(raw[0] / raw[1], GAIN**2, rtol=1e-3), f"Fisher ratio {raw[0] / raw[1]}, expected {GAIN**2}"
    assert np.all(r.table[0] > r.table[1])
    assert r.info["forwards"] == 2 and r.info["backwards"] == 2, r.info


def test_modelopt_matches_brute_force_output_difference(tiny_ctx):
    """Σ g² (Y^(r) − Y)² with Y^(r) from an actual forward with the layer swapped, one batch."""
    from bitalloc.sensitivity.peer_context import PeerContext

    ctx = PeerContext(tiny_ctx.model, tiny_ctx.layers, tiny_ctx.schemes, tiny_ctx.batches[:1])
    r = pg.score_modelopt_gradient(ctx, group=False, monotone=False)
    batch, i = ctx.batches[0], 4  # a mid-block layer
    seen = {}
    h = ctx.module(i).register_forward_hook(lambda m, a, o: seen.__setitem__("y", o))
    try:
        out = pg.lm_loss(ctx.model, batch)
        (g,) = torch.autograd.grad(out, [seen["y"]])
        y = seen["y"].detach()
        for j in range(ctx.n_schemes):
            with ctx.swapped({i: j}), torch.no_grad():
                pg.lm_loss(ctx.model, batch)
                want = float((g**2 * (seen["y"] - y) ** 2).sum())
            assert r.table[i, j] == pytest.approx(want, rel=1e-3), f"scheme {j}: {r.table[i, j]} vs {want}"
    finally:
        h.remove()


def test_modelopt_groups_qkv_and_gate_up_and_is_monotone(tiny_ctx):
    before = _state(tiny_ctx.model)
    r = pg.score_modelopt_gradient(tiny_ctx)
    _assert_restored(tiny_ctx.model, before)
    names = [[tiny_ctx.layers[i].fqn.split(".")[-1] for i in g] for g in r.groups]
    assert names.count(["q_proj", "k_proj", "v_proj"]) == 2, names
    assert names.count(["gate_proj", "up_proj"]) == 2, names
    assert len(r.groups) == tiny_ctx.n_layers - 2 * 2 - 2 * 1, names
    raw = np.array(r.info["per_layer_raw"])
    for g, row in zip(r.groups, r.table):
        assert row[0] == pytest.approx(raw[list(g), 0].sum()), "a group's score is the sum of its layers'"
    order = np.argsort(r.info["scheme_bits"])
    assert np.all(np.diff(r.table[:, order], axis=1) <= 0), "scores must not rise with bits"


def test_monotone_rule_is_running_min_in_bits_order():
    t = np.array([[5.0, 1.0, 3.0], [2.0, 4.0, 0.5]])  # schemes with bits 4, 2, 8
    out = pg._monotone(t, [4, 2, 8])
    assert out.tolist() == [[1.0, 1.0, 1.0], [2.0, 4.0, 0.5]], out


# ----------------------------------------------------------------------------- AutoRound

def test_autoround_high_gain_layer_scores_gain(branch_ctx):
    before = _state(branch_ctx.model)
    r = pg.score_autoround(branch_ctx)
    _assert_restored(branch_ctx.model, before)
    assert np.allclose(r.table[0] / r.table[1], GAIN, rtol=1e-3), f"ratio {r.table[0] / r.table[1]}, expected {GAIN}"
    assert r.info["forwards"] == 4 * 2, r.info
    assert r.info["head_rule"]["head_layer"] is None, "no lm_head in this model"


def test_autoround_on_tiny_llama_f16_scores_zero_and_head_rule(tiny_ctx):
    from bitalloc.sensitivity.peer_context import PeerContext

    ctx = PeerContext(tiny_ctx.model, tiny_ctx.layers, ["w2g32z", "w8", "f16"], tiny_ctx.batches)
    r = pg.score_autoround(ctx)
    assert np.all(r.table[:, 2] == 0), "schemes above 8 bits are not scored (AutoRound's bf16 rule)"
    assert np.all(r.table[:, 0] > r.table[:, 1]), f"2-bit must lose more than 8-bit on every layer: {r.table}"
    head = r.info["head_rule"]
    assert ctx.layers[head["head_layer"]].fqn == "lm_head" and head["high_bit_schemes"] == [1, 2], head
    assert r.info["forwards"] == 2 * len(ctx.batches), "no passes for the 16-bit scheme"


def test_autoround_uses_the_gradient_at_the_quantized_model(branch_ctx):
    """score(l, 0) = Σ_batches Σ |∂L/∂Ŵ_l ⊙ ΔW_l| with *every* layer at scheme 0 (not the 16-bit gradient)."""
    ctx = branch_ctx
    r = pg.score_autoround(ctx)
    params = [ctx.module(i).weight for i in range(ctx.n_layers)]

    def score(assignment):
        total = np.zeros(ctx.n_layers)
        with ctx.swapped(assignment):
            for batch in ctx.batches:
                grads = torch.autograd.grad(pg.lm_loss(ctx.model, batch), params)
                total += [float((g * (ctx.weight(i) - ctx.quantized(i, 0))).abs().sum()) for i, g in enumerate(grads)]
        return total

    at_q, at_16 = score([0] * ctx.n_layers), score([None] * ctx.n_layers)
    assert np.allclose(r.table[:, 0], at_q, rtol=1e-4), f"{r.table[:, 0]} vs {at_q}"
    assert not np.allclose(at_q, at_16, rtol=1e-2), "the 2-bit and 16-bit gradients should differ (test has teeth)"


def test_modelopt_gradient_chunked_equals_one_pass(tiny_ctx):
    """Layers scored in cache-sized runs (one forward/backward per run) give the same table."""
    import numpy as np

    from bitalloc.sensitivity.peer_grad import _cache_chunks, score_modelopt_gradient

    one = score_modelopt_gradient(tiny_ctx)
    tiny_ctx.cache_bytes = 4 * 64 * 128 * tiny_ctx.n_schemes * 2  # room for about two MLP layers
    assert len(_cache_chunks(tiny_ctx)) > 3
    many = score_modelopt_gradient(tiny_ctx)
    np.testing.assert_allclose(many.table, one.table, rtol=1e-5, atol=1e-12)
    assert many.info["layer_chunks"] > 3
