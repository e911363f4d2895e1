"""Per-token weights of the token metrics (:class:`TokenWeighting`; see :mod:`sensitivity.metrics`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TokenWeighting", "as_weighting", "kept_positions"]


def kept_positions(batch: dict, n_out: int, device=None) -> torch.Tensor:
    """Input positions (n_out,) of the ``n_out`` output positions scored for this batch.

    ``n_out == T`` (the input length): every position. Otherwise the batch's
    ``logits_to_keep`` (a tensor of positions, or an int ``k``: the last ``k``).
    """
    T = int(batch["input_ids"].shape[1])
    if n_out == T:
        return torch.arange(T, device=device)
    keep = batch.get("logits_to_keep")
    if isinstance(keep, torch.Tensor) and keep.ndim == 1 and keep.numel() == n_out:
        return keep.to(device=device, dtype=torch.long)
    if isinstance(keep, int) or (isinstance(keep, torch.Tensor) and keep.ndim == 0):
        k = int(keep)
        if k == n_out:
            return torch.arange(T - k, T, device=device)
    raise ValueError(f"cannot tell which input positions the {n_out} scored outputs are (input length {T})")


@dataclass(frozen=True)
class TokenWeighting:
    """Per-token weights inside a metric (see the module docstring).

    ``weights``: a (b, T) tensor aligned with the input positions of every batch (or one
    (T,) row for all), or a callable ``batch -> (b, T)``. ``exclude_positions``: input
    positions with weight 0 (negative: from the end). ``exclude_token_ids``: input token
    ids whose positions get weight 0. Padded positions (attention mask 0) always get 0.
    """

    weights: Any = None
    exclude_positions: tuple[int, ...] = ()
    exclude_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for key in ("exclude_positions", "exclude_token_ids"):
            v = getattr(self, key)
            if isinstance(v, int):
                v = (v,)
            try:
                v = tuple(int(x) for x in v)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a list of integers, got {getattr(self, key)!r}") from None
            object.__setattr__(self, key, v)
        w = self.weights
        if w is not None and not callable(w) and not isinstance(w, torch.Tensor):
            try:
                w = torch.as_tensor(w, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError("token weights must be a tensor, a nested list of numbers or a callable") from None
            object.__setattr__(self, "weights", w)

    @property
    def is_default(self) -> bool:
        return self.weights is None and not self.exclude_positions and not self.exclude_token_ids

    def describe(self) -> dict:
        d: dict = {}
        if self.exclude_positions:
            d["exclude_positions"] = list(self.exclude_positions)
        if self.exclude_token_ids:
            d["exclude_token_ids"] = list(self.exclude_token_ids)
        if self.weights is not None:
            d["token_weights"] = "callable" if callable(self.weights) else f"tensor{list(self.weights.shape)}"
        return d

    def full(self, batch: dict, device=None) -> torch.Tensor:
        """(b, T) float64 weights over the input positions (mask and exclusions applied)."""
        ids = batch["input_ids"]
        b, T = ids.shape
        w = torch.ones((b, T), dtype=torch.float64, device=device)
        m = batch.get("attention_mask")
        if m is not None and tuple(m.shape) == (b, T):
            w = w * m.to(device=device, dtype=torch.float64)
        if self.weights is not None:
            tw = self.weights(batch) if callable(self.weights) else self.weights
            tw = torch.as_tensor(tw).to(device=device, dtype=torch.float64)
            if tw.ndim == 1:
                tw = tw.unsqueeze(0).expand(b, -1)
            if tuple(tw.shape) != (b, T):
                raise ValueError(f"token weights have shape {tuple(tw.shape)}, the batch is {(b, T)}")
            if (tw < 0).any() or not torch.isfinite(tw).all():
                raise ValueError("token weights must be finite and non-negative")
            w = w * tw
        for p in self.exclude_positions:
            if -T <= p < T:
                w[:, p] = 0
        if self.exclude_token_ids:
            bad = torch.isin(ids.to(device), torch.tensor(self.exclude_token_ids, device=device))
            w = w.masked_fill(bad, 0.0)
        return w

    def at(self, batch: dict, n_out: int, device=None) -> torch.Tensor:
        """(b, n_out) weights of the scored output positions."""
        w = self.full(batch, device)
        pos = kept_positions(batch, n_out, device)
        return w[:, pos]


def as_weighting(weighting: Any = None, *, exclude_positions=(), exclude_token_ids=(), token_weights=None) -> TokenWeighting:
    if isinstance(weighting, TokenWeighting):
        if exclude_positions or exclude_token_ids or token_weights is not None:
            raise ValueError("give either weighting= or the exclude_positions/exclude_token_ids/token_weights options, not both")
        return weighting
    if isinstance(weighting, Mapping):
        return TokenWeighting(weighting.get("weights"), weighting.get("exclude_positions", ()), weighting.get("exclude_token_ids", ()))
    if weighting is not None:
        raise ValueError(f"weighting must be a TokenWeighting or a mapping, got {type(weighting).__name__}")
    return TokenWeighting(token_weights, exclude_positions, exclude_token_ids)
