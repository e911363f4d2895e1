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

Saved quantized model (a directory):
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
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .plan import Plan, PlanError

__all__ = ["apply", "save_quantized", "load_quantized", "packed_weight_bytes", "ExecutorError", "QUANTIZED_SCHEMA"]

QUANTIZED_SCHEMA = "bitalloc.quantized/1"
TIES_ATTR = "_bitalloc_tied"  # on a quantized model: {parameter name: planned layer fqn} (derived params)


class ExecutorError(PlanError):
    """A plan cannot be applied to this model, or a saved model is corrupt or mismatched."""


def _one_line(e: BaseException | str) -> str:
    s = str(e).strip()
    return " ".join(s.split()) if s else type(e).__name__


# ---------------------------------------------------------------------------------------
# helpers


def _storage_key(t: torch.Tensor):
    from bitalloc.sensitivity.models import _storage_key as key

    return key(t)


def _set_module(model: torch.nn.Module, fqn: str, new: torch.nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _set_param(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    setattr(module, attr, param)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # noqa: BLE001 - transformers missing: no Conv1D layers
        return None
    return Conv1D


def _layer_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(out, in) of an nn.Linear / Conv1D, else None."""
    if isinstance(module, torch.nn.Linear):
        return tuple(module.weight.shape)
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return (module.weight.shape[1], module.weight.shape[0])
    return None


def _planned_modules(model, plan: Plan):
    names = dict(model.named_modules())
    missing = [f for f in plan.layers if f not in names]
    if missing:
        example = ", ".join(list(n for n, m in names.items() if _layer_shape(m) is not None)[:2])
        raise ExecutorError(
            f"plan names {len(missing)} layer(s) the model ({type(model).__name__}) does not have, e.g. "
            f"{missing[0]!r} (its layers look like: {example or 'none'}); was the plan made for another model?"
        )
    return [(f, names[f]) for f in plan.layers]


def _check_rules(model, plan: Plan) -> None:
    """Pattern rules / a default scheme are not materialised: refuse if they would cover a layer."""
    if not plan.rules and plan.default is None:
        return
    uncovered = [n for n, m in model.named_modules() if n and n not in plan.layers and _layer_shape(m) is not None
                 and plan.scheme_for(n) is not None]
    if uncovered:
        raise ExecutorError(
            f"plan has pattern rules / a default scheme covering {len(uncovered)} layer(s) not listed by name "
            f"(e.g. {uncovered[0]!r}); the executor applies only per-layer entries with exact bits: list them in plan.layers"
        )


def _check_layer(fqn: str, module: torch.nn.Module, lp) -> None:
    from bitalloc.kernels.qlinear import QuantLinear

    if isinstance(module, QuantLinear):
        raise ExecutorError(f"{fqn}: already a QuantLinear ({module.scheme.name}); apply a plan to the unquantized model")
    shape = _layer_shape(module)
    if shape is None:
        raise ExecutorError(f"{fqn}: is a {type(module).__name__}, the executor quantizes nn.Linear or Conv1D layers")
    if tuple(shape) != tuple(lp.shape):
        raise ExecutorError(f"{fqn}: the layer is (out, in) = {tuple(shape)} but the plan says {tuple(lp.shape)}")


def _param_sharers(model: torch.nn.Module) -> dict:
    """storage key -> [parameter names] (every name of a tied tensor)."""
    owners: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(_storage_key(p), []).append(name)
    return owners


def _is_fp16_exact(t: torch.Tensor) -> bool:
    if t.dtype == torch.float16:
        return True
    h = t.to(torch.float16)
    return bool(torch.equal(h.to(t.dtype), t))


# ---------------------------------------------------------------------------------------
# apply


def apply(model: torch.nn.Module, plan: Plan, *, inplace: bool = False, fingerprint: dict | None = None,
          hessians: Any = None) -> torch.nn.Module:
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
    """
    from bitalloc.kernels.formats import parse_scheme
    from bitalloc.kernels.qlinear import QuantLinear

    if not isinstance(plan, Plan):
        raise ExecutorError(f"plan must be a Plan, got {type(plan).__name__}")
    if fingerprint is not None:
        try:
            plan.check_model(fingerprint)
        except PlanError as e:
            raise ExecutorError(_one_line(e)) from None
    if plan.quantizer in ("ggml", "ggml-imatrix"):  # the llama.cpp target: ggml's own round trip
        from .llamacpp import apply_plan

        return apply_plan(model, plan, inplace=inplace)
    targets = _planned_modules(model, plan)
    _check_rules(model, plan)
    schemes = {fqn: parse_scheme(plan.layers[fqn].scheme) for fqn, _ in targets}
    for fqn, module in targets:
        _check_layer(fqn, module, plan.layers[fqn])

    # tied weights: among planned layers (refused) or with parameters outside the plan (derived)
    sharers = _param_sharers(model)
    planned_weights = {f"{fqn}.weight": fqn for fqn, _ in targets}
    derived: dict[str, str] = {}
    for fqn, module in targets:
        names = sharers.get(_storage_key(module.weight), [])
        layers = [planned_weights[n] for n in names if n in planned_weights and planned_weights[n] != fqn]
        if layers:
            raise ExecutorError(f"{fqn} and {layers[0]} share one weight; planning tied layers separately is not supported")
        if schemes[fqn].is_quantized:
            derived.update({n: fqn for n in names if n != f"{fqn}.weight"})

    if not inplace:
        memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        model = copy.deepcopy(model, memo)  # new modules, same tensors
        targets = _planned_modules(model, plan)

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
        high_idx = torch.tensor(lp.high_idx, dtype=torch.long) if lp.high_idx is not None else None
        try:
            with torch.no_grad():
                if gptq:
                    from bitalloc.kernels.gptq import gptq_quantize_weight

                    w = module.weight.detach()
                    w = w if isinstance(module, torch.nn.Linear) else w.t()
                    H = hessians[fqn]
                    H = (H.H if hasattr(H, "H") and not isinstance(H, torch.Tensor) else H).to(torch.float32)
                    qw = gptq_quantize_weight(w.to(torch.float32), scheme, H.to(w.device), high_idx)
                    q = QuantLinear.from_quantized(qw, module.bias)
                else:
                    q = QuantLinear.from_module(module, scheme, high_idx=high_idx)
        except (TypeError, ValueError) as e:
            raise ExecutorError(f"{fqn}: cannot quantize with {lp.scheme}: {_one_line(e)}") from None
        got = q.weight_nbytes() * 8
        if got != lp.bits:
            raise ExecutorError(f"{fqn}: packed {got} bits but the plan predicts {lp.bits}")
        quantized[fqn] = q

    conv1d = _conv1d_class()
    transposed = {fqn for fqn, m in targets if conv1d is not None and isinstance(m, conv1d)}
    _tie_derived(model, derived, quantized, transposed)  # tied to a quantized layer: its dequantized weight
    for fqn, q in quantized.items():
        _set_module(model, fqn, q)
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


def _tie_derived(model: torch.nn.Module, derived: dict[str, str], quantized: dict, transposed: set) -> None:
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
            _set_param(model, n, new)


def packed_weight_bytes(model: torch.nn.Module, plan: Plan) -> int:
    """Bytes the planned layers occupy in the model: packed buffers, or 16-bit for fp16 layers."""
    from bitalloc.kernels.qlinear import QuantLinear

    total = 0
    for fqn, module in _planned_modules(model, plan):
        if isinstance(module, QuantLinear):
            total += module.weight_nbytes()
        else:
            total += module.weight.numel() * 2
    return total


# ---------------------------------------------------------------------------------------
# save


def _check_applied(model: torch.nn.Module, plan: Plan) -> None:
    """The model is what apply(model, plan) makes: right module, scheme and packed bytes per layer."""
    from bitalloc.kernels.formats import parse_scheme
    from bitalloc.kernels.qlinear import QuantLinear

    for fqn, module in _planned_modules(model, plan):
        lp = plan.layers[fqn]
        scheme = parse_scheme(lp.scheme)
        if not scheme.is_quantized:
            _check_layer(fqn, module, lp)
            continue
        if not isinstance(module, QuantLinear):
            raise ExecutorError(f"{fqn}: is a {type(module).__name__}, not a QuantLinear: save the model apply(model, plan) returns")
        if module.scheme.name != scheme.name or (module.out_features, module.in_features) != tuple(lp.shape):
            raise ExecutorError(f"{fqn}: QuantLinear is {module.scheme.name} {(module.out_features, module.in_features)}, "
                                f"the plan says {scheme.name} {tuple(lp.shape)}")
        if module.weight_nbytes() * 8 != lp.bits:
            raise ExecutorError(f"{fqn}: packed {module.weight_nbytes() * 8} bits but the plan predicts {lp.bits}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def save_quantized(model: torch.nn.Module, plan: Plan, out_dir: str | Path, *, spec: str | None = None) -> Path:
    """Write model.safetensors + plan.json + quantized.json (last); returns the directory.

    ``model`` must be what ``apply(model, plan)`` returned; ``spec`` (default: the plan's)
    names the base model ``load_quantized`` rebuilds the architecture from. Every float
    tensor outside the packed layers is stored in float16 and must hold float16 values
    exactly (``allocator.load`` rounds the model so): anything else is an error, never a
    silent loss of precision.
    """
    from safetensors.torch import save_file

    from bitalloc.kernels.qlinear import PACKED_NAMES, QuantLinear

    if not isinstance(plan, Plan):
        raise ExecutorError(f"plan must be a Plan, got {type(plan).__name__}")
    spec = spec or plan.model.get("spec")
    if not isinstance(spec, str) or not spec:
        raise ExecutorError("no base model spec: the plan has no model.spec; pass spec= (e.g. 'smollm2')")
    _check_applied(model, plan)

    packed = {f"{fqn}.{b}" for fqn, m in model.named_modules() if isinstance(m, QuantLinear) for b in PACKED_NAMES}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    derived = dict(getattr(model, TIES_ATTR, {}) or {})
    modules = dict(model.named_modules())
    for name, fqn in derived.items():  # still the dequantized weight of its layer?
        layer = modules.get(fqn)
        mod_name, _, attr = name.rpartition(".")
        p = getattr(modules.get(mod_name), attr, None) if mod_name in modules else None
        if not isinstance(layer, QuantLinear) or not isinstance(p, torch.Tensor):
            raise ExecutorError(f"{name} is recorded as tied to the quantized {fqn}, but the model no longer has them")
        w = layer.dequantized_weight()
        if not torch.equal(w.to(p.dtype), p.detach()) and not (w.t().shape == p.shape and torch.equal(w.t().to(p.dtype), p.detach())):
            raise ExecutorError(f"{name} was tied to the quantized {fqn} but has been changed since apply")

    tensors: dict[str, torch.Tensor] = {}
    seen: dict = {}
    aliases: dict[str, str] = {}
    dtypes: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        if name in derived:
            dtypes[name] = _dtype_name(t.dtype)
            continue
        key = _storage_key(t) if t.numel() else ("empty", name)
        if key in seen:  # tied: stored once, recorded as an alias
            aliases[name] = seen[key]
            continue
        seen[key] = name
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.is_floating_point() and name not in packed:
            dtypes[name] = _dtype_name(t.dtype)
            if t.dtype != torch.float16:
                if _is_fp16_exact(t):
                    t = t.to(torch.float16)
                elif name in params:
                    raise ExecutorError(
                        f"parameter {name} ({_dtype_name(t.dtype)}) holds values float16 cannot represent; "
                        "round the model to 16-bit first (allocator.load does; or sensitivity.models.round_to_16bit)"
                    )
                # a float buffer that is not fp16-exact is kept at its dtype (lossless)
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)  # a view into a larger tensor: own storage
        tensors[name] = t

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExecutorError(f"{str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    meta_p, st_p = out / "quantized.json", out / "model.safetensors"
    if meta_p.exists():
        meta_p.unlink()  # a crash below leaves no envelope pointing at half-written files
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "bitalloc": QUANTIZED_SCHEMA})
    os.replace(tmp, st_p)
    plan.save(out / "plan.json")
    meta = {
        "schema": QUANTIZED_SCHEMA,
        "spec": spec,
        "model": plan.model,
        "safetensors": {"sha256": _sha256_file(st_p), "bytes": st_p.stat().st_size, "n_tensors": len(tensors)},
        "packed_weight_bytes": packed_weight_bytes(model, plan),
        "predicted_quantized_bytes": plan.quantized_bits // 8,
        "layers": {fqn: lp.scheme for fqn, lp in plan.layers.items()},
        "aliases": aliases,
        "derived": derived,
        "dtypes": dtypes,
        "bitalloc_version": _version(),
    }
    tmp = out / "quantized.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_p)
    return out


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("bitalloc")
    except Exception:  # noqa: BLE001 - running from a checkout without metadata
        return "unknown"


# ---------------------------------------------------------------------------------------
# load


def _read_meta(meta_p: Path) -> dict:
    try:
        meta = json.loads(meta_p.read_text())
    except json.JSONDecodeError as e:
        raise ExecutorError(f"{meta_p}: corrupt JSON ({e.msg} at line {e.lineno}); the save is truncated or edited") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ExecutorError(f"{meta_p}: unreadable ({_one_line(e)})") from None
    if not isinstance(meta, dict):
        raise ExecutorError(f"{meta_p}: not a bitalloc quantized-model envelope (a JSON {type(meta).__name__})")
    if meta.get("schema") != QUANTIZED_SCHEMA:
        raise ExecutorError(f"{meta_p}: unsupported schema {meta.get('schema')!r} (this bitalloc reads {QUANTIZED_SCHEMA!r})")
    fields = {"spec": str, "model": dict, "safetensors": dict, "aliases": dict, "derived": dict, "dtypes": dict,
              "packed_weight_bytes": int}
    for k, typ in fields.items():
        if not isinstance(meta.get(k), typ):
            raise ExecutorError(f"{meta_p}: field {k!r} is missing or not a {typ.__name__}")
    st = meta["safetensors"]
    if not isinstance(st.get("sha256"), str) or not isinstance(st.get("bytes"), int):
        raise ExecutorError(f"{meta_p}: field 'safetensors' needs 'sha256' and 'bytes'")
    for k in ("aliases", "derived", "dtypes"):
        if not all(isinstance(a, str) and isinstance(b, str) for a, b in meta[k].items()):
            raise ExecutorError(f"{meta_p}: field {k!r} must map names to names")
    return meta


def _load_base(spec: str, plan: Plan, check_fingerprint: bool):
    from bitalloc.sensitivity.models import fingerprint, load_model, round_to_16bit

    try:
        loaded = load_model(spec)
    except (ValueError, OSError) as e:
        raise ExecutorError(f"cannot load the base model {spec!r}: {_one_line(e)}") from None
    want = plan.model.get("fingerprint", {}).get("sha256") if isinstance(plan.model.get("fingerprint"), dict) else None
    if check_fingerprint and want:
        got = fingerprint(loaded.model)["sha256"]
        if got != want:
            round_to_16bit(loaded.model)  # plans are made on the 16-bit model (allocator.load)
            got = fingerprint(loaded.model)["sha256"]
        if got != want:
            raise ExecutorError(
                f"base model {spec!r} (weights sha256 {got[:12]}…) is not the model the plan was made for "
                f"({want[:12]}…); pass check_fingerprint=False to load anyway"
            )
    return loaded


def load_quantized(path: str | Path, *, loaded=None, device=None, check_fingerprint: bool = True):
    """Rebuild a saved quantized model: returns (model, plan), the model in eval mode.

    The base architecture comes from the saved spec (or ``loaded``, an already loaded
    base model, which is modified); its fingerprint must match the plan's unless
    ``check_fingerprint=False``. Raises :class:`ExecutorError` on anything missing,
    corrupt, edited or for a different model.
    """
    from safetensors import SafetensorError, safe_open

    from bitalloc.kernels.formats import parse_scheme
    from bitalloc.kernels.qlinear import PACKED_NAMES, QuantLinear

    d = Path(path)
    if not d.is_dir():
        raise ExecutorError(f"{str(d)!r} is not a saved quantized model: no such directory")
    meta_p, plan_p, st_p = d / "quantized.json", d / "plan.json", d / "model.safetensors"
    for p in (meta_p, plan_p, st_p):
        if not p.is_file():
            raise ExecutorError(f"{str(d)!r} is not a saved quantized model: {p.name} is missing")
    meta = _read_meta(meta_p)
    try:
        plan = Plan.load(plan_p)
    except PlanError as e:
        raise ExecutorError(_one_line(e)) from None
    want = meta["model"].get("fingerprint", {}).get("sha256") if isinstance(meta["model"].get("fingerprint"), dict) else None
    have = plan.model.get("fingerprint", {}).get("sha256") if isinstance(plan.model.get("fingerprint"), dict) else None
    if want != have:
        raise ExecutorError(f"{d}: plan.json and quantized.json describe different models (weights sha256 "
                            f"{str(have)[:12]}… vs {str(want)[:12]}…)")
    if meta.get("layers") is not None and meta["layers"] != {f: lp.scheme for f, lp in plan.layers.items()}:
        raise ExecutorError(f"{d}: plan.json and quantized.json list different layers or schemes")
    if st_p.stat().st_size != meta["safetensors"]["bytes"] or _sha256_file(st_p) != meta["safetensors"]["sha256"]:
        raise ExecutorError(f"{st_p}: does not match the checksum in quantized.json (corrupt, truncated or replaced after saving)")

    if loaded is None:
        loaded = _load_base(meta["spec"], plan, check_fingerprint)
    elif check_fingerprint:
        from bitalloc.sensitivity.models import fingerprint

        try:
            plan.check_model(fingerprint(loaded.model if hasattr(loaded, "model") else loaded))
        except PlanError as e:
            raise ExecutorError(_one_line(e)) from None
    model = loaded.model if hasattr(loaded, "model") else loaded

    # the architecture: planned layers become empty QuantLinear modules
    _check_rules(model, plan)
    conv1d = _conv1d_class()
    transposed = set()
    for fqn, module in _planned_modules(model, plan):
        lp = plan.layers[fqn]
        scheme = parse_scheme(lp.scheme)
        _check_layer(fqn, module, lp)
        if conv1d is not None and isinstance(module, conv1d):
            transposed.add(fqn)
        if scheme.is_quantized:
            bias = getattr(module, "bias", None) is not None
            _set_module(model, fqn, QuantLinear.empty(lp.shape[1], lp.shape[0], scheme, bias, scheme.n_high(lp.shape[1])))

    try:
        tensors = {}
        with safe_open(str(st_p), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ExecutorError(f"{st_p}: corrupt safetensors file ({_one_line(e)})") from None

    derived = meta["derived"]
    for alias, target in meta["aliases"].items():
        if target not in tensors:
            raise ExecutorError(f"{meta_p}: alias {alias} -> {target}, but {target} is not in model.safetensors")
        tensors[alias] = tensors[target]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors) - set(derived))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ExecutorError(f"{st_p}: tensors do not match the plan's model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    packed = {f"{fqn}.{b}" for fqn, m in model.named_modules() if isinstance(m, QuantLinear) for b in PACKED_NAMES}
    for k, t in tensors.items():
        e = expected[k]
        if tuple(t.shape) != tuple(e.shape):
            raise ExecutorError(f"{st_p}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(e.shape)}")
        if k in packed or not e.is_floating_point():
            if t.dtype != e.dtype:
                raise ExecutorError(f"{st_p}: tensor {k} is {_dtype_name(t.dtype)}, expected {_dtype_name(e.dtype)}")
        elif not t.is_floating_point():
            raise ExecutorError(f"{st_p}: tensor {k} is {_dtype_name(t.dtype)}, expected a float tensor")

    # ties of the rebuilt model: a tensor the file holds under two names must be one tensor
    groups: dict = {}
    for n, t in model.state_dict(keep_vars=True).items():
        if t.numel():
            groups.setdefault(_storage_key(t), []).append(n)
    for names in groups.values():
        stored = [n for n in names if n in tensors]
        for n in stored[1:]:
            if not torch.equal(tensors[n], tensors[stored[0]]):
                raise ExecutorError(f"{st_p}: {stored[0]} and {n} are one tensor in {meta['spec']} but differ in the file")

    # original dtypes (float tensors are stored as float16)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for k, dt in meta["dtypes"].items():
            dtype = getattr(torch, dt, None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ExecutorError(f"{meta_p}: tensor {k} has unknown dtype {dt!r}")
            holder = params.get(k, buffers.get(k))
            if holder is not None and holder.dtype != dtype and k not in packed:
                holder.data = holder.data.to(dtype)
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise ExecutorError(f"{st_p}: cannot load into the model ({_one_line(e)[:300]})") from None
    if set(result.missing_keys) - set(derived) or result.unexpected_keys:
        raise ExecutorError(f"{st_p}: tensors do not match the model (missing {result.missing_keys[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]})")

    # aliases: tied in the saved model -> one Parameter here too
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in meta["aliases"].items():
        if alias in params and target in params and params[alias] is not params[target]:
            _set_param(model, alias, params[target])

    # validate what was loaded: packed bytes per layer, split indices
    for fqn, module in _planned_modules(model, plan):
        lp = plan.layers[fqn]
        if isinstance(module, QuantLinear):
            if module.weight_nbytes() * 8 != lp.bits:
                raise ExecutorError(f"{fqn}: packed {module.weight_nbytes() * 8} bits but the plan predicts {lp.bits}")
            idx = module.high_idx
            if idx is not None and idx.numel():
                i64 = idx.to(torch.int64)
                if int(i64.min()) < 0 or int(i64.max()) >= module.in_features or bool((i64[1:] <= i64[:-1]).any()):
                    raise ExecutorError(f"{fqn}: high_idx must be ascending distinct channels in [0, {module.in_features})")
                if lp.high_idx is not None and tuple(i64.tolist()) != tuple(sorted(lp.high_idx)):
                    raise ExecutorError(f"{fqn}: high_idx in the file differs from the plan's")
    if derived:
        quantized = {}
        for name, fqn in derived.items():
            layer = model.get_submodule(fqn) if fqn in plan.layers else None
            if not isinstance(layer, QuantLinear):
                raise ExecutorError(f"{meta_p}: {name} is derived from {fqn}, which is not a quantized layer of the plan")
            quantized[fqn] = layer
        _tie_derived(model, derived, quantized, transposed)
        setattr(model, TIES_ATTR, dict(derived))
    got = packed_weight_bytes(model, plan)
    if got != plan.quantized_bits // 8 or got != meta["packed_weight_bytes"]:
        raise ExecutorError(f"{d}: packed weights are {got} bytes, the plan predicts {plan.quantized_bits // 8}")
    model.eval()
    if device is not None:
        model.to(device)
    return model, plan
