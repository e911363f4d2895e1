"""Sizes in bytes from settings such as ``"512MiB"`` or ``"2GB"`` (torch-free)."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["parse_size"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def parse_size(value: Any, what: str = "logits memory") -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"2GB"``, ``"1e9"``."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a size such as 512MiB or 2GB, got {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{what} must be a size such as 512MiB or 2GB, got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1 << 20:
        raise ValueError(f"{what} must be at least 1MiB, got {value!r}")
    return n
