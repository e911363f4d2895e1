"""Reference quantization: exact bytes, packed == fake path, per-format semantics, splits, activations."""

import pytest
import torch

from bitalloc.kernels.formats import FP16, GROUP_SIZES, INT_BITS, Format, parse_format, parse_scheme
from bitalloc.kernels.packing import unpack_codes
from bitalloc.kernels.quant import (
    FP4_E2M1_VALUES,
    QuantizedTensor,
    dequantize,
    dequantize_weight,
    fake_quantize,
    fake_quantize_weight,
    quantize,
    quantize_activation,
    quantize_weight,
    select_high_channels,
)

SHAPES = [(1, 1), (3, 7), (5, 33), (17, 576), (4, 577), (2, 1000)]


def _formats():
    fs = [FP16]
    for g in (None, *GROUP_SIZES):
        fs += [Format("int", b, g, sym) for b in INT_BITS for sym in (True, False)]
        fs += [Format("fp8_e4m3", 8, g), Format("fp4_e2m1", 4, g)]
    return fs


def _w(out_f, in_f, seed=0, dtype=torch.float32):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- exact bytes and the packed route == the fake route --------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_nbytes_equals_storage_bits_and_fake_is_bit_identical(shape):
    w = _w(*shape, seed=shape[1])
    w[0, 0] = 0  # a zero somewhere
    for fmt in _formats():
        qt = quantize(w, fmt)
        assert qt.nbytes() == fmt.storage_bits(*shape) // 8, (fmt.name, shape)
        d = dequantize(qt)
        assert d.dtype == torch.float32 and d.shape == shape
        assert torch.equal(d, fake_quantize(w, fmt)), (fmt.name, shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_fake_quantize_keeps_dtype(dtype):
    w = _w(8, 200, dtype=dtype)
    for name in ("w4g128", "w3g64z", "fp8g32", "fp4g32", "fp16", "w8"):
        fmt = parse_format(name)
        fq = fake_quantize(w, fmt)
        assert fq.dtype == dtype
        assert torch.equal(fq, dequantize(quantize(w, fmt)).to(dtype)), name


def test_stored_dtypes_and_shapes():
    w = _w(6, 300)
    qt = quantize(w, parse_format("w3g128z"))
    assert qt.qweight.dtype == torch.int32 and qt.qweight.shape == (6, 19 + 10)  # 2-bit plane 19 words, 1-bit 10
    assert qt.scales.dtype == torch.float16 and qt.scales.shape == (6, 3)
    assert qt.qzeros.dtype == torch.int32 and qt.qzeros.shape == (6, 2)
    fp = quantize(w, FP16)
    assert fp.qweight.dtype == torch.float16 and fp.scales.shape == (6, 0) and fp.qzeros is None
    assert torch.equal(dequantize(fp), w.half().float())
    with pytest.raises(AssertionError, match="scales must be"):
        QuantizedTensor(qt.fmt, qt.shape, qt.qweight, qt.scales.float(), qt.qzeros)


# -- per-format semantics ---------------------------------------------------------------


@pytest.mark.parametrize("bits", INT_BITS)
def test_int_symmetric_codes_and_scales(bits):
    w = _w(4, 256, seed=bits)
    fmt = Format("int", bits, 64, True)
    qt = quantize(w, fmt, clip_search=False)
    qmax = 2 ** (bits - 1) - 1
    absmax = w.view(4, 4, 64).abs().amax(-1)
    assert torch.equal(qt.scales, (absmax / qmax).half())  # fp16 first, then quantize with it
    codes = unpack_codes(qt.qweight, bits, 256).to(torch.int64)
    q = codes - 2 ** (bits - 1)
    assert q.min() >= -qmax and q.max() <= qmax
    assert (q.abs().view(4, 4, 64).amax(-1) == qmax).all()  # absmax hits the top code
    scale = qt.scales.float().repeat_interleave(64, dim=1)
    assert torch.equal(dequantize(qt), q.float() * scale)
    assert ((dequantize(qt) - w).abs() <= 0.5 * scale * (1 + 1e-3)).all()


@pytest.mark.parametrize("bits", INT_BITS)
def test_int_asymmetric_codes_zeros(bits):
    w = _w(4, 256, seed=bits) + 0.7  # shifted: min and max of different size
    w[0, :64] = w[0, :64].abs() + 0.1  # one all-positive group: min clamps to 0, zero = 0
    fmt = Format("int", bits, 64, False)
    qt = quantize(w, fmt, clip_search=False)
    qmax = 2**bits - 1
    g = w.view(4, 4, 64)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    assert torch.equal(qt.scales, ((hi - lo) / qmax).half())
    zeros = unpack_codes(qt.qzeros, bits, 4).to(torch.int64)
    assert zeros[0, 0] == 0 and zeros.max() <= qmax
    codes = unpack_codes(qt.qweight, bits, 256).to(torch.int64)
    scale = qt.scales.float().repeat_interleave(64, dim=1)
    w_hat = (codes - zeros.repeat_interleave(64, dim=1)).float() * scale
    assert torch.equal(dequantize(qt), w_hat)
    assert ((w_hat - w).abs() <= scale * (1 + 1e-3)).all()


def test_fp8_codes_are_e4m3_patterns():
    w = _w(3, 128)
    qt = quantize(w, parse_format("fp8g128"))
    scale = (w.abs().amax(1, keepdim=True) / 448).half().float()
    expect = (w / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(unpack_codes(qt.qweight, 8, 128), expect)
    assert torch.equal(dequantize(qt), expect.view(torch.float8_e4m3fn).float() * scale)
    assert not torch.isnan(dequantize(qt)).any()


def test_fp4_grid_sign_and_ties_to_even():
    # scale = 6/6 = 1: values land on / between grid points exactly
    row = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.6, -6.0, 0.0, 2.9]
    w = torch.tensor([row])
    qt = quantize(w, parse_format("fp4"), clip_search=False)
    assert qt.scales.item() == 1.0
    codes = unpack_codes(qt.qweight, 4, len(row))[0].tolist()
    assert codes == [7, 0, 2, 2, 4, 4, 6, 6, 8 | 1, 8 | 7, 0, 5]
    assert dequantize(qt)[0].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.5, -6.0, 0.0, 3.0]
    grid = set(FP4_E2M1_VALUES) | {-v for v in FP4_E2M1_VALUES}
    w = _w(5, 64)
    d = dequantize(quantize(w, parse_format("fp4g32")))
    scales = quantize(w, parse_format("fp4g32")).scales.float().repeat_interleave(32, dim=1)
    assert set((d / scales).flatten().tolist()) <= grid


def test_fp4_matches_brute_force_nearest():
    # values on a fine grid incl. every midpoint; scale 1 via a 6.0 in each row
    x = torch.cat([torch.arange(0, 6.001, 0.0625), -torch.arange(0, 6.001, 0.0625)]).view(2, -1)
    x[:, 0] = 6.0
    codes = unpack_codes(quantize(x, parse_format("fp4"), clip_search=False).qweight, 4, x.shape[1]).to(torch.int64)
    grid = torch.tensor(FP4_E2M1_VALUES)
    dist = (x.abs()[..., None] - grid).abs()  # (2, n, 8)
    best = dist.min(-1, keepdim=True).values
    cand = torch.where(dist == best, torch.arange(8), 99)  # on a tie: both candidates
    even_first = torch.where(cand % 2 == 0, cand, cand + 100).min(-1).values % 100
    assert torch.equal(codes & 7, even_first)
    assert torch.equal(codes >> 3, (x < 0).to(torch.int64))


@pytest.mark.parametrize("name", ["w2g64z", "w3g128", "w3g64z", "w4g128z", "w4", "fp4g32"])
def test_clip_search_never_worse_than_minmax_per_group(name):
    from bitalloc.kernels.quant import CLIP_GRID, _group_params, _group_range, _minmax_params, _to_groups

    w = _w(8, 320, seed=3)
    w[0, 5] = 9.0  # an outlier: clipping it pays
    fmt = parse_format(name)
    g = fmt.group_size or 320
    err = lambda d: torch.nn.functional.pad((d - w).pow(2), (0, (-320) % g)).view(8, -1, g).sum(-1)  # (8, G)
    e_clip = err(dequantize(quantize(w, fmt)))
    e_mm = err(dequantize(quantize(w, fmt, clip_search=False)))
    assert (e_clip <= e_mm).all(), "clip search picked a range worse than min-max"
    assert e_clip.sum() < 0.95 * e_mm.sum(), (name, float(e_clip.sum() / e_mm.sum()))
    # every chosen scale is one of the grid's candidates
    wg = _to_groups(w, fmt)
    scale, _ = _group_params(wg, fmt)
    cands = torch.stack([_minmax_params(_group_range(wg, fmt), fmt, a)[0] for a in CLIP_GRID])  # (A, out, G, 1)
    assert (cands == scale).any(0).all()


def test_clip_search_off_for_8_bit_and_fp8():
    w = _w(4, 128, seed=1)
    for name in ("w8", "fp8g128"):
        assert torch.equal(quantize(w, name).scales, quantize(w, name, clip_search=False).scales)


@pytest.mark.parametrize("name", ["w4g32", "w3g32z", "fp8g32", "fp4g32", "w8"])
def test_zero_and_tiny_groups_never_nan(name):
    w = _w(3, 96)
    w[0] = 0  # an all-zero row
    w[1, :32] = 1e-9  # below float16 range: scale clamps to 2**-24
    w[2, :32] = 1e4  # large but finite
    fmt = parse_format(name)
    d = dequantize(quantize(w, fmt))
    assert torch.isfinite(d).all()
    assert (d[0] == 0).all()
    assert torch.equal(d, fake_quantize(w, fmt))
    assert torch.allclose(d[2, :32], w[2, :32], rtol=0.15)


def test_bad_weights_rejected():
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.zeros(4), parse_format("w4"))
    with pytest.raises(ValueError, match="floating point"):
        quantize(torch.zeros(2, 4, dtype=torch.int32), parse_format("w4"))
    w = torch.zeros(2, 4)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        fake_quantize(w, parse_format("w4"))


# -- split schemes ----------------------------------------------------------------------


SPLITS = ["w4g128+h8r0.05", "w3g64z+h8r0.1", "w2g32z+h4r0.02", "w4g128+h16r0.05", "w3g64z+h16r0.25",
          "w2g64z+h3csr0.05", "w3g64z+h4g128r0.1", "w4g128+h8zr0.05"]  # high parts with their own format


@pytest.mark.parametrize("name", SPLITS + ["w4g128", "fp16", "w8a8"])
@pytest.mark.parametrize("shape", [(8, 576), (3, 577), (2, 7)])
def test_quantize_weight_bytes_and_fake_path(name, shape):
    s = parse_scheme(name)
    w = _w(*shape, seed=shape[1])
    qw = quantize_weight(w, s)
    assert qw.nbytes() == s.storage_bits(*shape) // 8, (name, shape)
    k = s.n_high(shape[1])
    assert qw.n_high == k
    if k:
        assert qw.high_idx.dtype == torch.int16 and qw.high_idx.shape == (k,)
        assert (qw.high_idx[1:] > qw.high_idx[:-1]).all()
        assert set(qw.tensors()) >= {"qweight", "scales", "high_qweight", "high_scales", "high_idx"}
    d = dequantize_weight(qw)
    assert d.dtype == torch.float32 and d.shape == shape
    idx = None if qw.high_idx is None else qw.high_idx.long()
    assert torch.equal(d, fake_quantize_weight(w, s, idx))
    assert torch.equal(d, fake_quantize_weight(w, s))  # same default channel choice


def test_split_default_picks_energetic_columns_and_keeps_them_precise():
    w = _w(16, 256) * 0.1
    hot = [3, 77, 200]
    w[:, hot] *= 50  # outlier channels
    s = parse_scheme("w3g64+h16r0.01")  # k = round(2.56) = 3 channels kept in fp16
    qw = quantize_weight(w, s)
    assert qw.high_idx.tolist() == hot
    d = dequantize_weight(qw)
    assert torch.equal(d[:, hot], w[:, hot].half().float())
    low_cols = qw.low_idx()
    assert torch.equal(d[:, low_cols], fake_quantize(w[:, low_cols], parse_format("w3g64")))
    # removing the outliers from the 3-bit part lowers its error a lot
    plain = fake_quantize(w, parse_format("w3g64"))
    assert (d - w).pow(2).sum() < 0.1 * (plain - w).pow(2).sum()


def test_split_given_indices():
    w = _w(4, 100)
    s = parse_scheme("w4g32+h8r0.05")  # k = 5
    qw = quantize_weight(w, s, high_idx=torch.tensor([90, 1, 50, 7, 3]))
    assert qw.high_idx.tolist() == [1, 3, 7, 50, 90]  # sorted
    assert torch.equal(dequantize_weight(qw)[:, [1, 3, 7, 50, 90]], fake_quantize(w[:, [1, 3, 7, 50, 90]], s.high))
    with pytest.raises(ValueError, match="keeps 5 high channels"):
        quantize_weight(w, s, high_idx=[1, 2])
    with pytest.raises(ValueError, match="duplicate"):
        quantize_weight(w, s, high_idx=[1, 1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"in \[0, 100\)"):
        fake_quantize_weight(w, s, high_idx=[1, 2, 3, 4, 100])
    with pytest.raises(ValueError, match="no high-impact split"):
        quantize_weight(w, parse_scheme("w4"), high_idx=[1])


def test_split_edge_cases():
    # every channel in the high part: empty low part, still exact bytes
    s = parse_scheme("w4g32z+h8r0.5")
    w = _w(3, 1)
    qw = quantize_weight(w, s)
    assert qw.n_high == 1 and qw.low.shape == (3, 0)
    assert qw.nbytes() == s.storage_bits(3, 1) // 8
    assert torch.equal(dequantize_weight(qw), fake_quantize_weight(w, s))
    # int32 indices beyond 32768 input channels
    s = parse_scheme("w4g256+h8r0.001")
    w = _w(1, 32769)
    qw = quantize_weight(w, s)
    assert qw.high_idx.dtype == torch.int32 and qw.n_high == 33
    assert qw.nbytes() == s.storage_bits(1, 32769) // 8


def test_select_high_channels():
    sal = torch.tensor([1.0, 5.0, 5.0, 0.0, 9.0, 5.0])
    assert select_high_channels(sal, 3).tolist() == [1, 2, 4]  # ties go to the lower index
    assert select_high_channels(sal, 0).tolist() == []
    assert select_high_channels(sal, 6).tolist() == list(range(6))
    with pytest.raises(ValueError, match="k must be in"):
        select_high_channels(sal, 7)
    with pytest.raises(ValueError, match="1-D"):
        select_high_channels(sal[None], 1)


# -- activations ------------------------------------------------------------------------


def test_activation_a16_is_identity():
    x = torch.randn(2, 3, 8)
    assert quantize_activation(x, "a16") is x


def test_activation_a8_per_token():
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    x[0, 1] = 0  # an all-zero token stays zero
    x[1, 2] *= 1000  # a loud token does not change the others' scale
    xq = quantize_activation(x, "a8")
    assert xq.shape == x.shape and xq.dtype == x.dtype
    assert (xq[0, 1] == 0).all()
    scale = x.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = xq / scale
    assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 127.001
    assert ((xq - x).abs() <= 0.5 * scale * 1.001).all()
    assert torch.equal(quantize_activation(x[1, :2], "a8"), xq[1, :2])  # per token
    xb = x.to(torch.bfloat16)
    assert quantize_activation(xb, "a8").dtype == torch.bfloat16


def test_activation_af8_per_token():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    xq = quantize_activation(x, "af8")
    scale = x.abs().amax(-1, keepdim=True) / 448
    expect = (x / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(xq, expect)
    assert torch.equal(quantize_activation(torch.zeros(2, 8), "af8"), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="activation must be one of"):
        quantize_activation(x, "a4")


def test_names_accepted_and_results_never_alias_the_weight():
    w = _w(4, 64).half()
    assert torch.equal(fake_quantize(w, "w4g32"), fake_quantize(w, parse_format("w4g32")))
    assert torch.equal(fake_quantize_weight(w, "w4g32+h8r0.05"), fake_quantize_weight(w, parse_scheme("w4g32+h8r0.05")))
    assert quantize_weight(w, "fp16").nbytes() == 4 * 64 * 2
    fq, qt = fake_quantize(w, "fp16"), quantize(w, "fp16")
    assert torch.equal(fq, w) and fq.data_ptr() != w.data_ptr() and qt.qweight.data_ptr() != w.data_ptr()
