from __future__ import annotations

import numpy as np
import pytest
import torch

from bitalloc.kernels.formats import parse_scheme
from bitalloc.kernels.quant import fake_quantize_weight, quantize_activation, select_high_channels
from bitalloc.sensitivity.calibration import as_batches
from bitalloc.sensitivity.hessian import collect_hessians, collect_input_statistics
from bitalloc.sensitivity.layers import find_layers, get_weight
from bitalloc.sensitivity.models import fingerprint
from bitalloc.sensitivity.proxy import (
    CosineMetric,
    KLMetric,
    calibrate_proxy,
    compute_reference,
    measure_item,
    measure_kl_deltas,
    measure_table,
    proxy_table,
)

SCHEMES = ["w2g32z", "w3g64z", "w4g32", "w8", "fp8g32", "fp4g32", "w3g32z+h8r0.1", "fp16"]


def _direct(w, H, scheme):
    s = parse_scheme(scheme)
    k = s.n_high(w.shape[1])
    idx = select_high_channels(torch.diagonal(H) * w.pow(2).sum(0), k) if k else None
    d = (fake_quantize_weight(w, s, idx) - w).double()
    return float(torch.trace(d @ H.double() @ d.T))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_proxy_matches_direct_computation(name, request, ids):
    model = request.getfixturevalue(name)
    layers, _ = find_layers(model)
    H = collect_hessians(model, layers, ids, progress=False)
    P = proxy_table(model, layers, H, SCHEMES, progress=False)
    assert P.shape == (len(layers), len(SCHEMES)) and P.dtype == np.float64
    mods = dict(model.named_modules())
    for i, layer in enumerate(layers):
        w = get_weight(mods[layer.fqn], layer.module_type).detach().float()
        for j, s in enumerate(SCHEMES):
            assert P[i, j] == pytest.approx(_direct(w, H[layer.fqn], s), rel=1e-4, abs=1e-12)
    assert (P[:, :-1] > 0).all()
    assert (P[:, 0] > P[:, 2]).all() and (P[:, 2] > P[:, 3]).all()  # 2 bits worse than 4 worse than 8


def test_proxy_zero_when_scheme_reproduces_weight(llama, ids):
    layers, _ = find_layers(llama)
    mods = dict(llama.named_modules())
    with torch.no_grad():
        for layer in layers:  # weights on the fp16 grid, and one layer on the w4g32 grid
            w = mods[layer.fqn].weight
            w.copy_(w.half().float())
        q = mods[layers[0].fqn].weight
        # min-max grid (the clip search keeps a weight that min-max reproduces exactly: error 0 is never beaten)
        from bitalloc.kernels.quant import fake_quantize

        q.copy_(fake_quantize(q, "w4g32", clip_search=False))
    H = collect_hessians(llama, layers, ids, progress=False)
    P = proxy_table(llama, layers, H, ["fp16", "w4g32", "w2g32z"], progress=False)
    assert (P[1:, 0] == 0).all()  # (code x fp16 scale needs more than fp16's 11 mantissa bits)
    assert P[0, 1] == 0 and (P[1:, 1] > 0).all() and (P[:, 2] > 0).all()


def test_activation_quantized_proxy_is_exact_output_error(llama, ids):
    layers, _ = find_layers(llama, include=["model.layers.1.mlp.*"])
    stats = collect_input_statistics(llama, layers, ids, progress=False, dtype=torch.float64, act_formats=("a8",))
    P = proxy_table(llama, layers, stats, ["w4g32a8", "w4g32"], progress=False, act_stats=stats)
    mods = dict(llama.named_modules())
    for i, layer in enumerate(layers):
        got = []
        h = mods[layer.fqn].register_forward_pre_hook(lambda m, a: got.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            for b in as_batches(ids, 4):
                llama(**b)
        h.remove()
        x = torch.cat(got)
        w = mods[layer.fqn].weight.detach()
        wq = fake_quantize_weight(w, parse_scheme("w4g32"))
        y, yq = x.double() @ w.double().T, quantize_activation(x, "a8").double() @ wq.double().T
        assert P[i, 0] == pytest.approx(float(((yq - y) ** 2).sum(1).mean()), rel=1e-6)
        assert P[i, 0] > P[i, 1]


def test_kl_metric_matches_direct_kl():
    g = torch.Generator().manual_seed(0)
    ref_logits = torch.randn(2, 5, 300, generator=g) * 3
    q_logits = ref_logits + 0.05 * torch.randn(2, 5, 300, generator=g)
    m = KLMetric(chunk_tokens=3)
    s, n = m.score(m.reference(ref_logits, {}), q_logits, {})
    lp, lq = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    direct = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert n == 10 and s / n == pytest.approx(direct, rel=2e-3)
    s0, _ = m.score(m.reference(ref_logits, {}), ref_logits, {})
    assert abs(s0) < 1e-6 * 10
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0
    _, n2 = m.score(m.reference(ref_logits, {}), q_logits, {"attention_mask": mask})
    assert n2 == 8


def test_kl_deltas_nonnegative_zero_when_exact_and_restored(llama, ids):
    layers, _ = find_layers(llama)
    mods = dict(llama.named_modules())
    with torch.no_grad():
        for layer in layers:
            w = mods[layer.fqn].weight
            w.copy_(w.half().float())
    before = fingerprint(llama)["sha256"]
    H = collect_hessians(llama, layers, ids, progress=False)
    ref = compute_reference(llama, layers, ids, progress=False)
    kl2 = measure_kl_deltas(llama, layers, None, ref, "w2g32z", progress=False, hessians=H)
    kl16 = measure_kl_deltas(llama, layers, None, ref, "fp16", progress=False)
    mixed = measure_kl_deltas(llama, layers, None, ref, ["w2g32z", "fp16"] * 7 + ["w8"], progress=False, hessians=H)
    assert kl2.shape == (len(layers),) and (kl2 > 0).all()
    assert (kl16 == 0).all()
    assert mixed[0] == kl2[0] and mixed[1] == 0
    assert fingerprint(llama)["sha256"] == before
    with pytest.raises(ValueError, match="15 layers"):
        measure_kl_deltas(llama, layers, None, ref, ["w8"], progress=False)


def test_weights_restored_after_error(llama, ids, monkeypatch):
    layers, _ = find_layers(llama)
    before = fingerprint(llama)["sha256"]
    ref = compute_reference(llama, layers, ids, progress=False)

    def boom(*a, **k):
        raise RuntimeError("metric failed")

    monkeypatch.setattr(ref.metric, "score", boom)
    with pytest.raises(RuntimeError, match="metric failed"):
        measure_item(llama, layers[3], "w2g32z", ref)
    assert fingerprint(llama)["sha256"] == before
    assert all(not m._forward_pre_hooks for m in llama.modules())
    assert all("forward" not in m.__dict__ for m in llama.modules())


def test_block_replay_matches_full_forward(llama, gpt2, ids):
    for model in (llama, gpt2):
        layers, _ = find_layers(model)
        layers = layers[1::3]  # a few layers of each block (and lm_head for llama)
        with_replay = compute_reference(model, layers, ids, progress=False)
        assert with_replay.replay and sorted(with_replay.block_outputs) == [0]
        full = compute_reference(model, layers, ids, progress=False, replay=False)
        assert not full.replay
        a = measure_kl_deltas(model, layers, None, with_replay, "w3g32z", progress=False)
        b = measure_kl_deltas(model, layers, None, full, "w3g32z", progress=False)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12)
        assert all("forward" not in m.__dict__ for m in model.modules())


def test_act_quantized_measurement_and_table(llama, ids):
    layers, _ = find_layers(llama, include=["model.layers.1.*"])
    before = fingerprint(llama)["sha256"]
    T = measure_table(llama, layers, ids, ["w8", "w8a8", "w2g32z"], progress=False)
    assert T.shape == (7, 3) and (T >= 0).all()
    assert T[:, 1].sum() > T[:, 0].sum() and (T[:, 2] > T[:, 0]).all()  # a8 adds error; 2 bits > 8 bits
    assert fingerprint(llama)["sha256"] == before
    assert all(not m._forward_pre_hooks for m in llama.modules())


def test_encoder_cosine_metric(bert):
    layers, _ = find_layers(bert)
    ids = torch.randint(3, 200, (4, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    before = fingerprint(bert)["sha256"]
    ref = compute_reference(bert, layers, {"input_ids": ids, "attention_mask": mask}, progress=False)
    assert isinstance(ref.metric, CosineMetric)
    d = measure_kl_deltas(bert, layers, None, ref, "w2g32z", progress=False)
    assert (d >= 0).all() and d.max() > 0
    assert fingerprint(bert)["sha256"] == before


def test_calibrate_proxy_exact_on_synthetic():
    rng = np.random.default_rng(0)
    P = rng.uniform(0.1, 10, size=(6, 4))
    c = rng.uniform(0.01, 2, size=6)
    K = c * P[:, 1]
    table, scales = calibrate_proxy(P, K, 1)
    np.testing.assert_allclose(scales, c, rtol=1e-12)
    np.testing.assert_allclose(table, c[:, None] * P, rtol=1e-12)
    # two references, consistent: still exact; noisy: least squares through the origin
    table2, scales2 = calibrate_proxy(P, np.stack([c * P[:, 1], c * P[:, 3]], 1), [1, 3])
    np.testing.assert_allclose(scales2, c, rtol=1e-12)
    Kn = np.stack([c * P[:, 1] * 1.1, c * P[:, 3] * 0.9], 1)
    _, s3 = calibrate_proxy(P, Kn, [1, 3])
    expect = (Kn * P[:, [1, 3]]).sum(1) / (P[:, [1, 3]] ** 2).sum(1)
    np.testing.assert_allclose(s3, expect, rtol=1e-12)


def test_calibrate_proxy_guards():
    P = np.array([[4.0, 1.0], [2.0, 0.0], [8.0, 2.0], [1.0, 3.0]])
    K = np.array([2.0, 5.0, np.nan, -1.0])
    table, c = calibrate_proxy(P, K, 1)
    # row 0: 2/1; row 3: negative measurement clipped to 0; rows 1 (proxy 0) and 2 (no data): median
    assert c[0] == 2.0 and c[3] == 0.0
    assert c[1] == c[2] == np.median([2.0, 0.0])
    assert np.isfinite(table).all()
    with pytest.raises(ValueError, match="out of range"):
        calibrate_proxy(P, K, 5)
    with pytest.raises(ValueError, match="ref_values"):
        calibrate_proxy(P, K[:2], 1)


def test_two_references_follow_a_power_law_through_the_measured_points():
    """With references at two bit-widths the row passes through both measurements exactly,
    is a power law between them, and linear through the origin below the smaller one."""
    import numpy as np

    from bitalloc.sensitivity.proxy import calibrate_proxy

    P = np.array([[1.0, 2.0, 4.0, 8.0, 16.0, 0.0]])
    K = np.array([[4.0, 32.0]])  # measured at P=2 and P=8: slope 1.5 in log-log
    table, _ = calibrate_proxy(P, K, [1, 3])
    row = table[0]
    assert row[1] == pytest.approx(4.0) and row[3] == pytest.approx(32.0)
    assert row[2] == pytest.approx(4.0 * 2**1.5)  # between: power law
    assert row[0] == pytest.approx(2.0)  # below: linear through the origin
    assert row[4] == pytest.approx(32.0 * 2**1.5)  # above: last segment's slope
    assert row[5] == 0.0


def test_calibration_keeps_unfit_cells_nan():
    """A NaN proxy cell (a ggml type the layer's shape cannot take) stays NaN through the
    piecewise power law, so the solver masks it (a 0 there was free and got chosen)."""
    import numpy as np

    from bitalloc.sensitivity.calibrate import calibrate_proxy

    P = np.array([[np.nan, 4.0, 2.0, 1.0], [8.0, 4.0, 2.0, 1.0]])
    K = np.array([[0.4, 0.1], [0.8, 0.2]])
    table, _ = calibrate_proxy(P, K, [1, 2])
    assert np.isnan(table[0, 0]) and np.isfinite(table[0, 1:]).all(), table
    assert np.isfinite(table[1]).all() and table[1, 0] > table[1, 1]
