"""``--to compressed-tensors``: a Hugging Face model directory in compressed-tensors'
pack-quantized format (what llm-compressor writes; vLLM, SGLang and transformers load it).

The export **repacks** the executor's own integer codes, scales and zero-points (the
``QuantLinear`` buffers ``bitalloc.apply`` builds); nothing is requantized, so the
checkpoint dequantizes to exactly the weights bitalloc evaluated.

Layout per quantized module (compressed-tensors >= 0.18, checked against its
``pack_to_int32`` / ``unpack_from_int32`` in the tests):

* ``weight_packed`` int32 ``[out, ceil(in·b/32)]``: each row is one LSB-first bitstream
  of ``b``-bit values (value ``j`` at bits ``j·b .. j·b+b-1``; 3/5/6-bit values straddle
  words); a value is the signed code plus ``2^(b-1)``. compressed-tensors' signed code is
  ``clamp(round(w/s + zp), -2^(b-1), 2^(b-1)-1)`` with a signed zero-point ``zp``;
  bitalloc's unsigned code is ``clamp(round(w/s) + z, 0, 2^b-1)`` with ``z = zp + 2^(b-1)``:
  the stored values are bitalloc's codes unchanged, and ``(q - zp)·s = (code - z)·s``.
* ``weight_scale`` float16 ``[out, in/g]`` (``[out, 1]`` per channel): bitalloc's float16
  scales, bit for bit. compressed-tensors requires ``g`` to divide ``in``; a bitalloc
  format with a narrower last group (SmolLM2's 576 inputs with g128 = 4·128 + 64) is
  written with group ``gcd(g, in)`` (64 there) and each scale repeated: the same weights
  exactly, more scale bytes (reported per layer as ``regrouped``).
* ``weight_zero_point`` (asymmetric only) int32 ``[ceil(out·b/32), in/g]``: the values
  ``z`` packed the same way along the *output* dimension.
* ``weight_shape`` int64 ``[2]`` = ``(out, in)``.

``config.json`` carries ``quantization_config`` (``quant_method: compressed-tensors``,
``format: pack-quantized``, ``quantization_status: compressed``) with one config group per
distinct weight format listing exact module names, and ``ignore`` listing every linear
layer kept in 16-bit. ``dtype`` is float16, so scales load as the float16 values they are
(loading with ``dtype=torch.bfloat16`` would round them).

Not expressible (an error naming the layer and scheme unless ``--fallback`` says what to
do): fp8 / fp4 codes with float16 group scales (pack-quantized is integer only; the
nvfp4 / mxfp4 formats use fp8 / e8m0 scales), high-impact splits (a second format for
some input channels), and activation quantization (``a8`` / ``af8``: bitalloc's per-token
scale is ``absmax/127``; not written). ``--fallback fp16`` keeps such layers in 16-bit
(listed in ``ignore``); ``--fallback weight-only`` exports an ``a8``/``af8`` layer's
weights and drops its activation quantization.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from .export import ExportError, ExportRequest
from .plan import Plan, PlanError
from .vllm import ct_unexpressible

__all__ = ["export", "pack_dense", "unpack_dense", "ct_weight_args", "DESCRIPTION", "FALLBACKS"]

DESCRIPTION = "compressed-tensors pack-quantized checkpoint (vLLM, SGLang; loads in transformers)"
FALLBACKS = ("fp16", "weight-only")
NEEDS_MODEL = True
FORMAT = "pack-quantized"
WEIGHTS_FILE = "model.safetensors"


# ---------------------------------------------------------------------------------------
# the dense LSB-first bitstream


def pack_dense(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values (rows, n) in [0, 2^bits) -> int32 (rows, ceil(n·bits/32)): each row one
    LSB-first bitstream (value j at bits j·bits ..), zero-padded to whole words."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    v = values.to(torch.int64)
    rows, n = v.shape
    words = math.ceil(n * bits / 32)
    bitplane = (v.unsqueeze(-1) >> torch.arange(bits)) & 1  # (rows, n, bits), LSB first
    stream = bitplane.reshape(rows, n * bits).to(torch.uint8)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - n * bits))  # (rows, words*32)
    weights = torch.tensor([1 << k for k in range(32)], dtype=torch.int64)  # (32,)
    w = (stream.view(rows, words, 32).to(torch.int64) * weights).sum(-1)  # (rows, words) in [0, 2^32)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def unpack_dense(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_dense`: int32 (rows, W) -> int64 (rows, n) unsigned values."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    rows, w = u.shape
    stream = ((u.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(rows, w * 32)[:, : n * bits]  # (rows, n*bits)
    return (stream.view(rows, n, bits) << torch.arange(bits)).sum(-1)


# ---------------------------------------------------------------------------------------
# which bitalloc schemes have a compressed-tensors counterpart


def ct_weight_args(scheme, in_features: int) -> tuple[dict | None, int | None, str | None]:
    """(compressed-tensors ``weights`` args, bitalloc group size it was regrouped from, reason
    it cannot be expressed). fp16 gives (None, None, None): a 16-bit layer (``ignore``)."""
    w = scheme.weight
    if not w.is_quantized:
        return None, None, None
    why = ct_unexpressible(scheme)
    if why is not None:
        return None, None, why
    args = {"num_bits": w.bits, "type": "int", "symmetric": bool(w.symmetric), "dynamic": False}
    regrouped = None
    if w.group_size is None:
        args.update(strategy="channel")
    else:
        g = w.group_size
        if in_features % g:
            regrouped, g = g, math.gcd(g, in_features)
        args.update(strategy="group", group_size=g)
    if scheme.act != "a16":
        return args, regrouped, (f"activation quantization {scheme.act} (bitalloc's per-token scale) is not written "
                                 "(--fallback weight-only exports the weights alone)")
    return args, regrouped, None


def _args_key(args: dict) -> tuple:
    return tuple(sorted(args.items()))


# ---------------------------------------------------------------------------------------
# the export


def _bitalloc_parts(fmt, out_f: int, in_f: int) -> dict[str, int]:
    """Bytes of bitalloc's own packed tensors per part (what the plan counts)."""
    from bitalloc.kernels.formats import packed_words

    g = fmt.n_groups(in_f)
    parts = {"codes": out_f * packed_words(in_f, fmt.bits) * 4, "scales": out_f * g * 2}
    parts["zeros"] = out_f * packed_words(g, fmt.bits) * 4 if fmt.has_zero else 0
    return parts


def _repack(qlinear, args: dict, regrouped: int | None) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one QuantLinear (no split), from its packed buffers."""
    from bitalloc.kernels.packing import unpack_codes

    qw = qlinear.quantized_weight()
    low = qw.low
    fmt = low.fmt
    out_f, in_f = low.shape
    b = fmt.bits
    codes = unpack_codes(low.qweight, b, in_f)  # (out, in) uint8: bitalloc's codes = CT's stored values
    scale = low.scales  # (out, G) float16
    zeros = unpack_codes(low.qzeros, b, fmt.n_groups(in_f)) if low.qzeros is not None else None  # (out, G)
    if regrouped is not None:
        r = regrouped // args["group_size"]
        n = in_f // args["group_size"]
        scale = scale.repeat_interleave(r, dim=1)[:, :n]  # (out, in/g')
        zeros = zeros.repeat_interleave(r, dim=1)[:, :n] if zeros is not None else None
    t = {
        "weight_packed": pack_dense(codes, b),  # (out, ceil(in*b/32))
        "weight_scale": scale.to(torch.float16).contiguous(),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if zeros is not None:
        t["weight_zero_point"] = pack_dense(zeros.t(), b).t().contiguous()  # (ceil(out*b/32), G')
    return t


def _decide(req: ExportRequest):
    """Per layer: ("quant", args, regrouped, scheme_name) | ("fp16", reason or None)."""
    from bitalloc.kernels.formats import parse_scheme

    out = {}
    for fqn, lp in req.plan.layers.items():
        scheme = parse_scheme(lp.scheme)
        args, regrouped, why = ct_weight_args(scheme, lp.shape[1])
        if args is None and why is None:
            out[fqn] = ("fp16", None)
            continue
        if why is not None:
            if args is not None and "weight-only" in req.fallback:
                from bitalloc.kernels.formats import Scheme

                out[fqn] = ("quant", args, regrouped, Scheme(scheme.weight).name, "weight-only: activation quantization dropped")
                continue
            if "fp16" in req.fallback:
                out[fqn] = ("fp16", f"fallback fp16: {why}")
                continue
            hint = "--fallback weight-only or fp16" if args is not None else "--fallback fp16 keeps it in 16-bit"
            raise ExportError(f"layer {fqn}: scheme {lp.scheme} cannot be exported to compressed-tensors: {why} ({hint})")
        out[fqn] = ("quant", args, regrouped, lp.scheme, None)
    return out


def load_checked(req: ExportRequest):
    from bitalloc.sensitivity.models import fingerprint

    from . import api

    loaded = req.model if (req.model is not None and not isinstance(req.model, str)) else api.load(req.model_spec, log=None)
    try:
        req.plan.check_model(fingerprint(loaded.model))
    except PlanError as e:
        raise ExportError(f"{' '.join(str(e).split())} (model {req.model_spec!r})") from None
    return loaded


def export(req: ExportRequest, stage: Path) -> dict:
    from bitalloc import require

    require("compressed_tensors", "compressed-tensors", "the compressed-tensors export")
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import save_file

    from bitalloc.kernels.qlinear import PACKED_NAMES, QuantLinear

    from . import vllm
    from .executor import TIES_ATTR, ExecutorError
    from .executor import apply as _apply
    from .plan import LayerPlan

    plan = req.plan
    decisions = _decide(req)
    loaded = load_checked(req)
    net = loaded.model

    # the executor quantizes exactly the layers written packed (same codes as bitalloc.apply)
    qlayers = {f: d for f, d in decisions.items() if d[0] == "quant"}
    from bitalloc.kernels.modules import is_conv1d

    for f in qlayers:
        mod = net.get_submodule(f) if f in dict(net.named_modules()) else None
        if mod is not None and is_conv1d(mod):
            raise ExportError(f"layer {f}: is a transformers Conv1D (GPT-2), stored (in, out); compressed-tensors "
                              "quantizes nn.Linear modules")
    sub = Plan(model=plan.model, layers={f: LayerPlan(f, d[3], plan.layers[f].shape, plan.layers[f].bits,
                                                       plan.layers[f].loss, plan.layers[f].high_idx)
                                          for f, d in qlayers.items()},
               quantization=plan.quantization, label=plan.label)
    try:
        qmodel = _apply(net, sub)
    except ExecutorError as e:
        raise ExportError(" ".join(str(e).split())) from None
    tied = dict(getattr(qmodel, TIES_ATTR, {}) or {})
    if tied:
        name, fqn = next(iter(tied.items()))
        raise ExportError(f"layer {fqn}: its weight is tied to {name}; a compressed-tensors checkpoint cannot hold a "
                          "quantized tied layer (plan it fp16 or untie it)")

    modules = dict(qmodel.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    seen: dict = {}
    packed_names = {f"{f}.{b}" for f in qlayers for b in PACKED_NAMES}
    from bitalloc.sensitivity.models import storage_key as _storage_key

    for name, t in qmodel.state_dict().items():
        if name in packed_names:
            continue
        key = _storage_key(t) if t.numel() else ("empty", name)
        if key in seen:  # tied tensors are stored once (transformers re-ties them from the config)
            continue
        seen[key] = name
        t = t.detach().cpu()
        if t.is_floating_point() and t.dtype != torch.float16:
            h = t.to(torch.float16)
            if not torch.equal(h.to(t.dtype), t):
                raise ExportError(f"tensor {name} holds values float16 cannot represent; the export stores float16")
            t = h
        tensors[name] = t.contiguous().clone()

    rows, groups = [], {}
    shapes = vllm.fused_shapes([(f, lp.shape[0], lp.shape[1]) for f, lp in plan.layers.items()])
    parts_total = {"ct": {"weight_packed": 0, "weight_scale": 0, "weight_zero_point": 0, "weight_shape": 0},
                   "bitalloc": {"codes": 0, "scales": 0, "zeros": 0}}
    ignore = []
    for fqn, lp in plan.layers.items():
        d = decisions[fqn]
        row = {"layer": fqn, "scheme": lp.scheme, "plan_bytes": lp.bits / 8}
        if d[0] == "fp16":
            ignore.append(fqn)
            w = modules[fqn].weight
            row.update(exported="fp16", note=d[1], bytes=w.numel() * 2, vllm_module=vllm.fused_name(fqn) or fqn)
            rows.append(row)
            continue
        _, args, regrouped, sname, note = d
        q = modules[fqn]
        assert isinstance(q, QuantLinear), (fqn, type(q))
        t = _repack(q, args, regrouped)
        for k, v in t.items():
            tensors[f"{fqn}.{k}"] = v
        if q.bias is not None:
            tensors[f"{fqn}.bias"] = q.bias.detach().cpu().to(torch.float16).contiguous().clone()
        key = _args_key(args)
        groups.setdefault(key, (args, []))[1].append(fqn)
        nb = {k: v.numel() * v.element_size() for k, v in t.items()}
        for k, v in nb.items():
            parts_total["ct"][k] += v
        ba = _bitalloc_parts(q.scheme.weight, *lp.shape)
        for k, v in ba.items():
            parts_total["bitalloc"][k] += v
        o, i = shapes[fqn]
        fam = vllm.kernel_families(args["num_bits"], args["symmetric"], args.get("group_size"), o, i)
        row.update(exported=sname, bytes=sum(nb.values()), parts=nb, bitalloc_parts=ba,
                   regrouped=(f"g{regrouped} -> g{args['group_size']} (gcd with in={lp.shape[1]}; scales repeated, "
                              "same weights)") if regrouped else None,
                   note=note, vllm_module=vllm.fused_name(fqn) or fqn, vllm_shape=[o, i],
                   vllm_kernels=[k for k, why in fam.items() if why is None],
                   vllm_not=fam)
        rows.append(row)

    # every other linear layer stays 16-bit too (e.g. a tied lm_head the plan skipped)
    from bitalloc.kernels.modules import weight_shape

    for name, m in qmodel.named_modules():
        if name and name not in plan.layers and weight_shape(m) is not None:
            ignore.append(name)

    config_groups = {}
    for k, (key, (args, targets)) in enumerate(groups.items()):
        config_groups[f"group_{k}"] = {"targets": targets, "weights": dict(args), "input_activations": None,
                                       "output_activations": None, "format": FORMAT}
    qc = {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
          "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None}
    try:
        QuantizationConfig.model_validate(qc)  # compressed-tensors' own schema (pydantic, no unknown keys)
    except Exception as e:  # noqa: BLE001 - a bug here, surfaced as one line
        raise ExportError(f"compressed-tensors rejects the quantization config: {' '.join(str(e).split())[:300]}") from None

    save_file(tensors, str(stage / WEIGHTS_FILE), metadata={"format": "pt"})
    cfg = copy.deepcopy(qmodel.config)
    cfg.quantization_config = qc
    cfg.architectures = [type(net).__name__]
    cfg.dtype = torch.float16
    cfg.save_pretrained(str(stage))
    tok = getattr(loaded, "tokenizer", None)
    tokenizer_files = []
    if tok is not None and hasattr(tok, "save_pretrained"):
        before = {p.name for p in stage.iterdir()}
        tok.save_pretrained(str(stage))
        tokenizer_files = sorted(p.name for p in stage.iterdir() if p.name not in before)
    return _report(req, rows, parts_total, stage, tensors, qlayers, config_groups, ignore, tokenizer_files)


def _fused_conflicts(rows: list[dict]) -> list[str]:
    by: dict[str, set] = {}
    for r in rows:
        by.setdefault(r.get("vllm_module") or r["layer"], set()).add(r["exported"])
    return sorted(m for m, s in by.items() if len(s) > 1 and m not in {r["layer"] for r in rows})


def _report(req, rows, parts, stage, tensors, qlayers, config_groups, ignore, tokenizer_files) -> dict:
    plan = req.plan
    quant_rows = [r for r in rows if r["exported"] != "fp16"]
    exported_q = sum(r["bytes"] for r in quant_rows)
    plan_q = sum(r["plan_bytes"] for r in quant_rows)
    fp16_rows = [r for r in rows if r["exported"] == "fp16"]
    file_bytes = (stage / WEIGHTS_FILE).stat().st_size
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    d_codes = parts["ct"]["weight_packed"] - parts["bitalloc"]["codes"]
    d_scales = parts["ct"]["weight_scale"] - parts["bitalloc"]["scales"]
    d_zeros = parts["ct"]["weight_zero_point"] - parts["bitalloc"]["zeros"]
    explain = [
        f"codes: {parts['ct']['weight_packed']} B dense bitstream vs {parts['bitalloc']['codes']} B bitalloc bit planes "
        f"({d_codes:+d} B: bitalloc pads each row to whole words per bit plane, compressed-tensors once per row)",
        f"scales: {parts['ct']['weight_scale']} B vs {parts['bitalloc']['scales']} B ({d_scales:+d} B: both float16; "
        "layers regrouped to gcd(g, in) repeat their scales)",
        f"zero-points: {parts['ct']['weight_zero_point']} B vs {parts['bitalloc']['zeros']} B ({d_zeros:+d} B: "
        "compressed-tensors packs them along the output dimension, bitalloc along the groups of each row)",
        f"weight_shape: {parts['ct']['weight_shape']} B (int64 [2] per layer; bitalloc stores shapes in the plan)",
    ]
    conflicts = _fused_conflicts(rows)
    kernels = {}
    for r in quant_rows:
        for k in r["vllm_kernels"]:
            kernels.setdefault(k, 0)
            kernels[k] += 1
    none = [r["layer"] for r in quant_rows if not r["vllm_kernels"]]
    summary = [
        f"compressed-tensors ({FORMAT}): {len(quant_rows)} packed layers in {len(config_groups)} config group(s), "
        f"{len(ignore)} linear layer(s) in ignore ({len(fp16_rows)} planned/fallback fp16)",
        f"packed tensors {exported_q} B vs the plan's predicted {plan_q:.0f} B ({exported_q - plan_q:+.0f} B); "
        f"{WEIGHTS_FILE} {file_bytes} B (all tensors {tensor_bytes} B + safetensors header)",
        *[f"  {e}" for e in explain],
        "vLLM kernels (read from vLLM's code): " + (", ".join(f"{k} {n}/{len(quant_rows)} layers" for k, n in kernels.items())
                                                   or "none") + (f"; no vLLM kernel for {len(none)} layer(s) (e.g. {none[0]})" if none else ""),
    ]
    if conflicts:
        summary.append(f"warning: vLLM fuses {conflicts[0]} (and {len(conflicts) - 1} more) whose shards got different "
                       "schemes; vLLM refuses that (solve with --target vllm)")
    regrouped = [r["layer"] for r in quant_rows if r.get("regrouped")]
    if regrouped:
        summary.append(f"regrouped {len(regrouped)} layer(s) to a group size dividing their inputs "
                       f"(e.g. {regrouped[0]}: {next(r['regrouped'] for r in quant_rows if r.get('regrouped'))})")
    return {
        "format": FORMAT,
        "files": sorted(p.name for p in stage.iterdir()),
        "weights_file": {"name": WEIGHTS_FILE, "bytes": file_bytes, "tensor_bytes": tensor_bytes, "n_tensors": len(tensors)},
        "tokenizer_files": tokenizer_files,
        "config_groups": {k: {"weights": v["weights"], "n_targets": len(v["targets"])} for k, v in config_groups.items()},
        "ignore": ignore,
        "bytes": {"exported_quantized": exported_q, "plan_predicted_quantized": plan_q,
                  "plan_predicted_all_planned": plan.quantized_bits / 8,
                  "fp16_layers_exported": sum(r["bytes"] for r in fp16_rows),
                  "parts": parts, "explanation": explain},
        "scale_dtype": {"bitalloc": "float16 (rounded to float16 before the codes are computed)",
                        "exported": "float16 (bit-identical); config dtype float16 keeps them so on load"},
        "vllm": {"kernel_counts": kernels, "no_kernel": none, "fused_conflicts": conflicts},
        "layers": rows,
        "summary_lines": summary,
    }
