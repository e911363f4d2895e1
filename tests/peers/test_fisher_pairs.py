"""Pair terms from the Fisher information (sensitivity.fisher_pairs) on hand-built cases."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from bitalloc.sensitivity import fisher_pairs as fp
from bitalloc.sensitivity.fisher_refs import sample_labels
from bitalloc.sensitivity.pairs import check_pairs, pair_matrices

from test_peer_grad import GAIN, TwoBranch  # noqa: E402  (tests/peers is on sys.path)


def _ctx(model, rows: int, length: int, vocab: int, schemes, seed: int = 0):
    from bitalloc.sensitivity.calibration import as_batches
    from bitalloc.sensitivity.layers import find_layers
    from bitalloc.sensitivity.peer_context import PeerContext

    layers, _ = find_layers(model)
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    return PeerContext(model.eval(), layers, list(schemes), as_batches(ids, 2))


def _loglik(model, ids, y) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()  # (1, T-1, V)
        return float(torch.log_softmax(logits, -1).gather(-1, y[..., None]).sum())


def test_projection_is_the_directional_derivative_of_the_sampled_loglik(tiny_ctx):
    """s[r, l, j] = d/dε Σ_t log p(y_t) at W_l + ε (Q_j(W_l) − W_l), with the labels the function drew."""
    ctx = tiny_ctx
    proj = fp.fisher_projections(ctx, rows=1, seed=3)
    assert proj.s.shape == (1, ctx.n_layers, ctx.n_schemes) and proj.n_tokens == 31
    ids = ctx.batches[0]["input_ids"][:1]  # (1, 32)
    with torch.no_grad():
        y = sample_labels(ctx.model(input_ids=ids).logits, ids, "sampled", torch.Generator().manual_seed(3))
    for i, j in [(0, 0), (3, 2), (ctx.n_layers - 1, 1)]:
        w, dw = ctx.weight(i), ctx.quantized(i, j) - ctx.weight(i)
        eps, f = 1e-2, []
        for e in (eps, -eps):
            with torch.no_grad():
                ctx.module(i).weight.copy_(w + e * dw)
            f.append(_loglik(ctx.model, ids, y))
        with torch.no_grad():
            ctx.module(i).weight.copy_(w)
        fd = (f[0] - f[1]) / (2 * eps)
        assert math.isclose(proj.s[0, i, j], fd, rel_tol=2e-2, abs_tol=1e-4), (i, j, proj.s[0, i, j], fd)


def test_fisher_model_predicts_the_kl_of_a_small_joint_change_within_its_error():
    """KL(δ) ≈ 1/(2N) Σ_r (Σ_l s_r[l])² for δ = ε × every layer's w2 damage; checked against the
    measured KL, to within three standard errors of the one-sample-per-row estimate."""
    from sens_helpers import VOCAB, make_llama

    torch.manual_seed(0)
    ctx = _ctx(make_llama(tie=False), rows=48, length=32, vocab=VOCAB, schemes=["w2g32z"])
    proj = fp.fisher_projections(ctx, seed=1)
    eps = 0.05
    q = (eps * proj.s[:, :, 0].sum(axis=1)) ** 2  # (R,): (g_r · δ)²
    pred = q.sum() / (2 * proj.n_tokens)
    se = q.std(ddof=1) * len(q) / math.sqrt(len(q)) / (2 * proj.n_tokens)
    ids = torch.cat([b["input_ids"] for b in ctx.batches])  # (48, 32)
    with torch.no_grad():
        p = torch.log_softmax(ctx.model(input_ids=ids).logits[:, :-1].double(), -1)
        for i in range(ctx.n_layers):
            ctx.module(i).weight.add_(eps * (ctx.quantized(i, 0) - ctx.weight(i)))
        qlog = torch.log_softmax(ctx.model(input_ids=ids).logits[:, :-1].double(), -1)
        for i in range(ctx.n_layers):
            ctx.module(i).weight.copy_(ctx.weight(i))
    kl = float((p.exp() * (p - qlog)).sum(-1).mean())
    assert kl > 0 and se < 0.5 * pred, (kl, pred, se)
    assert abs(pred - kl) < 3 * se, f"Fisher prediction {pred:.3e} ± {se:.1e}, measured KL {kl:.3e}"


def test_two_branches_that_add_are_perfectly_correlated():
    """TwoBranch: L depends on A and B only through GAIN·A + B and they hold the same weight, so
    s_A = GAIN · s_B on every row: ρ_AB = I / sqrt(F_A F_B) = 2 at every equal-scheme pair, and
    the profile's term is 2·sqrt(D_A D_B)."""
    model = TwoBranch()
    ctx = _ctx(model, rows=6, length=16, vocab=64, schemes=["w2g32z", "w3g32z", "w8"])
    proj = fp.fisher_projections(ctx, seed=0)
    np.testing.assert_allclose(proj.s[:, 0], GAIN * proj.s[:, 1], rtol=1e-4, atol=1e-7)
    F = proj.layer_kl()
    inter, se = fp.pair_stats(proj, 0, 1)
    np.testing.assert_allclose(np.diag(inter) / np.sqrt(F[0] * F[1]), 2.0, rtol=1e-4)
    assert (se > 0).all()

    fqns = [layer.fqn for layer in ctx.layers]
    D = np.array([[0.5, 0.2, 0.01], [0.3, 0.1, 0.002], [1.0, 0.4, 0.03]])
    prof = SimpleNamespace(fqns=fqns, schemes=list(ctx.schemes), tables={"all": D}, table=lambda name: D)
    field = fp.fisher_pairs_field(prof, proj, [("a", "b")], shrink=False)
    check_pairs(field, fqns, prof.schemes)
    prof.pairs = field
    M = pair_matrices(prof)[("a", "b")]  # (S, S)
    np.testing.assert_allclose(np.diag(M), 2.0 * np.sqrt(D[0] * D[1]), rtol=1e-4)
    assert field["fisher"]["rows"] == 6 and field["fisher"]["rho_same_scheme"]["negative"] == 0.0


def test_shrinkage_keeps_resolved_terms_and_removes_noise():
    """Layers 0 and 1 move together on every row; layer 2 is independent noise. The 0-1 term is
    resolved (|I| > 2 se) and kept nearly whole; the 0-2 term is shrunk toward zero."""
    rng = np.random.default_rng(0)
    R = 400
    base = rng.normal(size=(R, 1))
    s = np.concatenate([base, base + 0.1 * rng.normal(size=(R, 1)), rng.normal(size=(R, 1))], axis=1)[..., None]
    proj = fp.FisherProjections(s, n_tokens=R * 100)
    fqns = ["l0", "l1", "l2"]
    D = np.ones((3, 1))
    prof = SimpleNamespace(fqns=fqns, schemes=["w2"], tables={"all": D}, table=lambda name: D)
    raw = fp.fisher_pairs_field(prof, proj, [("l0", "l1"), ("l0", "l2")], shrink=False)
    shr = fp.fisher_pairs_field(prof, proj, [("l0", "l1"), ("l0", "l2")], shrink=True)
    keep, noise = "l0|l1", "l0|l2"
    assert raw["terms"][keep][0][0] > 1.9 and shr["terms"][keep][0][0] > 0.99 * raw["terms"][keep][0][0]
    inter, se = fp.pair_stats(proj, 0, 2)
    assert abs(inter[0, 0]) < 2 * se[0, 0], "the independent layer's term should not be resolved"
    factor = max(0.0, 1.0 - (se[0, 0] / inter[0, 0]) ** 2)  # < 0.75 for an unresolved term
    assert factor < 0.75
    np.testing.assert_allclose(shr["terms"][noise][0][0], factor * raw["terms"][noise][0][0], atol=1e-12)
    assert shr["fisher"]["resolved_2se"] == 1 and shr["fisher"]["terms"] == 2
