"""Layer-input Hessians ``H = XᵀX / n`` from forward hooks (GPTQ style).

One pass over the calibration batches; each selected layer's input tokens are folded into
a running mean as they go by, so no activations are kept. Layers that read the very same
input tensor in a forward (q/k/v projections read one normed hidden state, gate/up read
another; BERT's query/key/value likewise) share one accumulator and one ``H`` tensor: for
SmolLM2 that is 4 Hessians per block instead of 7 (about 400 MB instead of 520 MB in
float32). Sharing is detected at run time by tensor identity (weak references, so a freed
tensor whose memory is reused can never be mistaken for a shared input); returned tensors
may therefore be the same object under several names: treat them as read-only.

Padded tokens (``attention_mask == 0``) are left out when the hooked input has the batch's
(batch, seq) leading shape.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from bitalloc.kernels.gptq import fold_mean_outer

from ._forward import base_module_for, forward
from .calibration import as_batches
from .layers import LayerInfo

__all__ = ["HessianAccumulator", "InputHooks", "collect_hessians", "collect_input_statistics", "hessian_tensor"]

log = logging.getLogger("bitalloc.sensitivity")


class HessianAccumulator:
    """Running mean ``H = Σ xᵀx / n`` over all rows (tokens) of the inputs it is given.

    With ``act_formats`` (e.g. ``("a8",)``) it also accumulates, for each activation
    format, the statistics that make the output error of activation quantization exact:
    ``cross[a] = E[xᵀe]`` and ``noise[a] = E[eᵀe]`` with ``e = Q_a(x) - x`` per token.
    """

    def __init__(
        self,
        in_features: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        act_formats: Sequence[str] = (),
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessian dtype must be float32 or float64, got {dtype}")
        self.in_features = int(in_features)
        self.dtype = dtype
        self.nsamples = 0
        self._H: torch.Tensor | None = torch.zeros(self.in_features, self.in_features, dtype=dtype, device=device)
        self.act_formats = tuple(a for a in act_formats if a != "a16")
        self.cross: dict[str, torch.Tensor] = {
            a: torch.zeros_like(self._H) for a in self.act_formats
        }
        self.noise: dict[str, torch.Tensor] = {
            a: torch.zeros_like(self._H) for a in self.act_formats
        }

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x (..., in_features)`` into the running mean."""
        if self._H is None:
            raise RuntimeError("HessianAccumulator was freed")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, accumulator expects {self.in_features}")
        x2 = x.detach().reshape(-1, self.in_features)
        m = x2.shape[0]
        if m == 0:
            return
        n = self.nsamples
        xf = x2.to(device=self._H.device, dtype=self.dtype)  # (m, in)
        fold_mean_outer(self._H, xf, xf, n)
        if self.act_formats:
            from bitalloc.kernels.quant import quantize_activation

            for a in self.act_formats:
                e = (quantize_activation(x2, a).to(self.dtype) - x2.to(self.dtype)).to(self._H.device)  # (m, in)
                fold_mean_outer(self.cross[a], xf, e, n)
                fold_mean_outer(self.noise[a], e, e, n)
        self.nsamples = n + m

    @classmethod
    def from_statistics(cls, H: torch.Tensor, nsamples: int, cross: dict | None = None,
                        noise: dict | None = None) -> HessianAccumulator:
        """An accumulator holding already-reduced statistics (``H (in, in)`` the mean over
        ``nsamples`` rows; ``cross`` / ``noise``: act format -> (in, in)), e.g. the reduction of
        data-parallel shards (:mod:`sensitivity.hessian_shards`)."""
        assert H.dim() == 2 and H.shape[0] == H.shape[1], f"H must be (in, in), got {tuple(H.shape)}"
        cross, noise = dict(cross or {}), dict(noise or {})
        assert set(cross) == set(noise), f"cross {sorted(cross)} and noise {sorted(noise)} name other formats"
        acc = cls(H.shape[0], H.dtype, device=H.device)
        acc._H = H
        acc.act_formats = tuple(cross)
        acc.cross, acc.noise = cross, noise
        acc.nsamples = int(nsamples)
        return acc

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            raise RuntimeError("HessianAccumulator was freed")
        return self._H

    def free(self) -> None:
        self._H = None
        self.cross.clear()
        self.noise.clear()


def hessian_tensor(h: Any) -> torch.Tensor:
    """The (in, in) tensor of a Hessian given as a tensor or as a :class:`HessianAccumulator`."""
    return h.H if hasattr(h, "H") and not isinstance(h, torch.Tensor) else h


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    for k in ("input", "hidden_states", "x"):
        if isinstance(kwargs.get(k), torch.Tensor):
            return kwargs[k]
    return None


class InputHooks:
    """Forward pre-hooks folding each selected layer's input rows into its accumulator.

    One object per calibration pass (the whole model's, or one block's in
    :mod:`sensitivity.streaming`): install, run the batches inside :meth:`batch`, then
    :meth:`results`. Accumulators are shared between layers that read the same input tensor
    (see the module docstring) unless ``share_inputs=False``.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[LayerInfo], *, dtype: torch.dtype = torch.float32,
                 share_inputs: bool = True, act_formats: Sequence[str] = ()) -> None:
        fqns = [layer.fqn for layer in layers]
        if len(set(fqns)) != len(fqns):
            raise ValueError("layers contain duplicate fqns")
        self.layers, self.dtype, self.share_inputs, self.act_formats = list(layers), dtype, share_inputs, act_formats
        self.assigned: dict[str, HessianAccumulator] = {}
        self.owner: dict[int, str] = {}  # id(accumulator) -> fqn that created it
        self.seen: dict[int, tuple[Any, HessianAccumulator]] = {}  # per batch: id(x) -> (weakref(x), acc)
        self.mask: torch.Tensor | None = None
        modules = dict(model.named_modules(remove_duplicate=False))
        self.handles = []
        try:
            for layer in layers:
                if layer.fqn not in modules:
                    raise ValueError(f"layer {layer.fqn!r} is not a module of {type(model).__name__}")
                self.handles.append(modules[layer.fqn].register_forward_pre_hook(self._hook(layer.fqn), with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is not None and x.dim() >= 2 and tuple(x.shape[:-1]) == tuple(mask.shape):
            return x[mask.to(device=x.device, dtype=torch.bool)]
        return x

    def _hook(self, fqn: str):
        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs)
            if x is None:
                return
            entry = self.seen.get(id(x))
            same = entry is not None and entry[0]() is x
            acc = self.assigned.get(fqn)
            if acc is None:
                if self.share_inputs and same and entry[1].in_features == x.shape[-1]:
                    self.assigned[fqn] = entry[1]
                    return
                acc = HessianAccumulator(x.shape[-1], self.dtype, device=x.device, act_formats=self.act_formats)
                self.assigned[fqn] = acc
                self.owner[id(acc)] = fqn
            elif same and entry[1] is acc:
                return  # this exact tensor was already folded into the shared accumulator
            elif self.owner[id(acc)] != fqn:
                raise RuntimeError(
                    f"{fqn} shared its input with {self.owner[id(acc)]} on the first batch but not later; "
                    "rerun with share_inputs=False"
                )
            acc.add_batch(self._rows(x))
            if not same:
                self.seen[id(x)] = (weakref.ref(x), acc)

        return hook

    @contextlib.contextmanager
    def batch(self, mask: torch.Tensor | None):
        """Run one batch's forward inside: padded positions (``mask == 0``) are left out."""
        self.mask = mask
        try:
            yield
        finally:
            self.seen.clear()
            self.mask = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.seen.clear()

    def results(self) -> dict[str, HessianAccumulator]:
        """``fqn -> accumulator`` in layer order (a zero one, with a warning, for a layer never called)."""
        for layer in self.layers:
            if layer.fqn not in self.assigned:
                log.warning("layer %s was never called during calibration: its Hessian is zero", layer.fqn)
                self.assigned[layer.fqn] = HessianAccumulator(layer.in_features, self.dtype, act_formats=self.act_formats)
        return {layer.fqn: self.assigned[layer.fqn] for layer in self.layers}


@torch.no_grad()
def collect_input_statistics(
    model: torch.nn.Module,
    layers: Sequence[LayerInfo],
    batches: Iterable | torch.Tensor | dict,
    progress: bool = True,
    *,
    batch_size: int = 4,
    dtype: torch.dtype = torch.float32,
    share_inputs: bool = True,
    act_formats: Sequence[str] = (),
) -> dict[str, HessianAccumulator]:
    """Accumulators (fqn -> :class:`HessianAccumulator`) after one calibration pass.

    Accumulators are shared between layers that read the same input tensor (see the module
    docstring) unless ``share_inputs=False``.
    """
    batches = as_batches(batches, batch_size)
    fqns = [layer.fqn for layer in layers]
    runner, _ = base_module_for(model, fqns)
    head_only = _head_outside_body(model, fqns, batches) if runner is model else None
    hooks = InputHooks(model, layers, dtype=dtype, share_inputs=share_inputs, act_formats=act_formats)
    try:
        it = batches
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc="hessians", unit="batch", leave=False)
        for batch in it:
            with hooks.batch(batch.get("attention_mask")):
                if head_only is not None:  # the body, then only the head's input hooks: no (b, T, V) logits
                    out = forward(head_only.body, batch)
                    hook_only(head_only.head, out.last_hidden_state)
                else:
                    forward(runner, batch)
    finally:
        hooks.remove()
    return hooks.results()


def collect_hessians(
    model: torch.nn.Module,
    layers: Sequence[LayerInfo],
    batches: Iterable | torch.Tensor | dict,
    progress: bool = True,
    *,
    batch_size: int = 4,
    dtype: torch.dtype = torch.float32,
    share_inputs: bool = True,
) -> dict[str, torch.Tensor]:
    """``fqn -> H (in, in)`` with ``H = XᵀX / n`` over every calibration token of the layer input.

    ``batches`` is a (n, seq) id tensor or ``{input_ids, attention_mask}`` dict (split into
    mini-batches of ``batch_size`` rows) or an iterable of batches. Layers reading the same
    input share one tensor (read-only). Hooks are removed even on error.
    """
    accs = collect_input_statistics(
        model, layers, batches, progress, batch_size=batch_size, dtype=dtype, share_inputs=share_inputs
    )
    return {fqn: acc.H for fqn, acc in accs.items()}


def _head_outside_body(model: torch.nn.Module, fqns: Sequence[str], batches: list[dict]):
    """The model's :class:`~sensitivity.logits.HeadSplit` when the only selected layer outside
    its body is the LM head (then the head's matmul is skipped: only its input is needed)."""
    from .logits import split_head

    split = split_head(model, batches[0]) if batches else None
    if split is None:
        return None
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    body, head = names.get(id(split.body)), names.get(id(split.head))
    if body is None or head is None or any(f != head and not f.startswith(body + ".") for f in fqns):
        return None
    return split


def hook_only(module: torch.nn.Module, x: torch.Tensor) -> None:
    """Run ``module``'s forward pre-hooks on ``x`` and skip its forward."""
    module.forward = lambda *a, **k: None
    try:
        module(x)
    finally:
        del module.forward
