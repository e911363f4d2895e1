"""Logits a chunk of positions at a time: memory that does not grow with the vocabulary.

A causal LM's forward returns logits for every scored position over the whole vocabulary,
``positions × V × 4`` bytes (1 GiB for 4 × 256 positions of a 256k vocabulary), and a
log-softmax of them is as large again. Here the model's body runs to the final hidden
states (``positions × d``) and the LM head is applied to ``chunk_rows`` positions at a
time, so every logit-sized buffer is bounded by one setting, the *logits memory*:

* :func:`logits_memory` — the bound in bytes: :func:`set_logits_memory`, else the
  environment variable ``BITALLOC_LOGITS_MEMORY`` (``"512MiB"``, ``"2GB"``, bytes), else
  :data:`DEFAULT_LOGITS_MEMORY` (1 GiB). Half of it bounds the working chunks of the
  metrics and the evaluation; the other half bounds the log-probs the KL reference keeps
  (beyond it the reference keeps hidden states and recomputes its logits per chunk).
* :func:`forward_logits` — one forward whose outputs carry :class:`ChunkedLogits` instead
  of a logits tensor when the model's head can be split off (:func:`split_head`: a
  transformers causal LM whose ``forward`` takes ``logits_to_keep`` and whose logits are
  the head applied to the final hidden state — checked once per model on a few positions);
  otherwise the model's own outputs.
* :func:`logit_rows` — ``(n_rows, V, rows(i, j))`` for either kind of outputs: float32
  logits of flattened positions ``i:j``.

Results equal the unchunked ones to float rounding (the head matmul and the sums are
blocked differently): about 1e-6 relative, tested in ``tests/sensitivity/test_logits.py``.
Vocabulary is never split: one position's logits (V × 4 bytes, 1 MiB at 256k) is the
smallest chunk.
"""

from __future__ import annotations

import inspect
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ._forward import forward
from .sizes import parse_size  # noqa: F401 - re-exported (its old home)

__all__ = [
    "DEFAULT_LOGITS_MEMORY",
    "parse_size",
    "logits_memory",
    "set_logits_memory",
    "chunk_rows",
    "HeadSplit",
    "split_head",
    "ChunkedLogits",
    "forward_logits",
    "logit_rows",
    "protect_head",
    "strided_batches",
]

DEFAULT_LOGITS_MEMORY = 1 << 30
ENV = "BITALLOC_LOGITS_MEMORY"
_setting: list[int | None] = [None]


def logits_memory() -> int:
    """The logits memory bound in bytes (see the module docstring)."""
    if _setting[0] is not None:
        return _setting[0]
    env = os.environ.get(ENV)
    return parse_size(env, ENV) if env else DEFAULT_LOGITS_MEMORY


def set_logits_memory(value: Any) -> None:
    """Set the bound for this process (and, through the environment, for workers it starts);
    None restores the default."""
    if value is None:
        _setting[0] = None
        os.environ.pop(ENV, None)
        return
    _setting[0] = parse_size(value)
    os.environ[ENV] = str(_setting[0])


def chunk_rows(vocab: int, n_buffers: int = 4, budget: int | None = None) -> int:
    """Positions per chunk so that ``n_buffers`` float32 (chunk, V) buffers fit half the bound."""
    budget = logits_memory() if budget is None else budget
    return max(1, (budget // 2) // (max(1, vocab) * 4 * n_buffers))


# ---------------------------------------------------------------------------------------
# splitting the head off


class HeadSplit:
    """A causal LM as ``body`` (to the final hidden state) and ``head`` (hidden -> logits)."""

    def __init__(self, body: torch.nn.Module, head: torch.nn.Module) -> None:
        self.body = body
        self.head = head
        self.frozen: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.protect = False

    def reference_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) that recompute the *unperturbed* logits, or None (head not a Linear).

        The live parameters, or a copy taken on first call when :func:`protect_head` said a
        measured layer shares the head's weight (it is perturbed in place later)."""
        if type(self.head) is not torch.nn.Linear:
            return None
        if not self.protect:
            return self.head.weight, self.head.bias
        if self.frozen is None:
            b = self.head.bias
            self.frozen = (self.head.weight.detach().clone(), None if b is None else b.detach().clone())
        return self.frozen


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _candidate(model: torch.nn.Module) -> HeadSplit | None:
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    prefix = getattr(model, "base_model_prefix", "") or ""
    body = getattr(model, prefix, None) if prefix else None
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(body, torch.nn.Module) or body is model or not isinstance(head, torch.nn.Module):
        return None
    return HeadSplit(body, head)


def split_head(model: torch.nn.Module, batch: dict | None = None) -> HeadSplit | None:
    """The model's :class:`HeadSplit`, verified on the first few positions of ``batch``
    against the model's own logits (once per model); None when it cannot be split."""
    if model in _SPLITS:
        return _SPLITS[model]
    split = _candidate(model)
    if split is not None and batch is not None:
        ids = batch["input_ids"][:1, :8]
        small = {"input_ids": ids}
        with torch.no_grad():
            want = forward(model, {**small, "logits_to_keep": 2})
            want = (getattr(want, "logits", None) if not isinstance(want, torch.Tensor) else want)
            got = split.head(forward(split.body, small).last_hidden_state[:, -2:])
        if want is None or want.shape != got.shape or not torch.allclose(want.float(), got.float(), rtol=1e-4, atol=1e-5):
            split = None
    elif split is not None:
        return split  # unverified: not cached
    _SPLITS[model] = split
    return split


def protect_head(model: torch.nn.Module, weights: list[torch.Tensor]) -> None:
    """Copy the head's weight before the reference uses it when one of ``weights`` (the
    measured layers') is the head's weight: it will be perturbed in place."""
    split = _candidate(model) if model not in _SPLITS else _SPLITS[model]
    if split is None:
        return
    w = getattr(split.head, "weight", None)
    split.protect = any(x is w for x in weights)
    split.frozen = None
    if model not in _SPLITS:
        _SPLITS[model] = split


# ---------------------------------------------------------------------------------------
# lazy logits


class ChunkedLogits:
    """Model outputs whose logits are computed on demand, a chunk of positions at a time.

    ``hidden``: (b, n_out, d) final hidden states of the scored positions; ``rows(i, j)``:
    float32 logits of flattened positions ``i:j``; ``logits``: all of them (materialises
    (b, n_out, V): for metrics that need the whole tensor). ``last_hidden_state`` /
    ``hidden_states``: the body's, for hidden-state metrics.
    """

    def __init__(self, hidden: torch.Tensor, split: HeadSplit, body_out: Any) -> None:
        self.hidden = hidden
        self.split = split
        self.last_hidden_state = body_out.last_hidden_state
        self.hidden_states = getattr(body_out, "hidden_states", None)
        self.vocab = int(getattr(split.head, "out_features", 0) or 0) or int(split.head(hidden[:1, :1]).shape[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.hidden.shape[:2], self.vocab)

    def rows(self, i: int, j: int) -> torch.Tensor:
        h = self.hidden.reshape(-1, self.hidden.shape[-1])[i:j]
        return self.split.head(h).float()

    @property
    def logits(self) -> torch.Tensor:
        return self.split.head(self.hidden)

    def __getitem__(self, k):
        if k == 0:
            return self.logits
        raise KeyError(k)


def _kept(keep: Any, T: int) -> slice | torch.Tensor:
    if keep is None or (isinstance(keep, int) and keep == 0):
        return slice(None)
    if isinstance(keep, torch.Tensor) and keep.ndim == 1:
        return keep.to(torch.long)
    return slice(T - int(keep), None)


def forward_logits(model: torch.nn.Module, batch: dict) -> Any:
    """One forward (no cache, no gradients): :class:`ChunkedLogits` outputs when the head
    splits off (:func:`split_head`), else the model's own."""
    split = split_head(model, batch)
    if split is None:
        return forward(model, batch)
    body_batch = {k: v for k, v in batch.items() if k != "logits_to_keep"}
    out = forward(split.body, body_batch)
    h = out.last_hidden_state
    pos = _kept(batch.get("logits_to_keep"), h.shape[1])
    return ChunkedLogits(h[:, pos].to(h.device), split, out)


def logit_rows(outputs: Any) -> tuple[tuple[int, ...], Callable[[int, int], torch.Tensor]]:
    """``(shape, rows)``: the logits' shape (``(b, n_out, V)``) and ``rows(i, j)``, float32
    logits of flattened positions ``i:j`` (``b·n_out`` rows)."""
    if isinstance(outputs, ChunkedLogits):
        return outputs.shape, outputs.rows
    logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
    if logits is None:
        logits = outputs["logits"] if isinstance(outputs, dict) and "logits" in outputs else outputs[0]
    logits = logits.detach()
    flat = logits.reshape(-1, logits.shape[-1])
    return tuple(logits.shape), lambda i, j: flat[i:j].float()


def strided_batches(net, batches: list[dict], stride: int) -> list[dict]:
    """Score the metric at every ``stride``-th position only (positions stride-1, 2·stride-1, ...).

    The forward still runs every token (attention needs them); only the LM head and the
    KL, about half the cost of one measurement on SmolLM2 (49152-word vocabulary), shrink.
    Neighbouring positions are strongly correlated, so little information is lost. Needs
    a model whose forward takes ``logits_to_keep`` (transformers' causal LMs); others
    are scored at every position.
    """
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"kl_stride must be a positive integer, got {stride!r}")
    if stride == 1 or "logits_to_keep" not in inspect.signature(net.forward).parameters:
        return batches
    out = []
    for b in batches:
        T = b["input_ids"].shape[1]
        out.append({**b, "logits_to_keep": torch.arange(stride - 1, T, stride)})  # (T // stride,) kept positions
    return out
