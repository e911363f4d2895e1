"""Calibrating the Hessian proxy into the end metric's units (expected KL per token).

The proxy ``tr(ΔW H ΔWᵀ)`` ranks schemes within a layer; the measured references of each
layer turn its row into expected loss (one scale, or a piecewise power law through several
references). Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["calibrate_proxy"]


def calibrate_proxy(
    proxy: np.ndarray,
    ref_values: np.ndarray,
    ref_scheme_index: int | Sequence[int],
    rel_eps: float = 1e-12,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale proxy rows into metric units: ``KL_i,s ≈ c_i · proxy_i,s``.

    Model: for a small perturbation both the layer-output error (the proxy) and the KL of
    the final distribution are quadratic in the output perturbation, so within one layer
    their ratio is roughly constant across schemes, while it differs between layers (how
    much a unit of output error at layer i moves the end metric). ``c_i`` is fitted from
    the measured reference scheme(s) by least squares through the origin,
    ``c_i = Σ_r KL_i,r P_i,r / Σ_r P_i,r²`` over the measured (finite) references
    (= ``KL_i,ref / P_i,ref`` with one reference), clipped at 0.

    ``ref_values``, the metric measured at the reference scheme(s) (a profile's
    ``ref_values``), is ``(L,)`` for one reference index or ``(L, R)`` for ``R`` indices.
    A layer whose reference proxy is ≈ 0 (``≤ rel_eps · max|proxy|``) or that has no
    finite measurement cannot be fitted and gets the median scale of the fitted layers.

    With two or more references the table follows each layer's measured points exactly
    (a piecewise power law in log-log, see :func:`_loglog_interpolate`); ``c`` is still
    the least-squares linear scale, for reporting.

    Returns (scaled table ``(L, S)`` = expected loss in the metric's units, e.g.
    nats/token; ``c`` ``(L,)``).
    """
    P = np.asarray(proxy, dtype=np.float64)
    if P.ndim != 2:
        raise ValueError(f"proxy must be (L, S), got shape {P.shape}")
    idx = [int(ref_scheme_index)] if np.ndim(ref_scheme_index) == 0 else [int(i) for i in ref_scheme_index]
    for i in idx:
        if not 0 <= i < P.shape[1]:
            raise ValueError(f"ref_scheme_index {i} out of range for {P.shape[1]} schemes")
    K = np.asarray(ref_values, dtype=np.float64)
    if K.ndim == 1:
        K = K[:, None]
    if K.shape != (P.shape[0], len(idx)):
        raise ValueError(f"ref_values must be ({P.shape[0]},) or ({P.shape[0]}, {len(idx)}), got {np.shape(ref_values)}")
    Pr = P[:, idx]
    eps = rel_eps * max(float(np.nanmax(np.abs(P))) if P.size else 0.0, 1e-300)
    use = np.isfinite(K) & np.isfinite(Pr) & (Pr > eps)
    num = np.where(use, K * Pr, 0.0).sum(1)
    den = np.where(use, Pr * Pr, 0.0).sum(1)
    fitted = den > 0
    c = np.zeros(P.shape[0], dtype=np.float64)
    c[fitted] = np.maximum(num[fitted] / den[fitted], 0.0)
    if (~fitted).any():
        fill = float(np.median(c[fitted])) if fitted.any() else 0.0
        c[~fitted] = fill
    table = c[:, None] * P
    if len(idx) >= 2:
        table = _loglog_interpolate(P, K, Pr, use & (K > 0), table)
    return table, c


def _loglog_interpolate(P: np.ndarray, K: np.ndarray, Pr: np.ndarray, ok: np.ndarray, table: np.ndarray) -> np.ndarray:
    """With two or more measured references per layer: piecewise power law through them.

    KL is quadratic in the output perturbation only while it is small; at 2-3 bits it
    grows faster than the proxy (errors push probabilities through the softmax's
    non-linearity). With references at several bit-widths, each layer's row follows the
    measured points exactly: log KL is interpolated linearly in log proxy between them;
    below the smallest measured proxy the row is linear through the origin (the small-
    perturbation regime), above the largest it extends the last segment's slope (clipped
    to [1, 3]). Layers with fewer than two usable points keep the linear fit.
    """
    out = table.copy()
    for i in range(P.shape[0]):
        pts = sorted((float(Pr[i, r]), float(K[i, r])) for r in range(Pr.shape[1]) if ok[i, r])
        if len(pts) < 2:
            continue
        lx = np.log([p for p, _ in pts])
        ly = np.log([k for _, k in pts])
        if np.any(np.diff(lx) <= 0):
            continue
        x = P[i]
        pos = x > 0
        lxi = np.log(np.where(pos, x, 1.0))
        y = np.interp(lxi, lx, ly)  # inside: piecewise linear in log-log
        slope = float(np.clip((ly[-1] - ly[-2]) / (lx[-1] - lx[-2]), 1.0, 3.0))
        y = np.where(lxi > lx[-1], ly[-1] + slope * (lxi - lx[-1]), y)
        row = np.exp(y)
        row = np.where(lxi < lx[0], x * (pts[0][1] / pts[0][0]), row)  # linear below the smallest point
        out[i] = np.where(pos, row, np.where(np.isnan(x), np.nan, 0.0))  # NaN (an unfit cell) stays NaN
    return out
