"""Saving and loading a quantized model (the directory format described in :mod:`.executor`).

``save_quantized`` writes every file through the atomic helper (temporary file beside
it, fsync, rename) with the envelope ``quantized.json`` last; ``load_quantized`` reads
the envelope against its declared schema (:mod:`.quantized_schema`), checks the tensor
file's sha256, rebuilds the architecture and refuses anything missing, edited or for
another model with one line (an :class:`~.executor.ExecutorError`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bitalloc.sensitivity.artifact import file_sha256, read_json, validate, write_json, atomic_path

from bitalloc.kernels.modules import is_conv1d

from .executor import (
    QUANTIZED_SCHEMA,
    TIES_ATTR,
    ExecutorError,
    check_layer,
    check_rules,
    is_fp16_exact,
    one_line,
    planned_modules,
    set_module,
    set_param,
    storage_key,
    tie_derived,
    packed_weight_bytes,
)
from .plan import Plan, PlanError

__all__ = ["save_quantized", "load_quantized"]

MAX_ENVELOPE_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------
# save


def _check_applied(model: torch.nn.Module, plan: Plan) -> None:
    """The model is what apply(model, plan) makes: right module, scheme and packed bytes per layer."""
    from bitalloc.kernels.formats import parse_scheme
    from bitalloc.kernels.qlinear import QuantLinear

    for fqn, module in planned_modules(model, plan):
        lp = plan.layers[fqn]
        scheme = parse_scheme(lp.scheme)
        if not scheme.is_quantized:
            check_layer(fqn, module, lp)
            continue
        if not isinstance(module, QuantLinear):
            raise ExecutorError(f"{fqn}: is a {type(module).__name__}, not a QuantLinear: save the model apply(model, plan) returns")
        if module.scheme.name != scheme.name or (module.out_features, module.in_features) != tuple(lp.shape):
            raise ExecutorError(f"{fqn}: QuantLinear is {module.scheme.name} {(module.out_features, module.in_features)}, "
                                f"the plan says {scheme.name} {tuple(lp.shape)}")
        if module.weight_nbytes() * 8 != lp.bits:
            raise ExecutorError(f"{fqn}: packed {module.weight_nbytes() * 8} bits but the plan predicts {lp.bits}")


_sha256_file = file_sha256


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def save_quantized(model: torch.nn.Module, plan: Plan, out_dir: str | Path, *, spec: str | None = None,
                   overwrite: bool = True) -> Path:
    """Write model.safetensors + plan.json + quantized.json (last); returns the directory.

    ``model`` must be what ``apply(model, plan)`` returned; ``spec`` (default: the plan's)
    names the base model ``load_quantized`` rebuilds the architecture from. Every float
    tensor outside the packed layers is stored in float16 and must hold float16 values
    exactly (``allocator.load`` rounds the model so): anything else is an error, never a
    silent loss of precision. ``overwrite=False`` refuses a folder that already holds a
    saved model (the CLI's default; ``--overwrite`` allows it).
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
        key = storage_key(t) if t.numel() else ("empty", name)
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
                if is_fp16_exact(t):
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
    meta_p, st_p = out / "quantized.json", out / "model.safetensors"
    if not overwrite and any((out / n).exists() for n in ("quantized.json", "model.safetensors", "plan.json")):
        raise ExecutorError(f"{str(out)!r} already holds a saved model; pass --overwrite (overwrite=True) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    if meta_p.exists():
        meta_p.unlink()  # a crash below leaves no envelope pointing at half-written files
    with atomic_path(st_p) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "bitalloc": QUANTIZED_SCHEMA})
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
    write_json(meta_p, meta, indent=1)
    return out


def _version() -> str:
    from bitalloc import __version__

    return __version__


# ---------------------------------------------------------------------------------------
# load


def _read_meta(meta_p: Path) -> dict:
    """The envelope, validated against its declared schema before any field is used."""
    from bitalloc.sensitivity.artifact import check_schema

    from .quantized_schema import QuantizedFile

    where = f"{meta_p}"
    meta = read_json(meta_p, "quantized-model envelope", error=ExecutorError, max_bytes=MAX_ENVELOPE_BYTES)
    if not isinstance(meta, dict):
        raise ExecutorError(f"{meta_p}: not a bitalloc quantized-model envelope (a JSON {type(meta).__name__})")
    check_schema(meta.get("schema"), QUANTIZED_SCHEMA, where, error=ExecutorError)
    validate(QuantizedFile, meta, where, error=ExecutorError)
    return meta


def _load_base(spec: str, plan: Plan, check_fingerprint: bool):
    from bitalloc.sensitivity.models import fingerprint, load_model, round_to_16bit

    try:
        loaded = load_model(spec)
    except (ValueError, OSError) as e:
        raise ExecutorError(f"cannot load the base model {spec!r}: {one_line(e)}") from None
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
        raise ExecutorError(one_line(e)) from None
    want = meta["model"].get("fingerprint", {}).get("sha256") if isinstance(meta["model"].get("fingerprint"), dict) else None
    have = plan.model.get("fingerprint", {}).get("sha256") if isinstance(plan.model.get("fingerprint"), dict) else None
    if want != have:
        raise ExecutorError(f"{d}: plan.json and quantized.json describe different models (weights sha256 "
                            f"{str(have)[:12]}… vs {str(want)[:12]}…)")
    if meta.get("layers") is not None and meta["layers"] != {f: lp.scheme for f, lp in plan.layers.items()}:
        raise ExecutorError(f"{d}: plan.json and quantized.json list different layers or schemes")
    if st_p.stat().st_size != meta["safetensors"]["bytes"] or _sha256_file(st_p) != meta["safetensors"]["sha256"]:
        raise ExecutorError(f"{st_p}: does not match the checksum in quantized.json (corrupt, truncated or replaced after saving)")

    given = loaded is not None  # a model we load ourselves is checked by _load_base
    if not given:
        loaded = _load_base(meta["spec"], plan, check_fingerprint)
    # a LoadedModel holds its network in .model; a bare transformers causal LM has a .model too
    # (its inner base model), so the test is the type, not the attribute
    from bitalloc.sensitivity.models import LoadedModel, fingerprint

    model = loaded.model if isinstance(loaded, LoadedModel) else loaded
    if check_fingerprint and given:
        try:
            plan.check_model(fingerprint(model))
        except PlanError as e:
            raise ExecutorError(one_line(e)) from None

    # the architecture: planned layers become empty QuantLinear modules
    check_rules(model, plan)
    transposed = set()
    for fqn, module in planned_modules(model, plan):
        lp = plan.layers[fqn]
        scheme = parse_scheme(lp.scheme)
        check_layer(fqn, module, lp)
        if is_conv1d(module):
            transposed.add(fqn)
        if scheme.is_quantized:
            bias = getattr(module, "bias", None) is not None
            set_module(model, fqn, QuantLinear.empty(lp.shape[1], lp.shape[0], scheme, bias, scheme.n_high(lp.shape[1])))

    try:
        tensors = {}
        with safe_open(str(st_p), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ExecutorError(f"{st_p}: corrupt safetensors file ({one_line(e)})") from None

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
            groups.setdefault(storage_key(t), []).append(n)
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
        raise ExecutorError(f"{st_p}: cannot load into the model ({one_line(e)[:300]})") from None
    if set(result.missing_keys) - set(derived) or result.unexpected_keys:
        raise ExecutorError(f"{st_p}: tensors do not match the model (missing {result.missing_keys[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]})")

    # aliases: tied in the saved model -> one Parameter here too
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in meta["aliases"].items():
        if alias in params and target in params and params[alias] is not params[target]:
            set_param(model, alias, params[target])

    # validate what was loaded: packed bytes per layer, split indices
    for fqn, module in planned_modules(model, plan):
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
        tie_derived(model, derived, quantized, transposed)
        setattr(model, TIES_ATTR, dict(derived))
    got = packed_weight_bytes(model, plan)
    if got != plan.quantized_bits // 8 or got != meta["packed_weight_bytes"]:
        raise ExecutorError(f"{d}: packed weights are {got} bytes, the plan predicts {plan.quantized_bits // 8}")
    model.eval()
    if device is not None:
        model.to(device)
    return model, plan
