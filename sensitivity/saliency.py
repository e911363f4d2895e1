"""Per-input-channel saliency: which input channels of a layer a high-impact split keeps high.

Three measures, one number per input channel ``j`` of a weight ``W`` (out, in):

* ``"hessian"`` — ``H_jj · ‖W[:, j]‖²``: the layer-output error of zeroing column j when
  the inputs were uncorrelated (``H = XᵀX / n``, the profile's Hessian).
* ``"obq"`` — ``Σ_i W_ij² / [H⁻¹]_jj``: the OBQ/GPTQ error of removing column j with the
  other columns compensating, ``H`` damped as GPTQ does (``H + λ·mean(diag H)·I``,
  ``λ = damp``, default 0.01).
* ``"fisher"`` — ``Σ_i F_ij · W_ij²`` with ``F_ij = Σ_batches (∂L/∂W_ij)²`` the empirical
  Fisher diagonal of the calibration loss (next-token cross-entropy; one backward pass
  per batch, gradients caught by hooks on the weights): the second-order loss change of
  zeroing column j under a diagonal Fisher.

:func:`select_split_channels` turns a saliency vector into the ``k`` channels of a scheme
(the :func:`kernels.quant.select_high_channels` rule: highest first, ties to the lower
index, returned ascending), so profiler, measurement and executor pick the same channels
from the same stored vector. Saliency vectors are stored in the profile
(``SensitivityProfile.saliency``) and the plan records the chosen indices.
"""

from __future__ import annotations
from .. import BitallocError

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SALIENCY_METHODS", "SaliencyError", "channel_saliency", "fisher_diagonals", "layer_saliencies",
           "select_split_channels"]



class SaliencyError(BitallocError, ValueError):
    """A saliency request is invalid (unknown method, missing Hessian/Fisher, bad shapes)."""


def _check_method(method: str) -> None:
    if method not in SALIENCY_METHODS:
        raise SaliencyError(f"saliency must be one of {SALIENCY_METHODS}, got {method!r}")


def channel_saliency(w: torch.Tensor, method: str = "hessian", *, H: torch.Tensor | None = None,
                     fisher: torch.Tensor | None = None, damp: float = 0.01) -> torch.Tensor:
    """``(in,)`` float32 saliency of the input channels of ``w (out, in)`` (see module docstring).

    ``H`` (in, in) is needed for ``hessian`` and ``obq``; ``fisher`` (out, in) squared-gradient
    sums for ``fisher``.
    """
    _check_method(method)
    w = w.detach().to(torch.float32)
    if w.dim() != 2:
        raise SaliencyError(f"weight must be 2-D (out, in), got shape {tuple(w.shape)}")
    return SALIENCY[method](w, H, fisher, damp)


def _checked_hessian(w: torch.Tensor, H: torch.Tensor | None, method: str) -> torch.Tensor:
    n = w.shape[1]
    if H is None:
        raise SaliencyError(f"saliency {method!r} needs the layer's Hessian")
    H = H.detach().to(torch.float32).to(w.device)
    if H.shape != (n, n):
        raise SaliencyError(f"H must be ({n}, {n}), got {tuple(H.shape)}")
    return H


def _fisher_saliency(w: torch.Tensor, H, fisher: torch.Tensor | None, damp: float) -> torch.Tensor:
    if fisher is None:
        raise SaliencyError("saliency 'fisher' needs the Fisher diagonal (fisher_diagonals)")
    F = fisher.detach().to(torch.float32).to(w.device)
    if F.shape != w.shape:
        raise SaliencyError(f"fisher must have the weight's shape {tuple(w.shape)}, got {tuple(F.shape)}")
    return (F * w.pow(2)).sum(0)  # (in,)


def _hessian_saliency(w: torch.Tensor, H, fisher, damp: float) -> torch.Tensor:
    H = _checked_hessian(w, H, "hessian")
    return torch.diagonal(H) * w.pow(2).sum(0)  # (in,)


def _obq_saliency(w: torch.Tensor, H, fisher, damp: float) -> torch.Tensor:
    H = _checked_hessian(w, H, "obq")
    energy = w.pow(2).sum(0)  # (in,)
    Hd = H.to(torch.float64).clone()
    d = torch.diagonal(Hd)
    dead = d == 0
    d[dead] = 1.0  # GPTQ's rule: a never-active input gets unit curvature (its column is zeroed anyway)
    d += damp * float(d.mean())
    try:
        L = torch.linalg.cholesky(Hd)
    except RuntimeError:  # not positive definite even damped: more damping
        d += 10 * damp * float(d.mean())
        L = torch.linalg.cholesky(Hd)
    inv_diag = torch.diagonal(torch.cholesky_inverse(L))
    s = energy.to(torch.float64) / inv_diag
    s[dead] = 0.0
    return s.to(torch.float32)


# name -> (w (out, in) float32, H (in, in) or None, fisher (out, in) or None, damp) -> (in,) saliency
SALIENCY = {"hessian": _hessian_saliency, "obq": _obq_saliency, "fisher": _fisher_saliency}
SALIENCY_METHODS = tuple(SALIENCY)


def select_split_channels(saliency: torch.Tensor | Sequence[float], scheme: Any, in_features: int | None = None):
    """The ascending int64 channels a split ``scheme`` keeps high, from a saliency vector (None: no split)."""
    from bitalloc.kernels.quant import select_high_channels

    from .proxy import as_scheme

    s = torch.as_tensor(saliency, dtype=torch.float64).flatten()
    n = s.numel() if in_features is None else int(in_features)
    if s.numel() != n:
        raise SaliencyError(f"saliency has {s.numel()} entries for {n} input channels")
    k = as_scheme(scheme).n_high(n)
    return select_high_channels(s, k) if k else None


@torch.enable_grad()
def fisher_diagonals(model: torch.nn.Module, layers: Sequence[Any], data: Any, *, batch_size: int = 4,
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """``fqn -> (out, in)`` float32 ``Σ_batches (∂L/∂W)²`` of the mean next-token cross-entropy.

    One forward and one backward pass per batch of ``data`` (an (n, seq) id tensor or an
    encoder dict; encoders use the mean squared pooled output as the loss, a stand-in
    without labels). Gradients are caught by hooks on the selected layers' weights, so
    only those are kept; the model's parameters are left with no ``.grad`` and
    ``requires_grad`` as they were.
    """
    from ._forward import model_device, to_device
    from .calibration import as_batches
    from .layers import get_weight
    from .proxy import module_at

    mods = {layer.fqn: module_at(model, layer.fqn) for layer in layers}
    acc: dict[str, torch.Tensor] = {}
    handles, flags = [], {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for layer in layers:
            param = mods[layer.fqn].weight
            param.requires_grad_(True)
            conv = layer.module_type == "Conv1D"

            def hook(g, _f=layer.fqn, _conv=conv):
                g2 = g.detach().to(torch.float32).pow(2)
                g2 = g2.t() if _conv else g2
                acc[_f] = acc[_f] + g2 if _f in acc else g2.clone()
                return None

            handles.append(param.register_hook(hook))
        batches = as_batches(data, batch_size)
        it = batches
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc="fisher", leave=False)
        was_training = model.training
        model.eval()
        device = model_device(model)
        for batch in it:
            kw = dict(to_device(batch, device))
            if "logits_to_keep" in kw:
                kw.pop("logits_to_keep")
            try:
                out = model(**kw, use_cache=False)
            except TypeError:
                out = model(**kw)
            logits = getattr(out, "logits", None)
            if logits is not None and "input_ids" in batch:
                ids = batch["input_ids"]
                lg = logits[:, :-1].to(torch.float32)
                loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1))
            else:
                h = getattr(out, "last_hidden_state", out[0] if isinstance(out, (tuple, list)) else out)
                loss = h.to(torch.float32).pow(2).mean()
            loss.backward()
            del out, loss
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.grad = None
            p.requires_grad_(f)
    for layer in layers:  # shared weights (tie groups) hook once per parameter: every member gets the sum
        if layer.fqn not in acc:
            w = get_weight(mods[layer.fqn], layer.module_type)
            acc[layer.fqn] = torch.zeros(w.shape, dtype=torch.float32)
    return acc


def layer_saliencies(model: torch.nn.Module, layers: Sequence[Any], method: str, *, hessians: dict | None = None,
                     fisher: dict | None = None, damp: float = 0.01) -> dict[str, torch.Tensor]:
    """``fqn -> (in,)`` saliency of every layer by ``method`` (Hessians or Fisher diagonals as needed)."""
    from .layers import get_weight
    from .proxy import hessian_tensor, module_at

    _check_method(method)
    out = {}
    for layer in layers:
        w = get_weight(module_at(model, layer.fqn), layer.module_type)
        H = hessian_tensor(hessians[layer.fqn]) if hessians and layer.fqn in hessians else None
        F = fisher.get(layer.fqn) if fisher else None
        out[layer.fqn] = channel_saliency(w, method, H=H, fisher=F, damp=damp).cpu()
    return out
