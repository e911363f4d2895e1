"""Measured-table benchmark (issue 3): every (layer, scheme) of SmolLM2 measured end to end on Ray.

For each worker count (default 1 and 2) a local Ray instance measures the same items
(``sensitivity.runner.run_items``, no checkpoint, items handed out once every worker has
loaded the model): wall time, worker startup, items per second, peak RSS of every worker
(from the actors), and the scaling efficiency ``(t_1 / t_N) / N`` of the measuring phase.
The tables of all worker counts must be identical (checked). ``--compare-kl-samples`` /
``--compare-kl-stride`` also measure the items with more calibration tokens per item and
report the Spearman rank correlation of the cheap table with that fuller estimate.

    python experiments/bench_measured.py                          # the full table, 1 and 2 workers
    python experiments/bench_measured.py --layers 'model.layers.0.*' --workers 1 --limit 6   # smoke test
    python experiments/bench_measured.py --kl-samples 2 --kl-stride 8 --compare-kl-samples 4 --compare-kl-stride 4

Writes experiments/results/measured/<name>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DEFAULT_SCHEMES = "w2g64z,w3g128z,w3g64z,w4g128z,w4g64z,w5g128z,w6g128z,w8"


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--schemes", default=DEFAULT_SCHEMES, help=f"comma-separated schemes (default {DEFAULT_SCHEMES})")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    ap.add_argument("--calib", default="generated", help="'generated' or a text file")
    ap.add_argument("--n-samples", type=int, default=8, help="calibration rows (default 8)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256)")
    ap.add_argument("--kl-samples", type=int, default=4, help="rows run per item (default 4)")
    ap.add_argument("--kl-stride", type=int, default=4, help="KL scored at every N-th position (default 4)")
    ap.add_argument("--compare-kl-samples", type=int, default=None,
                    help="also measure with this many rows per item and report the rank correlation")
    ap.add_argument("--compare-kl-stride", type=int, default=None, help="... and this stride (default: --kl-stride)")
    ap.add_argument("--layers", action="append", default=[], help="layer pattern to include (repeatable; default all)")
    ap.add_argument("--limit", type=int, default=None, help="measure only the first N items")
    ap.add_argument("--threads-per-worker", type=int, default=None, help="torch threads per worker (default cpus // N)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "measured"))
    ap.add_argument("--name", default=None, help="results file name (default bench-<workers>.json)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import numpy as np

    from bitalloc.allocator.api import load
    from bitalloc.allocator.context import calibration_spec
    from bitalloc.sensitivity.calibration import load_calibration, tokens_sha256
    from bitalloc.sensitivity.layers import find_layers
    from bitalloc.sensitivity.models import fingerprint
    from bitalloc.sensitivity.proxy import as_scheme
    from bitalloc.sensitivity.runner import WorkerSetup, run_items

    schemes = [as_scheme(s).name for s in _csv(a.schemes)]
    worker_counts = [int(w) for w in _csv(a.workers)]
    t0 = time.perf_counter()
    loaded = load(a.model, log=None)
    spec = calibration_spec(a.calib, a.n_samples, a.seq_len, 0)
    data = load_calibration(spec, loaded.model, loaded.tokenizer, loaded.kind)
    layers, _ = find_layers(loaded.model, a.layers, ())
    fp = fingerprint(loaded.model)
    driver_setup_s = time.perf_counter() - t0
    ids = data["input_ids"] if isinstance(data, dict) else data

    def setup_for(kl_samples, kl_stride):
        return WorkerSetup(
            model=loaded.spec, calibration=spec.describe(), tokens=ids.tolist(),
            attention_mask=data["attention_mask"].tolist() if isinstance(data, dict) else None,
            tokens_sha256=tokens_sha256(data), fingerprint_sha256=fp["sha256"], weights="16bit",
            kl_samples=kl_samples, kl_stride=kl_stride, metric="cosine" if loaded.kind == "encoder" else "kl",
            include=tuple(a.layers))

    fqns = [layer.fqn for layer in layers]
    all_items = [(f, s) for f in fqns for s in schemes]
    items = all_items[: a.limit] if a.limit else all_items
    item_fqns = list(dict.fromkeys(f for f, _ in items))
    print(f"{a.model}: {len(items)} items ({len(item_fqns)} layers x {len(schemes)} schemes"
          f"{', limited' if a.limit else ''}), calibration {a.n_samples} x {a.seq_len}, per item "
          f"{a.kl_samples} rows, KL every {a.kl_stride}th position; workers {worker_counts}", flush=True)

    setup = setup_for(a.kl_samples, a.kl_stride)
    runs, tables = [], {}
    for w in worker_counts:
        res = run_items(setup, items, workers=w, wait_all_ready=True, progress=not a.quiet,
                        threads_per_worker=a.threads_per_worker)
        info = res.info
        measure_s = info["measure_s"]  # first item handed out (all workers loaded) to last result back
        runs.append({
            "workers": w, "threads_per_worker": info.get("threads_per_worker"), "wall_s": info["wall_s"],
            "ray_init_s": info.get("ray_init_s"), "startup_s": info.get("startup_s"), "measure_s": round(measure_s, 3),
            "items_per_s": round(len(items) / measure_s, 4) if measure_s > 0 else None,
            "peak_rss_mb_per_worker": [wi["peak_rss_mb"] for wi in info.get("worker_info", [])],
            "items_per_worker": [wi["items"] for wi in info.get("worker_info", [])],
            "worker_setup_s": [wi["setup_s"] for wi in info.get("worker_info", [])],
            "actor_failures": info["actor_failures"],
        })
        tables[w] = res.table(item_fqns, schemes)
        print(f"  {w} worker(s): {info['wall_s']:.1f} s wall (Ray init {info.get('ray_init_s', 0):.1f} s, workers loaded "
              f"{info.get('startup_s', 0):.1f} s, measuring {measure_s:.1f} s), "
              f"{runs[-1]['items_per_s']} items/s, peak RSS/worker {runs[-1]['peak_rss_mb_per_worker']} MB", flush=True)
    base = runs[0]
    for r in runs:
        r["speedup"] = round(base["measure_s"] / r["measure_s"], 3) if r["measure_s"] > 0 else None
        r["scaling_efficiency"] = round(r["speedup"] * base["workers"] / r["workers"], 3) if r["speedup"] else None
        r["full_table_estimate_s"] = (round(len(all_items) / r["items_per_s"] + (r["ray_init_s"] or 0) + (r["startup_s"] or 0), 1)
                                      if r["items_per_s"] else None)
    ref_t = tables[worker_counts[0]]
    identical = all(np.array_equal(ref_t, t, equal_nan=True) for t in tables.values())
    max_diff = max(float(np.nanmax(np.abs(ref_t - t))) for t in tables.values())

    compare = None
    if a.compare_kl_samples is not None:
        from scipy.stats import spearmanr

        stride = a.compare_kl_stride or a.kl_stride
        full = run_items(setup_for(a.compare_kl_samples, stride), items, workers=max(worker_counts),
                         wait_all_ready=True, progress=not a.quiet, threads_per_worker=a.threads_per_worker)
        ft = full.table(item_fqns, schemes)
        ok = np.isfinite(ref_t) & np.isfinite(ft)
        rho_all = float(spearmanr(ref_t[ok], ft[ok]).statistic)
        per_scheme = {}
        for j, s in enumerate(schemes):
            col = ok[:, j]
            if col.sum() >= 3:
                per_scheme[s] = round(float(spearmanr(ref_t[col, j], ft[col, j]).statistic), 4)
        compare = {"kl_samples": a.compare_kl_samples, "kl_stride": stride, "wall_s": full.info["wall_s"],
                   "spearman_all_items": round(rho_all, 4), "spearman_across_layers_per_scheme": per_scheme,
                   "median_rel_diff": float(np.nanmedian(np.abs(ref_t - ft) / np.maximum(np.abs(ft), 1e-12)))}
        print(f"  vs {a.compare_kl_samples} rows / stride {stride}: Spearman {rho_all:.4f} over all items", flush=True)

    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": a.model, "fingerprint_sha256": fp["sha256"], "schemes": schemes,
        "layers": len(item_fqns), "items": len(items), "items_full_table": len(all_items),
        "calibration": {"n_samples": a.n_samples, "seq_len": a.seq_len, "kl_samples": a.kl_samples,
                        "kl_stride": a.kl_stride, "tokens_sha256": setup.tokens_sha256},
        "driver_setup_s": round(driver_setup_s, 3),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "runs": runs, "tables_identical": identical, "max_abs_diff": max_diff, "compare": compare,
        "table": {"fqns": item_fqns, "schemes": schemes, "values": [[None if not np.isfinite(v) else float(v) for v in row]
                                                                      for row in ref_t]},
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (a.name or f"bench-{'-'.join(map(str, worker_counts))}.json")
    path.write_text(json.dumps(result, indent=1))

    print()
    print("| workers | threads | ray init s | worker load s | measure s | items/s | speedup | efficiency | peak RSS/worker MB | full table est. s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['workers']} | {r['threads_per_worker']} | {r['ray_init_s']} | {r['startup_s']} | {r['measure_s']} | {r['items_per_s']} | "
              f"{r['speedup']} | {r['scaling_efficiency']} | {', '.join(f'{m:.0f}' for m in r['peak_rss_mb_per_worker'])} | "
              f"{r['full_table_estimate_s']} |")
    print(f"tables identical across worker counts: {identical} (max |diff| {max_diff:.3g}); results -> {path}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
