"""Finding the quantizable layers of a model.

Quantizable layers are ``torch.nn.Linear`` and transformers' ``Conv1D`` (GPT-2, weight
stored (in, out)). :class:`LayerInfo` always reports the (out_features, in_features)
orientation of the linear map, whatever the storage.

Tied weights: a layer whose weight Parameter (or the memory it views) is shared with any
other parameter of the model is *tied*. If it is shared with a non-layer parameter (the
usual case: ``lm_head`` tied to ``model.embed_tokens``), quantizing it would also change
that parameter, so it is skipped unless ``quantize_tied=True`` (then it is quantized as one
unit with the tensor it shares, and its ``tie_group`` names that tensor). Layers sharing
one weight among themselves form one ``tie_group`` (they must get the same scheme; the
profile counts the shared weight's bits once).
"""

from __future__ import annotations
from .. import BitallocError

import re
from collections.abc import Sequence

import torch

from bitalloc.kernels.modules import get_weight, module_type

from .layer_info import LayerInfo, Skipped  # re-exported: the torch-free records
from .models import storage_key
from .patterns import match_pattern

__all__ = ["LayerInfo", "Skipped", "LayerSelectionError", "find_layers", "get_weight", "match_pattern"]


class LayerSelectionError(BitallocError, ValueError):
    """An include/exclude pattern matches nothing, or the selection is empty."""


def block_of(fqn: str) -> tuple[str | None, int | None]:
    """(block prefix, index) from the first numeric component of the fqn, else (None, None)."""
    parts = fqn.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1]), int(part)
    return None, None


def _check_patterns(patterns: Sequence[str], field: str) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise LayerSelectionError(f"{field} pattern must be a non-empty string, got {p!r}")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise LayerSelectionError(f"{field} pattern {p!r} is not a valid regex: {e}") from None
        out.append(p)
    return out


def find_layers(
    model: torch.nn.Module,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    quantize_tied: bool = False,
) -> tuple[list[LayerInfo], list[Skipped]]:
    """All quantizable layers (Linear, Conv1D) in module order, filtered by name patterns.

    ``include`` (if given) keeps layers matching any pattern, then ``exclude`` drops layers
    matching any pattern. Patterns are fnmatch globs on the fully qualified name
    (``*.mlp.*``, ``model.layers.0.*``) or ``re:<regex>``. A pattern matching no layer at
    all, or an empty selection, raises :class:`LayerSelectionError`.

    Returns (selected layers, skipped layers with reasons); only tied weights are reported
    as skipped (what include/exclude leaves out was asked for).
    """
    include = _check_patterns(include, "include")
    exclude = _check_patterns(exclude, "exclude")

    # who owns each piece of parameter memory (all parameters, not just layers)
    owners: dict[tuple, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(storage_key(p), []).append(name)

    candidates: list[tuple[str, torch.nn.Module, str]] = []
    for fqn, module in model.named_modules(remove_duplicate=False):
        mtype = module_type(module)
        if mtype is None or not fqn or getattr(module, "weight", None) is None:
            continue
        if module.weight.dim() != 2 or not module.weight.dtype.is_floating_point:
            continue
        candidates.append((fqn, module, mtype))
    if not candidates:
        raise LayerSelectionError(f"model {type(model).__name__} has no Linear or Conv1D layers")
    layer_weight_names = {f"{fqn}.weight" for fqn, _, _ in candidates}

    names = [fqn for fqn, _, _ in candidates]
    for field, patterns in (("include", include), ("exclude", exclude)):
        for p in patterns:
            if not any(match_pattern(p, n) for n in names):
                example = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                raise LayerSelectionError(f"{field} pattern {p!r} matches no layer (layers look like: {example})")

    selected: list[LayerInfo] = []
    skipped: list[Skipped] = []
    for fqn, module, mtype in candidates:
        if include and not any(match_pattern(p, fqn) for p in include):
            continue
        if any(match_pattern(p, fqn) for p in exclude):
            continue
        wname = f"{fqn}.weight"
        sharers = owners.get(storage_key(module.weight), [wname])
        others = [n for n in sharers if n != wname]
        tie_group = None
        if others:
            canonical = sharers[0]
            non_layer = [n for n in others if n not in layer_weight_names]
            if non_layer and not quantize_tied:
                skipped.append(
                    Skipped(
                        fqn,
                        f"weight tied to {non_layer[0]}; quantizing it would also change "
                        f"{non_layer[0].rsplit('.', 1)[0]} (use quantize_tied=True to quantize it as one unit)",
                    )
                )
                continue
            tie_group = canonical
        w = get_weight(module, mtype)
        out_f, in_f = int(w.shape[0]), int(w.shape[1])
        block, bidx = block_of(fqn)
        selected.append(
            LayerInfo(
                fqn=fqn,
                module_type=mtype,
                out_features=out_f,
                in_features=in_f,
                n_params=out_f * in_f,
                block=block,
                block_index=bidx,
                tie_group=tie_group,
                bias=getattr(module, "bias", None) is not None,
            )
        )
    if not selected:
        why = f" ({len(skipped)} skipped: " + "; ".join(str(s) for s in skipped[:3]) + ")" if skipped else ""
        raise LayerSelectionError(f"no quantizable layers selected (include={include}, exclude={exclude}){why}")
    return selected, skipped
