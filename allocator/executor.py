"""Materialise a plan: quantize each planned layer, pack it, swap in ``QuantLinear``.

Round-to-nearest quantization (kernels' reference quantizer); the packed weights are
exactly the plan's predicted bits (checked here, layer by layer, on every apply).

Saved quantized model (a directory):
    model.safetensors   every tensor of the model: the packed buffers of each QuantLinear
                        (qweight, scales, qzeros, high_*) and all other parameters in
                        float16 (tied tensors stored once)
    plan.json           the plan (schema, model fingerprint, fqn -> scheme)
    quantized.json      envelope: schema version, model spec, base-model fingerprint,
                        packed weight bytes, tensor list, bitalloc version
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .plan import Plan, PlanError

__all__ = ["apply", "save_quantized", "load_quantized", "packed_weight_bytes", "ExecutorError", "QUANTIZED_SCHEMA"]

QUANTIZED_SCHEMA = "bitalloc.quantized/1"


class ExecutorError(ValueError):
    """A plan cannot be applied to this model, or a saved model is corrupt or mismatched."""


def _set_module(model: torch.nn.Module, fqn: str, new: torch.nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _planned_modules(model, plan: Plan):
    names = dict(model.named_modules())
    missing = [f for f in plan.layers if f not in names]
    if missing:
        raise ExecutorError(f"plan names {len(missing)} layer(s) the model does not have, e.g. {missing[0]!r}")
    return [(f, names[f]) for f in plan.layers]


def apply(model: torch.nn.Module, plan: Plan, *, inplace: bool = False, fingerprint: dict | None = None) -> torch.nn.Module:
    """Return the model with every planned layer replaced by a packed ``QuantLinear``.

    inplace=False deep-copies only what is replaced: parameters not in the plan are
    shared with the original model, so a sweep of plans does not multiply the embedding.
    fingerprint: the model's fingerprint, to check the plan was made for this model.
    """
    from kernels.formats import parse_scheme
    from kernels.qlinear import QuantLinear

    if fingerprint is not None:
        plan.check_model(fingerprint)
    targets = _planned_modules(model, plan)
    if not inplace:
        planned = {id(m) for _, m in targets}
        memo = {id(p): p for n, p in model.named_parameters(remove_duplicate=False)
                if n.rpartition(".")[0] not in plan.layers}
        memo.update({id(b): b for n, b in model.named_buffers() if n.rpartition(".")[0] not in plan.layers})
        model = copy.deepcopy(model, memo)
        targets = _planned_modules(model, plan)
        del planned
    for fqn, module in targets:
        lp = plan.layers[fqn]
        scheme = parse_scheme(lp.scheme)
        if not scheme.is_quantized:
            continue  # fp16: kept as it is (counted at 16 bits)
        high_idx = torch.tensor(lp.high_idx, dtype=torch.long) if lp.high_idx is not None else None
        q = QuantLinear.from_module(module, scheme, high_idx=high_idx)
        got = q.weight_nbytes() * 8
        if got != lp.bits:
            raise ExecutorError(f"{fqn}: packed {got} bits but the plan predicts {lp.bits}")
        _set_module(model, fqn, q)
    return model


def packed_weight_bytes(model: torch.nn.Module, plan: Plan) -> int:
    """Bytes the planned layers occupy in the model: packed buffers, or 16-bit for fp16 layers."""
    from kernels.qlinear import QuantLinear

    total = 0
    for fqn, module in _planned_modules(model, plan):
        if isinstance(module, QuantLinear):
            total += module.weight_nbytes()
        else:
            total += module.weight.numel() * 2
    return total


def save_quantized(model: torch.nn.Module, plan: Plan, out_dir: str | Path, *, spec: str | None = None) -> Path:
    """Write model.safetensors + plan.json + quantized.json; returns the directory."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if key in seen:  # tied: stored once, recorded as an alias
            continue
        seen[key] = name
        if t.is_floating_point() and t.dtype not in (torch.float16,) and not _is_packed(name, plan):
            t = t.to(torch.float16)
        tensors[name] = t.contiguous()
    aliases = {n: seen[(t.data_ptr(), t.shape, t.dtype)] for n, t in model.state_dict().items()
               if t.numel() and n not in tensors}
    save_file(tensors, str(out / "model.safetensors"))
    plan.save(out / "plan.json")
    meta = {
        "schema": QUANTIZED_SCHEMA,
        "model": plan.model,
        "spec": spec or plan.model.get("spec"),
        "packed_weight_bytes": packed_weight_bytes(model, plan),
        "predicted_quantized_bytes": plan.quantized_bits // 8,
        "aliases": aliases,
    }
    (out / "quantized.json").write_text(json.dumps(meta, indent=1))
    return out


def _is_packed(name: str, plan: Plan) -> bool:
    layer, _, buf = name.rpartition(".")
    return layer in plan.layers and buf != "bias"


def load_quantized(path: str | Path, *, loaded=None):
    """Rebuild a saved quantized model: (model, plan). ``loaded``: an already loaded base model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from kernels.formats import parse_scheme
    from kernels.qlinear import QuantLinear
    from sensitivity.models import load_model

    d = Path(path)
    meta_p, plan_p, st_p = d / "quantized.json", d / "plan.json", d / "model.safetensors"
    for p in (meta_p, plan_p, st_p):
        if not p.is_file():
            raise ExecutorError(f"{str(d)!r} is not a saved quantized model: {p.name} is missing")
    try:
        meta = json.loads(meta_p.read_text())
    except json.JSONDecodeError as e:
        raise ExecutorError(f"{meta_p}: corrupt JSON ({e.msg})") from None
    if meta.get("schema") != QUANTIZED_SCHEMA:
        raise ExecutorError(f"{meta_p}: unsupported schema {meta.get('schema')!r} (this bitalloc reads {QUANTIZED_SCHEMA!r})")
    plan = Plan.load(plan_p)
    if plan.model.get("fingerprint", {}).get("sha256") != meta.get("model", {}).get("fingerprint", {}).get("sha256"):
        raise ExecutorError(f"{d}: plan.json and quantized.json describe different models")
    if loaded is None:
        loaded = load_model(meta["spec"])
    model = loaded.model
    for fqn, module in _planned_modules(model, plan):
        scheme = parse_scheme(plan.layers[fqn].scheme)
        if not scheme.is_quantized:
            continue
        n_high = scheme.n_high(plan.layers[fqn].shape[1])
        bias = getattr(module, "bias", None) is not None
        _set_module(model, fqn, QuantLinear.empty(plan.layers[fqn].shape[1], plan.layers[fqn].shape[0], scheme, bias, n_high))
    try:
        tensors = load_file(str(st_p))
    except (SafetensorError, OSError) as e:
        raise ExecutorError(f"{st_p}: corrupt safetensors file ({e})") from None
    for alias, target in meta.get("aliases", {}).items():
        if target in tensors:
            tensors[alias] = tensors[target]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ExecutorError(f"{st_p}: tensors do not match the plan (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise ExecutorError(f"{st_p}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
        if t.is_floating_point() and expected[k].is_floating_point():
            tensors[k] = t.to(expected[k].dtype)
    model.load_state_dict(tensors, strict=True)
    got = packed_weight_bytes(model, plan)
    if got != plan.quantized_bits // 8:
        raise ExecutorError(f"{d}: packed weights are {got} bytes, the plan predicts {plan.quantized_bits // 8}")
    model.eval()
    return model, plan
