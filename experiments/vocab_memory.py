"""Peak memory and wall time of a 256k-token vocabulary: the default profile and an evaluation of 12 plans.

Model: ``random:llama-256k`` (llama-tiny's body, 256000-token vocabulary, untied head). Each
step runs the ``bitalloc`` CLI under ``/usr/bin/time -v`` with ``PYTHONPATH`` pointing at one
source tree, so the same script measures the code before and after a change:

    python experiments/vocab_memory.py --label before --tree /path/to/old/checkout-parent
    python experiments/vocab_memory.py --label after  --tree /work/wt-vocab [--logits-memory 256MiB]

``--tree`` is the directory that *contains* the ``bitalloc`` package folder. The 12 plans
are made once (a budget sweep of the first label's profile) and reused by every label, so
each evaluation scores the same quantized models. Results accumulate (one entry per label)
in ``experiments/results/vocab-memory/results.json``; the table printed compares them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # experiments/_driver.py

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "vocab-memory"
MODEL = "random:llama-256k"
BUDGETS = ",".join(f"{b}bpw" for b in (2.75, 2.8, 3, 3.1, 3.25, 3.3, 3.5, 4.25, 4.3, 5, 6, 7))  # 12 distinct allocations  # 12 average-bits budgets


def timed(cmd: list[str], tree: str, log: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; peak RSS (MiB) and wall time (s)."""
    env = {**os.environ, "PYTHONPATH": tree, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {p.returncode}); see {log}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", p.stderr).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    return {"peak_rss_mib": round(rss_kb / 1024, 1), "wall_s": round(secs, 1), "command": " ".join(cmd)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--tree", required=True, help="directory containing the bitalloc package folder")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--reuse-profile", action="store_true", help="keep this label's timed profile if it exists")
    ap.add_argument("--logits-memory", default=None, help="passed to profile and eval as --logits-memory")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    work = OUT / a.label
    work.mkdir(exist_ok=True)
    cli = [sys.executable, "-m", "bitalloc.allocator.cli", "--quiet"]
    extra = ["--logits-memory", a.logits_memory] if a.logits_memory else []
    prof = work / "profile.json"
    row = {"label": a.label, "tree": a.tree, "logits_memory": a.logits_memory, "model": MODEL}
    res_path = OUT / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    if a.reuse_profile and prof.is_file() and "profile" in results.get(a.label, {}):
        row["profile"] = results[a.label]["profile"]
    else:
        row["profile"] = timed([*cli, "profile", "--model", MODEL, "--n-samples", str(a.n_samples), "--seq-len",
                                str(a.seq_len), "--out", str(prof), "--overwrite", *extra], a.tree,
                               work / "profile.log")
    plans_dir = OUT / "plans"
    if not plans_dir.is_dir() or len(list(plans_dir.glob("*.json"))) < 12:
        timed([*cli, "sweep", str(prof), "--budgets", BUDGETS, "--out-dir", str(plans_dir), "--overwrite"],
              a.tree, work / "sweep.log")
    plans = sorted(plans_dir.glob("*.json"))[:12]
    ev = [*cli, "eval", "--model", MODEL, "--windows", str(a.windows), "--seq-len", str(a.seq_len), *extra]
    for p in plans:
        ev += ["--plan", str(p)]
    row["eval_12_plans"] = timed(ev, a.tree, work / "eval.log")
    row["eval_output"] = (work / "eval.log").read_text().split("\n--- stderr ---")[0].strip().splitlines()[-16:]
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    results[a.label] = row
    res_path.write_text(json.dumps(results, indent=2) + "\n")
    from _driver import write_allocations

    write_allocations(plans_dir, OUT / "allocations.json")  # plans/ itself is regenerated, not committed
    print(f"{'label':<14} {'step':<14} {'peak RSS MiB':>13} {'wall s':>8}")
    for lab, r in results.items():
        for step in ("profile", "eval_12_plans"):
            print(f"{lab:<14} {step:<14} {r[step]['peak_rss_mib']:>13.1f} {r[step]['wall_s']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
