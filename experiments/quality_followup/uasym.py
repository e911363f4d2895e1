"""Evaluate the asymmetric uniform formats next to the quality benchmark's baselines (disclosure)."""
import json, sys
import pathlib; ROOT = pathlib.Path(__file__).resolve().parents[2]; sys.path.insert(0, str(ROOT))
from bitalloc.allocator import api, baselines
from bitalloc.allocator.evaluate import windows_from_file
from bitalloc.sensitivity.profile import SensitivityProfile
R = str(ROOT / "experiments/results/quality")
prof = SensitivityProfile.load(f"{R}/profile.json")
loaded = api.load("smollm2")
plans = {f"uniform {s}": baselines.uniform_plan(prof, s) for s in ("w3g128z", "w4g128z")}
windows = windows_from_file(loaded.tokenizer, str(ROOT.parent / "shared/data/wikitext2-test.txt"), 512, 32)
res = api._evaluate_plans(loaded, plans, windows, progress=False)
out = {k: {"ppl": v.ppl, "kl": v.kl, "bpw": plans[k].predicted["bpw"] if k in plans else 16.0} for k, v in res.items()}
print(json.dumps(out, indent=1)); json.dump(out, open(f"{R}/uniform-asym-results.json", "w"), indent=1)
