"""Shared parts of the Triton kernels: packed segments, the in-register dequantizer, configs.

A **segment** is one packed weight part that a kernel walks along K: the low part of a
layer, or the high-impact part of a split scheme (a second K segment accumulated into the
same accumulator; see ``kernels/ops.py``). :class:`Segment` validates the packed tensors
against the format (clear ``ValueError`` on any mismatch, never a silent wrong result) and
turns them into kernel arguments: 7 runtime values and 6 compile-time constants.

:func:`dequant_tile` rebuilds a tile of ``W_hat`` in float32 from the bit-plane layout of
``kernels/packing.py``: for every plane of width ``w`` (widest first, planes 0..2, the
widths are constexpr so the plane loop unrolls), code ``k`` of a row lives in word
``plane_start + k // (32 // w)`` at bit ``(k % (32 // w)) * w`` and carries the bits above
``shift = sum(widths of the later planes)``. ``(word >> off) & mask`` is right for int32
words with bit 31 set (the mask drops the sign extension). Row/column indices are passed
as broadcastable 2-D index tensors, so one helper serves both tile orientations:
``(BLOCK_K, BLOCK_N)`` for the matmul kernels, ``(BLOCK_N, BLOCK_K)`` for the dense one.

Configs: under the Triton interpreter (``TRITON_INTERPRET=1``, no GPU) every family runs
ONE fixed config (autotuning needs a GPU driver). On CUDA, a config comes from the per-GPU
cache ``~/.cache/bitalloc/triton-configs-<gpu>-triton<ver>.json`` (``BITALLOC_CACHE_DIR``
overrides the folder), else from benchmarking the candidates when autotuning is enabled
(``BITALLOC_AUTOTUNE=1`` or :func:`set_autotune`), else from the family's default.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import triton
import triton.language as tl

from .formats import Format, bit_planes
from .quant import expected_shapes

__all__ = [
    "Segment",
    "KIND_CODES",
    "dequant_tile",
    "int_tile",
    "is_interpreter",
    "pick_config",
    "tuned_config",
    "set_autotune",
    "autotune_enabled",
    "cache_path",
    "next_pow2",
    "TORCH_TO_TL",
]

# kernel-side codes for Format.kind (constexpr KIND)
KIND_CODES = {"int": 0, "fp8_e4m3": 1, "fp4_e2m1": 2, "fp16": 3}
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def is_interpreter() -> bool:
    """True when Triton kernels run on the CPU interpreter (set before the kernels were decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------
# packed segments


@dataclass(frozen=True)
class Segment:
    """One packed weight part (N, K) in ``fmt``: the tensors of a :class:`QuantizedTensor`.

    ``qweight`` int32 (N, packed_words(K, bits)) (float16 (N, K) for fp16), ``scales``
    float16 (N, n_groups), ``qzeros`` int32 (N, packed_words(n_groups, bits)) or None.
    """

    fmt: Format
    K: int
    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.fmt, Format):
            raise ValueError(f"fmt must be a Format, got {type(self.fmt).__name__}")
        if not isinstance(self.qweight, torch.Tensor) or self.qweight.dim() != 2:
            raise ValueError("qweight must be a 2-D tensor (out_features, words)")
        if isinstance(self.K, bool) or not isinstance(self.K, int) or self.K < 0:
            raise ValueError(f"K must be a non-negative int, got {self.K!r}")
        N = self.qweight.shape[0]
        got = {"qweight": self.qweight, "scales": self.scales, "qzeros": self.qzeros}
        for name, (shape, dtype) in expected_shapes(self.fmt, N, self.K).items():
            t = got[name]
            if shape is None:
                if t is not None:
                    raise ValueError(f"{self.fmt.name}: {name} must be None (symmetric / unscaled format)")
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{self.fmt.name}: {name} is missing (need {dtype} {shape})")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"{self.fmt.name} weight ({N}, {self.K}): {name} must be {dtype} {shape}, "
                    f"got {t.dtype} {tuple(t.shape)} (mismatched packed size?)"
                )
            if t.device != self.qweight.device:
                raise ValueError(f"{name} is on {t.device}, qweight on {self.qweight.device}")
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous (row-major packed layout)")

    @classmethod
    def from_quantized(cls, qt) -> Segment:
        """From a kernels.quant.QuantizedTensor."""
        return cls(qt.fmt, int(qt.shape[1]), qt.qweight, qt.scales, qt.qzeros)

    @property
    def N(self) -> int:
        return self.qweight.shape[0]

    @property
    def planes(self) -> tuple[int, int, int]:
        """Plane widths padded to 3 with zeros (0 = no plane); fp16 has none."""
        if self.fmt.kind == "fp16":
            return (0, 0, 0)
        p = bit_planes(self.fmt.bits)
        assert len(p) <= 3, f"{self.fmt.bits}-bit codes have {len(p)} planes; codes of <= 8 bits have <= 3"
        return tuple(p) + (0,) * (3 - len(p))

    @property
    def group(self) -> int:
        """Constexpr group size; 0 means one group per row (per-channel)."""
        return 0 if self.fmt.group_size is None else self.fmt.group_size

    def args(self) -> list:
        """Runtime kernel arguments: qw, scales, zeros, K, stride_qw, stride_s, stride_z."""
        z = self.qzeros if self.qzeros is not None else self.qweight  # dummy pointer, never read
        s = self.scales if self.scales.numel() else self.qweight  # fp16 kind: no scales
        return [self.qweight, s, z, self.K, self.qweight.stride(0), max(s.stride(0), 1), max(z.stride(0), 1)]

    def constexprs(self, prefix: str = "") -> dict:
        """Compile-time constants KIND, PW0..PW2, GROUP, SYM (with ``prefix`` for the high segment)."""
        pw = self.planes
        c = {
            "KIND": KIND_CODES[self.fmt.kind],
            "PW0": pw[0],
            "PW1": pw[1],
            "PW2": pw[2],
            "GROUP": self.group,
            "SYM": bool(self.fmt.symmetric),
        }
        return {prefix + k: v for k, v in c.items()}

    def key(self) -> str:
        return f"{self.fmt.name}:{self.K}"


# ---------------------------------------------------------------------------------------
# in-register dequantization


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row/column offsets of this program's output tile: a 1-D grid over (M/BM) x (N/BN)
    tiles walked in GROUP_M super-rows, so neighbouring programs reuse the same W tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_n)
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    return offs_m, offs_n


@triton.jit
def _pow2(e):
    """2**e for an int32 tensor e in [-126, 127], exact (built from the float32 exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _load_codes(ptr, rows, cols, n_cols, stride_row, mask, PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr):
    """Unsigned codes at (rows, cols) of a bit-plane packed int32 matrix (row = n_cols codes).

    rows/cols: broadcastable int32 index tensors; returns int32 codes of their broadcast shape.
    """
    base = ptr + rows * stride_row
    # plane 0 (widest, top bits): always present
    word = tl.load(base + cols // (32 // PW0), mask=mask, other=0)
    code = ((word >> ((cols % (32 // PW0)) * PW0)) & ((1 << PW0) - 1)) << (PW1 + PW2)
    if PW1 > 0:
        start1 = tl.cdiv(n_cols, 32 // PW0)
        word = tl.load(base + start1 + cols // (32 // PW1), mask=mask, other=0)
        code = code | (((word >> ((cols % (32 // PW1)) * PW1)) & ((1 << PW1) - 1)) << PW2)
        if PW2 > 0:
            start2 = start1 + tl.cdiv(n_cols, 32 // PW1)
            word = tl.load(base + start2 + cols // (32 // PW2), mask=mask, other=0)
            code = code | ((word >> ((cols % (32 // PW2)) * PW2)) & ((1 << PW2) - 1))
    return code


@triton.jit
def _sub_zero(code, z_ptr, K, stride_z, rows, gidx, mask,
              PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr):
    """Signed integer weight q = code - zero (zero = 2**(b-1) when symmetric, else the packed zero-point)."""
    if SYM:
        q = code - (1 << (PW0 + PW1 + PW2 - 1))
    else:
        if GROUP > 0:
            n_groups = tl.cdiv(K, GROUP)
        else:
            n_groups = 1
        q = code - _load_codes(z_ptr, rows, gidx, n_groups, stride_z, mask, PW0, PW1, PW2)
    return q


@triton.jit
def int_tile(
    qw_ptr, z_ptr, K, stride_qw, stride_z, rows, cols, mask,
    PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
):
    """int32 unscaled weight q = code - zero at (rows, cols) of an integer segment (0 where ~mask)."""
    code = _load_codes(qw_ptr, rows, cols, K, stride_qw, mask, PW0, PW1, PW2)
    if GROUP > 0:
        gidx = cols // GROUP
    else:
        gidx = cols * 0
    q = _sub_zero(code, z_ptr, K, stride_z, rows, gidx, mask, PW0, PW1, PW2, GROUP, SYM)
    return tl.where(mask, q, 0)


@triton.jit
def dequant_tile(
    qw_ptr, s_ptr, z_ptr, K, stride_qw, stride_s, stride_z,  # one segment (Segment.args)
    rows, cols, mask,  # broadcastable int32 index tensors (output channel, input channel) and mask
    KIND: tl.constexpr, PW0: tl.constexpr, PW1: tl.constexpr, PW2: tl.constexpr,
    GROUP: tl.constexpr, SYM: tl.constexpr,
):
    """float32 W_hat[rows, cols] of one segment (0 where ~mask), exactly kernels.quant.dequantize."""
    if KIND == 3:  # fp16 weight stored as is (a "keep 16-bit" high part)
        w = tl.load(qw_ptr + rows * stride_qw + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        code = _load_codes(qw_ptr, rows, cols, K, stride_qw, mask, PW0, PW1, PW2)
        if GROUP > 0:
            gidx = cols // GROUP
        else:
            gidx = cols * 0  # per-channel: one group
        scale = tl.load(s_ptr + rows * stride_s + gidx, mask=mask, other=0.0).to(tl.float32)
        if KIND == 0:  # integer: (code - zero) * scale
            q = _sub_zero(code, z_ptr, K, stride_z, rows, gidx, mask, PW0, PW1, PW2, GROUP, SYM)
            w = q.to(tl.float32) * scale
        elif KIND == 1:  # fp8 e4m3 bit pattern: s eeee mmm, bias 7
            e = (code >> 3) & 15
            m = code & 7
            mag = tl.where(e == 0, m, m + 8).to(tl.float32) * _pow2(tl.where(e == 0, 1, e) - 10)
            mag = tl.where((e == 15) & (m == 7), float("nan"), mag)
            w = tl.where((code >> 7) != 0, -mag, mag) * scale
        else:  # fp4 e2m1: s ee m, magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}
            e = (code >> 1) & 3
            m = code & 1
            mag = tl.where(e == 0, m, m + 2).to(tl.float32) * _pow2(tl.where(e == 0, 1, e) - 2)
            w = tl.where((code >> 3) != 0, -mag, mag) * scale
    return tl.where(mask, w, 0.0)


# ---------------------------------------------------------------------------------------
# configs: fixed under the interpreter, tuned and cached per GPU on CUDA

_AUTOTUNE: bool | None = None  # None: read BITALLOC_AUTOTUNE


def set_autotune(enabled: bool | None) -> None:
    """Force autotuning on/off for this process (None: back to the BITALLOC_AUTOTUNE env var)."""
    global _AUTOTUNE
    _AUTOTUNE = enabled


def autotune_enabled() -> bool:
    if _AUTOTUNE is not None:
        return _AUTOTUNE
    return os.environ.get("BITALLOC_AUTOTUNE", "0") not in ("", "0", "false", "False")


def _gpu_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    cc = "".join(map(str, torch.cuda.get_device_capability(device)))
    return re.sub(r"[^A-Za-z0-9]+", "_", f"{name}_sm{cc}").strip("_")


def cache_path(device: torch.device) -> Path:
    folder = Path(os.environ.get("BITALLOC_CACHE_DIR", Path.home() / ".cache" / "bitalloc"))
    return folder / f"triton-configs-{_gpu_tag(device)}-triton{triton.__version__}.json"


_CACHE: dict[str, dict] = {}  # path -> {family: {key: config}}


def _load_cache(path: Path) -> dict:
    p = str(path)
    if p not in _CACHE:
        try:
            _CACHE[p] = json.loads(path.read_text())
        except (OSError, ValueError):
            _CACHE[p] = {}
    return _CACHE[p]


def _save_cache(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_CACHE[str(path)], indent=1, sort_keys=True))
    tmp.replace(path)  # atomic: concurrent processes never read half a file


def pick_config(
    family: str,
    key: str,
    device: torch.device,
    default: dict,
    interpret: dict,
    candidates: Callable[[], Iterable[dict]],
    run: Callable[[dict], None],
    bench: Callable[[Callable[[], None]], float] | None = None,
    tune: bool | None = None,
) -> dict:
    """The launch config for ``family`` at ``key``.

    Interpreter: ``interpret`` (one fixed config). CUDA: the per-GPU cached config for
    ``key``, else (when tuning) the fastest of ``candidates()`` timed by ``bench(fn)`` (ms;
    ``triton.testing.do_bench`` by default) and cached, else ``default``.
    """
    if is_interpreter() or device.type != "cuda":
        return dict(interpret)
    return tuned_config(family, key, cache_path(device), default, candidates, run, bench, tune)


def tuned_config(
    family: str,
    key: str,
    path: Path,
    default: dict,
    candidates: Callable[[], Iterable[dict]],
    run: Callable[[dict], None],
    bench: Callable[[Callable[[], None]], float] | None = None,
    tune: bool | None = None,
) -> dict:
    """Cached config of ``family``/``key`` in the JSON file ``path``; else tune (if enabled) and cache."""
    table = _load_cache(path).setdefault(family, {})
    if key in table:
        return dict(table[key])
    if not (autotune_enabled() if tune is None else tune):
        return dict(default)
    bench = bench or (lambda fn: triton.testing.do_bench(fn, warmup=10, rep=30, return_mode="median"))
    best, best_ms = dict(default), math.inf
    for cfg in candidates():
        try:
            ms = bench(lambda: run(cfg))
        except Exception:  # out of resources / invalid on this GPU: not a candidate here
            continue
        if ms < best_ms:
            best, best_ms = dict(cfg), ms
    table[key] = best
    _save_cache(path)
    return best


def launch_opts(cfg: dict) -> dict:
    """num_warps / num_stages of a config (ignored by the interpreter)."""
    return {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 2)}


def check_segments(low: Segment, high: Segment | None) -> tuple[int, int]:
    """Segments of one layer: same N and device; returns (N, K_lo + K_hi)."""
    if not isinstance(low, Segment) or (high is not None and not isinstance(high, Segment)):
        raise ValueError("low / high must be kernels.triton_common.Segment")
    if high is not None and high.N != low.N:
        raise ValueError(f"low and high segments have different out_features ({low.N} vs {high.N})")
    if high is not None and high.qweight.device != low.qweight.device:
        raise ValueError(f"low segment is on {low.qweight.device}, high on {high.qweight.device}")
    return low.N, low.K + (high.K if high is not None else 0)


def check_inputs(x: torch.Tensor, low: Segment, high: Segment | None, dtypes=ACT_DTYPES, name: str = "x") -> tuple[int, int]:
    """x must be a contiguous 2-D (M, K_lo + K_hi) tensor of ``dtypes`` on the segments' device,
    and that device CUDA (or any under the interpreter). Returns (M, N)."""
    N, K = check_segments(low, high)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D (M, K) tensor, got {got}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} dtype must be one of {dtypes}, got {x.dtype}")
    if x.shape[1] != K:
        raise ValueError(f"{name} has {x.shape[1]} input features, the packed weight has {K}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if x.device != low.qweight.device:
        raise ValueError(f"{name} is on {x.device}, the packed weight on {low.qweight.device}")
    if x.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"Triton kernels need CUDA tensors or TRITON_INTERPRET=1, got device {x.device}")
    return x.shape[0], N


def high_args(low: Segment, high: Segment | None) -> tuple[list, dict]:
    """Runtime args and constexprs of the high segment (a zero-K copy of low when absent)."""
    if high is None:
        return low.args()[:3] + [0] + low.args()[4:], low.constexprs("H_")
    return high.args(), high.constexprs("H_")
