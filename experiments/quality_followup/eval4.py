import dataclasses, json, sys
import pathlib; ROOT = pathlib.Path(__file__).resolve().parents[2]; sys.path.insert(0, str(ROOT))
from bitalloc.allocator import api, baselines
from bitalloc.allocator.evaluate import windows_from_file
from bitalloc.sensitivity.profile import SensitivityProfile
R = str(ROOT / "experiments/results/quality")
p2 = SensitivityProfile.load(f"{R}/profile-ext5.json")
loaded = api.load("smollm2")
plans = {}
for b in ["3bpw", "3.5bpw", "4bpw", "4.5bpw", "5bpw"]:
    plans[f"bitalloc@{b}"] = dataclasses.replace(api.solve(p2, b), label=f"bitalloc@{b}")
    plans[f"bitalloc@{b}"].save(f"{R}/plans-18/bitalloc-{b}.json")
u = baselines.nearest_uniform(p2, "5bpw"); u.save(f"{R}/plans-18/uniform-5bpw.json")
ev = {k: plans[k] for k in ("bitalloc@3bpw", "bitalloc@3.5bpw", "bitalloc@4bpw")}
ev["uniform w5g128@5bpw"] = u
windows = windows_from_file(loaded.tokenizer, str(ROOT.parent / "shared/data/wikitext2-test.txt"), 512, 32)
res = api._evaluate_plans(loaded, ev, windows, progress=False)
out = {k: {"ppl": v.ppl, "kl": v.kl, "top1": v.top1_agree, "bpw": ev[k].predicted["bpw"] if k in ev else 16.0} for k, v in res.items()}
print(json.dumps(out, indent=1)); json.dump(out, open(f"{R}/plans-18-results.json", "w"), indent=1)
