"""The common envelope: the previous profile version is read, ProfileConfig validates
strictly, atomic writes leave nothing behind, outputs are checked before work starts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitalloc import BitallocError
from bitalloc.sensitivity.artifact import OutputError, atomic_write, check_output, parse_json, read_json
from bitalloc.sensitivity.profile import PROFILE_SCHEMA, ProfileError, SensitivityProfile
from bitalloc.sensitivity.profile_config import ProfileConfig


def test_previous_profile_version_is_read(golden, tmp_path):
    p = SensitivityProfile.load(golden / "profile.json")
    d = p.to_dict()
    d.pop("schema")
    d["schema_version"] = "bitalloc.profile/1"  # the /1 layout: version key, saliency inline
    d["kl_ref"] = d.pop("ref_values")  # and the reference values' old name
    (tmp_path / "old.json").write_text(json.dumps(d))
    q = SensitivityProfile.load(tmp_path / "old.json")
    assert q.schema_version == PROFILE_SCHEMA and q.fqns == p.fqns
    assert all(np.array_equal(q.saliency[f], p.saliency[f]) for f in p.fqns)
    q.save(tmp_path / "new.json")  # re-saved in the current version, bulk in the sidecar
    new = json.loads((tmp_path / "new.json").read_text())
    assert new["schema"] == PROFILE_SCHEMA and "saliency" not in new and "schema_version" not in new
    assert "kl_ref" not in new and np.array_equal(np.array(new["ref_values"], dtype=float), p.ref_values, equal_nan=True)
    assert (tmp_path / "new.arrays.safetensors").is_file()
    assert new["arrays"]["file"] == "new.arrays.safetensors" and len(new["bitalloc_version"]) > 0


@pytest.mark.parametrize("kw,match", [
    ({"measured": "no"}, "measured"),
    ({"quantize_tied": 1}, "quantize_tied"),
    ({"n_samples": True}, "n_samples"),
    ({"kl_stride": 0}, "kl_stride"),
    ({"kl_samples": 0}, "kl_samples"),
    ({"schemes": "w4g32"}, "schemes"),
    ({"schemes": ["w4g32", "w4g32"], "ref_schemes": ["w4g32"]}, "duplicates"),
    ({"schemes": ["w4g32"], "ref_schemes": ["w2g64z"]}, "ref scheme 'w2g64z'"),
    ({"include": ["re:("]}, "regular expression"),
    ({"saliency": "vibes"}, "saliency"),
    ({"workers": 0}, "workers"),  # --workers without --measured is allowed since the default profile runs on Ray
    ({"hessian_dtype": "int8"}, "hessian_dtype"),
])
def test_profile_config_is_strict(kw, match):
    with pytest.raises(ProfileError, match=match):
        ProfileConfig(**kw)


def test_profile_config_is_the_one_settings_object():
    import bitalloc
    from bitalloc.allocator.config import RunConfig

    cfg = RunConfig.from_dict({"profile": {"schemes": ["w2g64z", "w4g32"], "ref_schemes": ["w2g64z"],
                                           "saliency": "obq"}, "calibration": {"n_samples": 3}})
    pc = cfg.profile_config()
    assert isinstance(pc, bitalloc.ProfileConfig) and pc.saliency == "obq" and pc.n_samples == 3
    assert pc.schemes == ("w2g64z", "w4g32") and pc.kl_samples == 2
    with pytest.raises(ProfileError, match="unknown profile setting"):
        ProfileConfig.from_settings(None, shemes=["w4g32"])


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_check_output(tmp_path):
    (tmp_path / "in.json").write_text("{}")
    with pytest.raises(OutputError, match="also an input"):
        check_output(tmp_path / "sub" / ".." / "in.json", inputs=[tmp_path / "in.json"])
    with pytest.raises(OutputError, match="--overwrite"):
        check_output(tmp_path / "in.json")
    assert check_output(tmp_path / "in.json", overwrite=True) == tmp_path / "in.json"
    assert check_output(tmp_path / "new" / "deeper" / "x.json") == tmp_path / "new" / "deeper" / "x.json"
    assert not (tmp_path / "new").exists()  # checking creates nothing


@pytest.mark.parametrize("text,match", [("[" * 100_000, "nested too deeply"), ("[NaN]", "NaN"),
                                        ("[-Infinity]", "Infinity"), ('{"a": 1', "not valid JSON"),
                                        (b"\xff\xfe", "UTF-8")])
def test_parse_json_one_line(text, match):
    with pytest.raises(BitallocError, match=match) as e:
        parse_json(text, "test input")
    assert "\n" not in str(e.value)


def test_read_json_size_limit(tmp_path):
    (tmp_path / "big.json").write_text("[" + "0," * 1000 + "0]")
    with pytest.raises(BitallocError, match="more than the 100 bytes"):
        read_json(tmp_path / "big.json", "test", max_bytes=100)
