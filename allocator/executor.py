"""Materialise a plan: quantize each planned layer, pack it, swap in ``QuantLinear``.

Round-to-nearest quantization (kernels' reference quantizer); the packed weights are
exactly the plan's predicted bits (checked here, layer by layer, on every apply, save and
load). Layers planned ``fp16`` stay ``nn.Linear`` / ``Conv1D`` and are stored in float16.

Tied weights: a planned layer whose weight is shared with a parameter outside the plan
(``lm_head`` tied to ``embed_tokens``) is quantized as one unit with it, as the profiler
measured it: the other parameter becomes the dequantized weight (so the embedding lookup
sees the same values as the output layer), and a saved model stores only the packed
weight (the plan does not count the embedding either). Two planned layers sharing one
weight are refused (the plan format cannot express the shared bytes).

Saved quantized model (a directory; written and read by :mod:`.quantized_io`):
    model.safetensors   every tensor of the model's state dict once: the packed buffers of
                        each QuantLinear (qweight, scales, qzeros, high_*), fp16-planned
                        layers' weights and all other parameters in float16 (tied tensors
                        stored once, under their first name)
    plan.json           the plan (schema, model fingerprint, fqn -> scheme)
    quantized.json      envelope, written last: schema version, base-model spec and
                        fingerprint, sha256 and size of model.safetensors, packed weight
                        bytes, aliases (tied names), derived tensors, original dtypes

``load_quantized`` rebuilds the base architecture from the spec, checks its fingerprint
against the plan, swaps in empty ``QuantLinear`` layers and loads the tensors; anything
missing, corrupt, edited or mismatched is an :class:`ExecutorError` (a ``PlanError``)
with a one-line message, never a silently different model.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from bitalloc.kernels.modules import get_weight, is_conv1d, weight_shape
from bitalloc.sensitivity.hessian import hessian_tensor

from .plan import Plan, PlanError

__all__ = ["apply", "packed_weight_bytes", "ExecutorError", "QUANTIZED_SCHEMA"]  # save/load: .quantized_io

QUANTIZED_SCHEMA = "bitalloc.quantized/1"
TIES_ATTR = "_bitalloc_tied"  # on a quantized model: {parameter name: planned layer fqn} (derived params)


class ExecutorError(PlanError):
    """A plan cannot be applied to this model, or a saved model is corrupt or mismatched."""


def one_line(e: BaseException | str) -> str:
    s = str(e).strip()
    return " ".join(s.split()) if s else type(e).__name__


# ---------------------------------------------------------------------------------------
# helpers


def storage_key(t: torch.Tensor):
    from bitalloc.sensitivity.models import storage_key as key

    return key(t)


def set_module(model: torch.nn.Module, fqn: str, new: torch.nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def set_param(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    setattr(module, attr, param)


def planned_modules(model, plan: Plan):
    names = dict(model.named_modules())
    missing = [f for f in plan.layers if f not in names]
    if missing:
        example = ", ".join(list(n for n, m in names.items() if weight_shape(m) is not None)[:2])
        raise ExecutorError(
            f"plan names {len(missing)} layer(s) the model ({type(model).__name__}) does not have, e.g. "
            f"{missing[0]!r} (its layers look like: {example or 'none'}); was the plan made for another model?"
        )
    return [(f, names[f]) for f in plan.layers]


def check_rules(model, plan: Plan) -> None:
    """Pattern rules / a default scheme are not materialised: refuse if they would cover a layer."""
    if not plan.rules and plan.default is None:
        return
    uncovered = [n for n, m in model.named_modules() if n and n not in plan.layers and weight_shape(m) is not None
                 and plan.scheme_for(n) is not None]
    if uncovered:
        raise ExecutorError(
            f"plan has pattern rules / a default scheme covering {len(uncovered)} layer(s) not listed by name "
            f"(e.g. {uncovered[0]!r}); the executor applies only per-layer entries with exact bits: list them in plan.layers"
        )


def check_layer(fqn: str, module: torch.nn.Module, lp) -> None:
    from bitalloc.kernels.qlinear import QuantLinear

    if isinstance(module, QuantLinear):
        raise ExecutorError(f"{fqn}: already a QuantLinear ({module.scheme.name}); apply a plan to the unquantized model")
    shape = weight_shape(module)
    if shape is None:
        raise ExecutorError(f"{fqn}: is a {type(module).__name__}, the executor quantizes nn.Linear or Conv1D layers")
    if tuple(shape) != tuple(lp.shape):
        raise ExecutorError(f"{fqn}: the layer is (out, in) = {tuple(shape)} but the plan says {tuple(lp.shape)}")


def _param_sharers(model: torch.nn.Module) -> dict:
    """storage key -> [parameter names] (every name of a tied tensor)."""
    owners: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(storage_key(p), []).append(name)
    return owners


def is_fp16_exact(t: torch.Tensor) -> bool:
    if t.dtype == torch.float16:
        return True
    h = t.to(torch.float16)
    return bool(torch.equal(h.to(t.dtype), t))


# ---------------------------------------------------------------------------------------
# apply


def apply(model: torch.nn.Module, plan: Plan, *, inplace: bool = False, fingerprint: dict | None = None,
          hessians: Any = None, cache: dict | None = None) -> torch.nn.Module:
    """Return the model with every planned layer replaced by a packed ``QuantLinear``.

    inplace=False copies the module tree but shares every tensor with the original model
    (nothing is modified in place), so a sweep of plans does not multiply the weights.
    fingerprint: the model's fingerprint, to check the plan was made for this model.
    Raises :class:`ExecutorError` when the plan does not fit the model.

    A plan with ``quantization.quantizer == "gptq"`` needs ``hessians``: ``fqn -> H``
    (tensors or accumulators) or the path of a file written by
    :func:`sensitivity.hessian_store.save_hessians` (checked against the plan's recorded
    ``quantization.hessians.sha256`` when there is one). Split layers use the plan's
    ``high_idx`` (the profile's saliency-chosen channels).

    ``cache`` (a dict the caller keeps while applying several plans to one model) shares the
    packed layers between plans that choose the same (layer, scheme, channels, quantizer):
    each is quantized once. The modules are never modified after creation, so sharing is safe.
    """
    from bitalloc.kernels.formats import parse_scheme
    from bitalloc.kernels.qlinear import QuantLinear

    if not isinstance(plan, Plan):
        raise ExecutorError(f"plan must be a Plan, got {type(plan).__name__}")
    if fingerprint is not None:
        try:
            plan.check_model(fingerprint)
        except PlanError as e:
            raise ExecutorError(one_line(e)) from None
    if plan.quantizer in ("ggml", "ggml-imatrix"):  # the llama.cpp target: ggml's own round trip
        from .llamacpp import apply_plan

        return apply_plan(model, plan, inplace=inplace)
    targets = planned_modules(model, plan)
    check_rules(model, plan)
    schemes = {fqn: parse_scheme(plan.layers[fqn].scheme) for fqn, _ in targets}
    for fqn, module in targets:
        check_layer(fqn, module, plan.layers[fqn])

    # tied weights: among planned layers (refused) or with parameters outside the plan (derived)
    sharers = _param_sharers(model)
    planned_weights = {f"{fqn}.weight": fqn for fqn, _ in targets}
    derived: dict[str, str] = {}
    for fqn, module in targets:
        names = sharers.get(storage_key(module.weight), [])
        layers = [planned_weights[n] for n in names if n in planned_weights and planned_weights[n] != fqn]
        if layers:
            raise ExecutorError(f"{fqn} and {layers[0]} share one weight; planning tied layers separately is not supported")
        if schemes[fqn].is_quantized:
            derived.update({n: fqn for n in names if n != f"{fqn}.weight"})

    if not inplace:
        memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        model = copy.deepcopy(model, memo)  # new modules, same tensors
        targets = planned_modules(model, plan)

    gptq = plan.quantizer == "gptq"
    if plan.quantizer not in ("rtn", "gptq"):
        raise ExecutorError(f"plan quantizer {plan.quantizer!r} is not one of ('rtn', 'gptq')")
    if gptq:
        hessians = _plan_hessians(plan, hessians, [fqn for fqn, _ in targets if schemes[fqn].is_quantized])
    quantized: dict[str, QuantLinear] = {}
    for fqn, module in targets:
        lp, scheme = plan.layers[fqn], schemes[fqn]
        if not scheme.is_quantized:
            continue  # fp16: kept as it is (stored, and counted, at 16 bits)
        key = (fqn, lp.scheme, tuple(lp.high_idx or ()), plan.quantizer, storage_key(module.weight))
        if cache is not None and key in cache:
            quantized[fqn] = cache[key]
            continue
        high_idx = torch.tensor(lp.high_idx, dtype=torch.long) if lp.high_idx is not None else None
        try:
            with torch.no_grad():
                if gptq:
                    from bitalloc.kernels.gptq import gptq_quantize_weight

                    w = get_weight(module).detach()  # (out, in)
                    H = hessian_tensor(hessians[fqn]).to(torch.float32)
                    qw = gptq_quantize_weight(w.to(torch.float32), scheme, H.to(w.device), high_idx)
                    q = QuantLinear.from_quantized(qw, module.bias)
                else:
                    q = QuantLinear.from_module(module, scheme, high_idx=high_idx)
        except (TypeError, ValueError) as e:
            raise ExecutorError(f"{fqn}: cannot quantize with {lp.scheme}: {one_line(e)}") from None
        got = q.weight_nbytes() * 8
        if got != lp.bits:
            raise ExecutorError(f"{fqn}: packed {got} bits but the plan predicts {lp.bits}")
        quantized[fqn] = q
        if cache is not None:
            cache[key] = q

    transposed = {fqn for fqn, m in targets if is_conv1d(m)}
    tie_derived(model, derived, quantized, transposed)  # tied to a quantized layer: its dequantized weight
    for fqn, q in quantized.items():
        set_module(model, fqn, q)
    if derived:
        ties = dict(getattr(model, TIES_ATTR, {}) or {})
        ties.update(derived)
        setattr(model, TIES_ATTR, ties)
    return model


def _plan_hessians(plan: Plan, hessians: Any, fqns: list[str]) -> dict:
    """The Hessians a GPTQ plan needs, from a dict or a saved file; a clear error when missing."""
    rec = dict(plan.quantization.get("hessians") or {})
    if hessians is None and rec.get("path") and Path(rec["path"]).is_file():
        hessians = rec["path"]  # the file saved beside the profile (checked against its sha256 below)
    if hessians is None:
        where = f" (the plan records {rec['path']!r})" if rec.get("path") else ""
        raise ExecutorError("this plan was made with quantizer 'gptq': apply it with hessians= (a dict or the "
                            f"Hessian file saved beside the profile){where}")
    if isinstance(hessians, (str, os.PathLike)):
        from bitalloc.sensitivity.hessian_store import HessianStoreError, load_hessians

        try:
            hessians = load_hessians(hessians, sha256=rec.get("sha256"),
                                     tokens_sha256=plan.quantization.get("calibration_tokens_sha256"))
        except HessianStoreError as e:
            raise ExecutorError(str(e)) from None
    missing = [f for f in fqns if f not in hessians]
    if missing:
        raise ExecutorError(f"GPTQ plan: no Hessian for {len(missing)} layer(s), e.g. {missing[0]}")
    return hessians


def tie_derived(model: torch.nn.Module, derived: dict[str, str], quantized: dict, transposed: set) -> None:
    """Set each derived parameter (name -> quantized layer fqn) to the layer's dequantized weight, in the
    parameter's dtype and device; all names derived from one layer share one new Parameter. ``transposed``:
    layers stored (in, out) (Conv1D), whose tied parameters are too."""
    by_layer: dict[str, list[str]] = {}
    for name, fqn in derived.items():
        by_layer.setdefault(fqn, []).append(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    for fqn, names in by_layer.items():
        old = params.get(names[0])
        if old is None:
            raise ExecutorError(f"{names[0]} (tied to {fqn}) is not a parameter of the model")
        with torch.no_grad():
            w = quantized[fqn].dequantized_weight()  # (out, in) float32
            if fqn in transposed:
                w = w.t()
            if tuple(w.shape) != tuple(old.shape):
                raise ExecutorError(f"{fqn}: tied parameter {names[0]} has shape {tuple(old.shape)}, the layer weight "
                                    f"{tuple(w.shape)}; cannot quantize them as one unit")
            new = torch.nn.Parameter(w.to(dtype=old.dtype, device=old.device).contiguous(), requires_grad=old.requires_grad)
        for n in names:
            set_param(model, n, new)


def packed_weight_bytes(model: torch.nn.Module, plan: Plan) -> int:
    """Bytes the planned layers occupy in the model: packed buffers, or 16-bit for fp16 layers."""
    from bitalloc.kernels.qlinear import QuantLinear

    total = 0
    for fqn, module in planned_modules(model, plan):
        if isinstance(module, QuantLinear):
            total += module.weight_nbytes()
        else:
            total += module.weight.numel() * 2
    return total


