"""How close each ggml type comes to SmolLM2's shipped weights (issue 13).

SmolLM2-135M ships as a Q4_1 GGUF (its token embedding in Q8_0), so the F32 source every
llama.cpp benchmark file is built from holds weights that already sit on a Q4_1 grid:
``w = m + d·q`` with ``q`` in 0..15 per block of 32. A type whose grid holds that grid
rebuilds the weights and looks lossless; this script measures, tensor by tensor and through
ggml's own quantizer (the bytes llama.cpp writes), how much of that each type gets.

For every quantizable 2-D weight and every type that fits its rows, with and without the
importance matrix: the relative error ``‖Q(W) − W‖² / ‖W‖²``, the same weighted by the
imatrix per input column (what the imatrix-aware quantizer minimises), and the fraction of
values reproduced exactly. Prints a table and writes ``results/llamacpp/storage.json``.

    python experiments/llamacpp_storage.py --source /tmp/s32/lcb/src-f32.gguf \
      --imatrix /tmp/s32/lcb/profile-imatrix.imatrix.gguf
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "llamacpp" / "storage.json"
TYPES = ("q4_1", "q5_1", "q4_0", "q5_0", "iq4_nl", "q8_0", "q4_k", "q5_k", "q6_k")


def _kind(name: str) -> str:
    # blk.3.attn_q.weight -> attn_q; token_embd.weight -> token_embd
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def source_weights(source: str, names=None) -> dict:
    """{gguf name: (out, in) float32} of an F32 GGUF's quantizable weights (llama.cpp's rule, as
    :func:`bitalloc.sensitivity.ggml.gguf_layout` reads it), or of ``names`` among them."""
    import gguf

    from bitalloc.sensitivity import ggml

    keep = set(ggml.gguf_layout(source)["quantizable"] if names is None else names)
    out = {}
    for t in gguf.GGUFReader(source).tensors:
        if t.name not in keep:
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, f"{t.name}: the source must be F32, not {t.tensor_type.name}"
        n_in, n_out = (int(x) for x in t.shape)  # gguf lists ne0 (the row length) first
        out[t.name] = np.array(t.data, dtype=np.float32).reshape(n_out, n_in)
    assert len(out) == len(keep), f"not in {source}: {sorted(keep - set(out))}"
    return out


def measure(weights: dict, imatrix: dict | None, types=TYPES) -> list[dict]:
    """One row per (kind, type, imatrix): errors summed over that kind's tensors."""
    from bitalloc.sensitivity import ggml

    acc: dict[tuple, dict] = {}
    for name, w in weights.items():
        n = w.shape[1]
        im = None if imatrix is None else imatrix.get(name)
        col = np.ones(n, np.float32) if im is None else im  # (in,) the imatrix's column weights
        ref, wref = float((w ** 2).sum()), float((w ** 2 * col).sum())  # the tensor's own, for every type
        for t in types:
            if not ggml.ggml_fits(t, n):
                continue
            for use_im in ((False, True) if im is not None else (False,)):
                q = ggml.dequantize(ggml.quantize(w, t, im if use_im else None), t, w.shape)  # (out, in)
                d2 = (q - w) ** 2
                a = acc.setdefault((_kind(name), t, use_im), {"err": 0.0, "ref": 0.0, "werr": 0.0, "wref": 0.0,
                                                               "exact": 0, "values": 0, "tensors": 0})
                a["err"] += float(d2.sum())
                a["ref"] += ref
                a["werr"] += float((d2 * col).sum())
                a["wref"] += wref
                a["exact"] += int((q == w).sum())
                a["values"] += w.size
                a["tensors"] += 1
    return [{"kind": k, "type": t, "imatrix": u, "tensors": a["tensors"], "values": a["values"],
             "rel_err": a["err"] / a["ref"], "rel_err_imatrix_weighted": a["werr"] / a["wref"],
             "exact_fraction": a["exact"] / a["values"]} for (k, t, u), a in sorted(acc.items())]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="the F32 source GGUF (llamacpp_benchmark.py writes WORK/src-f32.gguf)")
    ap.add_argument("--imatrix", default=None, help="a GGUF imatrix file (the profile's *.imatrix.gguf)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    from bitalloc.sensitivity import ggml
    from bitalloc.sensitivity.artifact import write_json

    t0 = time.perf_counter()
    weights = source_weights(a.source)
    imatrix = None if a.imatrix is None else ggml.read_imatrix(a.imatrix)
    rows = measure(weights, imatrix)
    print("| tensors | type | imatrix | rel. error | imatrix-weighted rel. error | values exact |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} ({r['tensors']}) | {r['type']} | {'yes' if r['imatrix'] else 'no'} | {r['rel_err']:.3e} | "
              f"{r['rel_err_imatrix_weighted']:.3e} | {100 * r['exact_fraction']:.1f} % |")
    sha = None if a.imatrix is None else hashlib.sha256(Path(a.imatrix).read_bytes()).hexdigest()
    write_json(Path(a.out), {"schema": "bitalloc.llamacpp-storage/1", "source": Path(a.source).name,
                             "model": "smollm2 (SmolLM2-135M-Instruct, shipped Q4_1 / token_embd Q8_0)",
                             "imatrix_sha256": sha, "quantizer": "ggml_quantize_chunk (llama-cpp-python's libggml)",
                             "seconds": round(time.perf_counter() - t0, 1), "rows": rows}, indent=1)
    print(f"{time.perf_counter() - t0:.0f} s; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
