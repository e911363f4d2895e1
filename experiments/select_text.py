"""Which text should the run's end-to-end selection measure? Every candidate plan, three ways (issue 14).

bitalloc's default picks, per budget, the candidate calibration's plan with the lowest KL to
the 16-bit model on the last 4 calibration rows (``[solve] select_rows``). Those rows also
fed the profile, and they are of the calibration's kind (WikiText-2 in the peers benchmark),
while two cells lost on Tiny Shakespeare (2.5 and 4.5 bpw, RTN) asked whether another
selection text would pick plans that hold on text of another kind. For every distinct
candidate plan of each budget this script measures

- ``kl_cal``: KL per token on the profile's last ``--select-rows`` calibration rows (what the
  run selects on);
- ``kl_gen``: KL per token on ``--gen-rows`` rows the model samples itself (seed
  ``--gen-seed``; text of no particular kind, held out from the profile);
- ``dnll_<text>``: the change of each evaluation text's own next-token loss (nats per token,
  quantized minus 16-bit) on ``--windows`` windows of ``--seq-len`` tokens, the benchmark's
  windows of each ``--text`` file;

and reports, per budget, the plan each selection rule (``kl_cal``, ``kl_gen``, their sum)
would choose and the best candidate on each text. Results (one row per distinct plan, and
the choices) go to ``--out`` as JSON::

    python experiments/select_text.py --profile /tmp/s30/profile-both.json \\
      --out experiments/results/peers/select-text.json

Nothing is cached; 24–29 s per candidate plan on a 2-core machine for 4 + 4 + 8 + 8 rows of 512.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _data import DATA


def _summary(rows: list[dict], texts: list[str]) -> dict:
    """Per budget: the tables each rule picks, and each text's best candidate."""
    out = {}
    for b in dict.fromkeys(r["budget"] for r in rows):
        rs = [r for r in rows if r["budget"] == b]
        pick = {"kl_cal": min(rs, key=lambda r: r["kl_cal"]), "kl_gen": min(rs, key=lambda r: r["kl_gen"]),
                "kl_cal+kl_gen": min(rs, key=lambda r: r["kl_cal"] + r["kl_gen"])}
        pick.update({f"best_{t}": min(rs, key=lambda r: r[f"dnll_{t}"]) for t in texts})
        out[b] = {rule: {"tables": r["tables"], **{f"dnll_{t}": r[f"dnll_{t}"] for t in texts}}
                  for rule, r in pick.items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", required=True, help="a profile with its candidate calibrations (--fisher-table)")
    ap.add_argument("--out", required=True, help="the JSON to write")
    ap.add_argument("--budgets", default="2.5bpw,3bpw,3.5bpw,4bpw,4.5bpw")
    ap.add_argument("--data", default=str(DATA), help="folder of the --text files")
    ap.add_argument("--text", action="append", default=None,
                    help="evaluation text file under --data (repeatable; default wikitext2-test.txt and "
                         "tinyshakespeare.txt)")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows per text")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--select-rows", type=int, default=4)
    ap.add_argument("--gen-rows", type=int, default=4)
    ap.add_argument("--gen-seed", type=int, default=4321)
    ap.add_argument("--model", default=None, help="model spec (default: the profile's)")
    a = ap.parse_args(argv)

    import numpy as np

    import bitalloc
    from bitalloc.allocator import api
    from bitalloc.allocator.candidates import candidate_plans
    from bitalloc.allocator.context import calibration_spec, peer_context, profile_calibration
    from bitalloc.sensitivity.artifact import write_json
    from bitalloc.sensitivity.calibration import as_batches, load_calibration
    from bitalloc.sensitivity.metrics import get_metric

    texts = a.text or ["wikitext2-test.txt", "tinyshakespeare.txt"]
    missing = [t for t in texts if not (Path(a.data) / t).is_file()]
    if missing:
        print(f"missing {', '.join(missing)} under {a.data}")
        return 2
    prof = bitalloc.load_profile(a.profile)
    loaded = bitalloc.load(a.model or prof.model.get("spec", "smollm2"), log=None)
    cal = profile_calibration(loaded, prof)[-a.select_rows:]  # (select_rows, T): the rows the run selects on
    t0 = time.perf_counter()
    gen = load_calibration(calibration_spec("generated", a.gen_rows, a.seq_len, a.gen_seed), loaded.model,
                           loaded.tokenizer)  # (gen_rows, seq_len)
    gen_s = time.perf_counter() - t0
    wins = {Path(t).stem: api.eval_windows(loaded, str(Path(a.data) / t), a.windows, a.seq_len)[0]
            for t in texts}
    ctx, _ = peer_context(loaded, prof, data=cal, profile_path=a.profile, what="the selection study",
                          cache_bytes=6 << 30)
    kl = ctx.fitness([as_batches(cal, 4), as_batches(gen, 4)])
    nll = ctx.fitness([as_batches(w, 4) for w in wins.values()], metric=get_metric("nll"))
    rows = []
    for b in a.budgets.split(","):
        for key, tables in candidate_plans(prof, b, ties=False)[2].items():  # the distinct plans, as the run sees them
            t = time.perf_counter()
            choice = [np.frombuffer(key, dtype=np.int64)]
            row = {"budget": b, "tables": tables, "kl_cal": kl(choice, 0)[0], "kl_gen": kl(choice, 1)[0]}
            row.update({f"dnll_{name}": nll(choice, k)[0] for k, name in enumerate(wins)})
            rows.append(row)
            print(f"{b:>7} {'+'.join(tables):<40} kl_cal {row['kl_cal']:.4f} kl_gen {row['kl_gen']:.4f} "
                  + " ".join(f"dnll_{n} {row[f'dnll_{n}']:.4f}" for n in wins) + f"  {time.perf_counter() - t:.0f} s",
                  flush=True)
    summary = _summary(rows, list(wins))
    write_json(a.out, {"schema": "bitalloc.experiment.select-text/1", "profile": str(a.profile),
                       "model": loaded.spec, "settings": {k: v for k, v in vars(a).items() if k != "out"},
                       "generated_s": round(gen_s, 1), "rows": rows, "choices": summary}, indent=1)
    for b, picks in summary.items():
        print(b, "  ".join(f"{rule}: {'+'.join(p['tables'])}" for rule, p in picks.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
