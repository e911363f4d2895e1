"""The default profile on Ray: 1 vs 2 workers measured here, and a cost model projecting
a 7 B and a 70 B Llama on N nodes (issue 17).

Phase ``measure`` runs ``bitalloc profile`` (the default calibrated-proxy profile: Hessian
pass, proxy table, measured reference KL) once in-process and once per worker count on a
local Ray instance, each under ``/usr/bin/time -v`` (the driver's peak RSS); every worker's
peak RSS, load time and items come from the profile's ``metadata.ray``. The profiles must
agree (reference values exactly, proxy to rtol 1e-5: the in-process Hessian pass keeps a
float32 running mean).

Phase ``project`` fits the cost model to the in-process run and checks it against the Ray
runs, then projects Llama-2-7B and Llama-2-70B shapes. The model counts work per phase:

* Hessians: ``2·P_lin·tokens`` forward FLOPs plus ``2·d_in²·tokens`` per distinct layer input
  (XᵀX); shards of ``batch_size`` rows run in parallel; each shard ships its float64
  statistics (``8·Σ d_in²`` bytes) to the driver, which reduces them in shard order.
* Proxy: ``2·d_out·d_in²`` per (layer, scheme) (``tr(ΔW H ΔWᵀ)``); each layer's item needs
  its Hessian shipped to the worker (``8·d_in²`` bytes).
* References: 3 per layer, each a forward from the layer's block to the logits over the
  reference tokens (block replay): ``2·(P_lin after the block start + head)·kl_tokens``.
* Every worker loads the whole model (16-bit bytes over the disk / network rate) before its
  first item; phases run one after another, each as fast as its item count allows
  (``ceil(items / workers)`` waves of its mean item).

Rates (FLOP/s per node) are fitted per phase on this machine; a projected node is given as a
multiple of this 2-core machine (``--node-speedup``, default 16: a 32-core CPU node). The
network rate (``--net-gbps``, default 10 Gb/s) and disk rate (``--disk-gbps``) are stated
assumptions, not measurements.

    python experiments/ray_scaling.py --phase measure            # ~15-20 min on this machine, alone
    python experiments/ray_scaling.py --phase project            # instant; prints both tables

Results: ``experiments/results/ray-scaling/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "ray-scaling"  # --out replaces it

# Llama shapes: (hidden, intermediate, layers, heads, kv heads, vocab)
SHAPES = {
    "llama-2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama-2-70b": (8192, 28672, 80, 64, 8, 32000),
}


def timed(cmd: list[str], log: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {p.returncode}); see {log}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return {"wall_s": round(time.perf_counter() - t0, 1), "driver_peak_rss_mib": round(rss_kb / 1024, 1),
            "command": " ".join(cmd)}


# ---------------------------------------------------------------------------------------
# layer shapes and work


def llama_layers(hidden: int, inter: int, n_layers: int, heads: int, kv_heads: int) -> list[dict]:
    """Linear layers of a Llama body as profile layer records (fqn, out, in, block_index)."""
    kv = hidden * kv_heads // heads
    out = []
    for b in range(n_layers):
        for name, o, i in (("self_attn.q_proj", hidden, hidden), ("self_attn.k_proj", kv, hidden),
                           ("self_attn.v_proj", kv, hidden), ("self_attn.o_proj", hidden, hidden),
                           ("mlp.gate_proj", inter, hidden), ("mlp.up_proj", inter, hidden),
                           ("mlp.down_proj", hidden, inter)):
            out.append({"fqn": f"model.layers.{b}.{name}", "out_features": o, "in_features": i, "block_index": b})
    return out


def _input_key(layer: dict) -> tuple:
    """(block, input role): layers that read one input (q/k/v, gate/up) share one Hessian."""
    from bitalloc.sensitivity.fisher_refs import input_role

    return layer["block_index"], input_role(layer["fqn"])


def work(layers: list[dict], vocab: int, hidden: int, *, tokens: int, kl_tokens: int, schemes: int, refs: int = 3,
         batch_rows: int = 4, rows: int = 8, kl_stride: int = 4) -> dict:
    """FLOPs and bytes of each phase of the default profile (see the module docstring)."""
    p_lin = sum(lay["out_features"] * lay["in_features"] for lay in layers)
    head = vocab * hidden
    inputs = {}
    for lay in layers:
        inputs.setdefault(_input_key(lay), lay["in_features"])
    h_bytes = 8 * sum(d * d for d in inputs.values())  # float64 statistics of one shard
    hess = 2 * p_lin * tokens + sum(2 * d * d * tokens for d in inputs.values())  # the body only: no logits
    proxy_items = [2 * lay["out_features"] * lay["in_features"] ** 2 * schemes for lay in layers]
    n_blocks = max(lay["block_index"] for lay in layers) + 1
    after = [0] * (n_blocks + 1)  # P_lin of blocks b.. end
    for lay in layers:
        after[lay["block_index"]] += lay["out_features"] * lay["in_features"]
    for b in range(n_blocks - 1, -1, -1):
        after[b] += after[b + 1]
    # the head runs on the scored positions only (every kl_stride-th)
    ref_items = [2 * after[lay["block_index"]] * kl_tokens + 2 * head * kl_tokens // kl_stride
                 for lay in layers for _ in range(refs)]
    return {"p_lin": p_lin, "head": head, "weights_bytes_16bit": 2 * (p_lin + 2 * head),
            "hessians": {"flops": hess, "items": max(1, rows // batch_rows), "bytes_per_shard": h_bytes},
            "proxy": {"flops": sum(proxy_items), "items": len(layers),
                      "bytes_in": 8 * sum(lay["in_features"] ** 2 for lay in layers)},
            "measure": {"flops": sum(ref_items), "items": len(ref_items)}}


def phase_time(flops: float, items: int, workers: int, rate: float) -> float:
    """Seconds of a phase of ``items`` equal items on ``workers`` workers at ``rate`` FLOP/s each."""
    waves = math.ceil(items / max(1, workers))
    return waves * (flops / items) / rate


def project(w: dict, rates: dict, nodes: int, *, node_speedup: float, net_gbps: float, disk_gbps: float) -> dict:
    """Projected seconds per phase on ``nodes`` nodes (one worker each, ``node_speedup`` x this machine)."""
    r = {k: v * node_speedup for k, v in rates.items()}
    net = net_gbps * 1e9 / 8
    load = w["weights_bytes_16bit"] / (disk_gbps * 1e9 / 8)
    h = w["hessians"]
    hess = phase_time(h["flops"], h["items"], nodes, r["hessians"]) + h["items"] * h["bytes_per_shard"] / net
    proxy = phase_time(w["proxy"]["flops"], w["proxy"]["items"], nodes, r["proxy"]) + w["proxy"]["bytes_in"] / net
    meas = phase_time(w["measure"]["flops"], w["measure"]["items"], nodes, r["measure"])
    return {"load_s": load, "hessians_s": hess, "proxy_s": proxy, "measure_s": meas,
            "total_s": load + hess + proxy + meas,
            "hessian_reduce_bytes": h["items"] * h["bytes_per_shard"],
            "worker_memory_bytes": w["weights_bytes_16bit"] + h["bytes_per_shard"]}


# ---------------------------------------------------------------------------------------
# phases


def phase_measure(a) -> None:
    work_dir = Path(a.work)
    work_dir.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "bitalloc.allocator.cli", "--quiet", "profile", "--model", a.model,
           "--n-samples", str(a.n_samples), "--seq-len", str(a.seq_len), "--overwrite"]
    res_path = OUT / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    runs = results.setdefault("runs", {})
    for w in a.workers:
        name = "in-process" if w == 0 else f"ray-{w}"
        if name in runs and not a.redo:
            continue
        prof = work_dir / f"profile-{name}.json"
        extra = [] if w == 0 else ["--workers", str(w), "--checkpoint-dir", str(work_dir / f"ckpt-{name}")]
        if w:
            subprocess.run(["rm", "-rf", str(work_dir / f"ckpt-{name}")], check=False)
        print(f"[{name}] profiling ...", flush=True)
        row = timed([*cli, "--out", str(prof), *extra], work_dir / f"{name}.log")
        md = json.loads(prof.read_text())["metadata"]
        row["stages_s"] = md["wall_s"]
        if "ray" in md:
            row["ray"] = {ph: {k: v for k, v in info.items() if k in (
                "workers", "threads_per_worker", "ray_init_s", "startup_s", "measure_s", "wall_s", "computed",
                "actor_failures", "resubmitted")} | {
                "peak_rss_mb_per_worker": [wi.get("peak_rss_mb") for wi in info.get("worker_info", [])],
                "items_per_worker": [wi.get("items") for wi in info.get("worker_info", [])]}
                for ph, info in md["ray"].items() if isinstance(info, dict)}
        row["profile"] = str(prof)
        runs[name] = row
        OUT.mkdir(parents=True, exist_ok=True)
        res_path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"[{name}] {row['wall_s']} s wall, driver peak {row['driver_peak_rss_mib']} MiB, stages {row['stages_s']}",
              flush=True)
    _check_equal(runs)
    res_path.write_text(json.dumps(results, indent=1) + "\n")


def _check_equal(runs: dict) -> None:
    import numpy as np

    from bitalloc.allocator import api

    base = runs.get("in-process")
    if base is None:
        return
    p0 = api.load_profile(base["profile"])
    for name, row in runs.items():
        if name == "in-process" or not Path(row["profile"]).is_file():
            continue
        p = api.load_profile(row["profile"])
        row["ref_values_equal"] = bool(np.array_equal(np.asarray(p.ref_values), np.asarray(p0.ref_values)))
        row["proxy_max_rel_diff"] = float(np.max(np.abs(np.asarray(p.proxy) - np.asarray(p0.proxy))
                                                 / np.maximum(np.abs(np.asarray(p0.proxy)), 1e-30)))
        print(f"[{name}] reference values equal to in-process: {row['ref_values_equal']}; proxy max rel diff "
              f"{row['proxy_max_rel_diff']:.2e}", flush=True)


def phase_project(a) -> None:
    from bitalloc.allocator import api

    results = json.loads((OUT / "results.json").read_text())
    runs = results["runs"]
    base = runs["in-process"]
    prof = api.load_profile(base["profile"])
    cal = prof.calibration
    tokens = int(cal["n_samples"]) * int(cal["seq_len"])
    opts = prof.metadata["options"]
    kl_tokens = int(opts["kl_samples"]) * int(cal["seq_len"])
    raw = json.loads(Path(base["profile"]).read_text())
    layers = raw["layers"]
    hidden = max(lay["in_features"] for lay in layers if lay["fqn"].endswith("q_proj"))
    vocab = next(shape[0] for name, shape, _ in raw["model"]["fingerprint"]["parameters"] if "embed_tokens" in name)
    schemes = len(prof.schemes)
    stride = int(opts["kl_stride"])
    w = work(layers, vocab, hidden, tokens=tokens, kl_tokens=kl_tokens, schemes=schemes,
             batch_rows=int(opts["batch_size"]), rows=int(cal["n_samples"]), kl_stride=stride)
    st = base["stages_s"]
    rates = {ph: w[ph]["flops"] / max(st[ph], 1e-9) for ph in ("hessians", "proxy", "measure")}
    print("fitted effective rates on this machine (in-process, 2 threads):",
          {k: f"{v / 1e9:.1f} GFLOP/s" for k, v in rates.items()})
    # check against the Ray runs: each worker gets cores // workers threads -> rate / workers each
    check = {}
    for name, row in runs.items():
        if not name.startswith("ray-"):
            continue
        n = int(name.split("-")[1])
        per_worker = {k: v / n for k, v in rates.items()}  # the same 2 cores shared by n workers
        pred = {ph: phase_time(w[ph]["flops"], w[ph]["items"], n, per_worker[ph]) for ph in rates}
        got = {ph: row["ray"].get(ph, {}).get("measure_s") for ph in rates}
        check[name] = {"predicted_s": {k: round(v, 1) for k, v in pred.items()}, "measured_s": got,
                       "startup_s": {ph: row["ray"].get(ph, {}).get("startup_s") for ph in rates}}
        print(f"[{name}] predicted compute per phase {check[name]['predicted_s']} vs measured {got}")
    proj = {}
    for model, (hid, inter, nl, heads, kvh, voc) in SHAPES.items():
        wl = work(llama_layers(hid, inter, nl, heads, kvh), voc, hid, tokens=tokens, kl_tokens=kl_tokens,
                  schemes=schemes, batch_rows=int(opts["batch_size"]), rows=int(cal["n_samples"]), kl_stride=stride)
        proj[model] = {"work": {k: v for k, v in wl.items()}, "nodes": {}}
        for n in a.nodes:
            proj[model]["nodes"][n] = project(wl, rates, n, node_speedup=a.node_speedup, net_gbps=a.net_gbps,
                                              disk_gbps=a.disk_gbps)
    results["cost_model"] = {"rates_flops_per_s": rates, "check": check, "tokens": tokens, "kl_tokens": kl_tokens,
                             "schemes": schemes, "assumptions": {"node_speedup": a.node_speedup, "net_gbps": a.net_gbps,
                                                                 "disk_gbps": a.disk_gbps},
                             "projection": proj}
    (OUT / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nprojected default profile ({tokens} calibration tokens, {schemes} schemes; node = {a.node_speedup:g} x "
          f"this machine, {a.net_gbps:g} Gb/s network, {a.disk_gbps:g} Gb/s disk)")
    print("| model | nodes | load s | Hessians s | proxy s | references s | total | Hessian bytes to the driver | "
          "memory per worker |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, d in proj.items():
        for n, p in d["nodes"].items():
            print(f"| {model} | {n} | {p['load_s']:.0f} | {p['hessians_s']:.0f} | {p['proxy_s']:.0f} | "
                  f"{p['measure_s']:.0f} | {p['total_s'] / 60:.1f} min | {p['hessian_reduce_bytes'] / 1e9:.1f} GB | "
                  f"{p['worker_memory_bytes'] / 2**30:.0f} GiB |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", required=True, choices=("measure", "project"))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--workers", default="0,1,2", help="0 = in-process")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", default="/tmp/ray_scaling")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--out", default=None, help="results folder (default experiments/results/ray-scaling)")
    ap.add_argument("--nodes", default="1,4,16,64")
    ap.add_argument("--node-speedup", type=float, default=16.0)
    ap.add_argument("--net-gbps", type=float, default=10.0)
    ap.add_argument("--disk-gbps", type=float, default=8.0)
    a = ap.parse_args()
    global OUT
    OUT = Path(a.out) if a.out else OUT
    a.workers = [int(x) for x in a.workers.split(",") if x]
    a.nodes = [int(x) for x in a.nodes.split(",") if x]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    (phase_measure if a.phase == "measure" else phase_project)(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
