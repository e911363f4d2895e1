"""Profiles for the llama.cpp target: ggml's types, ggml's quantizer, the GGUF file as the budget.

:func:`build_llamacpp_profile` is :func:`build_profile` with

* candidates that are ggml types (default :data:`LLAMACPP_SCHEMES`; with an importance
  matrix also :data:`IMATRIX_SCHEMES`), each a candidate only where its block divides the
  rows (llama.cpp's rule; the table holds NaN elsewhere and the solver skips it);
* every weight quantized by ggml's own C quantizer (quantizer ``ggml``, or
  ``ggml-imatrix``: the importance matrix is each layer's ``diag(H)``, llama.cpp's
  per-column mean of x² over the calibration tokens);
* every 2-D weight of the GGUF in the plan, ``token_embd`` included (SmolLM2 ties the
  output to it: the tied ``lm_head`` layer stands for it and is measured as one unit);
* the whole GGUF file as the budget: ``other_bits`` is the exact rest of the file that
  ``llama_model_quantize`` writes (header, metadata, tokenizer, tensor infos, alignment
  padding, the F32 norms), so ``cost_bits[chosen].sum() + other_bits`` is the file size.

The importance matrix is written beside the profile (``<profile>.imatrix.gguf``, llama.cpp's
GGUF imatrix format) and recorded with its sha256 in ``metadata["imatrix"]``.
"""

from __future__ import annotations
from .. import BitallocError

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["LLAMACPP_SCHEMES", "IMATRIX_SCHEMES", "LLAMACPP_REF_SCHEMES", "build_llamacpp_profile",
           "LlamaCppProfileError"]

LLAMACPP_SCHEMES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "q4_0", "q5_0", "q5_1", "iq4_nl", "iq4_xs",
                    "f16", "bf16")
IMATRIX_SCHEMES = ("iq2_xs", "iq2_s", "iq3_xxs", "iq3_s")
# measured end to end per layer (they fit every row width that is a multiple of 32)
LLAMACPP_REF_SCHEMES = ("q4_0", "q5_0")


class LlamaCppProfileError(BitallocError, ValueError):
    """A llama.cpp-target profile request is invalid; one line."""


def default_schemes(imatrix: bool) -> list[str]:
    return list(LLAMACPP_SCHEMES) + (list(IMATRIX_SCHEMES) if imatrix else [])


def check_request(schemes, imatrix: bool, ref_schemes=None, include=(), exclude=()) -> tuple[list[str], list[str]]:
    """(schemes, ref schemes) of a llama.cpp-target profile, or a one-line error (before any work)."""
    from bitalloc.kernels.formats import GGML_IMATRIX_ONLY, is_ggml

    if include or exclude:
        raise LlamaCppProfileError("the llama.cpp target plans every 2-D weight of the GGUF: use pins "
                                   "(solve --pin PATTERN=q8_0) instead of --include/--exclude")
    schemes = list(schemes) if schemes else default_schemes(imatrix)
    bad = [s for s in schemes if not is_ggml(s)]
    if bad:
        raise LlamaCppProfileError(f"scheme {bad[0]!r} is not a ggml type: the llama.cpp target's candidates are "
                                   f"llama.cpp's own types ({', '.join(LLAMACPP_SCHEMES + IMATRIX_SCHEMES)})")
    schemes = [s.lower() for s in schemes]
    if not imatrix:
        need = [s for s in schemes if s in GGML_IMATRIX_ONLY]
        if need:
            raise LlamaCppProfileError(f"ggml type {need[0]} needs an importance matrix: profile with the imatrix "
                                       "(drop --no-imatrix) or without that type")
    refs = [r.lower() for r in (ref_schemes or [r for r in LLAMACPP_REF_SCHEMES if r in schemes] or [schemes[0]])]
    bad = [r for r in refs if r not in schemes]
    if bad:
        raise LlamaCppProfileError(f"ref scheme {bad[0]!r} is not one of the schemes")
    return schemes, refs


def build_llamacpp_profile(model: Any = "smollm2", schemes: Sequence[str] | None = None, *, imatrix: bool = True,
                           imatrix_out: str | os.PathLike | None = None, ref_schemes: Sequence[str] | None = None,
                           include: Sequence[str] = (), exclude: Sequence[str] = (), **kw):
    """A :class:`SensitivityProfile` for the llama.cpp target (see the module docstring).

    ``model``: a spec whose weights come from a GGUF (``smollm2``, a ``.gguf`` path) or a
    :class:`LoadedModel` of one. ``imatrix_out``: where the importance matrix goes (needed
    with ``imatrix=True``). Other keywords go to :func:`build_profile`.
    """
    from .ggml import gguf_layout, model_gguf_path, write_imatrix
    from .models import LoadedModel, load_model
    from .build import build_profile
    from .errors import ProfileError
    from .hessian import hessian_tensor as _hessian_tensor

    schemes, refs = check_request(schemes, imatrix, ref_schemes, include, exclude)
    if imatrix and imatrix_out is None:
        raise LlamaCppProfileError("a profile with an importance matrix needs imatrix_out (where to write it)")

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    layout = gguf_layout(model_gguf_path(loaded.spec))
    from .ggml import GGMLError

    if layout["architecture"] not in ("llama",):
        raise LlamaCppProfileError(f"GGUF architecture {layout['architecture']!r} is not supported by the llama.cpp "
                                   "target (supported: llama)")
    kept: dict[str, np.ndarray] = {}

    def keep(stats):
        for fqn, h in stats.items():
            kept[fqn] = np.ascontiguousarray(np.diagonal(_hessian_tensor(h).to("cpu").float().numpy()), np.float32)

    prof = build_profile(loaded, schemes, ref_schemes=refs, quantize_tied=True,
                         quantizer="ggml-imatrix" if imatrix else "ggml", on_hessians=keep, **kw)
    try:
        names, other_bits, gmeta = gguf_budget(prof.layers, np.asarray(prof.cost_bits), layout)
    except (GGMLError, ProfileError) as e:
        raise LlamaCppProfileError(str(e)) from None
    md = dict(prof.metadata)
    md["target"] = "llamacpp"
    md["gguf"] = gmeta
    if "q4_1" in schemes:
        md["warning"] = "q4_1 reproduces SmolLM2's shipped Q4_1 weights exactly: never count a plan using it as a win"
    if imatrix:
        from .artifact import file_sha256

        im = {names[f]: v for f, v in kept.items() if f in names}
        calib = prof.calibration
        shape = calib.get("shape") or [1, 1]
        p = write_imatrix(imatrix_out, im, dataset=str(calib.get("source", "")), chunk_count=int(shape[0]),
                          chunk_size=int(shape[-1]))
        md["imatrix"] = {"path": str(Path(p).resolve()), "sha256": file_sha256(p), "entries": len(im),
                         "definition": "diag(H) = mean of x^2 per input channel over the calibration tokens"}
    return dataclasses.replace(prof, other_bits=int(other_bits), metadata=md)


def gguf_budget(layers, cost_bits: np.ndarray, layout: dict) -> tuple[dict, int, dict]:
    """({fqn: GGUF name}, other_bits, metadata["gguf"]) of the llama.cpp target: every
    quantizable tensor of the GGUF must be a layer; the rest of the file (header, metadata,
    tokenizer, tensor infos, the F32 norms, alignment padding) is ``other_bits``."""
    from .ggml import gguf_name

    names = {layer.fqn: gguf_name(layer.fqn, layout) for layer in layers}
    missing = [n for n in layout["quantizable"] if n not in names.values()]
    if missing:
        raise LlamaCppProfileError(f"{len(missing)} quantizable tensor(s) of the GGUF have no layer in the model, "
                                   f"e.g. {missing[0]}")
    align = layout["alignment"]
    if (np.asarray(cost_bits) % (8 * align)).any():
        raise LlamaCppProfileError(f"some tensor sizes are not multiples of the GGUF alignment ({align} bytes): the "
                                   "exact file size with padding is not modelled yet")
    planned = set(names.values())
    rest = sum(_pad(math.prod(ne) * 4, align) for n, ne in layout["tensors"].items() if n not in planned)
    other_bits = (layout["header_bytes"] + rest) * 8
    meta = {"source": layout["path"], "tensors_sha256": layout["tensors_sha256"], "header_bytes": layout["header_bytes"],
            "alignment": align, "rest_bytes": rest, "tensor_names": names,
            "note": "file bytes = header_bytes + rest_bytes (F32 norms, padded) + the chosen tensors' bytes"}
    return names, int(other_bits), meta


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align
