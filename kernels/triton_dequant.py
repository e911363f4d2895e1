"""Dense dequantization kernel: packed segment -> W_hat (N, K) in fp16/bf16/fp32.

Used for batches above 128 rows: dequantize once, then a vendor matmul (cuBLAS) wins over a
fused kernel. Parts in GemLite order: keys, candidate configs, kernel, launcher, entry.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import TORCH_TO_TL, Segment, dequant_tile, launch_opts, pick_config

__all__ = ["dequantize_dense"]

FAMILY = "dequant"


# -- keys ------------------------------------------------------------------------------
def _key(seg: Segment, dtype: torch.dtype) -> str:
    return f"N{seg.N}|{seg.key()}|{dtype}"


# -- candidate configs -----------------------------------------------------------------
DEFAULT = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}
INTERPRET = {"BLOCK_N": 32, "BLOCK_K": 64}


def _candidates():
    for bn in (16, 32, 64):
        for bk in (64, 128, 256):
            for w in (4, 8):
                yield {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": 1}


# -- kernel ----------------------------------------------------------------------------
@triton.jit
def _dequant_kernel(
    out_ptr, N, stride_out,
    qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,
    KIND: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr,
    GROUP: tl.constexpr, SYM: tl.constexpr,
    OUT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[n, k] = W_hat[n, k] for a (BLOCK_N, BLOCK_K) tile per program; grid (N/BN, K/BK)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)  # (BN, BK)
    w = dequant_tile(
        qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,
        offs_n[:, None], offs_k[None, :], mask,
        KIND, PW0, PW1, PW2, GROUP, SYM,
    )  # (BN, BK) fp32
    tl.store(out_ptr + offs_n[:, None] * stride_out + offs_k[None, :], w.to(OUT_DTYPE), mask=mask)


# -- launcher --------------------------------------------------------------------------
def _launch(seg: Segment, out: torch.Tensor, cfg: dict) -> None:
    grid = (triton.cdiv(seg.N, cfg["BLOCK_N"]), triton.cdiv(seg.K, cfg["BLOCK_K"]))
    _dequant_kernel[grid](
        out, seg.N, out.stride(0), *seg.args(), **seg.constexprs(),
        OUT_DTYPE=TORCH_TO_TL[out.dtype], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], **launch_opts(cfg),
    )


# -- entry -----------------------------------------------------------------------------
def dequantize_dense(
    seg: Segment, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None, config: dict | None = None
) -> torch.Tensor:
    """W_hat (N, K) of a packed segment in ``dtype`` (written into ``out`` if given: an
    (N, K) view with unit column stride, e.g. the columns of a concatenated [low | high])."""
    if not isinstance(seg, Segment):
        raise ValueError(f"seg must be a Segment, got {type(seg).__name__}")
    if out is None:
        if dtype not in TORCH_TO_TL:
            raise ValueError(f"dtype must be one of {tuple(TORCH_TO_TL)}, got {dtype}")
        out = torch.empty(seg.N, seg.K, dtype=dtype, device=seg.qweight.device)
    if tuple(out.shape) != (seg.N, seg.K) or out.dtype not in TORCH_TO_TL or (seg.K > 1 and out.stride(1) != 1):
        raise ValueError(f"out must be a ({seg.N}, {seg.K}) fp16/bf16/fp32 view with unit column stride, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    if out.device != seg.qweight.device:
        raise ValueError(f"out is on {out.device}, the weight on {seg.qweight.device}")
    if seg.N == 0 or seg.K == 0:
        return out
    cfg = config or pick_config(
        FAMILY, _key(seg, out.dtype), out.device, DEFAULT, INTERPRET, _candidates, lambda c: _launch(seg, out, c)
    )
    _launch(seg, out, cfg)
    return out
