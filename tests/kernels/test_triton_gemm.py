"""Dequant-GEMM (tl.dot, 9 <= M <= 128) against the torch reference, on the interpreter.

Bounds (max |y - ref| / ||ref||_inf, ref float64 from the same inputs): float32 <= 1e-5
(observed ~5e-7), float16 <= 2e-3, bfloat16 <= 1e-2.
"""

import pytest
import torch

from bitalloc.kernels.formats import Format
from bitalloc.kernels.quant import quantize
from bitalloc.kernels.triton_common import Segment
from bitalloc.kernels.triton_gemm import gemm

BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
K, N = 576, 72  # partial last group for g128 / g256; N not a tile multiple
CASES = [  # every bit width, sym and asym, every group size and per-channel (rotated)
    (2, 64, False), (2, 32, True), (3, 128, False), (3, 64, True), (4, 128, True), (4, None, False),
    (5, 256, False), (5, 32, True), (6, 64, False), (6, None, True), (8, 128, False), (8, None, True),
]


@pytest.mark.parametrize("bits,group,sym,M", [c + (16 if i % 2 else 32,) for i, c in enumerate(CASES)])
def test_gemm_int_formats(bits, group, sym, M, kref):
    """Every case once, at M = 16 or 32 alternately (interpreter time)."""
    qt = kref.packed(Format("int", bits, group, sym), N, K, seed=bits)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    y = gemm(x, Segment.from_quantized(qt))
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert kref.rel_err(y, kref.ref_matmul(x, qt)) <= BOUND[torch.float32]


@pytest.mark.parametrize("M", [9, 128])
def test_gemm_batch_edges(M, kref):
    """M not a tile multiple (9) and the largest M the kernel takes (128, several M tiles)."""
    qt = kref.packed(Format("int", 4, 64, False), 40, 192)
    x = torch.randn(M, 192)
    assert kref.rel_err(gemm(x, Segment.from_quantized(qt)), kref.ref_matmul(x, qt)) <= BOUND[torch.float32]


def test_gemm_other_config(kref):
    """BLOCK_K = 32 with groups of 128 / partial 64; BLOCK_M 32; GROUP_M ordering over 2 M tiles."""
    qt = kref.packed(Format("int", 3, 128, True), N, K)
    x = torch.randn(48, K)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
    assert kref.rel_err(gemm(x, Segment.from_quantized(qt), config=cfg), kref.ref_matmul(x, qt)) <= BOUND[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemm_half_dtypes(dtype, kref):
    qt = kref.packed(Format("int", 4, 128, True), N, K)
    x = torch.randn(16, K).to(dtype)
    y = gemm(x, Segment.from_quantized(qt))
    assert y.dtype == dtype
    assert kref.rel_err(y, kref.ref_matmul(x, qt)) <= BOUND[dtype]


def test_gemm_float_codes_and_high_segment(kref):
    """fp4 low part + int8 asymmetric high part, one accumulator."""
    w = torch.randn(N, K)
    lo, hi = quantize(w[:, :540], Format("fp4_e2m1", 4, 32, True)), quantize(w[:, 540:], Format("int", 8, 32, False))
    x = torch.randn(16, K)
    y = gemm(x, Segment.from_quantized(lo), Segment.from_quantized(hi))
    assert kref.rel_err(y, kref.ref_matmul(x, lo, hi)) <= BOUND[torch.float32]


def test_gemm_rejects_bad_input(kref):
    seg = Segment.from_quantized(kref.packed(Format("int", 4, 128, True), N, K))
    with pytest.raises(ValueError, match="M <= 128"):
        gemm(torch.randn(129, K), seg)
    with pytest.raises(ValueError, match="M <= 128"):
        gemm(torch.randn(0, K), seg)
    with pytest.raises(ValueError, match="input features"):
        gemm(torch.randn(16, K - 1), seg)
    with pytest.raises(ValueError, match=">= 16"):
        gemm(torch.randn(16, K), seg, config={"BLOCK_M": 16, "BLOCK_N": 8, "BLOCK_K": 32, "GROUP_M": 1})
    with pytest.raises(ValueError, match="Segment"):
        gemm(torch.randn(16, K), "w4g128")
