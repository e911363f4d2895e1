"""Running a model on calibration batches (shared by the Hessian and measurement passes)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["model_device", "to_device", "forward", "base_module_for", "tree_clone", "replay_blocks"]


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}  # flags pass through


def base_module_for(model: torch.nn.Module, fqns: Sequence[str]) -> tuple[torch.nn.Module, str]:
    """The smallest module to run so that every layer in ``fqns`` sees its input.

    For a causal LM whose selected layers all sit in the base model (``model.model``,
    ``transformer``), running the base model skips the LM head: for SmolLM2 that is a
    49152 x 576 matmul per token, about a fifth of the forward. Returns (module, prefix).
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, torch.nn.Module) and base is not model and fqns and all(f.startswith(prefix + ".") for f in fqns):
        return base, prefix + "."
    return model, ""


def forward(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """One forward without cache or gradients; the batch is moved to the module's device."""
    batch = to_device(batch, model_device(module))
    kwargs: dict[str, Any] = dict(batch)
    if getattr(getattr(module, "config", None), "use_cache", None) is not None or hasattr(module, "generate"):
        kwargs["use_cache"] = False
    with torch.no_grad():
        try:
            return module(**kwargs)
        except TypeError:
            kwargs.pop("use_cache", None)
            return module(**kwargs)


def tree_clone(x: Any) -> Any:
    """Detached clones of every tensor in a (nested) tuple/list/dict/ModelOutput."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, tuple) and not hasattr(x, "keys"):
        return type(x)(tree_clone(v) for v in x) if type(x) is tuple else type(x)(*[tree_clone(v) for v in x])
    if isinstance(x, list):
        return [tree_clone(v) for v in x]
    if isinstance(x, dict):
        out = type(x)() if type(x) is dict else x.__class__(**{k: tree_clone(v) for k, v in x.items()})
        if type(x) is dict:
            out.update({k: tree_clone(v) for k, v in x.items()})
        return out
    return x


@contextlib.contextmanager
def replay_blocks(blocks: Sequence[torch.nn.Module], before: int, output: Any, leaf: torch.Tensor | None = None):
    """Blocks ``0..before-1`` skip their work: the last returns a clone of ``output`` (block
    ``before-1``'s cached output, so the consumer may not change the cache), the others
    ``output`` itself (nothing reads it). With ``leaf`` (a gradient target standing for the
    output's hidden state), the last returns ``leaf`` in its place, not a clone. Each block's
    own ``forward`` comes back after."""
    last = tree_clone(output) if leaf is None else (
        leaf if isinstance(output, torch.Tensor) else type(output)((leaf, *output[1:])))
    patched = []
    try:
        for i in range(before):
            blk = blocks[i]
            prev = blk.__dict__.get("forward", None)
            value = last if i == before - 1 else output
            blk.forward = lambda *a, _v=value, **k: _v
            patched.append((blk, prev))
        yield
    finally:
        for blk, prev in patched:
            if prev is None:
                del blk.forward
            else:
                blk.forward = prev
