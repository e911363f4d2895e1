"""Memory budgets: parsing and conversion to an exact capacity in bits.

Three kinds of budget, all checked against exact storage (codes, scales, zero-points,
channel indices, padding), never against nominal bit-widths:

* ``3.5bpw``: average bits per weight over the quantized layers, metadata included:
  capacity = floor(3.5 · number of weights in the quantized layers) bits.
* ``layers:100MB``: bytes of the quantized layers only.
* ``120MB`` (same as ``total:120MB``): bytes of the whole model: the quantized layers plus
  every other parameter (embeddings, norms, excluded layers) stored in 16-bit.

Units: ``B``; decimal ``kB``/``KB``, ``MB``, ``GB`` (10³, 10⁶, 10⁹ bytes); binary ``KiB``,
``MiB``, ``GiB`` (2¹⁰, 2²⁰, 2³⁰ bytes). ``MB`` is never 2²⁰.
"""

from __future__ import annotations
from .. import BitallocError

import math
import re
from dataclasses import dataclass

__all__ = ["Budget", "BudgetError", "parse_budget", "UNITS"]

UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
SCOPES = ("total", "layers")


class BudgetError(BitallocError, ValueError):
    """A budget string or value is malformed; the message names it."""


@dataclass(frozen=True)
class Budget:
    kind: str  # "bpw" | "bytes"
    value: float  # bits per weight, or bytes
    scope: str = "layers"  # "layers" (quantized layers only) | "total" (whole model)
    text: str = ""  # as the user wrote it

    def __post_init__(self) -> None:
        if self.kind not in ("bpw", "bytes"):
            raise BudgetError(f"budget kind must be 'bpw' or 'bytes', got {self.kind!r}")
        if self.scope not in SCOPES:
            raise BudgetError(f"budget scope must be one of {SCOPES}, got {self.scope!r}")
        if self.kind == "bpw" and self.scope != "layers":
            raise BudgetError("a bits-per-weight budget is over the quantized layers only")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
            raise BudgetError(f"budget value must be a positive number, got {self.value!r}")

    @property
    def name(self) -> str:
        if self.text:
            return self.text
        if self.kind == "bpw":
            return f"{self.value:g}bpw"
        return f"{self.scope}:{int(self.value)}B"

    def __str__(self) -> str:
        return self.name

    def capacity_bits(self, n_weights: int, other_bits: int) -> int:
        """Exact capacity in bits for the quantized layers.

        n_weights: weights in the quantized layers; other_bits: bits of everything else in
        the model (counted only for a ``total`` budget). May be negative for an absurd
        total budget; the solver then reports the achievable range.
        """
        if self.kind == "bpw":
            return math.floor(self.value * n_weights)
        bits = math.floor(self.value * 8)
        return bits - other_bits if self.scope == "total" else bits

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "scope": self.scope, "text": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> "Budget":
        return cls(d["kind"], d["value"], d.get("scope", "layers"), d.get("text", ""))


_NUM = r"(?P<num>[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)"
_BPW_RE = re.compile(rf"^{_NUM}\s*bpw$", re.I)
_BYTES_RE = re.compile(rf"^(?:(?P<scope>total|layers):)?\s*{_NUM}\s*(?P<unit>[kmg]i?b|b)$", re.I)


def parse_budget(text: str | float | Budget) -> Budget:
    """Parse ``3.5bpw``, ``3.5`` (bpw), ``120MB``, ``0.12GiB``, ``layers:90MB``, ``total:120MB``."""
    if isinstance(text, Budget):
        return text
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return Budget("bpw", float(text), "layers", f"{text:g}bpw")
    if not isinstance(text, str):
        raise BudgetError(f"malformed budget {text!r}: expected a string such as 3.5bpw or 120MB")
    s = text.strip().replace(" ", "")
    try:
        if m := _BPW_RE.match(s):
            return Budget("bpw", float(m["num"]), "layers", s)
        if m := _BYTES_RE.match(s):
            unit = UNITS[m["unit"].lower()]
            return Budget("bytes", float(m["num"]) * unit, (m["scope"] or "total").lower(), s)
        if re.fullmatch(_NUM, s):
            return Budget("bpw", float(s), "layers", f"{s}bpw")
    except BudgetError as e:
        raise BudgetError(f"malformed budget {text!r}: {e}") from None
    raise BudgetError(
        f"malformed budget {text!r}: expected <x>bpw (e.g. 3.5bpw) or [total:|layers:]<x><unit> "
        f"with unit in B, kB, MB, GB (10^3) or KiB, MiB, GiB (2^10), e.g. 120MB, layers:0.08GiB"
    )
