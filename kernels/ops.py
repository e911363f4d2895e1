"""``bitalloc::quant_matmul``: the quantized-linear custom op and its kernel dispatch.

``y = quantize_activation(x, act) @ W_hat^T + bias`` for a packed weight (the tensors of a
:class:`~kernels.quant.QuantizedWeight`: low part, optional high-impact part and its
channel indices). Registered with ``torch.library.custom_op`` plus a fake (meta)
implementation, so ``torch.compile`` traces models that call it without running kernels.

Dispatch (``backend="auto"``):

* CUDA tensors -> Triton, by batch rows M (after flattening leading dims):
  ``act`` a8/af8 with integer weights of <= 8 bits -> ``triton_a8`` (int8 / fp8 tensor-core
  dots, any M); otherwise (activations fake-quantized in torch first for a8/af8 on float
  weights) M <= 8 -> ``triton_gemv`` (split-K dequant-GEMV), M <= 128 -> ``triton_gemm``
  (``tl.dot`` dequant-GEMM), M > 128 -> ``triton_dequant`` to a dense x.dtype matrix, then
  ``torch.matmul``. A ``fp16`` ("keep 16-bit") layer without a split is a plain matmul.
* CPU tensors -> the torch reference (exactly ``QuantLinear._forward_reference``), unless
  ``backend="triton"`` or ``BITALLOC_FORCE_TRITON=1``: then the same Triton kernels run on
  the interpreter (``TRITON_INTERPRET=1``, which must be set before the kernel modules are
  imported; the tests' conftest does it).

High-impact split: activations are small, so x is gathered in torch into
``[x[:, low_idx] | x[:, high_idx]]`` (the column order of the packed low and high parts)
and every kernel walks the two packed segments as two K ranges into one accumulator. The
gather permutation is built without a host sync (stable argsort of a 0/1 channel mask).

Bad input (wrong dtypes, shapes that do not match the packed sizes, unknown formats or
activations, mismatched devices) raises ``ValueError`` in both the real and the fake
implementation, before any kernel runs.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .formats import ACTIVATIONS, Format, FormatError
from .quant import QuantizedTensor, QuantizedWeight, dequantize, expected_shapes, quantize_activation

__all__ = [
    "HighPart",
    "quant_matmul",
    "quant_linear",
    "reference_matmul",
    "select_kernel",
    "GEMV_MAX_M",
    "GEMM_MAX_M",
]

GEMV_MAX_M = 8  # M <= 8: dequant-GEMV
GEMM_MAX_M = 128  # 8 < M <= 128: dequant-GEMM; above: dense dequant + torch.matmul
BACKENDS = ("auto", "triton", "reference")
_KERNEL_MODULES = tuple(f"{__package__}.{m}" for m in ("triton_common", "triton_gemv", "triton_gemm", "triton_a8", "triton_dequant"))
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class HighPart(NamedTuple):
    """The high-impact part of a split weight: packed (N, k) tensors and the k channel indices."""

    qweight: Tensor
    scales: Tensor
    qzeros: Optional[Tensor]
    idx: Tensor  # (k,) integer input-channel indices, in the column order of qweight
    bits: int
    group_size: Optional[int]
    symmetric: bool = True
    kind: str = "int"


# ---------------------------------------------------------------------------------------
# validation (shared by the real and the fake implementation: shapes and dtypes only)


def _format(kind: str, bits: int, group_size: int, symmetric: bool, what: str) -> Format:
    """Op args -> Format; group_size 0 (or None) means per channel."""
    gs = None if not group_size else int(group_size)
    if kind == "fp16":
        bits, gs, symmetric = 16, None, True
    try:
        return Format(kind, int(bits), gs, bool(symmetric))
    except FormatError as e:
        raise ValueError(f"{what} format: {e}") from None


def _check_packed(name: str, fmt: Format, N: int, K: int, qweight, scales, qzeros) -> None:
    got = {"qweight": qweight, "scales": scales, "qzeros": qzeros}
    for part, (shape, dtype) in expected_shapes(fmt, N, K).items():
        t = got[part]
        if shape is None:
            if t is not None:
                raise ValueError(f"{name}: {fmt.name} has no {part}, but one was given")
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}: {fmt.name} needs {part} {dtype} {shape}")
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(
                f"{name}: {part} of a {fmt.name} ({N}, {K}) weight must be {dtype} {shape}, got "
                f"{t.dtype} {tuple(t.shape)} (packed sizes do not match in_features?)"
            )


def _validate(x, qweight, scales, qzeros, bias, high_qweight, high_scales, high_qzeros, high_idx,
              kind, bits, group_size, symmetric, high_kind, high_bits, high_group_size, high_symmetric,
              in_features, act, backend):
    """Raise ValueError unless the op's arguments are consistent; returns (low fmt, high fmt | None, k)."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D (M, in_features) tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"x dtype must be one of {ACT_DTYPES}, got {x.dtype}")
    if x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} input features, the layer has in_features={in_features}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(qweight, Tensor) or qweight.dim() != 2:
        raise ValueError("qweight must be a 2-D tensor (out_features, words)")
    fmt = _format(kind, bits, group_size, symmetric, "low")
    if act != "a16" and not fmt.is_quantized:
        raise ValueError(f"activation {act} needs a quantized weight format, got {fmt.name}")
    N = qweight.shape[0]
    has_high = high_idx is not None
    if has_high != (high_qweight is not None) or (high_scales is not None and not has_high):
        raise ValueError("a high-impact part needs high_qweight, high_scales and high_idx together")
    k, hfmt = 0, None
    if has_high:
        if high_idx.dim() != 1 or high_idx.dtype not in (torch.int16, torch.int32, torch.int64):
            raise ValueError(f"high_idx must be a 1-D int16/int32/int64 tensor, got {high_idx.dtype} {tuple(high_idx.shape)}")
        k = high_idx.shape[0]
        if not 0 < k <= in_features:
            raise ValueError(f"high_idx must hold 1..{in_features} channels, got {k}")
        hfmt = _format(high_kind, high_bits, high_group_size, high_symmetric, "high")
        _check_packed("high part", hfmt, N, k, high_qweight, high_scales, high_qzeros)
    _check_packed("low part", fmt, N, in_features - k, qweight, scales, qzeros)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N or not bias.dtype.is_floating_point):
        raise ValueError(f"bias must be a floating ({N},) tensor, got {bias.dtype} {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("qzeros", qzeros), ("bias", bias),
                    ("high_qweight", high_qweight), ("high_scales", high_scales),
                    ("high_qzeros", high_qzeros), ("high_idx", high_idx)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    return fmt, hfmt, k


# ---------------------------------------------------------------------------------------
# the two implementations


def reference_matmul(x: Tensor, low: QuantizedTensor, high: QuantizedTensor | None = None,
                     high_idx: Tensor | None = None, bias: Tensor | None = None, act: str = "a16") -> Tensor:
    """Torch reference: exactly ``QuantLinear._forward_reference`` (x (M, K) -> (M, N) in x.dtype)."""
    xq = quantize_activation(x, act)  # (M, K) per-token fake quant
    w = dequantize(low)  # (N, K - k) float32
    if high is not None:
        K = x.shape[1]
        idx = high_idx.to(device=w.device, dtype=torch.int64)
        keep = torch.ones(K, dtype=torch.bool, device=w.device)
        keep[idx] = False
        full = torch.empty(w.shape[0], K, dtype=torch.float32, device=w.device)  # (N, K)
        full[:, keep.nonzero().squeeze(1)] = w
        full[:, idx] = dequantize(high)
        w = full
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(xq, w.to(x.dtype), b)


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def _triton_modules(device: torch.device):
    """Import the kernel modules (lazily: importing kernels must not import triton)."""
    if device.type == "cpu" and not _interpret_env():
        loaded = [m for m in _KERNEL_MODULES if m in sys.modules]
        if loaded or torch.cuda.is_available():
            raise RuntimeError(
                "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before kernels.triton_* "
                f"are imported (already imported: {loaded or 'none'}; CUDA present: {torch.cuda.is_available()})"
            )
        os.environ["TRITON_INTERPRET"] = "1"  # nothing decorated yet and no GPU: safe to switch on
    elif device.type not in ("cpu", "cuda"):
        raise ValueError(f"Triton kernels run on CUDA (or CPU under the interpreter), got device {device}")
    from . import triton_a8, triton_common, triton_dequant, triton_gemm, triton_gemv

    return triton_common, triton_gemv, triton_gemm, triton_a8, triton_dequant


def _gather_perm(high_idx: Tensor, K: int) -> Tensor:
    """Column order [low channels ascending | high_idx] (int64, (K,)), without a host sync."""
    idx = high_idx.to(torch.int64)
    mask = torch.zeros(K, dtype=torch.int8, device=idx.device).index_fill_(0, idx, 1)
    low = torch.argsort(mask, stable=True)[: K - idx.shape[0]]  # zeros (low channels) first, ascending
    return torch.cat([low, idx])


def select_kernel(M: int, act: str, fmt: Format, hfmt: Format | None = None) -> str:
    """Which Triton path the op takes: 'a8', 'gemv', 'gemm', 'dense' or 'matmul' (plain fp16 layer)."""
    fmts = [f for f in (fmt, hfmt) if f is not None]
    if act != "a16" and all(f.kind == "int" and f.bits <= 8 for f in fmts):
        return "a8"
    if fmt.kind == "fp16" and hfmt is None:
        return "matmul"
    return "gemv" if M <= GEMV_MAX_M else "gemm" if M <= GEMM_MAX_M else "dense"


def _triton_matmul(x: Tensor, low: QuantizedTensor, high: QuantizedTensor | None, high_idx: Tensor | None,
                   bias: Tensor | None, act: str) -> Tensor:
    """Triton path: x (M, K) -> (M, N) in x.dtype."""
    common, gemv, gemm, a8, dequant = _triton_modules(x.device)
    M, K, N = x.shape[0], x.shape[1], low.shape[0]
    if M == 0:
        y = x.new_empty(0, N)
    else:
        path = select_kernel(M, act, low.fmt, None if high is None else high.fmt)
        lo = common.Segment.from_quantized(low)
        hi = None if high is None else common.Segment.from_quantized(high)
        if hi is not None and lo.K == 0:  # every channel is high: one segment
            lo, hi = hi, None
        xg = x[:, _gather_perm(high_idx, K)] if high is not None else x  # (M, K) = [x_low | x_high]
        xg = xg.contiguous()
        if path == "a8":
            y = a8.a8_matmul(xg, lo, hi, act=act)
        else:
            if act != "a16":  # float weight formats: same arithmetic as the reference, A16 kernels
                xg = quantize_activation(xg, act)
            if path == "matmul":
                y = F.linear(xg, low.qweight.to(x.dtype))
            elif path == "gemv":
                y = gemv.gemv(xg, lo, hi)
            elif path == "gemm":
                y = gemm.gemm(xg, lo, hi)
            else:  # dense: dequantize [W_low | W_high] (N, K) in x.dtype, then cuBLAS
                w = torch.empty(N, K, dtype=x.dtype, device=x.device)
                dequant.dequantize_dense(lo, out=w[:, : lo.K])
                if hi is not None:
                    dequant.dequantize_dense(hi, out=w[:, lo.K :])
                y = xg @ w.t()
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def _use_triton(device: torch.device, backend: str) -> bool:
    if backend != "auto":
        return backend == "triton"
    return device.type == "cuda" or os.environ.get("BITALLOC_FORCE_TRITON", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------
# the custom op


@torch.library.custom_op("bitalloc::quant_matmul", mutates_args=())
def _quant_matmul_op(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    qzeros: Optional[Tensor],
    bias: Optional[Tensor],
    high_qweight: Optional[Tensor],
    high_scales: Optional[Tensor],
    high_qzeros: Optional[Tensor],
    high_idx: Optional[Tensor],
    kind: str,
    bits: int,
    group_size: int,
    symmetric: bool,
    high_kind: str,
    high_bits: int,
    high_group_size: int,
    high_symmetric: bool,
    in_features: int,
    act: str,
    backend: str,
) -> Tensor:
    """x (M, in_features) -> (M, out_features) in x.dtype. group sizes: 0 = per channel."""
    args = (x, qweight, scales, qzeros, bias, high_qweight, high_scales, high_qzeros, high_idx, kind, bits,
            group_size, symmetric, high_kind, high_bits, high_group_size, high_symmetric, in_features, act, backend)
    fmt, hfmt, k = _validate(*args)
    N = qweight.shape[0]
    if high_idx is not None and high_idx.device.type == "cpu" and k:  # cheap on CPU; on CUDA torch asserts
        lo_i, hi_i = int(high_idx.min()), int(high_idx.max())
        if lo_i < 0 or hi_i >= in_features or torch.unique(high_idx).numel() != k:
            raise ValueError(f"high_idx must be distinct channels in [0, {in_features}), got range [{lo_i}, {hi_i}]")
    low = QuantizedTensor(fmt, (N, in_features - k), qweight, scales, qzeros)
    high = None if hfmt is None else QuantizedTensor(hfmt, (N, k), high_qweight, high_scales, high_qzeros)
    if _use_triton(x.device, backend):
        return _triton_matmul(x, low, high, high_idx, bias, act)
    return reference_matmul(x, low, high, high_idx, bias, act)


@_quant_matmul_op.register_fake
def _quant_matmul_fake(x, qweight, scales, qzeros, bias, high_qweight, high_scales, high_qzeros, high_idx,
                       kind, bits, group_size, symmetric, high_kind, high_bits, high_group_size, high_symmetric,
                       in_features, act, backend):
    _validate(x, qweight, scales, qzeros, bias, high_qweight, high_scales, high_qzeros, high_idx, kind, bits,
              group_size, symmetric, high_kind, high_bits, high_group_size, high_symmetric, in_features, act, backend)
    return x.new_empty(x.shape[0], qweight.shape[0])


# ---------------------------------------------------------------------------------------
# Python entry points


def quant_matmul(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    qzeros: Tensor | None = None,
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool = True,
    kind: str = "int",
    K: int | None = None,
    act: str = "a16",
    bias: Tensor | None = None,
    high: HighPart | None = None,
    backend: str = "auto",
) -> Tensor:
    """x (..., K) -> (..., N) in x.dtype through ``bitalloc::quant_matmul``.

    ``qweight/scales/qzeros`` are the packed low part (columns not in ``high.idx``,
    ascending); ``group_size=None`` is per channel; ``K`` (in_features, default x's last
    dim) is the layer's full input width, low plus high channels.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor (..., in_features)")
    K = x.shape[-1] if K is None else K
    if high is not None and not isinstance(high, HighPart):
        raise ValueError(f"high must be a HighPart, got {type(high).__name__}")
    h = high or HighPart(None, None, None, None, 0, None, True, "int")
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    y = torch.ops.bitalloc.quant_matmul(
        x2, qweight, scales, qzeros, bias, h.qweight, h.scales, h.qzeros, h.idx,
        kind, bits, group_size or 0, symmetric, h.kind, h.bits, h.group_size or 0, h.symmetric,
        K, act, backend,
    )
    return y.reshape(*x.shape[:-1], y.shape[-1])


def quant_linear(x: Tensor, qw: QuantizedWeight, bias: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """``QuantLinear.forward``: x (..., in) -> (..., out) for a QuantizedWeight (any scheme)."""
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
    low, f = qw.low, qw.low.fmt
    high = None
    if qw.high is not None:
        hf = qw.high.fmt
        high = HighPart(qw.high.qweight, qw.high.scales, qw.high.qzeros, qw.high_idx, hf.bits, hf.group_size,
                        hf.symmetric, hf.kind)
    return quant_matmul(
        x, low.qweight, low.scales, low.qzeros, bits=f.bits, group_size=f.group_size, symmetric=f.symmetric,
        kind=f.kind, K=qw.shape[1], act=qw.scheme.act, bias=bias, high=high, backend=backend,
    )
