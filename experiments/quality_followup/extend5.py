"""Extend the quality benchmark's profile with w5 / w5g128 proxy columns (same Hessians, same
measured references), solve 5bpw, evaluate against uniform w5g128z."""
import dataclasses, json, sys, time
import numpy as np
import pathlib; ROOT = pathlib.Path(__file__).resolve().parents[2]; sys.path.insert(0, str(ROOT))
from bitalloc.allocator import api
from bitalloc.allocator import baselines
from bitalloc.allocator.evaluate import windows_from_file
from bitalloc.sensitivity.profile import SensitivityProfile
from bitalloc.sensitivity.build import cost_table
from bitalloc.sensitivity.calibration import CalibrationSpec, load_calibration, tokens_sha256
from bitalloc.sensitivity.hessian import collect_input_statistics
from bitalloc.sensitivity.proxy import proxy_table, calibrate_proxy, as_scheme

R = str(ROOT / "experiments/results/quality")
prof = SensitivityProfile.load(f"{R}/profile.json")
loaded = api.load("smollm2")
c = prof.calibration
spec = CalibrationSpec("file", c["path"], c["n_samples"], c["seq_len"], c["seed"])
data = load_calibration(spec, loaded.model, loaded.tokenizer, loaded.kind)
assert tokens_sha256(data) == c["tokens_sha256"]
t = time.perf_counter()
stats = collect_input_statistics(loaded.model, prof.layers, data, False, batch_size=4)
extra = ["w5", "w5g128"]
P = proxy_table(loaded.model, prof.layers, stats, [as_scheme(s) for s in extra], False)
print("hessians+proxy", time.perf_counter() - t)
schemes = prof.schemes + extra
proxy = np.concatenate([prof.proxy, P], 1)
ref_idx = [schemes.index(r) for r in prof.ref_schemes]
table, scales = calibrate_proxy(proxy, prof.kl_ref, ref_idx)
assert np.allclose(table[:, :len(prof.schemes)], prof.tables["all"], rtol=1e-9, atol=1e-15)
costs = np.concatenate([prof.cost_bits, cost_table(prof.layers, extra)], 1)
p2 = dataclasses.replace(prof, schemes=schemes, proxy=proxy, tables={"all": table}, cost_bits=costs, scales=scales,
                         metadata={**prof.metadata, "extended_with": extra})
p2.save(f"{R}/profile-ext5.json")
plans = {}
for b in ["5bpw", "4.5bpw"]:
    plans[f"bitalloc+w5@{b}"] = dataclasses.replace(api.solve(p2, b), label=f"bitalloc+w5@{b}")
    plans[f"bitalloc+w5@{b}"].save(f"{R}/plans/bitalloc-ext5-{b}.json")
plans["uniform w5g128z"] = baselines.uniform_plan(prof, "w5g128z")
import collections
for k, p in plans.items():
    print(k, p.predicted["bpw"], p.predicted["loss_total"], collections.Counter(l.scheme for l in p.layers.values()).most_common(6))
windows = windows_from_file(loaded.tokenizer, str(ROOT.parent / "shared/data/wikitext2-test.txt"), 512, 32)
res = api._evaluate_plans(loaded, plans, windows, progress=False)
out = {k: {"ppl": v.ppl, "kl": v.kl, "bpw": (plans[k].predicted["bpw"] if k in plans else 16.0)} for k, v in res.items()}
print(json.dumps(out, indent=1))
json.dump(out, open(f"{R}/ext5-results.json", "w"), indent=1)
