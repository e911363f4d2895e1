"""Dequantize-GEMM for mid-size batches (9 <= M <= 128): y (M, N) = x (M, K) @ W_hat^T.

Each program owns a (BLOCK_M, BLOCK_N) output tile and walks K: it loads the x tile,
dequantizes the (BLOCK_K, BLOCK_N) W tile in registers (``dequant_tile``, float32), casts
it to the dot type and accumulates ``tl.dot`` into a float32 accumulator. The dot type is
x's dtype for fp16/bf16 on GPU (tensor cores; W_hat is rounded to x's dtype exactly like
the reference ``dequantized_weight().to(x.dtype)``), float32 with ``input_precision="ieee"``
for float32 x and always under the interpreter (which mishandles bf16 arithmetic). No
split-K: at M >= 16 the grid over (M, N) tiles already fills the GPU for the layer sizes
we target; programs are ordered in GROUP_M super-rows so W tiles are reused from L2.

Two segments (high-impact split) as in ``triton_gemv``: x is ``[x_low | x_high]``, the
second segment's K loop adds into the same accumulator.

Parts in GemLite order: keys, candidate configs, kernel, launcher, entry.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    TORCH_TO_TL,
    Segment,
    check_inputs,
    dequant_tile,
    high_args,
    is_interpreter,
    launch_opts,
    next_pow2,
    pick_config,
    tile_offsets,
)

__all__ = ["gemm", "MAX_M"]

FAMILY = "gemm"
MAX_M = 128


# -- keys ------------------------------------------------------------------------------
def _key(M: int, low: Segment, high: Segment | None, dtype: torch.dtype) -> str:
    return f"M{next_pow2(M)}|N{low.N}|{low.key()}|{high.key() if high else '-'}|{dtype}"


# -- candidate configs -----------------------------------------------------------------
DEFAULT = {"BLOCK_M": 0, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}  # BM 0: fit M
INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}


def _candidates(M: int):
    bms = sorted({min(max(16, next_pow2(M)), bm) for bm in (16, 32, 64, 128)})
    for bm in bms:
        for bn in (64, 128, 256):
            for bk in (32, 64, 128):
                if bm * bn > 128 * 128:
                    continue
                for w in (4, 8):
                    for s in (2, 3, 4):
                        yield {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": s}


# -- kernel ----------------------------------------------------------------------------
@triton.jit
def _gemm_segment(
    acc, x_ptr, stride_xm, x_col0, offs_m, offs_n, M, N,
    qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,
    KIND: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr,
    GROUP: tl.constexpr, SYM: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc (BM, BN) += x[offs_m, x_col0 + k] @ W_hat[offs_n, k]^T over the whole segment."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        mk = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (x_col0 + offs_k)[None, :],
            mask=(offs_m[:, None] < M) & mk[None, :], other=0.0,
        ).to(DOT_DTYPE)  # (BM, BK)
        w = dequant_tile(
            qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,
            offs_n[None, :], offs_k[:, None], mk[:, None] & (offs_n[None, :] < N),
            KIND, PW0, PW1, PW2, GROUP, SYM,
        ).to(DOT_DTYPE)  # (BK, BN)
        if DOT_DTYPE == tl.float32:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _gemm_kernel(
    x_ptr, y_ptr, M, N, stride_xm, stride_ym,
    qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,
    hqw_ptr, hs_ptr, hz_ptr, HK, stride_hqw, stride_hs, stride_hz,
    KIND: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr,
    GROUP: tl.constexpr, SYM: tl.constexpr,
    H_KIND: tl.constexpr, H_PW0: tl.constexpr, H_PW1: tl.constexpr, H_PW2: tl.constexpr,
    H_GROUP: tl.constexpr, H_SYM: tl.constexpr,
    HAS_HIGH: tl.constexpr, DOT_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """1-D grid over (M/BM) x (N/BN) tiles in GROUP_M super-rows; y tile written in OUT_DTYPE."""
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)  # (BM,), (BN,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _gemm_segment(
        acc, x_ptr, stride_xm, 0, offs_m, offs_n, M, N,
        qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,
        KIND, PW0, PW1, PW2, GROUP, SYM, DOT_DTYPE, BLOCK_K,
    )
    if HAS_HIGH:  # second K segment: columns [K, K + HK) of x
        acc = _gemm_segment(
            acc, x_ptr, stride_xm, K, offs_m, offs_n, M, N,
            hqw_ptr, hs_ptr, hz_ptr, HK, stride_hqw, stride_hs, stride_hz,
            H_KIND, H_PW0, H_PW1, H_PW2, H_GROUP, H_SYM, DOT_DTYPE, BLOCK_K,
        )
    out = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(out, acc.to(OUT_DTYPE), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# -- launcher --------------------------------------------------------------------------
def _dot_dtype(dtype: torch.dtype):
    return tl.float32 if (dtype == torch.float32 or is_interpreter()) else TORCH_TO_TL[dtype]


def _launch(x: torch.Tensor, low: Segment, high: Segment | None, cfg: dict, y: torch.Tensor) -> None:
    M, N = x.shape[0], low.N
    bm = cfg["BLOCK_M"] or min(128, max(16, next_pow2(M)))
    h_args, h_const = high_args(low, high)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _gemm_kernel[grid](
        x, y, M, N, x.stride(0), y.stride(0), *low.args(), *h_args, **low.constexprs(), **h_const,
        HAS_HIGH=high is not None, DOT_DTYPE=_dot_dtype(x.dtype), OUT_DTYPE=TORCH_TO_TL[y.dtype],
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], **launch_opts(cfg),
    )


# -- entry -----------------------------------------------------------------------------
def gemm(x: torch.Tensor, low: Segment, high: Segment | None = None, config: dict | None = None) -> torch.Tensor:
    """y (M, N) in x.dtype = x @ W_hat^T for 1 <= M <= 128 (meant for M > 8).

    x: contiguous (M, low.K + high.K) fp16/bf16/fp32, the columns of ``high`` last.
    """
    M, N = check_inputs(x, low, high)
    if not 1 <= M <= MAX_M:
        raise ValueError(f"gemm takes 1 <= M <= {MAX_M} rows, got M={M} (dequantize_dense + matmul above)")
    if config is not None and min(config.get("BLOCK_M", 16) or 16, config["BLOCK_N"], config["BLOCK_K"]) < 16:
        raise ValueError("tl.dot needs BLOCK_M, BLOCK_N, BLOCK_K >= 16")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    cfg = config or pick_config(
        FAMILY, _key(M, low, high, x.dtype), x.device, DEFAULT, INTERPRET,
        lambda: _candidates(M), lambda c: _launch(x, low, high, c, y),
    )
    _launch(x, low, high, cfg, y)
    return y
