"""llama.cpp as a deploy target: GGUF files written by llama.cpp's own quantizer.

* :func:`f32_source` — a lossless F32 GGUF of the model (from a ``.gguf`` such as
  SmolLM2's Q4_1 file, by ``llama_model_quantize`` to ``ALL_F32`` with
  ``allow_requantize``: dequantizing is exact, so it holds exactly the weights bitalloc
  profiled).
* :func:`quantize_gguf` — ``llama_model_quantize`` from that source with one anchored
  override per tensor (``^blk\\.3\\.attn_q\\.weight$``) and the importance matrix; the
  file is written under a temporary name and renamed, and every tensor's type is read
  back and checked against the request.
* :func:`export_gguf` / :func:`export_llama_quantize` — a plan as a GGUF file, or as a
  ``--tensor-type-file`` + imatrix + command line for a user's own ``llama-quantize``.
* :func:`perplexity` — perplexity computed by llama.cpp (llama-cpp-python, logits for
  every position) on token windows (the same ids as bitalloc's torch evaluation).
* :func:`apply_plan` — bitalloc's own executor for a ggml plan: each weight through ggml's
  quantizer and back, in torch.

llama.cpp's presets (``Q4_K_M`` ...) fall back where a type does not fit a tensor's rows
(``tensor_type_fallback`` in ``src/llama-quant.cpp``): Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0,
Q2_K/Q3_K→Q4_0, IQ types→IQ4_NL (:data:`FALLBACK`). On SmolLM2 every tensor but
``ffn_down`` has 576-wide rows, so a preset is mostly its fallback types; bitalloc never
needs a fallback (it only offers types that fit).
"""

from __future__ import annotations
from .. import BitallocError

import contextlib
import ctypes
import os
import re
import shlex
from pathlib import Path
from typing import Mapping

import numpy as np

from bitalloc.kernels.formats import GGML_TYPES, ggml_fits, is_ggml
from bitalloc.sensitivity.artifact import file_sha256

__all__ = ["LlamaCppError", "FALLBACK", "PRESETS", "SUPPORTED_ARCHS", "f32_source", "quantize_gguf", "preset_gguf",
           "export_gguf", "export_llama_quantize", "perplexity", "compare_files", "apply_plan", "gguf_tensor_types", "plan_types"]

SUPPORTED_ARCHS = ("llama",)
# llama.cpp's tensor_type_fallback: what a preset writes where its type does not fit the rows
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q2_k": "q4_0", "q3_k": "q4_0", "iq4_xs": "iq4_nl",
            "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl", "iq2_s": "iq4_nl", "iq3_xxs": "iq4_nl", "iq3_s": "iq4_nl"}
# llama.cpp presets (llama_ftype values of include/llama.h)
PRESETS = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
           "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25,
           "IQ4_XS": 30, "F16": 1, "BF16": 32}
_FTYPE_F32 = 0
_FTYPE_BASE = 7  # MOSTLY_Q8_0: a quantized default, so the per-tensor overrides apply


class LlamaCppError(BitallocError, ValueError):
    """A GGUF cannot be built or read for this plan / model; one line."""


@contextlib.contextmanager
def _quiet():
    """Silence llama.cpp's C-level log lines (fd 1 and 2) for the duration."""
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
        os.close(devnull)
        yield
    finally:
        for fd, old in saved:
            os.dup2(old, fd)
            os.close(old)


def _llama():
    from bitalloc import require

    return require("llama_cpp", "llama-cpp-python", "the llama.cpp target")


@contextlib.contextmanager
def _plain_cpu_buffers(L):
    """Load models with ggml's CPU "extra buffer types" off (``use_extra_bufts = False``).

    Those buffers repack weights for special kernels (AMX, the x86/ARM repack path); with
    llama-cpp-python 0.3.36 built on an AMX CPU (Xeon, Rocket Lake-class flags),
    ``llama_decode`` of a Q4_0 or other quantized file segfaults in them (reproduced on the
    project's 2-core CI-class machine: F32 decodes, Q4_0 crashes at any length). Perplexity
    here is a measurement, so it takes ggml's plain CPU path, which every x86 CPU runs and
    which gives the same numbers on every machine. ``Llama`` has no argument for it: its
    default model parameters are patched while it loads.
    """
    low = L.llama_cpp
    orig = low.llama_model_default_params

    def params():
        mp = orig()
        if hasattr(mp, "use_extra_bufts"):
            mp.use_extra_bufts = False
        return mp

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = orig


def _check_writable(out: Path) -> None:
    d = out.parent if str(out.parent) else Path(".")
    if not d.is_dir():
        raise LlamaCppError(f"cannot write {str(out)!r}: folder {str(d)!r} does not exist")
    if not os.access(d, os.W_OK):
        raise LlamaCppError(f"cannot write {str(out)!r}: folder {str(d)!r} is not writable")
    if out.is_dir():
        raise LlamaCppError(f"cannot write {str(out)!r}: it is a folder")


def gguf_architecture(path: str | os.PathLike) -> str:
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise LlamaCppError(f"{str(path)!r} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    f = r.fields.get("general.architecture")
    return bytes(f.parts[f.data[0]]).decode() if f is not None else "?"


def _run_quantize(src: Path, out: Path, params) -> None:
    """``llama_model_quantize`` into a temporary name beside ``out``, renamed on success."""
    L = _llama()
    _check_writable(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with _quiet():
            rc = L.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise LlamaCppError(f"llama_model_quantize failed (code {rc}) writing {str(out)!r}")
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def f32_source(model_gguf: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A lossless F32 GGUF of ``model_gguf`` (llama.cpp dequantizes every tensor to F32)."""
    src, out = Path(model_gguf), Path(out)
    if not src.is_file():
        raise LlamaCppError(f"GGUF file {str(src)!r} does not exist")
    arch = gguf_architecture(src)
    if arch not in SUPPORTED_ARCHS:
        raise LlamaCppError(f"GGUF architecture {arch!r} is not supported by the llama.cpp target "
                            f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    L = _llama()
    q = L.llama_model_quantize_default_params()
    q.ftype, q.allow_requantize, q.nthread = _FTYPE_F32, True, max(1, min(4, os.cpu_count() or 1))
    _run_quantize(src, out, q)
    return out


def _imatrix_array(L, imatrix: Mapping[str, np.ndarray] | None, keep: list):
    if not imatrix:
        return None
    arr = (L.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, v) in enumerate(imatrix.items()):
        v = np.ascontiguousarray(v, dtype=np.float32)
        if not np.isfinite(v).all():
            raise LlamaCppError(f"importance matrix of {name} has NaN or inf values")
        b = name.encode()
        keep += [v, b]
        arr[i].name, arr[i].data, arr[i].size = b, v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
    arr[len(imatrix)].name = None  # terminator
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(L.llama_model_imatrix_data))


def anchored(name: str) -> str:
    """The override pattern for exactly one tensor (llama.cpp uses ``std::regex_search``)."""
    return "^" + re.escape(name) + "$"


def quantize_gguf(src_f32: str | os.PathLike, out: str | os.PathLike, types: Mapping[str, str], *,
                  imatrix: Mapping[str, np.ndarray] | None = None, nthread: int = 2) -> Path:
    """``llama_model_quantize`` with one anchored override per tensor ({gguf name: ggml type}).

    Every quantizable 2-D weight must be named; the types are read back from the file and
    a mismatch (llama.cpp fell back or ignored an override) is an error (the file is removed).
    """
    from bitalloc.sensitivity.ggml import requires_imatrix

    L = _llama()
    src, out = Path(src_f32), Path(out)
    for name, t in types.items():
        if t not in GGML_TYPES:
            raise LlamaCppError(f"tensor {name}: {t!r} is not a ggml type")
        if requires_imatrix(t) and not (imatrix and name in imatrix):
            raise LlamaCppError(f"tensor {name}: ggml type {t} needs an importance matrix and none was given")
    keep: list = []
    ov = (L.llama_model_tensor_override * (len(types) + 1))()
    for i, (name, t) in enumerate(types.items()):
        b = anchored(name).encode()
        keep.append(b)
        ov[i].pattern, ov[i].type = b, GGML_TYPES[t][0]
    ov[len(types)].pattern = None
    q = L.llama_model_quantize_default_params()
    q.ftype, q.nthread, q.allow_requantize, q.pure = _FTYPE_BASE, nthread, False, False
    q.tt_overrides = ctypes.cast(ov, ctypes.POINTER(L.llama_model_tensor_override))
    if "token_embd.weight" in types:
        q.token_embedding_type = GGML_TYPES[types["token_embd.weight"]][0]
    if "output.weight" in types:
        q.output_tensor_type = GGML_TYPES[types["output.weight"]][0]
    q.imatrix = _imatrix_array(L, imatrix, keep)
    _run_quantize(src, out, q)
    got = gguf_tensor_types(out)
    bad = [(n, t, got.get(n)) for n, t in types.items() if got.get(n) != t]
    if bad:
        os.unlink(out)
        n, t, g = bad[0]
        raise LlamaCppError(f"llama_model_quantize wrote {n} as {g}, not {t} ({len(bad)} tensor(s) differ)")
    return out


def preset_gguf(src_f32: str | os.PathLike, out: str | os.PathLike, preset: str, *,
                imatrix: Mapping[str, np.ndarray] | None = None, nthread: int = 2) -> Path:
    """A llama.cpp preset (``Q4_K_M`` ...) from the F32 source, as ``llama-quantize`` makes it."""
    if preset not in PRESETS:
        raise LlamaCppError(f"unknown preset {preset!r} (one of {', '.join(PRESETS)})")
    L = _llama()
    q = L.llama_model_quantize_default_params()
    q.ftype, q.nthread = PRESETS[preset], nthread
    keep: list = []
    q.imatrix = _imatrix_array(L, imatrix, keep)
    _run_quantize(Path(src_f32), Path(out), q)
    return Path(out)


def gguf_tensor_types(path: str | os.PathLike) -> dict[str, str]:
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name.lower() for t in r.tensors}


# ---------------------------------------------------------------------------------------
# plans


def plan_types(plan, layout: dict) -> dict[str, str]:
    """{gguf tensor name: ggml type} of a llama.cpp plan, covering every quantizable tensor."""
    from bitalloc.sensitivity.ggml import GGMLError, gguf_name

    out = {}
    for fqn, lp in plan.layers.items():
        if not is_ggml(lp.scheme):
            raise LlamaCppError(f"layer {fqn}: scheme {lp.scheme} is not a ggml type; this plan is not for the "
                                "llama.cpp target (profile with --target llamacpp)")
        try:
            name = gguf_name(fqn, layout)
        except GGMLError as e:
            raise LlamaCppError(str(e)) from None
        ne = layout["tensors"][name]
        if tuple(ne) != (lp.shape[1], lp.shape[0]):
            raise LlamaCppError(f"layer {fqn}: the plan says {lp.shape}, {name} is {tuple(reversed(ne))}: "
                                "the plan is for another model")
        if not ggml_fits(lp.scheme, lp.shape[1]):
            raise LlamaCppError(f"layer {fqn}: ggml type {lp.scheme} does not fit rows of {lp.shape[1]}")
        out[name] = lp.scheme
    missing = [n for n in layout["quantizable"] if n not in out]
    if missing:
        raise LlamaCppError(f"the plan has no type for {len(missing)} quantizable tensor(s) of the GGUF, e.g. "
                            f"{missing[0]}: a llama.cpp plan covers every 2-D weight")
    return out


def check_plan(plan) -> dict:
    """The plan's llama.cpp record (``plan.predicted['gguf']``), or a one-line error."""
    g = (plan.predicted or {}).get("gguf")
    if not g or (plan.quantization or {}).get("quantizer") not in ("ggml", "ggml-imatrix"):
        raise LlamaCppError("this plan was not made for the llama.cpp target (profile with --target llamacpp)")
    return g


def _plan_imatrix(plan, path_override: str | None = None) -> dict[str, np.ndarray] | None:
    from bitalloc.sensitivity.ggml import read_imatrix

    q = plan.quantization or {}
    if q.get("quantizer") != "ggml-imatrix":
        return None
    rec = q.get("imatrix") or {}
    p = Path(path_override or rec.get("path") or "")
    if not p.is_file():
        raise LlamaCppError(f"the plan's importance matrix {str(p)!r} does not exist (it is written beside the profile)")
    if rec.get("sha256") and file_sha256(p) != rec["sha256"]:
        raise LlamaCppError(f"importance matrix {str(p)!r} is not the one the plan was made with (sha256 differs)")
    return read_imatrix(p)


def export_gguf(plan, out: str | os.PathLike, *, model: str | None = None, workdir: str | os.PathLike | None = None,
                imatrix_path: str | None = None) -> dict:
    """Write the plan's GGUF with ``llama_model_quantize``; returns {path, bytes, predicted}."""
    from bitalloc.sensitivity.ggml import gguf_layout, model_gguf_path

    g = check_plan(plan)
    spec = model or plan.model.get("spec")
    if model and plan.model.get("spec") and model != plan.model.get("spec"):
        raise LlamaCppError(f"the plan was made for model {plan.model.get('spec')!r}, not {model!r}")
    src_model = model_gguf_path(spec)
    layout = gguf_layout(src_model)
    if g.get("source_sha256") and layout["tensors_sha256"] != g["source_sha256"]:
        raise LlamaCppError(f"the plan was made for another GGUF (tensor layout differs from {src_model.name})")
    out = Path(out)
    _check_writable(out)
    types = plan_types(plan, layout)
    imatrix = _plan_imatrix(plan, imatrix_path)
    wd = Path(workdir) if workdir else out.parent
    src = wd / f".{out.stem}.f32-source.gguf"
    try:
        f32_source(src_model, src)
        quantize_gguf(src, out, types, imatrix=imatrix)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(src)
    size = os.path.getsize(out)
    return {"path": str(out), "bytes": size, "predicted": g.get("file_bytes")}


def export_llama_quantize(plan, out_dir: str | os.PathLike, *, model: str | None = None,
                          imatrix_path: str | None = None) -> dict:
    """A ``--tensor-type-file``, the imatrix (GGUF imatrix format) and the ``llama-quantize`` command."""
    from bitalloc.sensitivity.artifact import write_text
    from bitalloc.sensitivity.ggml import gguf_layout, model_gguf_path, write_imatrix

    check_plan(plan)
    spec = model or plan.model.get("spec")
    layout = gguf_layout(model_gguf_path(spec))
    types = plan_types(plan, layout)
    d = Path(out_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlamaCppError(f"cannot create folder {str(d)!r}: {e.strerror}") from None
    if not os.access(d, os.W_OK):
        raise LlamaCppError(f"cannot write into {str(d)!r}")
    tt = d / "tensor-types.txt"
    write_text(tt, "".join(f"{anchored(n)}={t}\n" for n, t in types.items()))
    cmd = ["llama-quantize"]
    imatrix = _plan_imatrix(plan, imatrix_path)
    if imatrix is not None:
        im = d / "imatrix.gguf"
        write_imatrix(im, imatrix, dataset=str((plan.quantization or {}).get("calibration_tokens_sha256") or ""))
        cmd += ["--imatrix", str(im)]
    src = model_gguf_path(spec)
    f32 = d / "model-f32.gguf"
    cmd += ["--tensor-type-file", str(tt), str(f32), str(d / "model.gguf"), "Q8_0"]
    first = shlex.join(["llama-quantize", "--allow-requantize", str(src), str(f32), "F32"])
    line = shlex.join(cmd)
    write_text(d / "command.txt", f"{first}\n{line}\n")
    return {"dir": str(d), "tensor_type_file": str(tt), "command": f"{first}\n{line}", "tensors": len(types)}


# ---------------------------------------------------------------------------------------
# evaluation by llama.cpp


def perplexity(gguf_path: str | os.PathLike, windows, *, n_threads: int = 2, progress: bool = False) -> dict:
    """Perplexity computed by llama.cpp: each (T,) window of token ids evaluated from an empty
    context, logits for every position, NLL of tokens 1..T-1 (as bitalloc's torch evaluation).
    ``window_nll``: each window's summed NLL in nats, for paired comparisons of two files on
    the same windows (``experiments/llamacpp_benchmark.py --phase paired``)."""
    L = _llama()
    p = Path(gguf_path)
    if not p.is_file():
        raise LlamaCppError(f"GGUF file {str(p)!r} does not exist")
    arch = gguf_architecture(p)
    if arch not in SUPPORTED_ARCHS:
        raise LlamaCppError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    ids = np.asarray(windows.tolist() if hasattr(windows, "tolist") else windows, dtype=np.int64)
    n, T = ids.shape
    with _quiet(), _plain_cpu_buffers(L):
        llm = L.Llama(model_path=str(p), n_ctx=T, n_batch=T, n_ubatch=T, logits_all=True, n_threads=n_threads,
                      verbose=False, seed=0)
    nll, count, per_window = 0.0, 0, []
    try:
        for w in ids:
            llm.reset()
            llm.eval([int(x) for x in w])
            logits = np.asarray(llm.scores[: T - 1], dtype=np.float32)  # (T-1, V), llama.cpp's own float32
            m = logits.max(-1, keepdims=True)  # (T-1, 1)
            # float32 exp-sum (relative error ~1e-6 per row; float64 tripled the time), float64 total
            lse = np.log(np.exp(logits - m).sum(-1, dtype=np.float64)) + m[:, 0].astype(np.float64)
            per_window.append(float((lse - logits[np.arange(T - 1), w[1:]].astype(np.float64)).sum()))
            nll += per_window[-1]
            count += T - 1
    finally:
        with _quiet():
            llm.close() if hasattr(llm, "close") else None
    mean = nll / count
    return {"ppl": float(np.exp(mean)), "nll": mean, "tokens": count, "windows": n, "seq_len": T,
            "file_bytes": os.path.getsize(p), "window_nll": per_window}


def compare_files(gguf_paths, windows, *, n_threads: int = 2) -> list[dict]:
    """Each GGUF's llama.cpp :func:`perplexity` on the same windows; every file after the first
    also against the first, window by window (``vs_first``: :func:`bitalloc.allocator.report.
    paired_ratio`, this file over the first; with two or more windows)."""
    from .report import paired_ratio

    rows: list[dict] = []
    for g in gguf_paths:
        r = perplexity(g, windows, n_threads=n_threads)
        row = {"model": Path(g).name, "bytes": r["file_bytes"], "ppl": r["ppl"], "tokens": r["tokens"],
               "window_nll": r["window_nll"]}
        if rows and r["windows"] > 1:
            row["vs_first"] = paired_ratio(r["window_nll"], rows[0]["window_nll"], r["seq_len"] - 1)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# bitalloc's executor for a ggml plan


def apply_plan(model, plan, *, inplace: bool = False, imatrix_path: str | None = None):
    """The model (a torch module or a LoadedModel) with every planned weight replaced by its
    ggml round trip: what llama.cpp's file holds, in float (a copy unless ``inplace``)."""
    import copy

    import torch

    from bitalloc.sensitivity.ggml import fake_quantize
    from bitalloc.sensitivity.layers import get_weight

    check_plan(plan)
    imatrix = _plan_imatrix(plan, imatrix_path)
    from bitalloc.sensitivity.ggml import gguf_names_for_model

    from bitalloc.sensitivity.models import LoadedModel

    net = model.model if isinstance(model, LoadedModel) else model  # a causal LM's own .model is its body
    if not inplace:
        net = copy.deepcopy(net)  # tied weights stay tied in the copy
    names = gguf_names_for_model(net, list(plan.layers))
    with torch.no_grad():
        for fqn, lp in plan.layers.items():
            try:
                mod = net.get_submodule(fqn)
            except AttributeError:
                raise LlamaCppError(f"layer {fqn} of the plan is not in this model: the plan is for another model") from None
            w = get_weight(mod)
            if tuple(w.shape) != tuple(lp.shape):
                raise LlamaCppError(f"layer {fqn}: the plan says {tuple(lp.shape)}, the model has {tuple(w.shape)}")
            im = None if imatrix is None else imatrix.get(names[fqn])
            if imatrix is not None and im is None:
                raise LlamaCppError(f"the importance matrix has no entry for {names[fqn]}")
            w.copy_(fake_quantize(w.to(torch.float32), lp.scheme, None if im is None else torch.from_numpy(im)))
    return net
