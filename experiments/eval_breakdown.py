"""Where the main job's evaluation time goes (issue 10): windows, quantizing and packing, scoring.

Takes the plans of a finished ``bitalloc run`` (its ``plans/`` folder) and times, on the
default model and the run's evaluation (held-out self-generated text, 8 × 256, seed 1234):
generating the windows, applying every plan (quantize + pack, one shared layer cache, as the
run does), scoring all models in one pass, and, per 4 × 256 batch, the 16-bit forward, one
quantized model's forward and the dequantization of its packed weights alone.

    python experiments/eval_breakdown.py --plans bitalloc-out/plans     # ~3 min here

Results: ``experiments/results/main-job/eval-breakdown.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", default="bitalloc-out/plans", help="a finished run's plans folder")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default=str(HERE / "results" / "main-job" / "eval-breakdown.json"))
    a = ap.parse_args(argv)
    import torch

    import bitalloc
    from bitalloc.allocator.api import eval_windows
    from bitalloc.allocator.evaluate import _outputs, evaluate_models
    from bitalloc.allocator.executor import apply as _apply
    from bitalloc.allocator.plan import Plan
    from bitalloc.sensitivity.models import fingerprint

    files = sorted(Path(a.plans).glob("*.json"))
    if not files:
        raise SystemExit(f"no plans in {a.plans!r}: run `bitalloc run` first")
    loaded = bitalloc.load(a.model, log=None)
    row: dict = {"plans": len(files)}
    t0 = time.perf_counter()
    windows, desc = eval_windows(loaded)
    row["windows_s"] = round(time.perf_counter() - t0, 1)
    plans = {f.stem: Plan.load(f) for f in files}
    fp, cache = fingerprint(loaded.model), {}
    t0 = time.perf_counter()
    models = {k: _apply(loaded.model, p, fingerprint=fp, cache=cache) for k, p in plans.items()}
    row["apply_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    res = evaluate_models(loaded.model, models, windows, progress=False)
    row["score_s"] = round(time.perf_counter() - t0, 1)
    row["score_s_per_model"] = {k: round(v.seconds, 2) for k, v in res.items()}
    batch = windows[:4]
    with torch.no_grad():
        def per_batch(m, n=2):
            _outputs(m, batch)
            t = time.perf_counter()
            for _ in range(n):
                _outputs(m, batch)
            return round((time.perf_counter() - t) / n, 3)

        one = next(iter(models.values()))
        row["forward_16bit_s"] = per_batch(loaded.model)
        row["forward_quantized_s"] = per_batch(one)
        qls = [m for m in one.modules() if type(m).__name__ == "QuantLinear"]
        t = time.perf_counter()
        for m in qls:
            m.dequantized_weight()
        row["dequantize_all_s"] = round(time.perf_counter() - t, 3)
    row.update(evaluation=desc, machine="2-core CPU, 24 GiB", date=time.strftime("%Y-%m-%d"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(row, indent=1) + "\n")
    print("| windows | apply (quantize + pack) | score | 16-bit forward / batch | quantized forward / batch | "
          "dequantize 210 weights |\n|---|---|---|---|---|---|")
    print(f"| {row['windows_s']} s | {row['apply_s']} s | {row['score_s']} s | {row['forward_16bit_s']} s | "
          f"{row['forward_quantized_s']} s | {row['dequantize_all_s']} s |")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
