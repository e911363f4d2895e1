"""What serving on vLLM costs a SmolLM2 plan (issue 16): q/k/v and gate/up tied vs free.

vLLM runs ``q_proj, k_proj, v_proj`` as one ``qkv_proj`` and ``gate_proj, up_proj`` as one
``gate_up_proj``, each with one quantization scheme. ``bitalloc solve --target vllm`` ties
them; this script solves the same profile at each budget with and without the ties and
evaluates every plan the same way (WikiText-2 test perplexity, KL and top-1 agreement
against the 16-bit model), and writes the compressed-tensors export report of the tied
plan (which vLLM kernels can run its layers, read from vLLM's code).

    bitalloc profile --model smollm2 --out /tmp/issue16/profile.json      # ~6-15 min, once
    python experiments/vllm_ties.py --profile experiments/results/quality/profile.json \
        --text /work/shared/data/wikitext2-test.txt                          # ~4 min on 2 idle CPU cores

Writes experiments/results/vllm-ties/{results.json, allocations.json, plans/*.json} (plans/ is not
committed: allocations.json has each plan's schemes) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # experiments/_driver.py

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "experiments" / "results" / "vllm-ties"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--budgets", default="3.5bpw,4bpw")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--text", default=str(DATA / "wikitext2-test.txt"))
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()

    import bitalloc
    import bitalloc.allocator.export
    from bitalloc.allocator.report import format_table
    from bitalloc.allocator.vllm import fused_groups

    out = Path(a.out)
    (out / "plans").mkdir(parents=True, exist_ok=True)
    prof = bitalloc.load_profile(a.profile)
    groups = fused_groups(l.fqn for l in prof.layers)
    plans = {}
    for b in a.budgets.split(","):
        for tied in (False, True):
            t0 = time.perf_counter()
            p = bitalloc.solve(prof, b, target="vllm" if tied else None, profile_path=a.profile)
            name = f"{b}-{'vllm' if tied else 'free'}"
            p.save(out / "plans" / f"{name}.json")
            mixed = sum(1 for g in groups if len({p.layers[f].scheme for f in g}) > 1)
            plans[name] = (p, mixed, time.perf_counter() - t0)
    loaded = bitalloc.load("smollm2")
    t0 = time.perf_counter()
    res = bitalloc.evaluate(loaded, {k: v[0] for k, v in plans.items()}, text=a.text, n_windows=a.windows,
                            seq_len=a.seq_len, progress=False)
    eval_s = time.perf_counter() - t0
    rows = []
    for k, (p, mixed, solve_s) in plans.items():
        r = res[k]
        rows.append({"plan": k, "bpw": p.bpw, "pred_kl": p.predicted["loss_total"], "ppl": r.ppl, "kl": r.kl,
                     "top1": r.top1_agree, "mixed_fused": mixed, "n_fused": len(groups), "solve_s": solve_s})
    ref = next(v for k, v in res.items() if k not in plans)
    print(format_table(rows, (("plan", "plan", ""), ("bpw", "bpw", ".4f"), ("pred_kl", "pred. KL", ".4f"),
                              ("ppl", "ppl", ".3f"), ("kl", "KL", ".4f"), ("top1", "top-1", ".3f"),
                              ("mixed_fused", "fused w/ mixed schemes", "d"), ("solve_s", "solve s", ".2f"))))
    print(f"16-bit ppl {ref.ppl:.3f}; {a.windows} windows x {a.seq_len} tokens of {a.text}; eval {eval_s:.0f}s")
    result = {"profile": a.profile, "text": a.text, "windows": a.windows, "seq_len": a.seq_len,
              "fp16_ppl": ref.ppl, "rows": rows, "eval_s": eval_s}
    exports = {}
    for k, (p, _, _) in plans.items():  # what vLLM could run, and the exported bytes beside the plan's
        with tempfile.TemporaryDirectory() as d:
            env = bitalloc.allocator.export.export(p, "compressed-tensors", Path(d) / "ct", model=loaded, log=None)
        rep = env["report"]
        exports[k] = {"bytes": {kk: rep["bytes"][kk] for kk in ("exported_quantized", "plan_predicted_quantized")},
                      "parts": rep["bytes"]["parts"], "vllm": rep["vllm"], "file_bytes": rep["weights_file"]["bytes"],
                      "schemes": p.scheme_counts()}
        print(f"{k}: " + "; ".join(rep["summary_lines"][1:2] + rep["summary_lines"][6:]))
    result["exports"] = exports
    (out / "results.json").write_text(json.dumps(result, indent=1))
    from _driver import write_allocations

    write_allocations(out / "plans", out / "allocations.json")


if __name__ == "__main__":
    main()
