"""A8 kernels (per-token int8 / fp8 e4m3 activations) against the torch reference.

Reference: ``quantize_activation(x, act) @ dequantize(W)^T`` in float64. Bound float32
<= 1e-5 · ||ref||_inf (observed ~5e-7: the integer / exact-fp8 dots are exact, only the
final scaling rounds). On the interpreter af8 runs its exact fp16-upcast ("wide") dot;
the native fp8 tensor-core dot needs CUDA sm_89+ and is tested only there.
"""

import pytest
import torch

from bitalloc.kernels.formats import Format
from bitalloc.kernels.quant import quantize, quantize_activation
from bitalloc.kernels.triton_a8 import MODE_FP8, MODE_INT8, MODE_WIDE, a8_matmul, a8_matmul_quantized, dot_mode, quantize_tokens
from bitalloc.kernels.triton_common import Segment

BOUND = 1e-5
K, N = 576, 72

CASES = [  # (act, bits, group, sym): w8a8 per-channel, grouped, asymmetric, wide-dot fallbacks
    ("a8", 8, None, True), ("a8", 4, 128, True), ("a8", 3, 32, False), ("a8", 8, 64, False),
    ("af8", 8, None, True), ("af8", 4, 128, True), ("af8", 5, 64, False),
]


def _ref(x, act, *parts):
    from bitalloc.kernels.quant import dequantize

    xq = quantize_activation(x, act).double()
    out, k0 = 0, 0
    for qt in parts:
        out = out + xq[:, k0 : k0 + qt.shape[1]] @ dequantize(qt).double().T
        k0 += qt.shape[1]
    return out


@pytest.mark.parametrize("act,bits,group,sym", CASES)
@pytest.mark.parametrize("M", [1, 40])  # 40: several M tiles of the fixed BLOCK_M = 16, the last one partial
def test_a8_matches_reference(act, bits, group, sym, M, kref):
    qt = kref.packed(Format("int", bits, group, sym), N, K, seed=bits)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)) * 3
    y = a8_matmul(x, Segment.from_quantized(qt), act=act)
    assert y.shape == (M, N) and y.dtype == x.dtype
    assert kref.rel_err(y, _ref(x, act, qt)) <= BOUND


def test_a8_high_segment_and_zero_token(kref):
    """w4g64z low + w8 (per-group) high, shared token codes; an all-zero token stays zero."""
    w = torch.randn(N, K)
    lo, hi = quantize(w[:, :540], Format("int", 4, 64, False)), quantize(w[:, 540:], Format("int", 8, 64, True))
    x = torch.randn(17, K)
    x[3] = 0
    y = a8_matmul(x, Segment.from_quantized(lo), Segment.from_quantized(hi), act="a8")
    assert kref.rel_err(y, _ref(x, "a8", lo, hi)) <= BOUND
    assert not y[3].any()


@pytest.mark.parametrize("act", ["a8", "af8"])
def test_quantize_tokens_is_quantize_activation(act):
    x = torch.randn(5, 300) * torch.logspace(-3, 3, 5)[:, None]
    x[2] = 0
    q, s = quantize_tokens(x, act)
    assert q.dtype == (torch.int8 if act == "a8" else torch.float16) and s.shape == (5,)
    assert torch.equal(q.float() * s[:, None], quantize_activation(x, act))


def test_dot_modes():
    def seg(bits, sym):
        return Segment.from_quantized(quantize(torch.randn(4, 64), Format("int", bits, 32, sym)))

    assert dot_mode(seg(8, True), "a8", False) == MODE_INT8  # q in [-128, 127]
    assert dot_mode(seg(6, False), "a8", False) == MODE_INT8  # q in [-63, 63]
    assert dot_mode(seg(8, False), "a8", False) == MODE_WIDE  # q up to +-255
    assert dot_mode(seg(5, True), "af8", True) == MODE_FP8  # |q| <= 16: exact e4m3
    assert dot_mode(seg(4, False), "af8", True) == MODE_FP8
    assert dot_mode(seg(6, True), "af8", True) == MODE_WIDE
    assert dot_mode(seg(4, True), "af8", False) == MODE_WIDE  # no fp8 tensor cores


def test_a8_rejects_bad_input(kref):
    seg = Segment.from_quantized(kref.packed(Format("int", 8, None, True), N, K))
    q, s = quantize_tokens(torch.randn(4, K), "a8")
    with pytest.raises(ValueError, match="act"):
        a8_matmul(torch.randn(4, K), seg, act="a4")
    with pytest.raises(ValueError, match="token codes"):
        a8_matmul_quantized(q.float(), s, seg, act="a8")
    with pytest.raises(ValueError, match="token codes"):
        a8_matmul_quantized(q, s, seg, act="af8")
    with pytest.raises(ValueError, match="token codes has 575 input features"):
        a8_matmul_quantized(q[:, :-1].contiguous(), s, seg, act="a8")
    with pytest.raises(ValueError, match="token codes must be contiguous"):
        a8_matmul_quantized(q.t().contiguous().t(), s, seg, act="a8")
    with pytest.raises(ValueError, match="token scales"):
        a8_matmul_quantized(q, s.half(), seg, act="a8")
    with pytest.raises(ValueError, match="token scales"):
        a8_matmul_quantized(q, s[:3], seg, act="a8")
    fp8w = Segment.from_quantized(kref.packed(Format("fp8_e4m3", 8, 64, True), N, K))
    with pytest.raises(ValueError, match="integer weights"):
        a8_matmul(torch.randn(4, K), fp8w, act="a8")
    with pytest.raises(ValueError, match="sm_89"):
        a8_matmul_quantized(q.float().to(torch.float8_e4m3fn), s, seg, act="af8")


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="native fp8 e4m3 tl.dot needs a CUDA GPU with sm_89+ (Ada/Hopper); the interpreter cannot run it",
)
def test_af8_native_fp8_dot(kref):
    qt = kref.packed(Format("int", 4, 128, True), 512, 512).to("cuda")
    x = torch.randn(64, 512, device="cuda", dtype=torch.float16)
    y = a8_matmul(x, Segment.from_quantized(qt), act="af8")
    ref = _ref(x.float(), "af8", qt)
    assert kref.rel_err(y, ref) <= 2e-3
