from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bitalloc.kernels.formats import parse_scheme
from bitalloc.sensitivity.calibration import CalibrationSpec
from bitalloc.sensitivity.layers import LayerInfo, find_layers
from bitalloc.sensitivity.models import fingerprint, load_model
from bitalloc.sensitivity.profile import (
    PROFILE_SCHEMA,
    ProfileError,
    SensitivityProfile,
)
from bitalloc.sensitivity.build import build_profile, cost_table, other_parameter_bits

SCHEMES = ["w2g32z", "w3g64z", "w4g32", "w8", "fp16"]
CAL = CalibrationSpec(n_samples=4, seq_len=24, seed=1)


@pytest.fixture(scope="module")
def profile():
    lines = []
    p = build_profile("random:llama-tiny", SCHEMES, CAL, ref_schemes=["w3g64z"], progress=False, log_fn=lines.append)
    return p, lines


def test_build_profile_contents(profile):
    p, lines = profile
    assert p.schema_version == PROFILE_SCHEMA
    assert p.model["spec"] == "random:llama-tiny" and p.model["kind"] == "causal-lm"
    loaded = load_model("random:llama-tiny")
    assert p.model["fingerprint"]["sha256"] == fingerprint(loaded.model)["sha256"]
    assert p.n_layers == 14 and [s.fqn for s in p.skipped] == ["lm_head"]
    assert any(line.startswith("skipped lm_head: weight tied to model.embed_tokens.weight") for line in lines)
    assert p.schemes == SCHEMES and p.ref_schemes == ["w3g64z"]
    L, S = 14, len(SCHEMES)
    assert p.cost_bits.shape == (L, S) and p.cost_bits.dtype == np.int64
    for i, layer in enumerate(p.layers):
        for j, s in enumerate(SCHEMES):
            assert p.cost_bits[i, j] == parse_scheme(s).storage_bits(layer.out_features, layer.in_features)
    total = sum(t.numel() * t.element_size() * 8 for t in loaded.model.parameters())  # tied counted once
    assert p.other_bits == total - 32 * sum(layer.n_params for layer in p.layers)
    assert p.other_params == sum(t.numel() for t in loaded.model.parameters()) - sum(x.n_params for x in p.layers)
    table = p.table()
    np.testing.assert_allclose(table, p.scales[:, None] * p.proxy)
    np.testing.assert_allclose(table[:, 1], p.ref_values[:, 0], rtol=1e-9)  # single reference: exact at the ref
    assert (table >= 0).all() and (p.ref_values > 0).all()
    assert p.calibration["source"] == "generated" and p.calibration["shape"] == [4, 24]
    meta = p.metadata
    assert meta["metric"] == "kl" and meta["torch_version"] == torch.__version__
    assert set(meta["wall_s"]) >= {"load", "calibration", "hessians", "proxy", "measure", "total"}
    assert meta["options"]["block_replay"] is True
    assert p.layer_index("model.layers.1.mlp.up_proj") == 12 and p.scheme_index("w8") == 3


def test_save_load_round_trip(profile, tmp_path):
    p, _ = profile
    path = p.save(tmp_path / "sub" / "profile.json")
    q = SensitivityProfile.load(path)
    assert q.layers == p.layers and q.skipped == p.skipped and q.schemes == p.schemes
    assert q.model == p.model and q.calibration == p.calibration and q.metadata == p.metadata
    for name in ("cost_bits", "proxy", "ref_values", "scales"):
        np.testing.assert_array_equal(getattr(q, name), getattr(p, name))
        assert getattr(q, name).dtype == getattr(p, name).dtype
    np.testing.assert_array_equal(q.table("all"), p.table("all"))
    assert (q.other_bits, q.other_params) == (p.other_bits, p.other_params)
    assert q.to_dict() == p.to_dict()
    assert not (tmp_path / "sub" / "profile.json.tmp").exists()


def _edit(p, tmp_path, fn):
    d = p.to_dict()
    fn(d)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(d))
    return path


def test_load_errors(profile, tmp_path):
    p, _ = profile
    with pytest.raises(ProfileError, match=r"unsupported schema 'bitalloc.profile/9'"):
        SensitivityProfile.load(_edit(p, tmp_path, lambda d: d.update(schema_version="bitalloc.profile/9")))
    with pytest.raises(ProfileError, match=r"missing field\(s\): tables, scales"):
        SensitivityProfile.load(_edit(p, tmp_path, lambda d: (d.pop("tables"), d.pop("scales"))))
    with pytest.raises(ProfileError, match=r"'cost_bits' has shape \(13, 5\)"):
        SensitivityProfile.load(_edit(p, tmp_path, lambda d: d["cost_bits"].pop()))
    with pytest.raises(ProfileError, match="scheme 'w9' is invalid"):
        SensitivityProfile.load(_edit(p, tmp_path, lambda d: d["schemes"].__setitem__(0, "w9")))
    with pytest.raises(ProfileError, match=r"field 'proxy\[0\]\[0\]': Input should be a valid number"):
        SensitivityProfile.load(_edit(p, tmp_path, lambda d: d["proxy"][0].__setitem__(0, "x")))
    bad = tmp_path / "corrupt.json"
    bad.write_text('{"schema_version": "bitalloc.profile/1", "layers": [')
    with pytest.raises(ProfileError, match="is not valid JSON"):
        SensitivityProfile.load(bad)
    with pytest.raises(ProfileError, match="does not exist"):
        SensitivityProfile.load(tmp_path / "nope.json")
    with pytest.raises(ProfileError, match="must be a JSON object"):
        SensitivityProfile.from_dict([1, 2])


def test_build_profile_argument_errors():
    with pytest.raises(ProfileError, match="ref scheme 'w2g64z' is not one of the schemes"):
        build_profile("random:llama-tiny", ["w4g32", "fp16"], CAL, progress=False)
    with pytest.raises(ProfileError, match="duplicates"):
        build_profile("random:llama-tiny", ["w4g32", "w4g32"], CAL, ref_schemes=["w4g32"], progress=False)


def test_file_calibration_gpt2_and_provided_tensor(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("The cat sat on the mat. " * 40)
    cal = CalibrationSpec(source="file", path=str(text), n_samples=3, seq_len=32)
    p = build_profile("random:gpt2-tiny", ["w3g64z", "w8"], cal, ref_schemes=["w3g64z"], progress=False, include=["*.mlp.*"])
    assert p.n_layers == 4 and p.calibration["file_bytes"] == text.stat().st_size
    assert all(layer.module_type == "Conv1D" for layer in p.layers)
    loaded = load_model("random:gpt2-tiny")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    q = build_profile(loaded, ["w3g64z"], ids, ref_schemes=["w3g64z"], progress=False, kl_samples=1)
    assert q.calibration["source"] == "provided" and q.calibration["shape"] == [2, 16]


def test_encoder_profile_uses_cosine():
    p = build_profile(
        "random:bert-tiny", ["w2g32z", "w4g32"], CalibrationSpec(n_samples=4, seq_len=16), ref_schemes=["w2g32z"], progress=False
    )
    assert p.model["kind"] == "encoder" and p.metadata["metric"] == "cosine" and p.n_layers == 12
    assert p.calibration["shape"][0] == 4


def test_costs_count_a_shared_weight_once_and_other_bits():
    m = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8, bias=False))
    m[2].weight = m[1].weight
    layers, _ = find_layers(m)
    assert [x.tie_group for x in layers] == ["1.weight", "1.weight"]
    c = cost_table(layers, ["w4g32", "fp16"])
    assert c[0, 1] == 64 * 16 and (c[1] == 0).all()
    bits, count = other_parameter_bits(m, layers)
    assert (bits, count) == ((80 + 8) * 32, 88)  # embedding + the one bias


def test_profile_validation():
    layer = LayerInfo("a", "Linear", 2, 32, 64)
    kw = dict(
        model={}, calibration={}, layers=[layer], skipped=[], schemes=["w4g32"], cost_bits=[[10]],
        tables={"all": [[0.5]]}, proxy=[[1.0]], ref_values=[[0.5]], ref_schemes=["w4g32"], scales=[0.5],
        other_bits=0, other_params=0,
    )  # fmt: skip
    SensitivityProfile(**kw)
    with pytest.raises(ProfileError, match="not one of its schemes"):
        SensitivityProfile(**{**kw, "ref_schemes": ["w8"], "ref_values": [[0.1]]})
    with pytest.raises(ProfileError, match="non-negative"):
        SensitivityProfile(**{**kw, "cost_bits": [[-1]]})
    with pytest.raises(ProfileError, match="no loss tables"):
        SensitivityProfile(**{**kw, "tables": {}})
    nan = SensitivityProfile(**{**kw, "ref_values": [[float("nan")]]})
    assert nan.to_dict()["ref_values"] == [[None]]
    assert np.isnan(SensitivityProfile.from_dict(nan.to_dict()).ref_values[0, 0])


def _tiny(**over):
    layer = LayerInfo("a", "Linear", 2, 32, 64)
    kw = dict(
        model={}, calibration={}, layers=[layer], skipped=[], schemes=["w4g32", "w8"], cost_bits=[[10, 20]],
        tables={"all": [[0.5, 0.1]]}, proxy=[[1.0, 0.2]], ref_values=[[0.5]], ref_schemes=["w4g32"], scales=[0.5],
        other_bits=0, other_params=0,
    )  # fmt: skip
    return SensitivityProfile(**{k: v for k, v in {**kw, **over}.items() if v is not None})  # None: left out


def test_kl_ref_is_a_read_only_alias_of_ref_values():
    p = _tiny()
    assert p.kl_ref is p.ref_values and p.kl_ref.shape == (1, 1) and p.kl_ref[0, 0] == 0.5
    with pytest.raises(AttributeError):
        p.kl_ref = np.zeros((1, 1))
    old = _tiny(ref_values=None, kl_ref=[[0.25]])  # the constructor still takes the old keyword
    assert old.ref_values.dtype == np.float64 and old.ref_values[0, 0] == 0.25 and old.kl_ref[0, 0] == 0.25
    with pytest.raises(TypeError, match="both 'ref_values' and its old name 'kl_ref'"):
        _tiny(kl_ref=[[0.25]])
    d = p.to_dict()
    assert "ref_values" in d and "kl_ref" not in d


def _file(tmp_path, d, name="p.json"):
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return path


def test_v2_and_v1_files_with_kl_ref_load_and_resave_as_v3(tmp_path):
    p = _tiny(ref_values=[[0.125]])
    v2 = {**{k: v for k, v in p.to_dict().items() if k != "ref_values"}, "schema": "bitalloc.profile/2",
          "kl_ref": [[0.125]]}
    q = SensitivityProfile.load(_file(tmp_path, v2, "v2.json"))
    assert q.schema_version == PROFILE_SCHEMA and q.ref_values.tolist() == [[0.125]] and q.to_dict() == p.to_dict()
    new = json.loads(q.save(tmp_path / "v3.json").read_text())
    assert new["schema"] == PROFILE_SCHEMA and new["ref_values"] == [[0.125]] and "kl_ref" not in new
    assert SensitivityProfile.load(tmp_path / "v3.json").ref_values.tolist() == [[0.125]]
    v1 = {**{k: v for k, v in v2.items() if k != "schema"}, "schema_version": "bitalloc.profile/1"}
    assert SensitivityProfile.load(_file(tmp_path, v1, "v1.json")).ref_values.tolist() == [[0.125]]
    # errors in an old file's field name the field the file has
    with pytest.raises(ProfileError, match=r"field 'kl_ref\[0\]\[0\]': Input should be a valid number"):
        SensitivityProfile.load(_file(tmp_path, {**v2, "kl_ref": [["x"]]}))
    with pytest.raises(ProfileError, match=r"missing field\(s\): kl_ref$"):
        SensitivityProfile.load(_file(tmp_path, {k: v for k, v in v2.items() if k != "kl_ref"}))
    # the new name is not part of the old versions
    for old in (v2, v1):
        bad = {**{k: v for k, v in old.items() if k != "kl_ref"}, "ref_values": [[0.125]]}
        with pytest.raises(ProfileError, match="field 'ref_values' is not in a 'bitalloc.profile/[12]' profile") as e:
            SensitivityProfile.load(_file(tmp_path, bad))
        assert "\n" not in str(e.value)


def test_v3_file_with_the_old_key_loads_and_both_keys_are_refused(tmp_path):
    p = _tiny(ref_values=[[0.375]])
    d = p.to_dict()
    early = {**{k: v for k, v in d.items() if k != "ref_values"}, "kl_ref": [[0.375]]}  # /3 before the rename
    q = SensitivityProfile.load(_file(tmp_path, early))
    assert q.ref_values.tolist() == [[0.375]] and q.to_dict() == d
    assert SensitivityProfile.from_dict(early).ref_values.tolist() == [[0.375]]
    for both in ({**d, "kl_ref": [[0.375]]}, {**d, "kl_ref": [[0.5]]}):
        with pytest.raises(ProfileError, match="field 'kl_ref' is the old name of field 'ref_values'.*not both") as e:
            SensitivityProfile.load(_file(tmp_path, both))
        assert "\n" not in str(e.value) and str(tmp_path / "p.json") in str(e.value)
        with pytest.raises(ProfileError, match="not both"):
            SensitivityProfile.from_dict(both)
    with pytest.raises(ProfileError, match=r"missing field\(s\): ref_values$"):
        SensitivityProfile.load(_file(tmp_path, {k: v for k, v in d.items() if k != "ref_values"}))
    with pytest.raises(ProfileError, match=r"field 'ref_values\[0\]\[0\]': Input should be a valid number"):
        SensitivityProfile.load(_file(tmp_path, {**d, "ref_values": [["x"]]}))
