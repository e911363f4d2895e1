"""Round-to-nearest quantization in torch: the reference semantics the Triton kernels must match.

Every format quantizes a weight (out, in) group by group along the input dimension:

* **int, symmetric** (``w4g128``): ``scale = absmax / (2**(b-1) - 1)``,
  ``q = clamp(round(w / scale), -2**(b-1), 2**(b-1) - 1)``, stored code ``q + 2**(b-1)``,
  ``w_hat = (code - 2**(b-1)) * scale``.
* **int, asymmetric** (``w3g64z``): with ``min <= 0 <= max`` enforced over the group,
  ``scale = (max - min) / (2**b - 1)``, ``zero = clamp(round(-min / scale), 0, 2**b - 1)``,
  ``code = clamp(round(w / scale) + zero, 0, 2**b - 1)``, ``w_hat = (code - zero) * scale``.
* **fp8 e4m3** (``fp8g128``): ``scale = absmax / 448``, code = the e4m3 bit pattern of
  ``w / scale`` (round to nearest even), ``w_hat = e4m3(code) * scale``.
* **fp4 e2m1** (``fp4g32``): magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, ``scale = absmax / 6``,
  code = sign (bit 3) | magnitude index (bits 0..2), nearest magnitude, ties to the even
  index (as IEEE / OCP conversions do).
* **fp16**: the weight itself as float16.

**Clip search** (integer widths below 8 and fp4): the formulas above use the group's full
range; each group instead tries that range shrunk by every factor in :data:`CLIP_GRID`
(1.0 … 0.6) and keeps the one with the least squared rounding error (outliers clipped,
the bulk rounded more finely; on SmolLM2's weights the squared error falls to about 0.6×
of plain min-max for ``w2g64z``, 0.75× for ``w3g128z``, 0.5× for ``w3g128``, 0.87× for
``w4g128z``). The stored scale/zero are whatever was chosen, so the kernels and
``dequantize`` are unaffected. ``group_params(..., clip_search=False)`` is plain min-max.

Scales are rounded to float16 *before* quantizing and codes are computed with the stored
scale, so ``dequantize(quantize(w))`` is exactly what the packed model computes. Scales are
clamped to [2**-24, 65504] (the positive float16 range): an all-zero group gets the tiny
scale and dequantizes to exact zeros, never NaN. Dequantization ``(code - zero) * scale``
is exact in float32 (an 8-bit integer times an 11-bit mantissa), so any kernel that
dequantizes in float32 gets bit-identical weights.

A partial last group (576 = 4·128 + 64) has its own scale over its real columns: the
padding is zeros, which cannot change absmax, and min/max are clamped to include 0 anyway.

Split schemes (``w3g64z+h8r0.05``) store the ``k`` most salient input channels in a second
format (:class:`QuantizedWeight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formats import Format, Scheme, index_bits, packed_words, parse_format, parse_scheme
from .param_memo import PARAMS, weight_digest
from .packing import pack_codes, unpack_codes

__all__ = [
    "QuantizedTensor",
    "QuantizedWeight",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_weight",
    "dequantize_weight",
    "fake_quantize_weight",
    "select_high_channels",
    "quantize_activation",
    "activation_codes",
    "expected_shapes",
    "FP4_E2M1_VALUES",
]

FP8_E4M3_MAX = 448.0
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of code index 0..7
FP16_MIN_SCALE = 2.0**-24  # smallest positive float16 (subnormal)
FP16_MAX = 65504.0


# ---------------------------------------------------------------------------------------
# core round-to-nearest on groups (shared by the packed and the fake-quant paths)


def check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"weight must be a 2-D tensor (out_features, in_features), got {got}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"weight must be floating point, got {w.dtype}")
    if w.numel():  # min and max are NaN if any entry is, ±inf if any is: one pass, no bool copy (12x isfinite)
        lo, hi = torch.aminmax(w)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise ValueError("weight has NaN or inf entries; cannot quantize")


def _group_size(fmt: Format, in_features: int) -> int:
    return in_features if fmt.group_size is None else fmt.group_size


def to_groups(w: torch.Tensor, fmt: Format) -> torch.Tensor:
    """(out, in) float32 -> (out, G, g) with the last group zero-padded."""
    out_f, in_f = w.shape
    g = _group_size(fmt, in_f)
    n_groups = fmt.n_groups(in_f)
    w = torch.nn.functional.pad(w, (0, n_groups * g - in_f))  # zeros: neutral for absmax/min/max
    return w.view(out_f, n_groups, g)


def _fp16_scale(raw: torch.Tensor) -> torch.Tensor:
    """Round a float32 scale to the stored float16 value (as float32), never 0 or inf."""
    return raw.clamp(FP16_MIN_SCALE, FP16_MAX).to(torch.float16).to(torch.float32)


def _fp4_index(mag: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 magnitude index for mag in [0, 6], ties to the even index.

    The grid is uniform on three ranges (step .5 below 2, 1 below 4, 2 up to 6), so the
    index is a round-half-even on each; the offsets 0/2/4 keep the parity, hence ties
    land on the even index (1.75 -> 2.0, 2.5 -> 2.0, 5 -> 4.0), like IEEE / OCP conversion.
    """
    idx = torch.where(mag < 2, torch.round(mag * 2), torch.where(mag < 4, torch.round(mag) + 2, torch.round(mag / 2) + 4))
    return idx.to(torch.int64)


# Clip search: the fraction of the min-max range tried for each group (1.0 = plain min-max).
# RTN with the full range wastes levels on rare outliers; shrinking the range clips them and
# rounds the bulk more finely. Each group keeps the candidate of least squared error.
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def _group_range(wg: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, ...]:
    """What the min-max parameters of ``wg`` (out, G, g) start from, each (out, G, 1): the
    clamped min and max for asymmetric integers, else the absolute max. Computed once per
    clip search (the candidates only scale it)."""
    if fmt.kind not in ("int", "fp8_e4m3", "fp4_e2m1"):
        raise ValueError(f"format {fmt.name} has no codes (kind {fmt.kind!r})")
    if fmt.kind == "int" and not fmt.symmetric:
        return wg.amin(dim=-1, keepdim=True).clamp(max=0), wg.amax(dim=-1, keepdim=True).clamp(min=0)
    return (wg.abs().amax(dim=-1, keepdim=True),)


def _minmax_params(rng: tuple[torch.Tensor, ...], fmt: Format, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale and zero-point of each group from its range ``rng`` (:func:`_group_range`),
    the range times ``shrink``.

    Returns (scale (out, G, 1) float32 holding the float16 value, zero (out, G, 1) int64 or
    None). Zero padding of a partial group changes neither (absmax, min <= 0 <= max).
    """
    if fmt.kind == "int":
        b = fmt.bits
        if fmt.symmetric:
            qmax = 2 ** (b - 1) - 1
            return _fp16_scale(shrink * rng[0] / qmax), None  # (out, G, 1)
        qmax = 2**b - 1
        lo = shrink * rng[0]  # (out, G, 1), min <= 0
        hi = shrink * rng[1]  # (out, G, 1), max >= 0
        scale = _fp16_scale((hi - lo) / qmax)
        zero = torch.round(-lo / scale).clamp(0, qmax)
        return scale, zero.to(torch.int64)
    if fmt.kind == "fp8_e4m3":
        return _fp16_scale(shrink * rng[0] / FP8_E4M3_MAX), None
    return _fp16_scale(shrink * rng[0] / FP4_E2M1_VALUES[-1]), None


def _rounding_error(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: Format) -> torch.Tensor:
    """Squared error per group (out, G, 1) of rounding wg (out, G, g) with scale / zero.

    Integer formats in float32 only (the same values as ``decode(encode(...))``: codes are
    small integers, exact in float32), about 5x faster than the int64 round trip."""
    if fmt.kind != "int":
        return (decode(encode(wg, scale, zero, fmt), scale, zero, fmt) - wg).pow_(2).sum(-1, keepdim=True)
    b = fmt.bits
    q = torch.div(wg, scale).round_()  # (out, G, g), in place after the division: one pass fewer
    if fmt.symmetric:
        q.clamp_(-(2 ** (b - 1)), 2 ** (b - 1) - 1)
    else:  # code = round + zero in [0, 2^b - 1], minus zero: the same small integers, two passes fewer
        zf = zero.to(torch.float32)  # (out, G, 1)
        q = torch.max(torch.min(q, (2**b - 1) - zf, out=q), -zf, out=q)
    return q.mul_(scale).sub_(wg).square_().sum(-1, keepdim=True)


def searches_clip(fmt: Format, clip_search: bool = True) -> bool:
    """Whether :func:`group_params` searches :data:`CLIP_GRID` for ``fmt`` (integers below 8 bits, fp4)."""
    return clip_search and (fmt.kind == "fp4_e2m1" or (fmt.kind == "int" and fmt.bits < 8))


def group_params(wg: torch.Tensor, fmt: Format, clip_search: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero-point of each group of wg (out, G, g) float32.

    Integer and fp4 formats search :data:`CLIP_GRID` per group for the range that gives the
    least squared rounding error (``clip_search=False``: plain min-max, the full range).
    fp8 keeps min-max (3 mantissa bits: clipping does not pay). The padding of a partial
    group is zeros, which every candidate represents exactly (error 0), so it never
    influences the choice. Returns (scale (out, G, 1) float32 holding the float16 value,
    zero (out, G, 1) int64 or None).
    """
    rng = _group_range(wg, fmt)
    scale, zero = _minmax_params(rng, fmt)
    if not searches_clip(fmt, clip_search):
        return scale, zero
    best = _rounding_error(wg, scale, zero, fmt)  # (out, G, 1)
    for shrink in CLIP_GRID[1:]:
        s, z = _minmax_params(rng, fmt, shrink)
        err = _rounding_error(wg, s, z, fmt)  # (out, G, 1)
        better = err < best
        scale = torch.where(better, s, scale)
        if zero is not None:
            zero = torch.where(better, z, zero)
        best = torch.where(better, err, best)
    return scale, zero


def encode(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: Format) -> torch.Tensor:
    """Nearest codes (int64, unsigned) of wg (out, G, g) float32 with given scale / zero (out, G, 1)."""
    if fmt.kind == "int":
        b = fmt.bits
        if fmt.symmetric:
            qmax = 2 ** (b - 1) - 1
            q = torch.round(wg / scale).clamp(-qmax - 1, qmax)
            return q.to(torch.int64) + 2 ** (b - 1)
        qmax = 2**b - 1
        code = (torch.round(wg / scale) + zero).clamp(0, qmax)
        return code.to(torch.int64)
    if fmt.kind == "fp8_e4m3":
        x = (wg / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        return x.view(torch.uint8).to(torch.int64)
    if fmt.kind == "fp4_e2m1":
        x = wg / scale
        idx = _fp4_index(x.abs().clamp(max=FP4_E2M1_VALUES[-1]))
        return idx | ((x < 0).to(torch.int64) << 3)
    raise ValueError(f"format {fmt.name} has no codes (kind {fmt.kind!r})")


def _rtn(wg: torch.Tensor, fmt: Format, clip_search: bool = True,
         key: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest on groups wg (out, G, g) float32 -> (codes (out, G, g) int64 unsigned,
    scale (out, G, 1) float32 holding the float16 value, zero (out, G, 1) int64 or None); with
    ``key`` (:func:`_params_key`) the clip search goes through :data:`~kernels.param_memo.PARAMS`."""
    found = PARAMS.get(key) if key is not None else None
    if found is None:
        found = group_params(wg, fmt, clip_search)
        if key is not None:
            PARAMS.put(key, *found)
    scale, zero = found
    return encode(wg, scale, zero, fmt), scale, zero


def _params_key(w: torch.Tensor, fmt: Format, clip_search: bool, start: int, stop: int) -> tuple | None:
    """The memo key of rows ``start:stop`` of ``w`` in ``fmt``; None when nothing is searched or kept."""
    digest = weight_digest(w) if searches_clip(fmt, clip_search) else None
    return None if digest is None else (digest, start, stop, fmt)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: Format) -> torch.Tensor:
    """Codes (out, G, g) int, scale (out, G, 1) float32 -> w_hat (out, G, g) float32 (exact)."""
    if fmt.kind == "int":
        offset = zero if zero is not None else 2 ** (fmt.bits - 1)
        return (codes.to(torch.int64) - offset).to(torch.float32) * scale
    if fmt.kind == "fp8_e4m3":
        return codes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32) * scale
    if fmt.kind == "fp4_e2m1":
        values = torch.tensor(FP4_E2M1_VALUES, device=codes.device)
        c = codes.to(torch.int64)
        sign = 1.0 - 2.0 * (c >> 3).to(torch.float32)  # bit 3 set -> -1
        return sign * values[c & 7] * scale
    raise ValueError(f"format {fmt.name} has no codes (kind {fmt.kind!r})")


# ---------------------------------------------------------------------------------------
# one tensor in one format


@dataclass
class QuantizedTensor:
    """One (out, in) weight stored in one :class:`Format`, packed as formats.py counts.

    * ``qweight``: int32 (out, packed_words(in, bits)), bit-plane packed codes (packing.py);
      for fp16 it is the float16 weight itself, (out, in).
    * ``scales``: float16 (out, n_groups); for fp16 an empty (out, 0) tensor.
    * ``qzeros``: int32 (out, packed_words(n_groups, bits)) for asymmetric int, else None.
    """

    fmt: Format
    shape: tuple[int, int]
    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        exp = expected_shapes(self.fmt, *self.shape)
        got = {"qweight": self.qweight, "scales": self.scales, "qzeros": self.qzeros}
        for name, (shape, dtype) in exp.items():
            t = got[name]
            if shape is None:
                assert t is None, f"{self.fmt.name}: {name} must be None"
                continue
            assert t is not None, f"{self.fmt.name}: {name} is missing"
            assert tuple(t.shape) == shape and t.dtype == dtype, (
                f"{self.fmt.name} {self.shape}: {name} must be {dtype} {shape}, got {t.dtype} {tuple(t.shape)}"
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (qzeros only when present)."""
        d = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            d["qzeros"] = self.qzeros
        return d

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> QuantizedTensor:
        qz = None if self.qzeros is None else self.qzeros.to(device)
        return QuantizedTensor(self.fmt, self.shape, self.qweight.to(device), self.scales.to(device), qz)


def expected_shapes(fmt: Format, out_f: int, in_f: int) -> dict[str, tuple[tuple[int, int] | None, torch.dtype]]:
    """Shape and dtype of each stored tensor of a (out_f, in_f) weight in ``fmt``."""
    if fmt.kind == "fp16":
        return {
            "qweight": ((out_f, in_f), torch.float16),
            "scales": ((out_f, 0), torch.float16),
            "qzeros": (None, torch.int32),
        }
    n_groups = fmt.n_groups(in_f) if in_f > 0 else 0
    return {
        "qweight": ((out_f, packed_words(in_f, fmt.bits)), torch.int32),
        "scales": ((out_f, n_groups), torch.float16),
        "qzeros": ((out_f, packed_words(n_groups, fmt.bits)) if fmt.has_zero else None, torch.int32),
    }


def as_format(fmt: Format | str) -> Format:
    return parse_format(fmt) if isinstance(fmt, str) else fmt


def as_scheme(scheme: Scheme | str) -> Scheme:
    return parse_scheme(scheme) if isinstance(scheme, str) else scheme


def quantize(w: torch.Tensor, fmt: Format | str, *, clip_search: bool = True) -> QuantizedTensor:
    """Round-to-nearest quantize a weight (out, in) into packed storage (``clip_search``: see module docstring)."""
    check_weight(w)
    fmt = as_format(fmt)
    out_f, in_f = w.shape
    no_scales = w.new_zeros(out_f, 0, dtype=torch.float16)  # (out, 0)
    if fmt.kind == "fp16":
        return QuantizedTensor(fmt, (out_f, in_f), w.detach().to(torch.float16, copy=True).contiguous(), no_scales)
    if in_f == 0:  # empty low part of a split that took every channel: zero bytes
        qz = w.new_zeros(out_f, 0, dtype=torch.int32) if fmt.has_zero else None
        return QuantizedTensor(fmt, (out_f, 0), w.new_zeros(out_f, 0, dtype=torch.int32), no_scales, qz)
    wg = to_groups(w.detach().to(torch.float32), fmt)  # (out, G, g)
    codes, scale, zero = _rtn(wg, fmt, clip_search, _params_key(w, fmt, clip_search, 0, out_f))
    codes = codes.reshape(out_f, -1)[:, :in_f]  # (out, in), padding dropped
    qweight = pack_codes(codes, fmt.bits)  # (out, packed_words(in, bits))
    scales = scale.squeeze(-1).to(torch.float16)  # (out, G), exact: scale holds fp16 values
    qzeros = pack_codes(zero.squeeze(-1), fmt.bits) if zero is not None else None  # (out, words)
    return QuantizedTensor(fmt, (out_f, in_f), qweight, scales, qzeros)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """Packed weight -> float32 (out, in), exactly what the kernels compute."""
    fmt, (out_f, in_f) = qt.fmt, qt.shape
    if fmt.kind == "fp16":
        return qt.qweight.to(torch.float32)
    if in_f == 0:
        return torch.zeros(out_f, 0, dtype=torch.float32, device=qt.qweight.device)
    g = _group_size(fmt, in_f)
    n_groups = fmt.n_groups(in_f)
    codes = unpack_codes(qt.qweight, fmt.bits, in_f)  # (out, in) uint8
    codes = torch.nn.functional.pad(codes, (0, n_groups * g - in_f)).view(out_f, n_groups, g)
    scale = qt.scales.to(torch.float32).unsqueeze(-1)  # (out, G, 1)
    zero = None
    if qt.qzeros is not None:
        zero = unpack_codes(qt.qzeros, fmt.bits, n_groups).to(torch.int64).unsqueeze(-1)  # (out, G, 1)
    w = decode(codes, scale, zero, fmt)  # (out, G, g)
    return w.reshape(out_f, -1)[:, :in_f].contiguous()


# fake_quantize works on row pieces of at most this many weights: its temporaries (int64
# codes, the clip search's candidates) are several times a piece, not several times the weight
# (a 256k-vocabulary head, a 5632-wide MLP). Rows are independent: the result is the same.
FAKE_QUANT_PIECE = 1 << 20


def fake_quantize(w: torch.Tensor, fmt: Format | str, *, clip_search: bool = True) -> torch.Tensor:
    """dequantize(quantize(w, fmt)) without packing, in w's dtype (the profiler's fast path)."""
    check_weight(w)
    fmt = as_format(fmt)
    out_f, in_f = w.shape
    if fmt.kind == "fp16":
        return w.detach().to(torch.float16, copy=True).to(w.dtype)  # never aliases w
    if in_f == 0:
        return w.detach().clone()
    rows = max(1, FAKE_QUANT_PIECE // in_f)
    if out_f > rows:  # piece by piece into one output (the digest is w's, taken once)
        out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        for i in range(0, out_f, rows):
            key = _params_key(w, fmt, clip_search, i, min(i + rows, out_f))
            out[i:i + rows] = _fake_quantize_rows(w[i:i + rows], fmt, clip_search, key)
        return out
    return _fake_quantize_rows(w, fmt, clip_search, _params_key(w, fmt, clip_search, 0, out_f))


def _fake_quantize_rows(w: torch.Tensor, fmt: Format, clip_search: bool, key: tuple | None = None) -> torch.Tensor:
    out_f, in_f = w.shape
    wg = to_groups(w.detach().to(torch.float32), fmt)  # (out, G, g)
    codes, scale, zero = _rtn(wg, fmt, clip_search, key)
    w_hat = decode(codes, scale, zero, fmt)  # (out, G, g) float32
    return w_hat.reshape(out_f, -1)[:, :in_f].to(w.dtype).contiguous()


# ---------------------------------------------------------------------------------------
# a layer's weight in a scheme (optionally split into low / high-impact channels)


@dataclass
class QuantizedWeight:
    """A layer's weight (out, in) in a :class:`Scheme`.

    ``low`` holds the (out, in - k) columns not selected (ascending column order);
    ``high`` the (out, k) selected columns in the order of ``high_idx`` (sorted ascending,
    int16 when in_features <= 32768 else int32, as formats.index_bits counts).
    """

    scheme: Scheme
    shape: tuple[int, int]
    low: QuantizedTensor
    high: QuantizedTensor | None = None
    high_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        out_f, in_f = self.shape
        k = self.scheme.n_high(in_f)
        assert self.low.fmt == self.scheme.weight, f"low format {self.low.fmt} != scheme weight {self.scheme.weight}"
        assert self.low.shape == (out_f, in_f - k), f"low shape {self.low.shape} != {(out_f, in_f - k)}"
        if k == 0:
            assert self.high is None and self.high_idx is None, f"{self.scheme.name} has no split"
            return
        assert self.high is not None and self.high_idx is not None, f"{self.scheme.name} needs high and high_idx"
        assert self.high.fmt == self.scheme.high and self.high.shape == (out_f, k), (self.high.fmt, self.high.shape)
        assert self.high_idx.shape == (k,) and self.high_idx.dtype == index_dtype(in_f), (
            f"high_idx must be {index_dtype(in_f)} ({k},), got {self.high_idx.dtype} {tuple(self.high_idx.shape)}"
        )

    @property
    def n_high(self) -> int:
        return 0 if self.high_idx is None else int(self.high_idx.numel())

    def low_idx(self) -> torch.Tensor:
        """Ascending int64 indices of the columns stored in ``low``."""
        in_f = self.shape[1]
        device = self.low.qweight.device
        if self.high_idx is None:
            return torch.arange(in_f, device=device)
        return complement_channels(self.high_idx.to(device=device, dtype=torch.int64), in_f)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Stored tensors by name: low part unprefixed, high part prefixed ``high_``."""
        d = dict(self.low.tensors())
        if self.high is not None:
            d.update({f"high_{k}": v for k, v in self.high.tensors().items()})
            d["high_idx"] = self.high_idx
        return d

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if index_bits(in_features) == 16 else torch.int32


def complement_channels(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Ascending indices in [0, n) not in idx (int64)."""
    keep = torch.ones(n, dtype=torch.bool, device=idx.device)
    keep[idx] = False
    return keep.nonzero().squeeze(1)


def select_high_channels(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """The k most salient input channels, sorted ascending (int64); ties go to the lower index.

    quantize_weight's default saliency is the column energy ``‖W[:, j]‖²``; the profiler
    passes Hessian-based saliency (e.g. ``diag(H) · ‖W[:, j]‖²``) instead.
    """
    if not isinstance(saliency, torch.Tensor) or saliency.dim() != 1:
        raise ValueError("saliency must be a 1-D tensor (in_features,)")
    if not 0 <= k <= saliency.numel():
        raise ValueError(f"k must be in [0, {saliency.numel()}], got {k}")
    if not bool(torch.isfinite(saliency).all()):
        raise ValueError("saliency has NaN or inf entries")
    order = torch.argsort(saliency.to(torch.float64), descending=True, stable=True)
    return order[:k].sort().values


def resolve_high_idx(w: torch.Tensor, scheme: Scheme, high_idx) -> torch.Tensor | None:
    """Validated, sorted int64 high-channel indices (None when the scheme has no split)."""
    in_f = w.shape[1]
    k = scheme.n_high(in_f)
    if k == 0:
        if high_idx is not None and len(high_idx) > 0:
            raise ValueError(f"scheme {scheme.name} has no high-impact split but high_idx was given")
        return None
    if high_idx is None:
        return select_high_channels(w.detach().to(torch.float32).pow(2).sum(0), k)
    idx = torch.as_tensor(high_idx).to(device=w.device, dtype=torch.int64).flatten().sort().values
    if idx.numel() != k:
        raise ValueError(f"scheme {scheme.name} on in_features={in_f} keeps {k} high channels, got {idx.numel()} indices")
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= in_f):
        raise ValueError(f"high_idx must be in [0, {in_f}), got range [{int(idx[0])}, {int(idx[-1])}]")
    if bool((idx[1:] == idx[:-1]).any()):
        raise ValueError("high_idx has duplicate channels")
    return idx


def quantize_weight(w: torch.Tensor, scheme: Scheme | str, high_idx=None) -> QuantizedWeight:
    """Quantize a layer weight (out, in) in ``scheme``; a split picks ``high_idx`` by column energy if not given."""
    check_weight(w)
    scheme = as_scheme(scheme)
    idx = resolve_high_idx(w, scheme, high_idx)
    if idx is None:
        return QuantizedWeight(scheme, tuple(w.shape), quantize(w, scheme.weight))
    low_idx = complement_channels(idx, w.shape[1])
    low = quantize(w[:, low_idx], scheme.weight)  # (out, in - k)
    high = quantize(w[:, idx], scheme.high)  # (out, k)
    return QuantizedWeight(scheme, tuple(w.shape), low, high, idx.to(index_dtype(w.shape[1])))


def dequantize_weight(qw: QuantizedWeight) -> torch.Tensor:
    """Float32 (out, in) weight of a QuantizedWeight, high channels scattered back in place."""
    low = dequantize(qw.low)  # (out, in - k)
    if qw.high is None:
        return low
    w = torch.empty(qw.shape, dtype=torch.float32, device=low.device)
    w[:, qw.low_idx()] = low
    w[:, qw.high_idx.to(device=low.device, dtype=torch.int64)] = dequantize(qw.high)
    return w


def fake_quantize_weight(w: torch.Tensor, scheme: Scheme | str, high_idx=None) -> torch.Tensor:
    """dequantize_weight(quantize_weight(w, scheme, high_idx)) without packing, in w's dtype."""
    check_weight(w)
    scheme = as_scheme(scheme)
    idx = resolve_high_idx(w, scheme, high_idx)
    if idx is None:
        return fake_quantize(w, scheme.weight)
    low_idx = complement_channels(idx, w.shape[1])
    out = torch.empty_like(w)
    out[:, low_idx] = fake_quantize(w[:, low_idx], scheme.weight)
    out[:, idx] = fake_quantize(w[:, idx], scheme.high)
    return out.detach()


# ---------------------------------------------------------------------------------------
# activations (reference semantics of the A8 schemes)


def activation_codes(x: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) codes and scales of the A8 schemes, the one implementation that
    :func:`quantize_activation` and the Triton A8 path share.

    ``a8``: symmetric int8, scale = absmax / 127 (float32, not rounded to fp16: kernels
    compute it on the fly); codes int8. ``af8``: fp8 e4m3, scale = absmax / 448; codes
    float8_e4m3fn. Returns (codes (..., K), scale (..., 1) float32); an all-zero token gets
    scale 1 (codes 0).
    """
    if act not in ("a8", "af8"):
        raise ValueError(f"activation must be one of ('a16', 'a8', 'af8'), got {act!r}")
    xf = x.to(torch.float32)
    absmax = xf.abs().amax(dim=-1, keepdim=True)  # (..., 1)
    qmax = 127.0 if act == "a8" else FP8_E4M3_MAX
    scale = absmax / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero (or underflowed) token
    if act == "a8":
        q = torch.round(xf / scale).clamp(-128, 127).to(torch.int8)
    else:
        q = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """Fake-quantize activations per token (per row of the last dim), returned in x's dtype.

    ``a16``: identity; ``a8`` / ``af8``: :func:`activation_codes` times their scale. An
    all-zero token stays zero.
    """
    if act == "a16":
        return x
    q, scale = activation_codes(x, act)
    return (q.to(torch.float32) * scale).to(x.dtype)


# the old private spellings (tests and code on other branches import some of them)
_as_format = as_format
_as_scheme = as_scheme
_check_weight = check_weight
_complement = complement_channels
_decode = decode
_encode = encode
_group_params = group_params
_index_dtype = index_dtype
_resolve_high_idx = resolve_high_idx
_to_groups = to_groups
