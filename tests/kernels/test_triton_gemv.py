"""Dequant-GEMV (M <= 8) and dense dequantization against the torch reference.

Runs on the Triton interpreter without a GPU (conftest sets TRITON_INTERPRET), one fixed
config. Error bounds, max |y - ref| relative to ||ref||_inf, ref in float64 from the
same (dtype-rounded) inputs and kernels.quant.dequantize:
float32 <= 1e-5 (observed ~5e-7), float16 <= 2e-3, bfloat16 <= 1e-2 (output rounding).
"""

import pytest
import torch

from bitalloc.kernels.formats import Format
from bitalloc.kernels.quant import dequantize, quantize
from bitalloc.kernels.triton_common import Segment
from bitalloc.kernels.triton_dequant import dequantize_dense
from bitalloc.kernels.triton_gemv import gemv

BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
K, N = 576, 72  # 576 = 4*128 + 64 = 2*256 + 64: partial last group for g128 / g256; N not a tile multiple

# every bit width, symmetric and asymmetric, every group size and per-channel (rotated)
CASES = [
    (2, 64, False), (2, 32, True), (3, 128, False), (3, 64, True), (4, 128, True), (4, None, False),
    (5, 256, False), (5, 32, True), (6, 64, False), (6, None, True), (8, 128, False), (8, None, True),
]


@pytest.mark.parametrize("bits,group,sym", CASES)
@pytest.mark.parametrize("M", [1, 3, 8])
def test_gemv_int_formats(bits, group, sym, M, kref):
    qt = kref.packed(Format("int", bits, group, sym), N, K, seed=bits)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    y = gemv(x, Segment.from_quantized(qt))
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert kref.rel_err(y, kref.ref_matmul(x, qt)) <= BOUND[torch.float32]


@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_split_k_configs(split_k, kref):
    """Other split counts than the fixed config's 2 (3 does not divide the K tiles evenly)."""
    qt = kref.packed(Format("int", 4, 32, False), N, K)
    x = torch.randn(2, K)
    y = gemv(x, Segment.from_quantized(qt), config={"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": split_k})
    assert kref.rel_err(y, kref.ref_matmul(x, qt)) <= BOUND[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_half_dtypes(dtype, kref):
    qt = kref.packed(Format("int", 4, 128, True), N, K)
    x = torch.randn(3, K).to(dtype)
    y = gemv(x, Segment.from_quantized(qt))
    assert y.dtype == dtype
    assert kref.rel_err(y, kref.ref_matmul(x, qt)) <= BOUND[dtype]


@pytest.mark.parametrize("fmt", [Format("fp8_e4m3", 8, 64, True), Format("fp4_e2m1", 4, 32, True)], ids=str)
def test_gemv_float_codes(fmt, kref):
    qt = kref.packed(fmt, N, K)
    x = torch.randn(4, K)
    assert kref.rel_err(gemv(x, Segment.from_quantized(qt)), kref.ref_matmul(x, qt)) <= BOUND[torch.float32]


@pytest.mark.parametrize(
    "low,high",
    [(Format("int", 3, 64, False), Format("int", 8, 64, False)), (Format("int", 2, 128, True), Format("fp16", 16, None))],
    ids=["w3g64z+h8", "w2g128+h16"],
)
def test_gemv_high_segment(low, high, kref):
    """Two K segments, one accumulator: x = [x_low | x_high]."""
    w = torch.randn(N, K)
    lo, hi = quantize(w[:, :548], low), quantize(w[:, 548:], high)  # 28 high channels
    x = torch.randn(5, K)
    y = gemv(x, Segment.from_quantized(lo), Segment.from_quantized(hi))
    assert kref.rel_err(y, kref.ref_matmul(x, lo, hi)) <= BOUND[torch.float32]


def test_dense_dequant_is_bit_exact(kref):
    """The in-register dequantizer equals kernels.quant.dequantize bit for bit, every format."""
    fmts = [Format("int", b, g, s) for b, g, s in CASES] + [
        Format("fp8_e4m3", 8, 128, True), Format("fp4_e2m1", 4, None, True), Format("fp16", 16, None)]
    for i, fmt in enumerate(fmts):
        qt = kref.packed(fmt, 40, 200, seed=i)  # 200: partial groups for 64/128/256
        assert torch.equal(dequantize_dense(Segment.from_quantized(qt)), dequantize(qt)), fmt.name


def test_dense_dequant_into_column_view_and_half(kref):
    qt = kref.packed(Format("int", 5, 64, False), 40, 200)
    out = torch.zeros(40, 260, dtype=torch.float16)
    dequantize_dense(Segment.from_quantized(qt), out=out[:, 60:])
    assert torch.equal(out[:, 60:], dequantize(qt).half()) and not out[:, :60].any()


# -- bad input: clear ValueError, never a silent wrong result ---------------------------
def test_gemv_rejects_bad_input(kref):
    qt = kref.packed(Format("int", 4, 128, False), N, K)
    seg = Segment.from_quantized(qt)
    with pytest.raises(ValueError, match="M <= 8"):
        gemv(torch.randn(9, K), seg)
    with pytest.raises(ValueError, match="input features"):
        gemv(torch.randn(2, K + 1), seg)
    with pytest.raises(ValueError, match="dtype"):
        gemv(torch.randn(2, K).to(torch.float64), seg)
    with pytest.raises(ValueError, match="dtype"):
        gemv(torch.ones(2, K, dtype=torch.int32), seg)
    with pytest.raises(ValueError, match="contiguous"):
        gemv(torch.randn(K, 2).t(), seg)
    with pytest.raises(ValueError, match="2-D"):
        gemv(torch.randn(K), seg)
    other = Segment.from_quantized(kref.packed(Format("int", 4, 128, False), N + 1, 64))
    with pytest.raises(ValueError, match="out_features"):
        gemv(torch.randn(2, K + 64), seg, other)
    with pytest.raises(ValueError, match="BLOCK_K"):
        gemv(torch.randn(2, K), seg, config={"BLOCK_N": 32, "BLOCK_K": 8, "SPLIT_K": 1})


def test_segment_rejects_mismatched_packing(kref):
    qt = kref.packed(Format("int", 3, 64, False), N, K)
    fmt = qt.fmt
    with pytest.raises(ValueError, match="qweight"):  # 3-bit words claimed as 4-bit
        Segment(Format("int", 4, 64, False), K, qt.qweight, qt.scales, qt.qzeros)
    with pytest.raises(ValueError, match="qweight"):  # wrong K for the packed words
        Segment(fmt, K + 64, qt.qweight, qt.scales, qt.qzeros)
    with pytest.raises(ValueError, match="scales"):
        Segment(fmt, K, qt.qweight, qt.scales.float(), qt.qzeros)
    with pytest.raises(ValueError, match="scales"):  # group size 128 scales count differs
        Segment(Format("int", 3, 128, False), K, qt.qweight, qt.scales, qt.qzeros)
    with pytest.raises(ValueError, match="qzeros is missing"):
        Segment(fmt, K, qt.qweight, qt.scales, None)
    with pytest.raises(ValueError, match="must be None"):
        Segment(Format("int", 3, 64, True), K, qt.qweight, qt.scales, qt.qzeros)
    with pytest.raises(ValueError, match="contiguous"):
        Segment(fmt, K, qt.qweight.t().contiguous().t(), qt.scales, qt.qzeros)
    with pytest.raises(ValueError):
        Segment(fmt, -1, qt.qweight, qt.scales, qt.qzeros)
