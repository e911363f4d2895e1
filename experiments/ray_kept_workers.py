"""One set of Ray workers for a whole profile, against new workers for every step (issue 17).

A profile on Ray runs three runner steps (Hessian shards, proxy rows, reference
measurements). Since ``runner_ray.kept_workers`` the later steps re-configure the first
step's actors, which keep the model they loaded and fingerprinted; before, every step started
new actors that loaded it again. This runs the same profile both ways on a local Ray
instance (the old way by making the profile believe a block is already open, so none is) and
prints, per step, the Ray start, the time until every worker was ready, each worker's setup
and the wall time. The two profiles must be equal: proxy, reference values and table.

    python experiments/ray_kept_workers.py            # SmolLM2, 2 workers: about 4.5 min here

Results: ``experiments/results/ray-scaling/kept-workers.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _profile(a, kept: bool):
    import bitalloc
    from bitalloc.sensitivity import runner_ray

    real = runner_ray.keeping_workers
    if not kept:  # build_profile opens no block: every step starts its own workers, as before
        runner_ray.keeping_workers = lambda: True
    try:
        t = time.perf_counter()
        prof = bitalloc.profile(a.model, workers=a.workers, n_samples=a.n_samples, seq_len=a.seq_len,
                                ref_method="measured", ref_schemes=["w3g128z"], progress=False, log=None)
        return prof, time.perf_counter() - t
    finally:
        runner_ray.keeping_workers = real


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=str(HERE / "results" / "ray-scaling" / "kept-workers.json"))
    a = ap.parse_args(argv)
    import numpy as np

    rows, profs = [], {}
    for kept in (False, True):
        prof, wall = _profile(a, kept)
        name = "kept for the profile" if kept else "new for every step"
        profs[name] = prof
        steps = {k: {"reused_workers": v.get("reused_workers", 0), "ray_init_s": v.get("ray_init_s"),
                     "all_ready_s": v.get("startup_s"), "worker_setup_s": [w.get("setup_s") for w in v.get("worker_info", [])]}
                 for k, v in prof.metadata["ray"].items() if isinstance(v, dict)}
        rows.append({"workers": name, "wall_s": round(wall, 1), "steps": steps})
    a_, b_ = profs.values()
    same = {k: bool(np.array_equal(getattr(a_, k), getattr(b_, k), equal_nan=True)) for k in ("proxy", "ref_values")}
    same["table"] = bool(np.array_equal(a_.table(), b_.table(), equal_nan=True))
    out = {"model": a.model, "workers": a.workers, "calibration": f"{a.n_samples} x {a.seq_len}", "rows": rows,
           "equal": same, "machine": "2-core CPU, 24 GiB", "date": time.strftime("%Y-%m-%d")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print("| workers | wall | step: Ray start / all ready / worker setup (s) |\n|---|---|---|")
    for r in rows:
        cells = "; ".join(f"{k} {v['ray_init_s']} / {v['all_ready_s']} / {', '.join(str(x) for x in v['worker_setup_s'])}"
                          for k, v in r["steps"].items())
        print(f"| {r['workers']} | {r['wall_s']} s | {cells} |")
    print(f"equal: {same}\n-> {a.out}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
