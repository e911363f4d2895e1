import json, sys
import pathlib; ROOT = pathlib.Path(__file__).resolve().parents[2]; sys.path.insert(0, str(ROOT))
from bitalloc.allocator import api, baselines
from bitalloc.allocator.plan import Plan
from bitalloc.sensitivity.profile import SensitivityProfile
R = str(ROOT / "experiments/results/quality")
p2 = SensitivityProfile.load(f"{R}/profile-ext5.json")
need = {}
for b in ["3bpw", "3.5bpw", "4bpw", "4.5bpw", "5bpw"]:
    for m, fn in (("bitalloc", lambda b: api.solve(p2, b)), ("uniform", lambda b: baselines.nearest_uniform(p2, b)), ("rule-mix", lambda b: baselines.rule_mix(p2, b))):
        new = fn(b)
        old = Plan.load(f"{R}/plans/{m}-{b}.json")
        same = {k: v.scheme for k, v in new.layers.items()} == {k: v.scheme for k, v in old.layers.items()}
        print(b, m, "same" if same else "DIFFERENT", new.label, round(new.predicted["bpw"], 4), round(new.predicted["loss_total"], 4), "| old", old.label, round(old.predicted["loss_total"], 4))
        if not same: need[f"{m}@{b}"] = new
