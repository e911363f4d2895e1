"""``--to torchao``: the plan as a torchao ``FqnToConfig`` (per-module configs by exact name).

Writes two files:

* ``torchao_config.json``: ``{"schema", "torchao_version", "config": <torchao's own
  serialisation of the FqnToConfig (torchao.core.config.config_to_dict)>, "layers": ...}``;
  rebuild it with ``torchao.core.config.config_from_dict(d["config"])`` (or
  :func:`load_config`);
* ``torchao_config.py``: the same config as a readable Python snippet with
  ``apply(model)`` = ``quantize_(model, config, filter_fn=None)``.

Mapping (torchao 0.18). Every integer weight format becomes
``IntxWeightOnlyConfig(weight_dtype=torch.int<b>, granularity=PerGroup(g) | PerAxis(0),
mapping_type=SYMMETRIC | ASYMMETRIC, scale_dtype=torch.float16)``: torchao's int1..int8
weight-only path, which runs on CPU (``IntxUnpackedToInt8Tensor``). 16-bit layers map to
``None`` (left alone). ``Int4WeightOnlyConfig(group_size=g)`` is not written: its default
"plain" packing needs the ``mslk`` package and its other packings CUDA or a layout this
torchao build refuses on CPU ("opaque"), and its "tinygemm" quantizer stores a float
zero-point (not bitalloc's symmetric or integer-zero formats).

torchao quantizes the float weights itself when ``quantize_`` runs: the export carries the
plan's *format choice* per layer, not bitalloc's codes. torchao's symmetric scale is
``absmax / ((2^b - 1) / 2)`` (bitalloc: ``absmax / (2^(b-1) - 1)``) and it has no clip
search, so the quantized weights differ from bitalloc's (same bits, same bytes per layer).

Not supported (an error naming the layer and scheme unless ``--fallback``): fp8 / fp4
codes with float16 group scales (torchao's float8 configs are per-row/per-tensor, its
fp4 configs use their own scale formats), high-impact splits, activation quantization
(torchao's int8-dynamic-activation + intx-weight path asserts asymmetric activations;
bitalloc's ``a8`` is symmetric per token; ``af8`` has no int-weight counterpart), and
group sizes that do not divide the layer's inputs (torchao asserts divisibility).
``--fallback fp16`` leaves such layers unquantized; ``--fallback weight-only`` drops the
activation quantization of ``a8``/``af8`` layers; ``--fallback regroup`` uses group
``gcd(g, in)`` for a layer whose inputs the group size does not divide.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .export import ExportError, ExportRequest

__all__ = ["export", "layer_config", "load_config", "DESCRIPTION", "FALLBACKS", "UNSUPPORTED"]

DESCRIPTION = "torchao FqnToConfig (JSON + Python snippet) applying the plan's formats with quantize_"
FALLBACKS = ("fp16", "weight-only", "regroup")
NEEDS_MODEL = False
JSON_NAME = "torchao_config.json"
PY_NAME = "torchao_config.py"
SCHEMA = "bitalloc.torchao/1"

UNSUPPORTED = (
    "fp8 / fp4 weight codes with float16 group scales",
    "high-impact splits (a second format for some input channels)",
    "activation quantization a8 (symmetric per token) and af8",
    "a group size that does not divide the layer's input features (e.g. g128 on 576 inputs)",
    "Int4WeightOnlyConfig on CPU (plain packing needs mslk, the others CUDA); IntxWeightOnlyConfig is used instead",
    "bitalloc's exact codes: torchao requantizes the float weights (its own scale rule, no clip search)",
    "transformers Conv1D layers (GPT-2): torchao's weight-only configs act on nn.Linear",
)


def layer_config(scheme, in_features: int, fallback=()) -> tuple[dict | None, str | None]:
    """(spec of the torchao config for one layer, note) — spec None: leave the layer 16-bit.

    The spec is ``{"weight_dtype": "int4", "group_size": 32 | None, "mapping_type":
    "SYMMETRIC" | "ASYMMETRIC"}``. Raises ``ValueError`` with the reason when the scheme has no
    torchao counterpart and ``fallback`` does not cover it.
    """
    w = scheme.weight
    if not w.is_quantized:
        return None, None
    why, note = None, None
    if scheme.high is not None:
        why = "a high-impact split has no torchao counterpart"
    elif w.kind != "int":
        why = f"{w.kind} codes with float16 group scales have no torchao counterpart"
    elif scheme.act != "a16" and "weight-only" not in fallback:
        why = (f"activation quantization {scheme.act} has no torchao counterpart (its int8 dynamic-activation path is "
               "asymmetric only) (--fallback weight-only drops it)")
    if why is not None:
        if "fp16" in fallback:
            return None, f"fallback fp16: {why}"
        raise ValueError(why + ("" if "fallback" in why else " (--fallback fp16 leaves it unquantized)"))
    if scheme.act != "a16":
        note = f"weight-only: activation quantization {scheme.act} dropped"
    g = w.group_size
    if g is not None and in_features % g:
        if "regroup" in fallback:
            g2 = math.gcd(g, in_features)
            note = (note + "; " if note else "") + f"regrouped g{g} -> g{g2} (torchao needs the group to divide in={in_features})"
            g = g2
        elif "fp16" in fallback:
            return None, f"fallback fp16: group {g} does not divide in={in_features}"
        else:
            raise ValueError(f"group size {g} does not divide the layer's {in_features} inputs (torchao asserts it; "
                             "--fallback regroup uses gcd, fp16 leaves it unquantized)")
    return {"weight_dtype": f"int{w.bits}", "group_size": g,
            "mapping_type": "SYMMETRIC" if w.symmetric else "ASYMMETRIC"}, note


def _torchao_config(spec: dict):
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, MappingType
    from torchao.quantization.granularity import PerAxis, PerGroup

    gran = PerAxis(0) if spec["group_size"] is None else PerGroup(int(spec["group_size"]))
    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, spec["weight_dtype"]), granularity=gran,
                                mapping_type=getattr(MappingType, spec["mapping_type"]), scale_dtype=torch.float16)


def _snippet_line(fqn: str, spec: dict | None) -> str:
    if spec is None:
        return f"    {fqn!r}: None,"
    gran = "PerAxis(0)" if spec["group_size"] is None else f"PerGroup({int(spec['group_size'])})"
    return (f"    {fqn!r}: IntxWeightOnlyConfig(weight_dtype=torch.{spec['weight_dtype']}, granularity={gran}, "
            f"mapping_type=MappingType.{spec['mapping_type']}, scale_dtype=torch.float16),")


def load_config(path: str | Path):
    """The FqnToConfig of an exported ``torchao_config.json`` (via torchao's own deserialiser)."""
    from torchao.core.config import config_from_dict

    d = json.loads(Path(path).read_text())
    if d.get("schema") != SCHEMA:
        raise ExportError(f"{path}: not a bitalloc torchao export (schema {d.get('schema')!r}, expected {SCHEMA!r})")
    return config_from_dict(d["config"])


def export(req: ExportRequest, stage: Path) -> dict:
    from bitalloc import require

    torchao = require("torchao", "torchao", "the torchao export")
    from torchao.core.config import config_to_dict
    from torchao.quantization import FqnToConfig

    from bitalloc.kernels.formats import parse_scheme
    from bitalloc.sensitivity.artifact import write_json, write_text

    plan = req.plan
    if req.model:  # optional: check the plan against a model the user names
        from .export_ct import load_checked

        load_checked(req)
    specs, rows = {}, []
    for fqn, lp in plan.layers.items():
        try:
            spec, note = layer_config(parse_scheme(lp.scheme), lp.shape[1], req.fallback)
        except ValueError as e:
            raise ExportError(f"layer {fqn}: scheme {lp.scheme} cannot be exported to torchao: {e}") from None
        specs[fqn] = spec
        rows.append({"layer": fqn, "scheme": lp.scheme, "torchao": spec, "note": note, "plan_bytes": lp.bits / 8})
    config = FqnToConfig({f: (_torchao_config(s) if s is not None else None) for f, s in specs.items()})
    doc = {"schema": SCHEMA, "torchao_version": getattr(torchao, "__version__", "?"),
           "config": config_to_dict(config), "layers": rows, "unsupported": list(UNSUPPORTED),
           "how": "torchao.quantization.quantize_(model, torchao.core.config.config_from_dict(doc['config']), "
                  "filter_fn=None)"}
    write_json(stage / JSON_NAME, doc, indent=1)
    lines = [
        f"# torchao FqnToConfig for bitalloc plan {plan.label or '(unlabelled)'} "
        f"({plan.bpw:.4f} bpw over {len(plan.layers)} layers), written by `bitalloc export --to torchao`.",
        "# torchao quantizes the float weights itself (its own scales): the per-layer formats are the plan's,",
        "# the codes are not bitalloc's. Use: from torchao_config import apply; apply(model)",
        "import torch",
        "from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig, MappingType, quantize_",
        "from torchao.quantization.granularity import PerAxis, PerGroup",
        "",
        "config = FqnToConfig({",
        *[_snippet_line(f, s) for f, s in specs.items()],
        "})",
        "",
        "",
        "def apply(model):",
        "    quantize_(model, config, filter_fn=None)",
        "    return model",
        "",
    ]
    write_text(stage / PY_NAME, "\n".join(lines))
    n_q = sum(1 for s in specs.values() if s is not None)
    fallen = [r for r in rows if r["note"]]
    summary = [f"torchao: {n_q} layers as IntxWeightOnlyConfig, {len(specs) - n_q} left unquantized (None); "
               f"{len(fallen)} with a fallback note; files {JSON_NAME}, {PY_NAME}",
               "torchao requantizes the float weights at quantize_ time (same formats and bytes, not bitalloc's codes)"]
    return {"files": [JSON_NAME, PY_NAME], "layers": rows, "unsupported": list(UNSUPPORTED), "summary_lines": summary}
