from __future__ import annotations

import pytest
import torch

from bitalloc.sensitivity.calibration import as_batches
from bitalloc.sensitivity.hessian import HessianAccumulator, collect_hessians, collect_input_statistics
from bitalloc.sensitivity.layers import find_layers


def _capture_inputs(model, fqns, batches):
    """Concatenated inputs (tokens, in) of each module, captured directly."""
    got = {f: [] for f in fqns}
    mods = dict(model.named_modules())
    hs = [mods[f].register_forward_pre_hook(lambda m, a, _f=f: got[_f].append(a[0].reshape(-1, a[0].shape[-1]))) for f in fqns]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hs:
        h.remove()
    return {f: torch.cat(v) for f, v in got.items()}


def test_accumulator_running_mean_over_uneven_batches():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 5, generator=g) for n in (1, 7, 3, 12)]
    acc = HessianAccumulator(5, dtype=torch.float64)
    for x in xs:
        acc.add_batch(x.reshape(-1, 5) if x.shape[0] % 2 else x.reshape(1, -1, 5))  # any leading dims
    X = torch.cat(xs).double()
    assert acc.nsamples == 23
    torch.testing.assert_close(acc.H, X.T @ X / 23, rtol=1e-12, atol=1e-12)
    acc32 = HessianAccumulator(5)
    for x in xs:
        acc32.add_batch(x)
    torch.testing.assert_close(acc32.H.double(), X.T @ X / 23, rtol=1e-5, atol=1e-6)
    acc32.add_batch(torch.zeros(0, 5))
    assert acc32.nsamples == 23
    with pytest.raises(ValueError, match="features"):
        acc32.add_batch(torch.zeros(2, 4))
    acc32.free()
    with pytest.raises(RuntimeError, match="freed"):
        acc32.H


def test_collect_matches_direct_and_shares_inputs(llama, ids):
    layers, _ = find_layers(llama)
    H = collect_hessians(llama, layers, ids, progress=False, batch_size=4, dtype=torch.float64)
    X = _capture_inputs(llama, [x.fqn for x in layers], as_batches(ids, 4))
    for layer in layers:
        x = X[layer.fqn].double()
        torch.testing.assert_close(H[layer.fqn], x.T @ x / x.shape[0], rtol=1e-9, atol=1e-10)
    p = "model.layers.0."
    assert H[p + "self_attn.q_proj"] is H[p + "self_attn.k_proj"] is H[p + "self_attn.v_proj"]
    assert H[p + "mlp.gate_proj"] is H[p + "mlp.up_proj"]
    assert H[p + "self_attn.q_proj"] is not H[p + "self_attn.o_proj"]
    assert H[p + "self_attn.q_proj"] is not H["model.layers.1.self_attn.q_proj"]
    assert len({id(h) for h in H.values()}) == 2 * 4 + 1  # 4 distinct inputs per block + lm_head
    for m in llama.modules():  # hooks removed
        assert not m._forward_pre_hooks and not m._forward_hooks


def test_unshared_gives_same_values(llama, ids):
    layers, _ = find_layers(llama, include=["model.layers.0.*"])
    a = collect_hessians(llama, layers, ids, progress=False)
    b = collect_hessians(llama, layers, ids, progress=False, share_inputs=False)
    assert len({id(h) for h in b.values()}) == len(layers)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_gpt2_conv1d_and_progress(gpt2, ids):
    layers, _ = find_layers(gpt2)
    H = collect_hessians(gpt2, layers, ids, progress=True, batch_size=6)
    X = _capture_inputs(gpt2, [x.fqn for x in layers], as_batches(ids, 6))
    for layer in layers:
        x = X[layer.fqn]
        assert H[layer.fqn].shape == (layer.in_features, layer.in_features)
        torch.testing.assert_close(H[layer.fqn], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def test_padding_tokens_are_left_out(bert):
    layers, _ = find_layers(bert, include=["encoder.layer.0.attention.self.query"])
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    acc = collect_input_statistics(bert, layers, {"input_ids": ids, "attention_mask": mask}, progress=False)
    assert acc[layers[0].fqn].nsamples == 13


def test_hooks_removed_on_error(llama, ids):
    layers, _ = find_layers(llama)

    def boom(*a, **k):
        raise RuntimeError("boom")

    h = llama.model.layers[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        collect_hessians(llama, layers, ids, progress=False)
    h.remove()
    assert all(not m._forward_pre_hooks for m in llama.modules())


def test_activation_statistics(llama, ids):
    from bitalloc.kernels.quant import quantize_activation

    layers, _ = find_layers(llama, include=["model.layers.1.mlp.down_proj"])
    acc = collect_input_statistics(llama, layers, ids, progress=False, dtype=torch.float64, act_formats=("a8",))
    x = _capture_inputs(llama, [layers[0].fqn], as_batches(ids, 4))[layers[0].fqn]
    e = quantize_activation(x, "a8") - x
    a = acc[layers[0].fqn]
    torch.testing.assert_close(a.cross["a8"], x.double().T @ e.double() / x.shape[0])
    torch.testing.assert_close(a.noise["a8"], e.double().T @ e.double() / x.shape[0])
