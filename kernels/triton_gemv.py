"""Dequantize-GEMV for small batches (M <= 8): y (M, N) = x (M, K) @ W_hat^T.

W_hat is rebuilt tile by tile in registers (``dequant_tile``, float32) and contracted with
all M rows at once (broadcast-multiply-reduce, no tensor cores: at M <= 8 the kernel is
bound by reading the packed weight, which each program reads exactly once).

Split-K, deterministic two-pass: program (n, s) walks the s-th of SPLIT_K contiguous K
chunks of *each* segment (so a small high-impact segment is spread over all programs too)
and writes its float32 partial sum to ``partials[s]`` (SPLIT_K, M, N); the second pass is
``partials.sum(0)`` in torch. No atomics: results do not depend on scheduling, and the
interpreter needs none. Per segment, K is masked, so partial last groups and padding words
contribute nothing.

Two segments (high-impact split): x is the gathered ``[x_low | x_high]`` (M, K_lo + K_hi);
segment 1 reads columns ``[0, K_lo)``, segment 2 ``[K_lo, K_lo + K_hi)``, both into the
same accumulator.

Parts in GemLite order: keys, candidate configs, kernel, launcher, entry.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    Segment,
    check_inputs,
    dequant_tile,
    high_args,
    launch_opts,
    next_pow2,
    pick_config,
)

__all__ = ["gemv", "MAX_M"]

FAMILY = "gemv"
MAX_M = 8


# -- keys ------------------------------------------------------------------------------
def _key(M: int, low: Segment, high: Segment | None, dtype: torch.dtype) -> str:
    return f"M{M}|N{low.N}|{low.key()}|{high.key() if high else '-'}|{dtype}"


# -- candidate configs -----------------------------------------------------------------
def _default(M: int) -> dict:
    """Untuned config: the (BM, BK, BN) product tile stays <= 64 fp32 registers per thread."""
    bm = next_pow2(M)
    bn, bk = (128, 64) if bm <= 2 else (64, 32)
    warps = 4 if bm * bn * bk <= 8192 else 8
    return {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 0, "num_warps": warps, "num_stages": 2}  # SPLIT_K 0: heuristic


INTERPRET = {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2}  # the one config the CPU tests run


def _candidates(M: int):
    bm = next_pow2(M)
    for bn in (32, 64, 128, 256):
        for bk in (32, 64, 128):
            if bm * bn * bk > 32768:  # the (BM, BK, BN) product tile must stay in registers
                continue
            for sk in (1, 2, 4, 8):
                for w in (2, 4, 8):
                    yield {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": w, "num_stages": 2}


def _split_k(cfg: dict, N: int, K: int, device: torch.device) -> int:
    """Config's SPLIT_K, or (0) enough K chunks to give every SM two programs."""
    if cfg["SPLIT_K"] > 0:
        return cfg["SPLIT_K"]
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    max_split = max(1, triton.cdiv(K, 4 * cfg["BLOCK_K"]))  # keep >= 4 K-steps per program
    return max(1, min(max_split, triton.cdiv(2 * sms, n_blocks)))


# -- kernel ----------------------------------------------------------------------------
@triton.jit
def _gemv_segment(
    acc, x_ptr, stride_xm, x_col0, offs_m, offs_n, M, N, pid_k,
    qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,
    KIND: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr,
    GROUP: tl.constexpr, SYM: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc (BM, BN) += x[:, x_col0 + k] @ W_hat[n, k]^T over this program's K chunk of the segment."""
    chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # K chunk per split, whole tiles
    k_begin = pid_k * chunk
    k_end = tl.minimum(K, k_begin + chunk)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        mk = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (x_col0 + offs_k)[None, :],
            mask=(offs_m[:, None] < M) & mk[None, :], other=0.0,
        ).to(tl.float32)  # (BM, BK), upcast right after the load
        w = dequant_tile(
            qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,
            offs_n[None, :], offs_k[:, None], mk[:, None] & (offs_n[None, :] < N),
            KIND, PW0, PW1, PW2, GROUP, SYM,
        )  # (BK, BN) fp32
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)  # (BM, BN)
    return acc


@triton.jit
def _gemv_kernel(
    x_ptr, part_ptr, M, N, stride_xm,
    qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,
    hqw_ptr, hs_ptr, hz_ptr, HK, stride_hqw, stride_hs, stride_hz,
    KIND: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr,
    GROUP: tl.constexpr, SYM: tl.constexpr,
    H_KIND: tl.constexpr, H_PW0: tl.constexpr, H_PW1: tl.constexpr, H_PW2: tl.constexpr,
    H_GROUP: tl.constexpr, H_SYM: tl.constexpr,
    HAS_HIGH: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(N, BN), SPLIT_K); partials[pid_k] (M, N) fp32 = this program's K chunk."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)  # (BM,), rows >= M masked
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _gemv_segment(
        acc, x_ptr, stride_xm, 0, offs_m, offs_n, M, N, pid_k,
        qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,
        KIND, PW0, PW1, PW2, GROUP, SYM, SPLIT_K, BLOCK_K,
    )
    if HAS_HIGH:  # second K segment: the high-impact channels, columns [K, K + HK) of x
        acc = _gemv_segment(
            acc, x_ptr, stride_xm, K, offs_m, offs_n, M, N, pid_k,
            hqw_ptr, hs_ptr, hz_ptr, HK, stride_hqw, stride_hs, stride_hz,
            H_KIND, H_PW0, H_PW1, H_PW2, H_GROUP, H_SYM, SPLIT_K, BLOCK_K,
        )
    out = part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# -- launcher --------------------------------------------------------------------------
def _launch(x: torch.Tensor, low: Segment, high: Segment | None, cfg: dict) -> torch.Tensor:
    M, N = x.shape[0], low.N
    split = _split_k(cfg, N, low.K + (high.K if high else 0), x.device)
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device)  # (SPLIT_K, M, N)
    h_args, h_const = high_args(low, high)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), split)
    _gemv_kernel[grid](
        x, part, M, N, x.stride(0), *low.args(), *h_args, **low.constexprs(), **h_const,
        HAS_HIGH=high is not None, SPLIT_K=split,
        BLOCK_M=next_pow2(M), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], **launch_opts(cfg),
    )
    return part


# -- entry -----------------------------------------------------------------------------
def gemv(x: torch.Tensor, low: Segment, high: Segment | None = None, config: dict | None = None) -> torch.Tensor:
    """y (M, N) in x.dtype = x @ W_hat^T for M <= 8.

    x: contiguous (M, low.K + high.K) fp16/bf16/fp32, the columns of ``high`` last (already
    gathered). ``config`` overrides the tuned/fixed config (BLOCK_N, BLOCK_K, SPLIT_K).
    """
    M, _ = check_inputs(x, low, high)
    if not 1 <= M <= MAX_M:
        raise ValueError(f"gemv takes 1 <= M <= {MAX_M} rows, got M={M} (use triton_gemm.gemm)")
    if config is not None and config.get("BLOCK_K", 16) < 16:
        raise ValueError("BLOCK_K must be >= 16")
    cfg = config or pick_config(
        FAMILY, _key(M, low, high, x.dtype), x.device, _default(M), INTERPRET,
        lambda: _candidates(M), lambda c: _launch(x, low, high, c),
    )
    part = _launch(x, low, high, cfg)
    y = part[0] if part.shape[0] == 1 else part.sum(0)  # second pass: deterministic reduction
    return y.to(x.dtype)
