"""Benchmark the bitalloc Triton kernels on a CUDA GPU.

For each weight shape (N x K), batch M and scheme: the median time of
``kernels.ops.quant_linear`` (``triton.testing.do_bench``), the achieved bandwidth (packed
weight + activations + output bytes / time) against a measured device-to-device copy
bandwidth, the speedup over a torch fp16 matmul with the dense weight, and a GemLite
column when ``import gemlite`` works (A16 integer schemes GemLite packs: 8/4/2 bits).

Weight buffers are rotated (several copies, cycled call by call) so the working set is
more than twice the L2 cache and every call reads its weight from HBM, as in a real model.
Kernel configs are autotuned on first use and cached per GPU in ~/.cache/bitalloc
(``--no-tune``: use the cached or default configs).

Without a CUDA GPU it prints "no CUDA GPU" and exits 0.

    python experiments/bench_kernels.py [--quick] [--no-tune] [--out experiments/results/bench_kernels.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]  # (N, K)
BATCHES = [1, 16, 64]
SCHEMES = ["w8", "w4g128", "w3g64", "w2g64", "w8a8", "w4g128a8", "w8af8", "w4g128af8"]
DEFAULT_OUT = ROOT / "experiments" / "results" / "bench_kernels.json"


def do_bench_median(fn) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(device, timer=do_bench_median, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in GB/s (read + write bytes of a large buffer copy)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def _copies(n_bytes: int, l2_bytes: int, cap: int = 32) -> int:
    """Weight copies so the rotated working set is at least twice the L2 cache."""
    return max(1, min(cap, math.ceil(2 * l2_bytes / max(n_bytes, 1))))


def _clone_qw(qw):
    """A deep copy of a QuantizedWeight (its own buffers)."""
    from bitalloc.kernels.quant import QuantizedTensor

    def ct(t):
        return None if t is None else t.clone()

    def cq(q):
        return None if q is None else QuantizedTensor(q.fmt, q.shape, ct(q.qweight), ct(q.scales), ct(q.qzeros))

    return dataclasses.replace(qw, low=cq(qw.low), high=cq(qw.high), high_idx=ct(qw.high_idx))


def _gemlite_fn(qw, x, l2_bytes):
    """A GemLite forward for the same weight, or None when gemlite is missing / cannot pack it."""
    fmt, scheme = qw.low.fmt, qw.scheme
    if scheme.act != "a16" or qw.high is not None or fmt.kind != "int" or fmt.bits not in (8, 4, 2):
        return None
    try:
        from gemlite.core import DType, GemLiteLinear

        from bitalloc.kernels.packing import unpack_codes

        N, K = qw.shape
        g = fmt.group_size or K
        codes = unpack_codes(qw.low.qweight, fmt.bits, K)  # (N, K) uint8
        scales = qw.low.scales  # (N, K // g) fp16
        zeros = torch.full_like(scales, 2 ** (fmt.bits - 1))  # symmetric: code offset as hqq zero
        layers = []
        for _ in range(_copies(qw.nbytes(), l2_bytes)):
            gl = GemLiteLinear(fmt.bits, group_size=g, in_features=K, out_features=N,
                               input_dtype=DType.FP16, output_dtype=DType.FP16)
            gl.pack(codes, scales, zeros, None)
            layers.append(gl)
        cyc = itertools.cycle(layers)
        return lambda: next(cyc)(x)
    except Exception as e:  # not installed, API differences: report, do not fail the benchmark
        print(f"  gemlite unavailable for {scheme.name}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def bench_case(scheme: str, N: int, K: int, M: int, device, timer=do_bench_median, l2_bytes: int = 0,
               copy_gbps: float | None = None, backend: str = "auto", weight=None) -> dict:
    """Time one (scheme, N, K, M) case; returns a result row."""
    from bitalloc.kernels import ops
    from bitalloc.kernels.formats import parse_scheme
    from bitalloc.kernels.quant import quantize_weight

    s = parse_scheme(scheme)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    w = weight if weight is not None else torch.randn(N, K, device=device, dtype=torch.float32) * 0.02
    qw = quantize_weight(w, s)
    x = torch.randn(M, K, device=device, dtype=dtype)
    qws = [qw] + [_clone_qw(qw) for _ in range(_copies(qw.nbytes(), l2_bytes) - 1)]
    cyc = itertools.cycle(qws)
    ours = lambda: ops.quant_linear(x, next(cyc), backend=backend)  # noqa: E731
    ours()  # first call: autotunes (GPU, when enabled) and caches the config
    ms = timer(ours)
    w16 = [w.to(dtype)] + [w.to(dtype).clone() for _ in range(_copies(N * K * 2, l2_bytes) - 1)]
    cyc16 = itertools.cycle(w16)
    fp16_ms = timer(lambda: F.linear(x, next(cyc16)))
    gl = _gemlite_fn(qw, x, l2_bytes) if device.type == "cuda" else None
    gemlite_ms = timer(gl) if gl is not None else None
    moved = qw.nbytes() + x.numel() * x.element_size() + M * N * x.element_size()
    gbps = moved / ms / 1e6
    kernel = ops.select_kernel(M, s.act, s.weight, s.high)
    return {
        "scheme": scheme, "N": N, "K": K, "M": M, "kernel": kernel, "ms": ms, "GBps": gbps,
        "frac_copy_bw": None if not copy_gbps else gbps / copy_gbps,
        "fp16_ms": fp16_ms, "speedup_vs_fp16": fp16_ms / ms,
        "gemlite_ms": gemlite_ms, "speedup_vs_gemlite": None if gemlite_ms is None else gemlite_ms / ms,
        "weight_bytes": qw.nbytes(), "rotated_copies": len(qws),
    }


def format_table(rows: list[dict]) -> str:
    head = f"{'N x K':>12} {'M':>3} {'scheme':>10} {'kernel':>6} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'vs fp16':>8} {'gemlite ms':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        frac = "" if r["frac_copy_bw"] is None else f"{100 * r['frac_copy_bw']:.0f}"
        gl = "" if r["gemlite_ms"] is None else f"{r['gemlite_ms']:.4f}"
        lines.append(
            f"{r['N']:>5}x{r['K']:<6} {r['M']:>3} {r['scheme']:>10} {r['kernel']:>6} {r['ms']:>8.4f} "
            f"{r['GBps']:>7.0f} {frac:>6} {r['speedup_vs_fp16']:>7.2f}x {gl:>10}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first two shapes only")
    ap.add_argument("--no-tune", action="store_true", help="no autotuning: cached or default configs")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU")
        return 0
    from bitalloc.kernels.triton_common import cache_path, set_autotune

    device = torch.device("cuda")
    set_autotune(not args.no_tune)
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    copy_gbps = copy_bandwidth(device)
    print(f"{props.name}: copy bandwidth {copy_gbps:.0f} GB/s, L2 {l2 >> 20} MiB, config cache {cache_path(device)}")
    rows = []
    for N, K in SHAPES[:2] if args.quick else SHAPES:
        w = torch.randn(N, K, device=device) * 0.02
        for scheme in SCHEMES:
            for M in BATCHES:
                r = bench_case(scheme, N, K, M, device, l2_bytes=l2, copy_gbps=copy_gbps, weight=w)
                rows.append(r)
                print(format_table([r]).splitlines()[-1], flush=True)
        del w
        torch.cuda.empty_cache()
    print()
    print(format_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": props.name, "capability": list(torch.cuda.get_device_capability(device)),
            "torch": torch.__version__, "copy_GBps": copy_gbps, "l2_bytes": l2}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
