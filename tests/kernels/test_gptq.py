"""GPTQ into the packed formats: lower output error than RTN, identical storage layout."""

import pytest
import torch

from bitalloc.kernels.formats import parse_format, parse_scheme
from bitalloc.kernels.quant import dequantize, dequantize_weight, fake_quantize, quantize, quantize_weight
from bitalloc.kernels.gptq import GPTQ, GPTQError, gptq_fake_quantize_weight, gptq_quantize, gptq_quantize_weight

OUT, IN, N = 64, 256, 2048


def correlated(seed=0, out_f=OUT, in_f=IN, n=N):
    """W (out, in) and H = XᵀX / n from inputs with mixed channels and uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    X = torch.randn(n, in_f, generator=g) @ A + 0.1 * torch.randn(n, in_f, generator=g)
    X = X * torch.exp(0.5 * torch.randn(in_f, generator=g))
    W = torch.randn(out_f, in_f, generator=g)
    return W, X.T @ X / n, X


@pytest.fixture(scope="module")
def case():
    W, H, X = correlated()
    return W, H, X, GPTQ(W, H)  # one object: the inverse-Hessian factor is cached across formats


def proxy(W, W_hat, H):
    d = (W_hat - W).double()
    return float(torch.einsum("ij,jk,ik->", d, H.double(), d))


def same_tensors(a, b):
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


FORMATS = ["w2g32", "w2g64z", "w2", "w2z", "w3g128", "w3g32z", "w3", "w3z", "w4g128", "w4g256z", "w4", "w4z",
           "w8g64", "w5g128z", "w6", "fp8g128", "fp4g32", "fp4"]


@pytest.mark.parametrize("name", FORMATS)
def test_lower_output_error_than_rtn_and_same_layout(case, name):
    W, H, _, gptq = case
    fmt = parse_format(name)
    rtn = quantize(W, fmt)
    qt = gptq.quantize(fmt)
    # identical representation: shapes, dtypes, bytes
    assert qt.fmt == rtn.fmt and qt.shape == rtn.shape
    for key, t in rtn.tensors().items():
        assert qt.tensors()[key].shape == t.shape and qt.tensors()[key].dtype == t.dtype, key
    assert qt.nbytes() == rtn.nbytes() == fmt.storage_bits(OUT, IN) // 8
    err_gptq, err_rtn = proxy(W, dequantize(qt), H), proxy(W, fake_quantize(W, fmt), H)
    assert err_gptq < 0.8 * err_rtn, (name, err_gptq / err_rtn)


@pytest.mark.parametrize("name", ["w2g32", "w3g128z", "w4", "fp4g32"])
def test_act_order_and_dynamic_groups_also_beat_rtn(case, name):
    W, H, _, gptq = case
    err_rtn = proxy(W, fake_quantize(W, name), H)
    for options in ({"act_order": True}, {"act_order": True, "static_groups": False}):
        qt = gptq.quantize(name, **options)
        assert qt.nbytes() == parse_format(name).storage_bits(OUT, IN) // 8
        assert proxy(W, dequantize(qt), H) < 0.8 * err_rtn, options
    if name != "w2g32":  # at 2 bits, groups set from updated weights can lose to RTN (see kernels/gptq.py)
        assert proxy(W, dequantize(gptq.quantize(name, static_groups=False)), H) < 0.8 * err_rtn


def test_static_group_parameters_are_the_rtn_ones(case):
    W, _, _, gptq = case
    qt, rtn = gptq.quantize("w3g64z"), quantize(W, "w3g64z")
    assert torch.equal(qt.scales, rtn.scales) and torch.equal(qt.qzeros, rtn.qzeros)
    assert not torch.equal(qt.qweight, rtn.qweight)


def test_dynamic_group_scales_are_fp16_values_from_updated_weights(case):
    W, _, _, gptq = case
    qt = gptq.quantize("w4g32", static_groups=False)
    rtn = quantize(W, "w4g32")
    assert torch.equal(qt.scales[:, 0], rtn.scales[:, 0])  # the first group sees no update yet
    assert not torch.equal(qt.scales, rtn.scales)
    assert qt.scales.dtype == torch.float16 and bool(torch.isfinite(qt.scales).all())


def test_deterministic(case):
    W, H, _, gptq = case
    a = gptq.quantize("w3g64z", act_order=True)
    b = GPTQ(W, H).quantize("w3g64z", act_order=True)
    assert same_tensors(a, b)


def test_blocksize_does_not_change_the_result(case):
    W, H, _, gptq = case
    for options in ({}, {"static_groups": False}):
        ref = dequantize(gptq.quantize("w4g32z", **options))
        for blocksize in (16, 100, 256):
            got = dequantize(gptq.quantize("w4g32z", blocksize=blocksize, **options))
            assert torch.allclose(got, ref, atol=1e-5), (blocksize, options)


@pytest.mark.parametrize("name", ["w2g32", "w3z", "w4g128", "w4g256z", "fp8g64", "fp4"])
def test_identity_hessian_reproduces_rtn(name):
    W, _, _ = correlated(1)
    for static in (True, False):
        qt = GPTQ(W, torch.eye(IN)).quantize(name, static_groups=static)
        assert same_tensors(qt, quantize(W, name)), static


def test_add_batch_accumulates_the_hessian():
    W, H, X = correlated(2, n=512)
    gptq = GPTQ(W)
    for chunk in X.split(100):  # uneven batches: running mean
        gptq.add_batch(chunk.view(-1, 4, IN) if chunk.shape[0] % 4 == 0 else chunk)
    assert gptq.nsamples == 512
    assert torch.allclose(gptq.H, H, rtol=1e-4, atol=1e-5)
    assert same_tensors(gptq.quantize("w4g128"), GPTQ(W, gptq.H).quantize("w4g128"))


def test_dead_columns_are_zeroed_and_handled():
    W, H, _ = correlated(3)
    dead = torch.tensor([0, 5, 200])
    H = H.clone()
    H[dead, :] = 0
    H[:, dead] = 0
    for name in ("w4g128", "w3z"):
        w_hat = dequantize(GPTQ(W, H).quantize(name))
        assert bool(torch.isfinite(w_hat).all())
        assert torch.all(w_hat[:, dead] == 0)
        assert proxy(W, w_hat, H) < proxy(W, fake_quantize(W, name), H)


def test_cholesky_failure_raises_damping_then_errors():
    W = torch.randn(8, 2)
    mildly_indefinite = torch.tensor([[1.0, 1.05], [1.05, 1.0]])  # eigenvalue -0.05: percdamp 0.1 fixes it
    gptq = GPTQ(W, mildly_indefinite)
    with pytest.warns(UserWarning, match="retrying"):
        qt = gptq.quantize("w4")
    assert gptq.percdamp_used == pytest.approx(0.1)
    assert qt.nbytes() == parse_format("w4").storage_bits(8, 2) // 8
    with pytest.raises(GPTQError, match="not positive definite"), pytest.warns(UserWarning):
        GPTQ(W, torch.tensor([[1.0, 3.0], [3.0, 1.0]])).quantize("w4")


def test_bad_inputs():
    W = torch.randn(4, 8)
    with pytest.raises(GPTQError, match=r"H: must be a \(8, 8\)"):
        GPTQ(W, torch.eye(4))
    with pytest.raises(GPTQError, match="NaN"):
        GPTQ(W, torch.full((8, 8), float("nan")))
    with pytest.raises(GPTQError, match="H\\[1, 1\\]"):
        GPTQ(W, torch.diag(torch.tensor([1.0, -1, 1, 1, 1, 1, 1, 1]))).quantize("w4")
    with pytest.raises(GPTQError, match="no Hessian"):
        GPTQ(W).quantize("w4")
    with pytest.raises(GPTQError, match="x must be"):
        GPTQ(W).add_batch(torch.randn(3, 7))
    with pytest.raises(GPTQError, match="given H"):
        GPTQ(W, torch.eye(8)).add_batch(torch.randn(3, 8))
    with pytest.raises(GPTQError, match="blocksize"):
        GPTQ(W, torch.eye(8)).quantize("w4", blocksize=0)
    with pytest.raises(GPTQError, match="percdamp"):
        GPTQ(W, torch.eye(8)).quantize("w4", percdamp=-1)
    gptq = GPTQ(W, torch.eye(8))
    gptq.free()
    with pytest.raises(GPTQError, match="freed"):
        gptq.quantize("w4")


def test_fp16_and_partial_last_group():
    W, H, _ = correlated(4, out_f=16, in_f=160)  # 160 = 128 + 32: a partial last group
    qt = gptq_quantize(W, "fp16", H)
    assert same_tensors(qt, quantize(W, "fp16"))
    for name in ("w4g128z", "fp4g128"):
        qt = gptq_quantize(W, name, H)
        assert qt.nbytes() == parse_format(name).storage_bits(16, 160) // 8
        assert proxy(W, dequantize(qt), H) < proxy(W, fake_quantize(W, name), H)


@pytest.mark.parametrize("scheme", ["w3g64z+h8r0.05", "w2g32+h16r0.1", "w4g128", "w4g128a8"])
def test_split_schemes_match_quantize_weight_layout(case, scheme):
    W, H, _, _ = case
    s = parse_scheme(scheme)
    rtn = quantize_weight(W, s)
    qw = gptq_quantize_weight(W, s, H)
    assert qw.tensors().keys() == rtn.tensors().keys()
    for key, t in rtn.tensors().items():
        assert qw.tensors()[key].shape == t.shape and qw.tensors()[key].dtype == t.dtype, key
    assert qw.nbytes() == rtn.nbytes() == s.storage_bits(OUT, IN) // 8
    if rtn.high_idx is not None:
        assert torch.equal(qw.high_idx, rtn.high_idx)
    w_hat = gptq_fake_quantize_weight(W, s, H)
    assert torch.equal(w_hat, dequantize_weight(qw).to(W.dtype))
    assert proxy(W, w_hat, H) < proxy(W, dequantize_weight(rtn), H)


def test_split_with_given_channels(case):
    W, H, _, _ = case
    idx = torch.tensor([3, 7, 100, 255, 17, 42, 9, 64, 128, 1, 2, 11, 12])  # unsorted: sorted like quantize_weight
    qw = gptq_quantize_weight(W, "w3g64z+h8r0.05", H, high_idx=idx)
    assert qw.high_idx.tolist() == sorted(idx.tolist())
    low = qw.low_idx()
    ref_low = GPTQ(W[:, low], H[low][:, low]).quantize("w3g64z")  # the documented simplification
    assert same_tensors(qw.low, ref_low)
