"""Numeric formats and schemes, with exact storage accounting.

A :class:`Format` says how one weight tensor is stored; a :class:`Scheme` is a candidate
for one layer (weight format, activation format, optional high-impact channel split).
Both have stable string names (``w4g128z``, ``w3g64z+h4r0.05``, ``w8a8``, ``fp16``) used
in plans, profiles, the CLI and the HTTP service.

Storage layout (the numbers :meth:`Format.storage_bits` counts, bit for bit):

* **Codes** are unsigned integers of ``bits`` width, packed along the *input* dimension
  into 32-bit words, one row of the weight (one output channel) after another. A width
  that is not a power of two is split into bit planes of widths 8/4/2/1 (binary
  decomposition: 3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1). Each plane packs ``32 // w``
  codes per word, so 3-bit codes cost exactly 3 bits each (no wasted bits inside a word)
  and every plane can be unpacked with shifts and masks only. A row is padded to whole
  words per plane; those padding bits are counted.
* **Scales** are float16, one per (output channel, group). Groups run along the input
  dimension; a last group narrower than ``group_size`` (e.g. 576 = 4·128 + 64) is a group
  of its own with its own scale. ``group_size=None`` means one group per output channel.
* **Zero-points** (asymmetric integer formats only) are unsigned integers of the same
  width as the codes, one per (output channel, group), packed along the group axis with
  the same plane layout as the codes. There is no float-minimum format: SmolLM2's
  shipped weights are GGUF Q4_1 (blocks of 32, float scale and float minimum), which such
  a format would reproduce exactly and so look lossless.
* **fp8 e4m3 / fp4 e2m1** codes are the raw 8/4-bit encodings, with a float16 scale per
  group (symmetric, no zero-point).
* **fp16** ("keep 16-bit") stores the weight as float16: 16 bits per weight, nothing else.
* **ggml types** (llama.cpp's own, named as llama.cpp names them in lowercase: ``q4_k``,
  ``q5_0``, ``iq4_nl``, ``q8_0``, ``f16``, ...; see :data:`GGML_TYPES`) are stored exactly
  as ggml stores them: ``rows × ggml_row_size(type, in_features)`` bytes, a row being
  ``in_features / block`` blocks of ``block_bytes`` (Q4_K: 144 bytes per 256 weights =
  4.5 bpw). A type whose block does not divide ``in_features`` does not fit the tensor
  (llama.cpp's rule: K-quants and most IQ types need ``in_features % 256 == 0``), and its
  storage is a :class:`FormatError`. They are quantized by ggml's own C quantizer
  (``sensitivity.ggml``), never by this package.
"""

from __future__ import annotations
from .. import BitallocError

import math
import re
from dataclasses import dataclass

__all__ = [
    "Format",
    "Scheme",
    "FormatError",
    "FP16",
    "parse_format",
    "parse_scheme",
    "bit_planes",
    "plane_words",
    "packed_words",
    "INT_BITS",
    "GROUP_SIZES",
    "ACTIVATIONS",
    "DEFAULT_RATIOS",
    "split_family",
    "split_families",
    "GGML_TYPES",
    "GGML_IMATRIX_ONLY",
    "is_ggml",
    "ggml_fits",
]

INT_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128, 256)
KINDS = ("int", "fp8_e4m3", "fp4_e2m1", "fp16")
ACTIVATIONS = ("a16", "a8", "af8")  # 16-bit; int8 per token; fp8 e4m3 per token
SCALE_BITS = 16  # float16 scales
WORD_BITS = 32


class FormatError(BitallocError, ValueError):
    """A format or scheme name or field is not valid; the message names it."""


# ggml (llama.cpp) types: name -> (ggml type id, weights per block, bytes per block, nominal
# bits). Checked against the bundled libggml's ggml_blck_size / ggml_type_size by
# sensitivity.ggml at import; q4_1 is SmolLM2's shipped storage (reproduces it exactly).
GGML_TYPES: dict[str, tuple[int, int, int, int]] = {
    "f32": (0, 1, 4, 32), "f16": (1, 1, 2, 16), "bf16": (30, 1, 2, 16),
    "q4_0": (2, 32, 18, 4), "q4_1": (3, 32, 20, 4), "q5_0": (6, 32, 22, 5), "q5_1": (7, 32, 24, 5),
    "q8_0": (8, 32, 34, 8), "iq4_nl": (20, 32, 18, 4),
    "q2_k": (10, 256, 84, 2), "q3_k": (11, 256, 110, 3), "q4_k": (12, 256, 144, 4), "q5_k": (13, 256, 176, 5),
    "q6_k": (14, 256, 210, 6), "iq4_xs": (23, 256, 136, 4),
    "iq2_xxs": (16, 256, 66, 2), "iq2_xs": (17, 256, 74, 2), "iq2_s": (22, 256, 82, 2),
    "iq3_xxs": (18, 256, 98, 3), "iq3_s": (21, 256, 110, 3),
}
# offered only with an importance matrix (llama.cpp refuses iq2_* without one; iq3_* are
# poor without one, so bitalloc asks for one too)
GGML_IMATRIX_ONLY = frozenset({"iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s"})


def is_ggml(x) -> bool:
    """Whether a format / scheme / name is a ggml type."""
    if isinstance(x, Scheme):
        x = x.weight
    if isinstance(x, Format):
        x = x.kind
    return isinstance(x, str) and x in GGML_TYPES


def ggml_fits(name: str, in_features: int) -> bool:
    """Whether ggml type ``name`` can store rows of ``in_features`` (its block divides them)."""
    return in_features > 0 and in_features % GGML_TYPES[name][1] == 0


def bit_planes(bits: int) -> tuple[int, ...]:
    """Plane widths used to store ``bits``-wide codes, widest first (3 -> (2, 1))."""
    planes = []
    for w in (8, 4, 2, 1):
        if bits >= w:
            planes.append(w)
            bits -= w
    return tuple(planes)


def plane_words(n: int, width: int) -> int:
    """32-bit words holding ``n`` codes of one plane of ``width`` bits."""
    return math.ceil(n / (WORD_BITS // width))


def packed_words(n: int, bits: int) -> int:
    """32-bit words holding ``n`` codes of ``bits`` bits in the bit-plane layout."""
    return sum(plane_words(n, w) for w in bit_planes(bits))


@dataclass(frozen=True)
class Format:
    """How one weight tensor of shape (out_features, in_features) is stored."""

    kind: str = "int"
    bits: int = 4
    group_size: int | None = 128  # None: one group per output channel
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.kind in GGML_TYPES:
            if self.bits != GGML_TYPES[self.kind][3] or self.group_size is not None or not self.symmetric:
                raise FormatError(f"ggml type {self.kind} has {GGML_TYPES[self.kind][3]} nominal bits, no group_size "
                                  "(its block is fixed) and no symmetric flag")
            return
        if self.kind not in KINDS:
            raise FormatError(f"format kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "int" and self.bits not in INT_BITS:
            raise FormatError(f"integer bits must be one of {INT_BITS}, got {self.bits}")
        expected = {"fp8_e4m3": 8, "fp4_e2m1": 4, "fp16": 16}
        if self.kind in expected and self.bits != expected[self.kind]:
            raise FormatError(f"{self.kind} has {expected[self.kind]} bits, got {self.bits}")
        if self.kind == "fp16":
            if self.group_size is not None:
                raise FormatError("fp16 has no group_size")
        elif self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise FormatError(
                f"group_size must be one of {GROUP_SIZES} or None (per channel), got {self.group_size}"
            )
        if self.kind != "int" and not self.symmetric:
            raise FormatError(f"{self.kind} is symmetric only (no zero-point)")

    # -- names -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        if self.kind == "fp16" or self.kind in GGML_TYPES:
            return self.kind
        g = "" if self.group_size is None else f"g{self.group_size}"
        if self.kind == "int":
            return f"w{self.bits}{g}{'' if self.symmetric else 'z'}"
        return f"fp{self.bits}{g}"

    def __str__(self) -> str:
        return self.name

    # -- storage -----------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return self.kind not in ("fp16", "f32", "f16", "bf16")

    @property
    def has_zero(self) -> bool:
        return self.kind == "int" and not self.symmetric

    def n_groups(self, in_features: int) -> int:
        """Groups per output channel; a narrower last group counts as a whole group."""
        if self.group_size is None:
            return 1
        return math.ceil(in_features / self.group_size)

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact bits to store a (out_features, in_features) weight in this format.

        Codes (with the padding of each row to whole 32-bit words per bit plane), float16
        scales, packed zero-points: the number the packed tensors occupy, byte for byte.
        """
        if out_features < 0 or in_features < 0:
            raise FormatError(f"shape must be non-negative, got ({out_features}, {in_features})")
        if in_features == 0 or out_features == 0:
            return 0
        if self.kind in GGML_TYPES:
            _, block, nbytes, _ = GGML_TYPES[self.kind]
            if in_features % block:
                rule = " (llama.cpp's rule for K-quants and IQ types)" if block == 256 else ""
                raise FormatError(f"ggml type {self.kind} needs in_features divisible by {block}{rule}; "
                                  f"this tensor has {in_features}")
            return out_features * (in_features // block) * nbytes * 8
        if self.kind == "fp16":
            return out_features * in_features * 16
        codes = out_features * packed_words(in_features, self.bits) * WORD_BITS
        groups = self.n_groups(in_features)
        scales = out_features * groups * SCALE_BITS
        zeros = out_features * packed_words(groups, self.bits) * WORD_BITS if self.has_zero else 0
        return codes + scales + zeros

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.storage_bits(out_features, in_features) / (out_features * in_features)


FP16 = Format(kind="fp16", bits=16, group_size=None, symmetric=True)

_FORMAT_RE = re.compile(
    r"^(?:w(?P<bits>\d+)(?:g(?P<g>\d+))?(?P<z>z)?|fp(?P<fbits>[48])(?:g(?P<fg>\d+))?|(?P<fp16>fp16))$"
)


def parse_format(name: str) -> Format:
    """Parse a weight format name: ``w4g128`` (sym), ``w3g64z`` (asym), ``w8``, ``fp8g128``, ``fp4g32``, ``fp16``."""
    if isinstance(name, str) and name.strip().lower() in GGML_TYPES:
        k = name.strip().lower()
        return Format(k, GGML_TYPES[k][3], None, True)
    m = _FORMAT_RE.match(name.strip()) if isinstance(name, str) else None
    if not m:
        raise FormatError(
            f"unknown format {name!r}: expected w<bits>[g<group>][z] (bits {INT_BITS}, "
            f"groups {GROUP_SIZES}), fp8[g<group>], fp4[g<group>], fp16, or a ggml type ({', '.join(GGML_TYPES)})"
        )
    if m["fp16"]:
        return FP16
    if m["fbits"]:
        kind = "fp8_e4m3" if m["fbits"] == "8" else "fp4_e2m1"
        return Format(kind, int(m["fbits"]), int(m["fg"]) if m["fg"] else None, True)
    return Format("int", int(m["bits"]), int(m["g"]) if m["g"] else None, m["z"] is None)


def n_high_channels(in_features: int, ratio: float) -> int:
    """Input channels kept in the high-precision part for a split ratio (at least one if r > 0)."""
    if ratio <= 0:
        return 0
    return min(in_features, max(1, round(ratio * in_features)))


def index_bits(in_features: int) -> int:
    """Bits per stored channel index: int16 while indices fit, else int32."""
    return 16 if in_features <= 32768 else 32


@dataclass(frozen=True)
class Scheme:
    """A candidate for one layer: weight format, activation format, optional high-impact split.

    With a split, ``ratio`` of the input channels (chosen by saliency) are stored in
    ``high``; the others in ``weight``; the chosen channel indices are stored too.
    """

    weight: Format
    act: str = "a16"
    high: Format | None = None
    ratio: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.weight, Format):
            raise FormatError(f"weight must be a Format, got {type(self.weight).__name__}")
        if self.act not in ACTIVATIONS:
            raise FormatError(f"activation must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.act != "a16" and not self.weight.is_quantized:
            raise FormatError("activation quantization needs a quantized weight format")
        if (self.high is None) != (self.ratio == 0):
            raise FormatError("a split needs both a high format and a ratio in (0, 1)")
        if self.weight.kind in GGML_TYPES and (self.act != "a16" or self.high is not None):
            raise FormatError(f"ggml type {self.weight.kind} is a whole-tensor format: no activation format or split")
        if self.high is not None:
            if not 0 < self.ratio < 1:
                raise FormatError(f"split ratio must be in (0, 1), got {self.ratio}")
            if not self.weight.is_quantized:
                raise FormatError("fp16 layers have no high-impact split")

    @property
    def name(self) -> str:
        s = self.weight.name
        if self.act != "a16":
            s += self.act
        if self.high is not None:
            s += f"+h{_high_spec(self.high, self.weight)}r{_fmt_ratio(self.ratio)}"
        return s

    def __str__(self) -> str:
        return self.name

    @property
    def is_quantized(self) -> bool:
        return self.weight.is_quantized

    def n_high(self, in_features: int) -> int:
        return n_high_channels(in_features, self.ratio) if self.high is not None else 0

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact bits: low part + high part + channel indices."""
        k = self.n_high(in_features)
        if k == 0:
            return self.weight.storage_bits(out_features, in_features)
        assert self.high is not None
        return (
            self.weight.storage_bits(out_features, in_features - k)
            + self.high.storage_bits(out_features, k)
            + k * index_bits(in_features)
        )

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.storage_bits(out_features, in_features) / (out_features * in_features)


def _high_spec(high: Format, low: Format) -> str:
    """The high part in a scheme name: its bits, then its grouping (``g<N>``, or ``c`` per
    channel) and symmetry (``s`` / ``z``) only where they differ from the low part's."""
    if high.kind == "fp16":
        return "16"
    spec = str(high.bits)
    if high.group_size != low.group_size:
        spec += "c" if high.group_size is None else f"g{high.group_size}"
    if high.symmetric != low.symmetric:
        spec += "s" if high.symmetric else "z"
    return spec


def _fmt_ratio(r: float) -> str:
    return f"{r:.4f}".rstrip("0").rstrip(".") if r else "0"


_SCHEME_RE = re.compile(
    r"^(?P<w>[a-z0-9]+?)(?P<act>a8|af8|a16)?"
    r"(?:\+h(?P<hb>\d+)(?:g(?P<hg>\d+)|(?P<hc>c))?(?P<hs>[sz])?r(?P<r>[0-9.]+))?$")


def parse_scheme(name: str) -> Scheme:
    """Parse a scheme name such as ``w4g128``, ``w8a8``, ``w4g128af8``, ``w2g64z+h4r0.05``, ``fp16``.

    The high part of a split (``+h<bits>[g<group>|c][s|z]r<ratio>``) is an integer format
    of ``bits`` with the low part's group size and symmetry unless given: ``g<group>`` or
    ``c`` (one scale per output channel), ``s`` (symmetric) or ``z`` (zero-points). So
    ``w2g64z+h3r0.05`` keeps 5 % of the channels in ``w3g64z``, ``w2g64z+h3csr0.05`` in
    ``w3`` (per-channel, symmetric: no per-group scales for a few channels). ``h16`` keeps
    those channels in fp16.
    """
    if not isinstance(name, str) or not name.strip():
        raise FormatError(f"unknown scheme {name!r}: empty name")
    if name.strip().lower() in GGML_TYPES:
        return Scheme(parse_format(name))
    m = _SCHEME_RE.match(name.strip())
    if not m:
        raise FormatError(f"unknown scheme {name!r}: expected <format>[a8|af8][+h<bits>[g<group>|c][s|z]r<ratio>]")
    try:
        weight = parse_format(m["w"])
    except FormatError as e:
        raise FormatError(f"unknown scheme {name!r}: {e}") from None
    act = m["act"] or "a16"
    if m["hb"] is None:
        return Scheme(weight, act)
    hb = int(m["hb"])
    try:
        ratio = float(m["r"])
    except ValueError:
        raise FormatError(f"unknown scheme {name!r}: bad ratio {m['r']!r}") from None
    if hb == 16:
        if m["hg"] or m["hc"] or m["hs"]:
            raise FormatError(f"unknown scheme {name!r}: an fp16 high part (h16) has no group size or zero-point")
        high = FP16
    else:
        if weight.kind != "int":
            raise FormatError(f"unknown scheme {name!r}: a split needs an integer low part")
        group = None if m["hc"] else (int(m["hg"]) if m["hg"] else weight.group_size)
        symmetric = weight.symmetric if not m["hs"] else m["hs"] == "s"
        try:
            high = Format("int", hb, group, symmetric)
        except FormatError as e:
            raise FormatError(f"unknown scheme {name!r}: high part: {e}") from None
    return Scheme(weight, act, high, ratio)


DEFAULT_RATIOS = (0.0, 0.02, 0.05, 0.10, 0.15, 0.20)


def split_family(low: str | Format = "w2g64z", high_bits: int | None = None,
                 ratios=DEFAULT_RATIOS, high: str | Format | None = None) -> list[Scheme]:
    """The high-impact split schemes for one low format: one scheme per ratio.

    ``low`` is the low part's format (name or :class:`Format`, an integer format);
    ``high_bits`` the high part's width (default ``low.bits + 1``: 3 bits over a 2-bit
    low part, 4 over 3-bit, as in Pham et al. 2025; 16 keeps those channels in fp16);
    the high part shares the low part's group size and symmetry (what ``parse_scheme``
    reads from ``w2g64z+h3r0.05``) unless ``high`` names its whole format (``"w3"``:
    per-channel symmetric, ``w2g64z+h3csr0.05``; it overrides ``high_bits``). Ratio 0 gives
    the plain low scheme. Ratios must be distinct and in [0, 1); the result is in the
    order given.

    >>> [s.name for s in split_family("w2g64z", ratios=(0, 0.05))]
    ['w2g64z', 'w2g64z+h3r0.05']
    >>> split_family("w2g64z", ratios=(0.05,), high="w3")[0].name
    'w2g64z+h3csr0.05'
    """
    fmt = parse_format(low) if isinstance(low, str) else low
    if not isinstance(fmt, Format) or fmt.kind != "int":
        raise FormatError(f"split_family: the low part must be an integer format, got {low!r}")
    if high is not None:
        hfmt = parse_format(high) if isinstance(high, str) else high
        if not isinstance(hfmt, Format) or hfmt.kind not in ("int", "fp16"):
            raise FormatError(f"split_family: the high part must be an integer format or fp16, got {high!r}")
        hb = hfmt.bits
    else:
        hb = fmt.bits + 1 if high_bits is None else int(high_bits)
    if hb != 16 and hb <= fmt.bits:
        raise FormatError(f"split_family: high_bits ({hb}) must exceed the low part's {fmt.bits} bits (or be 16)")
    if high is None:
        hfmt = FP16 if hb == 16 else Format("int", hb, fmt.group_size, fmt.symmetric)
    high = hfmt
    rs = [float(r) for r in ratios]
    if len(set(rs)) != len(rs):
        raise FormatError(f"split_family: ratios contain duplicates: {rs}")
    out = []
    for r in rs:
        if not 0 <= r < 1:
            raise FormatError(f"split_family: ratio must be in [0, 1), got {r}")
        out.append(Scheme(fmt) if r == 0 else Scheme(fmt, "a16", high, r))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise FormatError(f"split_family: ratios {rs} give duplicate scheme names {names} (4 decimals are kept)")
    return out


def split_families(lows=("w2g64z", "w3g64z"), high_bits=None, ratios=DEFAULT_RATIOS, highs=None) -> list[Scheme]:
    """:func:`split_family` for several low formats, concatenated (``high_bits``: one value
    for all, a sequence per low format, or None for low bits + 1; ``highs``: None, or one
    high-part format per low format, None entries inheriting as ``high_bits`` says)."""
    if high_bits is None or isinstance(high_bits, int):
        high_bits = [high_bits] * len(lows)
    if len(high_bits) != len(lows):
        raise FormatError(f"split_families: {len(high_bits)} high_bits for {len(lows)} low formats")
    highs = [None] * len(lows) if highs is None else list(highs)
    if len(highs) != len(lows):
        raise FormatError(f"split_families: {len(highs)} high formats for {len(lows)} low formats")
    out: list[Scheme] = []
    for lo, hb, hf in zip(lows, high_bits, highs):
        out += split_family(lo, hb, ratios, high=hf)
    return out
