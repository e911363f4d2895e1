"""GPTQ (Frantar et al. 2022) into the packed formats of :mod:`kernels.quant`, reusing a Hessian.

GPTQ quantizes a weight (out, in) one input column at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the
layer input, so that the output error ``tr(ΔW H ΔWᵀ)`` (``H = XᵀX / n``) is smaller than
round-to-nearest's. This module follows the reference implementation (lazy batch updates
over ``blocksize`` columns, Cholesky factor of the damped inverse Hessian, dead columns,
optional act-order) with these choices, so that the result is stored *exactly* as
:func:`kernels.quant.quantize` stores RTN (same codes / scales / zeros tensors, same bytes):

* **Groups are the format's own**: contiguous runs of ``group_size`` input columns in the
  original column order (a partial last group is a group of its own), one float16 scale
  (and integer zero-point) per (output channel, group), computed by the RTN rules of
  :mod:`kernels.quant` (same fp16 rounding of scales, same zero-point rounding).
* **When group parameters are fixed** (``static_groups``):

  - ``True`` (default; the reference's ``static_groups``): every group's scale / zero is
    computed up front from the weight itself (dead columns zeroed), i.e. the RTN
    parameters; GPTQ then only changes the codes.
  - ``False``: when GPTQ reaches the first column of a group (in processing order), the
    group's scale / zero are computed from the current, error-updated values of all its
    columns. (The reference's default reads those columns from a copy that misses the
    updates made inside the current lazy block when a group starts mid-block; here they
    include every update, so the result does not depend on ``blocksize``.)

  Measured on random correlated Hessians (64 x 256, tests/kernels/test_gptq.py style),
  both beat RTN's ``tr(ΔW H ΔWᵀ)`` by ~2x at 3-4 bits and are within a few percent of
  each other, but at 2 bits with groups ``False`` lets the error compensation inflate each
  later group's range and can end *worse* than RTN (w2g32: 1.2x RTN vs 0.55x static), hence
  the default. Per-channel formats (``group_size=None``) have one group, set from the
  weight before any update, either way.
* **act_order** processes columns by decreasing ``H_jj`` while keeping the storage groups
  (contiguous in the original column order, so the layout is unchanged); with
  ``static_groups=False`` a group's parameters are set when its first column in that order
  is reached, from the current values of all its columns.
* **fp8 e4m3 / fp4 e2m1**: each column is rounded to the nearest representable value on the
  fp grid times the group's scale, exactly as RTN does for those formats.
* **Dead columns** (``H_jj == 0``: that input is always zero on the calibration data) are
  set to zero in the weight and get ``H_jj = 1``, as in the reference.
* ``fp16`` is stored as the weight itself (nothing to optimise).

Hessian convention: ``H = XᵀX / n`` (what the profiler collects); the reference's factor 2
does not change the result (damping is relative to the mean diagonal).

Typical use::

    gptq = GPTQ(layer.weight, H)               # or GPTQ(W) then gptq.add_batch(x) per batch
    qt = gptq.quantize(parse_format("w4g128"))  # QuantizedTensor, same layout as quantize()
    gptq.free()
"""

from __future__ import annotations
from .. import BitallocError

import math
import warnings

import torch

from .formats import Format, Scheme
from .packing import pack_codes
from .quant import (
    QuantizedTensor,
    QuantizedWeight,
    as_format,
    as_scheme,
    check_weight,
    complement_channels,
    decode,
    encode,
    group_params,
    index_dtype,
    resolve_high_idx,
    to_groups,
    dequantize_weight,
    quantize,
)

__all__ = ["GPTQ", "GPTQError", "gptq_quantize", "gptq_quantize_weight", "gptq_fake_quantize_weight", "fold_mean_outer"]

MAX_PERCDAMP = 1.0  # damping is raised x10 per Cholesky failure up to this fraction of mean(diag H)


def fold_mean_outer(M: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seen: int) -> None:
    """Fold ``aᵀb`` of ``m = a.shape[0]`` new rows into the running mean ``M`` of ``seen``
    rows, in place: ``M ← M·seen/(seen+m) + aᵀb/(seen+m)``; ``a (m, i)``, ``b (m, j)``,
    ``M (i, j)``. The one running-mean update of GPTQ's and the profiler's Hessians."""
    total = seen + a.shape[0]
    M.mul_(seen / total).addmm_(a.T, b, alpha=1.0 / total)


class GPTQError(BitallocError, ValueError):
    """GPTQ cannot run on the given inputs (bad Hessian, no Hessian, bad arguments)."""


class GPTQ:
    """GPTQ for one weight (out, in) with its input Hessian (in, in).

    Give ``H`` (e.g. the profiler's ``XᵀX / n``), or leave it out and call
    :meth:`add_batch` with layer inputs to accumulate it. :meth:`quantize` can be called
    several times (different formats): the damped inverse-Hessian factor is computed once
    per ``(percdamp, act_order)`` and cached. :meth:`free` drops every buffer.
    """

    def __init__(self, W: torch.Tensor, H: torch.Tensor | None = None) -> None:
        check_weight(W)
        self.W = W.detach().to(torch.float32).clone()  # (out, in) master copy, never updated in place
        self.rows, self.columns = W.shape
        self.dtype = W.dtype
        self.nsamples = 0
        self._given_H = H is not None
        if H is None:
            self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=W.device)
        else:
            self.H = _check_hessian(H, self.columns).to(device=W.device, dtype=torch.float32).clone()
        self._factors: dict[tuple[float, bool], tuple] = {}
        self.percdamp_used: float | None = None  # damping of the last quantize (after retries)

    # -- Hessian ---------------------------------------------------------------------

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate ``H = XᵀX / n`` over the rows of x (..., in), as a running mean."""
        if self.H is None:
            raise GPTQError("GPTQ.add_batch: buffers were freed")
        if self._given_H:
            raise GPTQError("GPTQ.add_batch: this GPTQ was given H; accumulate into a GPTQ created without H")
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != (self.columns,):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise GPTQError(f"GPTQ.add_batch: x must be (..., {self.columns}), got {got}")
        x = x.detach().reshape(-1, self.columns).to(device=self.H.device, dtype=torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise GPTQError("GPTQ.add_batch: x has NaN or inf entries")
        fold_mean_outer(self.H, x, x, self.nsamples)
        self.nsamples += n
        self._factors.clear()

    # -- quantization ----------------------------------------------------------------

    def quantize(self, fmt: Format | str, blocksize: int = 128, percdamp: float = 0.01,
                 act_order: bool = False, static_groups: bool = True) -> QuantizedTensor:
        """GPTQ-quantize the weight into ``fmt``: a QuantizedTensor laid out as ``quantize(W, fmt)``.

        ``static_groups=True``: all scales / zeros are set up front from the weight itself
        (the RTN parameters; the reference's ``static_groups``), so error compensation
        cannot inflate a group's range. ``False``: each group's scale / zero is set when
        its first column is reached, from the current error-updated values of its columns.
        See the module docstring for the measured difference.
        """
        fmt = as_format(fmt)
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise GPTQError(f"blocksize: must be a positive int, got {blocksize!r}")
        if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and 0 <= percdamp <= MAX_PERCDAMP):
            raise GPTQError(f"percdamp: must be in [0, {MAX_PERCDAMP}], got {percdamp!r}")
        if self.W is None or self.H is None:
            raise GPTQError("GPTQ.quantize: buffers were freed")
        if fmt.kind == "fp16" or self.columns == 0:
            return quantize(self.W.to(self.dtype), fmt)
        if not self._given_H and self.nsamples == 0:
            raise GPTQError("GPTQ.quantize: no Hessian: pass H or call add_batch first")

        perm, Hinv, dead = self._factor(float(percdamp), bool(act_order))
        out_f, in_f = self.rows, self.columns
        g = in_f if fmt.group_size is None else fmt.group_size
        n_groups = fmt.n_groups(in_f)

        W = self.W.clone()
        W[:, dead] = 0
        if perm is not None:
            W = W[:, perm]
            position = torch.argsort(perm)  # position[c] = processing position of original column c
        else:
            position = torch.arange(in_f, device=W.device)
        group_at = (perm if perm is not None else torch.arange(in_f, device=W.device)) // g  # (in,) per position
        group_at = group_at.tolist()

        if static_groups:  # from the weight before any update (dead columns zeroed), original order
            scale, zero = group_params(to_groups(W[:, position] if perm is not None else W, fmt), fmt)
        else:
            scale = torch.empty(out_f, n_groups, 1, dtype=torch.float32, device=W.device)
            zero = torch.empty(out_f, n_groups, 1, dtype=torch.int64, device=W.device) if fmt.has_zero else None
        codes = torch.empty(out_f, in_f, dtype=torch.int64, device=W.device)  # processing order
        started = [bool(static_groups)] * n_groups

        for i1 in range(0, in_f, blocksize):
            i2 = min(i1 + blocksize, in_f)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                grp = group_at[i1 + i]
                if not started[grp]:
                    cols = position[grp * g:min((grp + 1) * g, in_f)]  # the group's processing positions
                    current = _current_columns(W, W1, Err1, Hinv, cols, i1, i2, i)  # (out, n_cols)
                    s, z = group_params(current.unsqueeze(1), fmt)
                    scale[:, grp] = s[:, 0]
                    if zero is not None:
                        zero[:, grp] = z[:, 0]
                    started[grp] = True
                w = W1[:, i]  # (out,)
                s = scale[:, grp:grp + 1]  # (out, 1, 1)
                z = None if zero is None else zero[:, grp:grp + 1]
                c = encode(w.view(out_f, 1, 1), s, z, fmt)  # (out, 1, 1)
                q = decode(c, s, z, fmt).view(out_f)
                codes[:, i1 + i] = c.view(out_f)
                err = (w - q) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        if perm is not None:
            codes = codes[:, position]  # back to the original column order
        qweight = pack_codes(codes, fmt.bits)
        scales = scale.squeeze(-1).to(torch.float16)  # exact: scale holds fp16 values
        qzeros = pack_codes(zero.squeeze(-1), fmt.bits) if zero is not None else None
        return QuantizedTensor(fmt, (out_f, in_f), qweight, scales, qzeros)

    def free(self) -> None:
        """Drop the weight, Hessian and cached factors."""
        self.W = None
        self.H = None
        self._factors = {}

    # -- the damped inverse-Hessian factor ---------------------------------------------

    def _factor(self, percdamp: float, act_order: bool):
        """(perm or None, upper Cholesky factor of H⁻¹ in processing order (float32), dead mask)."""
        key = (percdamp, act_order)
        if key in self._factors:
            perm, Hinv, dead, used = self._factors[key]
            self.percdamp_used = used
            return perm, Hinv, dead
        H = self.H.to(torch.float64)
        H = (H + H.T) / 2
        diag = torch.diagonal(H)
        if bool((diag < 0).any()):
            j = int(torch.nonzero(diag < 0)[0])
            raise GPTQError(f"H: must be positive semidefinite, but H[{j}, {j}] = {float(diag[j]):g} < 0")
        dead = diag == 0
        H[dead, dead] = 1.0
        perm = None
        if act_order:
            perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
            H = H[perm][:, perm]
        mean_diag = float(torch.diagonal(H).mean())
        eye = torch.eye(self.columns, dtype=H.dtype, device=H.device)
        damp = percdamp
        while True:
            L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
            if int(info) == 0:
                Hinv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if int(info) == 0 and bool(torch.isfinite(U).all()):
                    break
            if damp >= MAX_PERCDAMP:
                raise GPTQError(
                    f"GPTQ: H is not positive definite even with damping {damp:g} x mean(diag H) "
                    f"(started at percdamp={percdamp:g}); check the Hessian (NaN, negative eigenvalues?)"
                )
            new = min(max(damp * 10, 1e-6), MAX_PERCDAMP)
            warnings.warn(f"GPTQ: Cholesky failed with percdamp={damp:g}; retrying with {new:g}", stacklevel=3)
            damp = new
        Hinv = U.to(torch.float32)
        self._factors[key] = (perm, Hinv, dead, damp)
        self.percdamp_used = damp
        return perm, Hinv, dead


def _current_columns(W, W1, Err1, Hinv, cols: torch.Tensor, i1: int, i2: int, i: int) -> torch.Tensor:
    """Current (error-updated) values of the not-yet-quantized columns at positions ``cols``.

    Positions inside the current block are up to date in W1; later positions still miss
    the block's pending update ``Err1[:, :i] @ Hinv[i1:i1+i, cols]``.
    """
    inside = cols < i2
    out = torch.empty(W.shape[0], cols.numel(), dtype=W.dtype, device=W.device)
    if bool(inside.any()):
        out[:, inside] = W1[:, cols[inside] - i1]
    if not bool(inside.all()):
        later = cols[~inside]
        out[:, ~inside] = W[:, later] - Err1[:, :i] @ Hinv[i1:i1 + i][:, later]
    return out


def _check_hessian(H: torch.Tensor, in_features: int) -> torch.Tensor:
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (in_features, in_features):
        got = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise GPTQError(f"H: must be a ({in_features}, {in_features}) tensor, got {got}")
    if not H.dtype.is_floating_point:
        raise GPTQError(f"H: must be floating point, got {H.dtype}")
    if not bool(torch.isfinite(H).all()):
        raise GPTQError("H: has NaN or inf entries")
    return H.detach()


# ---------------------------------------------------------------------------------------
# one-call helpers, and split schemes


def gptq_quantize(W: torch.Tensor, fmt: Format | str, H: torch.Tensor, **options) -> QuantizedTensor:
    """``GPTQ(W, H).quantize(fmt, **options)`` (blocksize, percdamp, act_order, static_groups)."""
    return GPTQ(W, H).quantize(fmt, **options)


def gptq_quantize_weight(W: torch.Tensor, scheme: Scheme | str, H: torch.Tensor, high_idx=None, *,
                         blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
                         static_groups: bool = True) -> QuantizedWeight:
    """GPTQ a layer weight (out, in) in ``scheme``: a QuantizedWeight laid out as ``quantize_weight``'s.

    Without a split this is :meth:`GPTQ.quantize` in ``scheme.weight``. With a split,
    ``high_idx`` defaults to the same column-energy choice as ``quantize_weight`` (the
    profiler / executor pass the plan's channels). Simplification: the low columns and
    the high columns are quantized by two independent GPTQ runs, each with the
    sub-Hessian of its own columns (``H[low][:, low]`` and ``H[high][:, high]``); the
    cross terms between the two sets are ignored, so neither part compensates the other's
    rounding error (a joint pass would do slightly better, most of all with an fp16 high
    part). An fp16 high part is stored as is.
    """
    check_weight(W)
    scheme = as_scheme(scheme)
    H = _check_hessian(H, W.shape[1]).to(W.device)
    options = {"blocksize": blocksize, "percdamp": percdamp, "act_order": act_order, "static_groups": static_groups}
    idx = resolve_high_idx(W, scheme, high_idx)
    if idx is None:
        return QuantizedWeight(scheme, tuple(W.shape), GPTQ(W, H).quantize(scheme.weight, **options))
    low_idx = complement_channels(idx, W.shape[1])
    low = GPTQ(W[:, low_idx], H[low_idx][:, low_idx]).quantize(scheme.weight, **options)  # (out, in - k)
    high = GPTQ(W[:, idx], H[idx][:, idx]).quantize(scheme.high, **options)  # (out, k)
    return QuantizedWeight(scheme, tuple(W.shape), low, high, idx.to(index_dtype(W.shape[1])))


def gptq_fake_quantize_weight(W: torch.Tensor, scheme: Scheme | str, H: torch.Tensor, high_idx=None,
                              **options) -> torch.Tensor:
    """``dequantize_weight(gptq_quantize_weight(...))`` in W's dtype (for proxy errors and evaluation)."""
    return dequantize_weight(gptq_quantize_weight(W, scheme, H, high_idx, **options)).to(W.dtype)
