"""Which input channels a high-impact split keeps high, in numpy (no torch).

The twin of :func:`kernels.quant.select_high_channels` (torch), giving the same indices
for the same vector, ties included: the ``k`` highest saliencies, ties to the lower index,
returned ascending. Solving and planning read a profile's stored channels and fall back to
this rule on a profile's stored saliency (profiles saved before the channels were stored),
so neither needs torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .formats import Scheme, parse_scheme

__all__ = ["select_high_channels_np", "split_channels_np"]


def select_high_channels_np(saliency: Any, k: int) -> np.ndarray:
    """``(k,)`` int64 ascending: the k most salient input channels of a 1-D ``saliency``
    (ties go to the lower index), exactly as :func:`kernels.quant.select_high_channels`."""
    s = np.asarray(saliency, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"saliency must be 1-D (in_features,), got shape {s.shape}")
    if not 0 <= k <= s.size:
        raise ValueError(f"k must be in [0, {s.size}], got {k}")
    if not np.isfinite(s).all():
        raise ValueError("saliency has NaN or inf entries")
    order = np.argsort(-s, kind="stable")  # (in,) descending; a stable sort keeps tied channels in index order
    return np.sort(order[:k]).astype(np.int64)


def split_channels_np(saliency: Any, scheme: Scheme | str, in_features: int | None = None) -> np.ndarray | None:
    """The ascending int64 channels a split ``scheme`` keeps high (None: no split); the
    numpy twin of :func:`sensitivity.saliency.select_split_channels`."""
    s = np.asarray(saliency, dtype=np.float64).reshape(-1)
    n = s.size if in_features is None else int(in_features)
    if s.size != n:
        raise ValueError(f"saliency has {s.size} entries for {n} input channels")
    k = (parse_scheme(scheme) if isinstance(scheme, str) else scheme).n_high(n)
    return select_high_channels_np(s, k) if k else None
