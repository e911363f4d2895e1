"""Bit-plane packing of unsigned codes into int32 words (the layout formats.py counts).

Layout of one row of ``n`` codes of ``bits`` bits (``1 <= bits <= 8``):

* The code width is split into planes ``bit_planes(bits)``, widest first (3 -> (2, 1),
  5 -> (4, 1), 6 -> (4, 2)). Planes are stored one after the other along dim 1, widest
  first: plane p occupies words ``[start_p, start_p + plane_words(n, w_p))`` of the row.
* **Plane p carries the next most significant bits**: its ``shift`` is the sum of the
  widths of the planes after it, and it holds ``(code >> shift) & (2**w - 1)``. So the
  widest plane holds the top bits. Examples: 3-bit = 2-bit plane ``(code >> 1) & 3`` then
  1-bit plane ``code & 1``; 6-bit = 4-bit plane ``code >> 2`` then 2-bit plane ``code & 3``.
  A code is rebuilt as ``sum(plane_value_p << shift_p)``.
* Inside a plane of width ``w`` there are ``per = 32 // w`` codes per word; code ``j``
  goes to word ``j // per`` at bit offset ``(j % per) * w``, little-endian inside the
  word (code 0 in the lowest bits). Each plane of a row is padded with zero codes to a
  whole word.
* Words are stored as int32 with two's-complement wrap: a word whose bit 31 is set is
  negative. Unpack with a *logical* shift or mask after an arithmetic one
  (``(word >> off) & mask`` is right for any ``off``, since the mask drops the sign
  extension).

:func:`plane_layout` gives (width, shift, word_start, n_words) per plane for kernels.
"""

from __future__ import annotations

import torch

from .formats import bit_planes, packed_words, plane_words

__all__ = ["pack_codes", "unpack_codes", "plane_layout"]

WORD_BITS = 32


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")


def plane_layout(n: int, bits: int) -> tuple[tuple[int, int, int, int], ...]:
    """Per plane, widest first: (width, shift, word_start, n_words) for a row of ``n`` codes."""
    _check_bits(bits)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    planes = bit_planes(bits)
    out, start = [], 0
    for p, w in enumerate(planes):
        shift = sum(planes[p + 1 :])  # the narrower planes after this one hold the lower bits
        nw = plane_words(n, w)
        out.append((w, shift, start, nw))
        start += nw
    return tuple(out)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> int32 with two's-complement wrap (explicit, not a cast UB)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (rows, n) in [0, 2**bits) into int32 words (rows, packed_words(n, bits))."""
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (rows, n), got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    rows, n = codes.shape
    c = codes.to(torch.int64)  # (rows, n)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(
            f"codes must be in [0, {2**bits}) for {bits}-bit packing, got range "
            f"[{int(c.min())}, {int(c.max())}]"
        )
    parts = []
    for w, shift, _, nw in plane_layout(n, bits):
        per = WORD_BITS // w
        plane = (c >> shift) & ((1 << w) - 1)  # (rows, n)
        plane = torch.nn.functional.pad(plane, (0, nw * per - n))  # (rows, nw*per), zero codes
        offsets = torch.arange(per, device=c.device, dtype=torch.int64) * w  # (per,)
        # fields are disjoint, so the sum is the bitwise OR of the shifted codes
        words = (plane.view(rows, nw, per) << offsets).sum(dim=-1)  # (rows, nw)
        parts.append(words)
    out = torch.cat(parts, dim=1) if parts else c.new_zeros(rows, 0)
    assert out.shape == (rows, packed_words(n, bits)), (out.shape, rows, n, bits)
    return _to_int32(out)


def unpack_codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_codes`: int32 words (rows, packed_words(n, bits)) -> uint8 codes (rows, n)."""
    _check_bits(bits)
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int32 or words.dim() != 2:
        got = f"{words.dtype} {tuple(words.shape)}" if isinstance(words, torch.Tensor) else type(words).__name__
        raise ValueError(f"words must be a 2-D int32 tensor, got {got}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rows = words.shape[0]
    if words.shape[1] != packed_words(n, bits):
        raise ValueError(
            f"{n} codes of {bits} bits need {packed_words(n, bits)} words per row, got {words.shape[1]}"
        )
    u = words.to(torch.int64) & 0xFFFFFFFF  # (rows, W) unsigned view of the words
    codes = torch.zeros(rows, n, dtype=torch.int64, device=words.device)
    for w, shift, start, nw in plane_layout(n, bits):
        per = WORD_BITS // w
        offsets = torch.arange(per, device=words.device, dtype=torch.int64) * w  # (per,)
        plane = (u[:, start : start + nw, None] >> offsets) & ((1 << w) - 1)  # (rows, nw, per)
        codes |= plane.reshape(rows, nw * per)[:, :n] << shift
    return codes.to(torch.uint8)
