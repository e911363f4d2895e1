"""Where the main job's time goes, and what cheaper proxy calibrations cost in plan quality.

The default profile calibrates the Hessian proxy with end-to-end KL measurements of every
layer at reference schemes (210 layers x R references, each a forward from the layer's block
to the logits on ``kl_samples`` calibration rows). This script compares, on the default run's
own evaluation (held-out self-generated text, 8 x 256 tokens, seed 1234; or ``--text``), the
3.0 / 3.5 / 4.0 bpw plans of several calibrations:

- the profiles given with ``--profile NAME=PATH`` (e.g. the default run's, kl_samples 2) and
  profiles it builds with ``--build NAME=KL_SAMPLES`` (the main job's calibration: 8 x 256
  self-generated tokens, default references and schemes; saved as ``<out>/profile-NAME.json``
  and reused when made with the same settings);
- profiles built with ``--build NAME=fisher`` (or ``NAME=fisher-text``): reference values
  estimated from one backward pass (``ref_method="fisher"``, :mod:`sensitivity.fisher_refs`)
  instead of measured; ``--build NAME=hybridN``: measured on every N-th block, the Fisher
  estimate corrected per layer kind elsewhere (``ref_method="hybrid"``);
- for each, reference subsets given with ``--refs`` (the subset's columns of the measured
  ``ref_values``, so a subset costs no new measurements and shows what measuring fewer costs).

    python experiments/main_job_variants.py --profile before=bitalloc-out/profile.json \\
        --build rows1=1 --refs w2g64z,w3g128z,w4g128z --refs w2g64z,w3g128z    # -> results/main-job/variants.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from _driver import Bench, add_args, table

COLUMNS = (("profile", "profile", ""), ("ref_method", "references", ""), ("kl_samples", "rows", ""), ("refs", "refs", ""),
           ("measure_s", "measure s", ".1f"), ("budget", "budget", ""), ("bpw", "bpw", ".3f"), ("ppl", "ppl", ".3f"),
           ("kl", "KL", ".4f"), ("top1", "top-1", ".3f"), ("other_ppl", "Shakespeare ppl", ".3f"))


def with_refs(prof, refs: list[str]):
    """The profile's calibrated table recomputed from a subset of its measured references."""
    from bitalloc.sensitivity.calibrate import calibrate_proxy

    cols = [prof.ref_schemes.index(r) for r in refs]
    idx = [prof.schemes.index(r) for r in refs]
    tab, scales = calibrate_proxy(prof.proxy, prof.ref_values[:, cols], idx)
    return dataclasses.replace(prof, tables={"all": tab}, ref_values=prof.ref_values[:, cols], ref_schemes=list(refs),
                               scales=scales)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap, out="main-job", budgets="3bpw,3.5bpw,4bpw", calibration="generated", calib_samples=8,
             calib_len=256, kl_samples=2, kl_stride=2, text="generated", windows=8, seq_len=256)
    ap.add_argument("--profile", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--build", action="append", default=[], metavar="NAME=KL_SAMPLES")
    ap.add_argument("--schemes", default="", help="candidate schemes of the built profiles (default: bitalloc's)")
    ap.add_argument("--refs", action="append", default=[], help="comma-separated reference subset (repeatable)")
    ap.add_argument("--name", default="variants.json", help="results file under --out")
    a = ap.parse_args(argv)

    import bitalloc

    bench = Bench(a)
    profiles = {}
    for item in a.profile:
        name, path = item.split("=", 1)
        profiles[name] = bitalloc.load_profile(path)
    for item in a.build:
        name, k = item.split("=", 1)
        extra = {"schemes": [s for s in a.schemes.split(",") if s]} if a.schemes else {}
        if k.startswith("fisher"):  # fisher (labels sampled from the model) or fisher-text
            extra.update(ref_method="fisher", fisher_labels=k.partition("-")[2] or "sampled")
        elif k.startswith("hybrid"):  # hybridN: every N-th block measured, the Fisher corrected elsewhere
            extra.update(ref_method="hybrid", measure_every=int(k[6:] or 3))
        else:
            extra["kl_samples"] = int(k)
        profiles[name] = bench.profile(f"profile-{name}.json", **extra)
    plans = {}
    for pname, prof in profiles.items():
        subsets = [s.split(",") for s in a.refs] or [list(prof.ref_schemes)]
        for refs in subsets:
            if not set(refs) <= set(prof.ref_schemes):
                continue
            p = with_refs(prof, refs)
            for b in bench.budgets:
                plans[f"{pname}|{'+'.join(refs)}|{b}"] = bitalloc.solve(p, b)
    res = bench.evaluate(plans)
    rows = []
    for key, plan in plans.items():
        pname, refs, b = key.split("|")
        prof = profiles[pname]
        r = res[key]
        opts = prof.metadata["options"]
        rows.append({"profile": pname, "kl_samples": opts["kl_samples"], "refs": refs,
                     "ref_method": opts.get("ref_method", "measured") + (f"/{opts['fisher']['labels']}" if "fisher" in opts else ""),
                     "measure_s": prof.metadata["wall_s"]["measure"], "budget": b, "bpw": round(plan.bpw, 4),
                     "ppl": round(r["ppl"], 3), "kl": round(r["kl"], 4), "top1": round(r["top1"], 4),
                     "other_ppl": r["other_ppl"], "other_kl": r["other_kl"]})
    path = bench.write({"fp16_ppl": res["fp16"]["ppl"], "rows": rows}, a.name)
    print(f"eval: {bench.eval_desc}; fp16 ppl {res['fp16']['ppl']:.3f}")
    print(table(rows, COLUMNS))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
