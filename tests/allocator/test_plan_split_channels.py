"""Split channels travel with the profile: plans copy the ones it measured, and solving and
planning need no torch (issue 11: "a profile's way to a plan reads in one direction")."""
import json
import subprocess
import sys

import numpy as np
import pytest

from bitalloc.allocator.plan import Plan
from bitalloc.kernels.formats import parse_scheme
from bitalloc.sensitivity.profile import PROFILE_SCHEMA_V2, ProfileError, SensitivityProfile

SCHEMES = ["w2g64z", "w2g64z+h3r0.1", "w2g32z+h4r0.1", "w2g32z+h4r0.05", "w4g64z"]
SPLITS = [s for s in SCHEMES if "+h" in s]


@pytest.fixture(scope="module")
def split_profile(tmp_path_factory):
    """A tiny random-weight profile with split schemes (two of them keep the same k), saved."""
    import bitalloc

    path = tmp_path_factory.mktemp("split") / "profile.json"
    prof = bitalloc.profile("random:llama-tiny", n_samples=4, seq_len=32, kl_samples=2, out=path, schemes=SCHEMES,
                            ref_schemes=["w2g64z", "w4g64z"], progress=False, log=None)
    return prof, path


def _old_rule(prof, fqn, scheme):
    """The channels a plan got before they were stored: torch's rule on the stored saliency."""
    from bitalloc.sensitivity.saliency import select_split_channels

    i = prof.layer_index(fqn)
    idx = select_split_channels(prof.saliency[fqn], scheme, prof.layers[i].in_features)
    return None if idx is None else tuple(idx.tolist())


def _as_v2(path, tmp_path):
    """The same profile as a /2 file: no split channels, saliency in the sidecar."""
    prof = SensitivityProfile.load(path)
    old = SensitivityProfile(**{**{f: getattr(prof, f) for f in prof.__dataclass_fields__}, "split_channels": None})
    p = old.save(tmp_path / "v2.json")
    d = json.loads(p.read_text())
    d["schema"] = PROFILE_SCHEMA_V2
    d["kl_ref"] = d.pop("ref_values")  # the /2 name of the field
    p.write_text(json.dumps(d))
    return p


def test_profile_stores_the_measured_channels(split_profile):
    prof, path = split_profile
    assert set(prof.split_channels) == set(prof.fqns)
    for layer in prof.layers:
        ks = {s: parse_scheme(s).n_high(layer.in_features) for s in SPLITS}
        assert set(prof.split_channels[layer.fqn]) == set(ks.values()), f"{layer.fqn}: keys {prof.split_channels[layer.fqn]}"
        for s, k in ks.items():
            got = prof.split_channels[layer.fqn][k]
            assert got.dtype == np.int64 and tuple(got.tolist()) == _old_rule(prof, layer.fqn, s), f"{layer.fqn} {s}"
    q = SensitivityProfile.load(path)
    assert q.split_channels.keys() == prof.split_channels.keys()
    assert all(np.array_equal(q.split_channels[f][k], v) for f, d in prof.split_channels.items() for k, v in d.items())
    r = SensitivityProfile.from_dict(json.loads(prof.to_json_bytes()))  # inline (the service's form)
    assert all(np.array_equal(r.split_channels[f][k], v) for f, d in prof.split_channels.items() for k, v in d.items())


def test_plans_are_the_ones_made_before(split_profile, tmp_path):
    """Every split scheme on every layer: the plan's high_idx is what the torch rule gave
    before the channels were stored, from the new profile and from a /2 file alike."""
    from bitalloc.allocator.solve import plan_from_choice

    prof, path = split_profile
    old = SensitivityProfile.load(_as_v2(path, tmp_path))
    assert old.split_channels is None and old.saliency is not None
    for k, s in enumerate(prof.schemes):
        new_plan, old_plan = plan_from_choice(prof, [k] * prof.n_layers), plan_from_choice(old, [k] * old.n_layers)
        for f in prof.fqns:
            want = _old_rule(prof, f, s)
            assert new_plan.layers[f].high_idx == want and old_plan.layers[f].high_idx == want, f"{f} {s}"
            assert (want is None) == (s not in SPLITS), f"{f} {s}"


def test_a_v2_profile_without_saliency_plans_no_channels(split_profile, tmp_path):
    prof, path = split_profile
    d = prof.to_dict()
    d.pop("saliency"), d.pop("split_channels")
    q = SensitivityProfile.from_dict(d)
    assert q.high_channels(0, SPLITS[0]) is None and q.high_channels(0, "w4g64z") is None


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(split_channels={"nope": {"3": [0, 1, 2]}}), "unknown layer"),
    (lambda d: d["split_channels"][next(iter(d["split_channels"]))].update({"3": [2, 1, 0]}), "ascending"),
    (lambda d: d["split_channels"][next(iter(d["split_channels"]))].update({"3": [0, 1]}), "shape"),
    (lambda d: d["split_channels"][next(iter(d["split_channels"]))].update({"x": [0]}), "channel count"),
    (lambda d: d["split_channels"][next(iter(d["split_channels"]))].update({"03": [0, 1, 2]}), "channel count"),
    (lambda d: d["split_channels"][next(iter(d["split_channels"]))].update({"1": [10**6]}), "ascending"),
])
def test_bad_inline_split_channels_are_one_line(split_profile, edit, match):
    prof, _ = split_profile
    d = json.loads(prof.to_json_bytes())
    edit(d)
    with pytest.raises(ProfileError, match=match):
        SensitivityProfile.from_dict(d)


def test_bad_sidecar_split_channels_are_refused(split_profile, tmp_path):
    from safetensors.numpy import load_file, save_file

    from bitalloc.sensitivity.artifact import file_sha256

    prof, _ = split_profile
    p = prof.save(tmp_path / "p.json")
    side = tmp_path / "p.arrays.safetensors"
    tensors = load_file(str(side))
    key = next(k for k in tensors if k.startswith("split/"))
    for bad, match in ((tensors[key].astype(np.float64), "expected int64"), (tensors[key][::-1].copy(), "ascending")):
        save_file({**tensors, key: bad}, str(side))
        d = json.loads(p.read_text())
        d["arrays"].update(sha256=file_sha256(side), bytes=side.stat().st_size)
        p.write_text(json.dumps(d))
        with pytest.raises(ProfileError, match=match):
            SensitivityProfile.load(p)


NO_TORCH = r"""
import json, sys
from bitalloc.allocator.cli import main
profile, out = sys.argv[1], sys.argv[2]
rc = main(["--quiet", "solve", profile, "--budget", "16bpw", "--schemes", "w2g64z+h3r0.1,w2g32z+h4r0.05",
           "--out", out])
assert rc == 0, f"bitalloc solve exited {rc}"
plan = json.load(open(out))
import bitalloc
p2 = bitalloc.solve(profile, "4.3bpw", schemes=["w2g32z+h4r0.05", "w4g64z"])
p2.save(out + ".api.json")
print(json.dumps({"torch": "torch" in sys.modules,
                  "high": {f: l.get("high_idx") for f, l in plan["layers"].items()},
                  "api": {f: lp.high_idx for f, lp in p2.layers.items()}}))
"""


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_solving_and_planning_need_no_torch(split_profile, tmp_path, version):
    """`bitalloc solve` and `bitalloc.solve` on a saved profile with split schemes write
    plans with the measured channels, and torch is never imported (a /2 file too)."""
    prof, path = split_profile
    src = str(path if version == "v3" else _as_v2(path, tmp_path))
    out = subprocess.run([sys.executable, "-c", NO_TORCH, src, str(tmp_path / "plan.json")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["torch"] is False, "solving or writing the plan imported torch"
    assert any(res["high"].values()) and any(v for v in res["api"].values()), "no split layer was chosen"
    for f, idx in res["high"].items():
        scheme = json.loads((tmp_path / "plan.json").read_text())["layers"][f]["scheme"]
        assert (tuple(idx) if idx is not None else None) == _old_rule(prof, f, scheme), f"{f} {scheme}"
    api = Plan.load(tmp_path / "plan.json.api.json")
    for f, idx in res["api"].items():
        want = _old_rule(prof, f, api.layers[f].scheme)
        assert (tuple(idx) if idx is not None else None) == want, f
        assert api.layers[f].high_idx == want, f"{f}: the saved plan differs"
