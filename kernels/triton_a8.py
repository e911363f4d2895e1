"""Activation-quantized matmul (A8 schemes): y = (s_x * q_x) @ W_hat^T with 8-bit q_x.

Activations are quantized per token in torch (:func:`quantize_tokens`, the exact codes of
``kernels.quant.quantize_activation``; the interpreter mishandles some casts, and one
(M, K) pass over activations is cheap). The kernel then contracts the 8-bit activation
codes with the *unscaled* integer weight ``q_w = code - zero`` on tensor cores and applies
the scales outside the dot:

* ``a8`` (int8 tokens): ``tl.dot(int8, int8) -> int32`` when ``q_w`` fits int8 (symmetric
  up to 8 bits, asymmetric up to 7). Per-channel weights (``w8a8``) accumulate the whole
  segment in int32 (exact) and scale once: ``y = s_x[m] * s_w[n] * sum_k q_x q_w``.
* ``af8`` (fp8 e4m3 tokens): ``tl.dot(fp8, fp8) -> fp32`` when every ``q_w`` is an exact
  e4m3 value (|q_w| <= 16: symmetric <= 5 bits, asymmetric <= 4; e.g. W4A8). Needs
  ``float8e4nv`` (sm_89+, Hopper/Ada); elsewhere the fp8 codes are upcast to fp16.
* otherwise (``w8`` asymmetric, wider weights under fp8): "wide" dot on fp16 copies of
  both operands (fp32 under the interpreter); exact, since 8-bit codes and integer weights
  up to 255 are fp16 values and products are accumulated in fp32.

Grouped weights: BLOCK_K divides the group size, so each K tile has one scale per output
channel and ``acc += dot(x_tile, q_tile) * s_w[n, group]``; the partial last group is
masked. Two segments (high-impact split) share the token codes (one scale per token over
all K) and add into the same accumulator, each with its own dot mode. Integer weight
formats only (``kernels/ops.py`` runs other formats as fake-quantized activations through
the A16 kernels, which is the same arithmetic).

Parts in GemLite order: keys, candidate configs, kernel, launcher, entry.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import activation_codes
from .triton_common import (
    TORCH_TO_TL,
    Segment,
    check_inputs,
    high_args,
    int_tile,
    is_interpreter,
    launch_opts,
    next_pow2,
    pick_config,
    tile_offsets,
)

__all__ = ["a8_matmul", "a8_matmul_quantized", "quantize_tokens", "dot_mode", "fp8_native"]

FAMILY = "a8"
MODE_INT8, MODE_FP8, MODE_WIDE = 0, 1, 2


# -- keys ------------------------------------------------------------------------------
def _key(M: int, act: str, low: Segment, high: Segment | None, dtype: torch.dtype) -> str:
    return f"{act}|M{next_pow2(M)}|N{low.N}|{low.key()}|{high.key() if high else '-'}|{dtype}"


# -- candidate configs -----------------------------------------------------------------
DEFAULT = {"BLOCK_M": 0, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}


def _candidates(M: int):
    bms = sorted({min(max(16, next_pow2(M)), bm) for bm in (16, 32, 64, 128)})
    for bm in bms:
        for bn in (64, 128, 256):
            for bk in (64, 128, 256):  # clipped to the group size at launch
                if bm * bn > 128 * 128:
                    continue
                for w in (4, 8):
                    for s in (3, 4):
                        yield {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": s}


# -- kernel ----------------------------------------------------------------------------
@triton.jit
def _a8_segment(
    acc, x_ptr, stride_xm, x_col0, offs_m, offs_n, M, N,
    qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,
    PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
    MODE: tl.constexpr, WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc (BM, BN) fp32 += (x codes @ q_w^T) * weight scales over one segment (token scale later)."""
    mn = offs_n < N
    if MODE == 0:
        seg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # per-channel: exact int32 over all K
    else:
        seg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        mk = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (x_col0 + offs_k)[None, :],
            mask=(offs_m[:, None] < M) & mk[None, :], other=0.0,
        )  # (BM, BK) int8 | fp8 | fp16 codes
        q = int_tile(
            qw_ptr, z_ptr, K, stride_qw, stride_z, offs_n[None, :], offs_k[:, None],
            mk[:, None] & mn[None, :], PW0, PW1, PW2, GROUP, SYM,
        )  # (BK, BN) int32
        if MODE == 0:
            d = tl.dot(x, q.to(tl.int8), out_dtype=tl.int32)
        elif MODE == 1:
            d = tl.dot(x, q.to(tl.float16).to(tl.float8e4nv))
        else:
            if WIDE == tl.float32:
                d = tl.dot(x.to(WIDE), q.to(WIDE), input_precision="ieee")
            else:
                d = tl.dot(x.to(WIDE), q.to(WIDE))
        if GROUP > 0:  # BLOCK_K divides GROUP: one scale per channel for this tile
            s = tl.load(s_ptr + offs_n * stride_s + k0 // GROUP, mask=mn, other=0.0).to(tl.float32)  # (BN,)
            acc += d.to(tl.float32) * s[None, :]
        else:
            seg += d
    if GROUP == 0:
        s = tl.load(s_ptr + offs_n * stride_s, mask=mn, other=0.0).to(tl.float32)  # (BN,)
        acc += seg.to(tl.float32) * s[None, :]
    return acc


@triton.jit
def _a8_kernel(
    x_ptr, sx_ptr, y_ptr, M, N, stride_xm, stride_ym,
    qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,
    hqw_ptr, hs_ptr, hz_ptr, HK, stride_hqw, stride_hs, stride_hz,
    KIND: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr,
    GROUP: tl.constexpr, SYM: tl.constexpr,
    H_KIND: tl.constexpr, H_PW0: tl.constexpr, H_PW1: tl.constexpr, H_PW2: tl.constexpr,
    H_GROUP: tl.constexpr, H_SYM: tl.constexpr,
    HAS_HIGH: tl.constexpr, MODE: tl.constexpr, H_MODE: tl.constexpr, WIDE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """1-D grid over (M/BM) x (N/BN) tiles in GROUP_M super-rows; y = s_x[m] * acc."""
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)  # (BM,), (BN,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _a8_segment(
        acc, x_ptr, stride_xm, 0, offs_m, offs_n, M, N,
        qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,
        PW0, PW1, PW2, GROUP, SYM, MODE, WIDE, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    if HAS_HIGH:  # second K segment: columns [K, K + HK) of the token codes
        acc = _a8_segment(
            acc, x_ptr, stride_xm, K, offs_m, offs_n, M, N,
            hqw_ptr, hs_ptr, hz_ptr, HK, stride_hqw, stride_hs, stride_hz,
            H_PW0, H_PW1, H_PW2, H_GROUP, H_SYM, H_MODE, WIDE, BLOCK_M, BLOCK_N, BLOCK_K,
        )
    sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)  # (BM,) fp32 token scales
    out = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(out, (acc * sx[:, None]).to(OUT_DTYPE), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# -- launcher --------------------------------------------------------------------------
def fp8_native(device: torch.device) -> bool:
    """float8e4nv tensor-core dots: CUDA sm_89+ and not the interpreter."""
    return (
        device.type == "cuda" and not is_interpreter() and torch.cuda.get_device_capability(device) >= (8, 9)
    )


def dot_mode(seg: Segment, act: str, native_fp8: bool) -> int:
    """The exact dot type for one segment: int8, fp8 or wide (fp16/fp32)."""
    b, sym = seg.fmt.bits, seg.fmt.symmetric
    if act == "a8":
        return MODE_INT8 if (b <= 8 if sym else b <= 7) else MODE_WIDE
    if native_fp8 and (b <= 5 if sym else b <= 4):  # |q_w| <= 16: exact e4m3 integers
        return MODE_FP8
    return MODE_WIDE


def _block_k(cfg: dict, low: Segment, high: Segment | None) -> int:
    """Config BLOCK_K clipped so it divides every group size (all are powers of two >= 32)."""
    groups = [s.group for s in (low, high) if s is not None and s.group > 0]
    return min([cfg["BLOCK_K"]] + groups)


def _launch(xq, sx, low, high, act, cfg, y) -> None:
    M, N = xq.shape[0], low.N
    native = xq.dtype == torch.float8_e4m3fn
    bm = cfg["BLOCK_M"] or min(128, max(16, next_pow2(M)))
    h_args, h_const = high_args(low, high)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _a8_kernel[grid](
        xq, sx, y, M, N, xq.stride(0), y.stride(0), *low.args(), *h_args, **low.constexprs(), **h_const,
        HAS_HIGH=high is not None,
        MODE=dot_mode(low, act, native), H_MODE=dot_mode(high or low, act, native),
        WIDE=tl.float32 if is_interpreter() else tl.float16, OUT_DTYPE=TORCH_TO_TL[y.dtype],
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=_block_k(cfg, low, high), GROUP_M=cfg["GROUP_M"],
        **launch_opts(cfg),
    )


# -- entry -----------------------------------------------------------------------------
def quantize_tokens(x: torch.Tensor, act: str, fp8_dtype: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes and scales of ``quantize_activation(x, act)``: (q (M, K), s (M,) fp32).

    ``a8``: int8 codes. ``af8``: fp8 e4m3 values, as float8_e4m3fn when ``fp8_dtype`` else
    upcast (exactly) to float16. ``quantize_activation(x, act) == (q * s[:, None]).to(x.dtype)``.
    """
    if act not in ("a8", "af8"):
        raise ValueError(f"act must be 'a8' or 'af8', got {act!r}")
    q, s = activation_codes(x, act)  # (M, K), (M, 1)
    if act == "af8" and not fp8_dtype:
        q = q.to(torch.float16)  # exact: every e4m3 value is a float16
    return q.contiguous(), s.squeeze(-1).contiguous()


def a8_matmul_quantized(
    xq: torch.Tensor, sx: torch.Tensor, low: Segment, high: Segment | None = None, *,
    act: str, out_dtype: torch.dtype = torch.float16, config: dict | None = None,
) -> torch.Tensor:
    """y (M, N) = (sx[:, None] * xq) @ W_hat^T from per-token codes (see :func:`quantize_tokens`)."""
    if act not in ("a8", "af8"):
        raise ValueError(f"act must be 'a8' or 'af8', got {act!r}")
    want = (torch.int8,) if act == "a8" else (torch.float8_e4m3fn, torch.float16)
    M, N = check_inputs(xq, low, high, dtypes=want, name=f"{act} token codes")
    if not isinstance(sx, torch.Tensor) or sx.dtype != torch.float32 or tuple(sx.shape) != (M,):
        raise ValueError(f"token scales must be float32 ({M},)")
    for name, seg in (("low", low), ("high", high)):
        if seg is not None and (seg.fmt.kind != "int" or seg.fmt.bits > 8):
            raise ValueError(f"A8 kernel takes integer weights of <= 8 bits; {name} segment is {seg.fmt.name}")
    if xq.dtype == torch.float8_e4m3fn and not fp8_native(xq.device):
        raise ValueError("float8_e4m3fn codes need CUDA sm_89+ (pass fp16-upcast codes instead)")
    if out_dtype not in TORCH_TO_TL:
        raise ValueError(f"out_dtype must be one of {tuple(TORCH_TO_TL)}, got {out_dtype}")
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    if M == 0:
        return y
    cfg = config or pick_config(
        FAMILY, _key(M, act, low, high, out_dtype), xq.device, DEFAULT, INTERPRET,
        lambda: _candidates(M), lambda c: _launch(xq, sx, low, high, act, c, y),
    )
    _launch(xq, sx, low, high, act, cfg, y)
    return y


def a8_matmul(
    x: torch.Tensor, low: Segment, high: Segment | None = None, *, act: str, config: dict | None = None
) -> torch.Tensor:
    """y (M, N) in x.dtype = quantize_activation(x, act) @ W_hat^T; x contiguous (M, K_lo + K_hi)."""
    check_inputs(x, low, high)
    xq, sx = quantize_tokens(x, act, fp8_dtype=act == "af8" and fp8_native(x.device))
    return a8_matmul_quantized(xq, sx, low, high, act=act, out_dtype=x.dtype, config=config)
