"""Which torch modules are quantizable linear layers, and their weight as (out, in).

Two kinds: ``torch.nn.Linear`` (weight (out, in)) and transformers' GPT-2 ``Conv1D``
(weight stored (in, out), ``y = x @ W + b``). ``Conv1D`` is recognised by its shape, not by
importing transformers: ``kernels/`` imports only torch and triton.
"""

from __future__ import annotations

import torch

__all__ = ["LAYER_TYPES", "is_conv1d", "module_type", "get_weight", "weight_shape"]

LAYER_TYPES = ("Linear", "Conv1D")


def is_conv1d(module: torch.nn.Module) -> bool:
    """A transformers ``Conv1D`` (GPT-2 style): class name ``Conv1D``, attributes ``nf``
    (out features) and ``nx`` (in features), a 2-D weight of shape (nx, nf)."""
    if type(module).__name__ != "Conv1D" or isinstance(module, torch.nn.Linear):
        return False
    w = getattr(module, "weight", None)
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and tuple(w.shape) == (nx, nf)


def module_type(module: torch.nn.Module) -> str | None:
    """``"Linear"``, ``"Conv1D"`` or None for any other module."""
    if isinstance(module, torch.nn.Linear):
        return "Linear"
    if is_conv1d(module):
        return "Conv1D"
    return None


def get_weight(module: torch.nn.Module, kind: str | None = None) -> torch.Tensor:
    """A layer's weight as an (out, in) view (Conv1D stores (in, out): a transposed view).

    ``kind`` ("Linear" / "Conv1D") skips the detection when the caller already knows it."""
    if kind is None:
        kind = module_type(module)
    w = module.weight
    return w.t() if kind == "Conv1D" else w


def weight_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(out, in) of a Linear / Conv1D, else None."""
    kind = module_type(module)
    return None if kind is None else tuple(get_weight(module, kind).shape)
