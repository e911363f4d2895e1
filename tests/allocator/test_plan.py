import json

import pytest

from bitalloc.allocator.plan import PLAN_SCHEMA, LayerPlan, Plan, PlanError
from bitalloc.kernels.formats import parse_scheme


def _plan(**kw):
    layers = {
        "a.q": LayerPlan("a.q", "w4g128z", (8, 256), parse_scheme("w4g128z").storage_bits(8, 256), {"all": 0.1}),
        "a.k": LayerPlan("a.k", "w2g64z", (8, 256), parse_scheme("w2g64z").storage_bits(8, 256), {"all": 0.3}),
    }
    return Plan(model={"spec": "x", "fingerprint": {"sha256": "ab" * 32}}, layers=layers, **kw)


def test_roundtrip(tmp_path):
    p = _plan(rules=(("b.*", "w8"),), default="w4g128")
    path = p.save(tmp_path / "plan.json")
    q = Plan.load(path)
    assert q.layers == p.layers and q.rules == p.rules and q.default == p.default
    assert json.loads(path.read_text())["schema"] == PLAN_SCHEMA


def test_lookup_order():
    p = _plan(rules=(("a.*", "w8"), ("re:b\\..*", "w3g64z")), default="fp16")
    assert p.scheme_for("a.q").name == "w4g128z"  # exact name first
    assert p.scheme_for("a.v").name == "w8"  # then the first matching pattern
    assert p.scheme_for("b.x").name == "w3g64z"
    assert p.scheme_for("c").name == "fp16"  # then the default
    assert _plan().scheme_for("zzz") is None


def test_bits_and_bpw():
    p = _plan()
    assert p.quantized_bits == sum(lp.bits for lp in p.layers.values())
    assert p.bpw == pytest.approx(p.quantized_bits / (2 * 8 * 256))


def test_wrong_bits_rejected():
    with pytest.raises(PlanError, match="takes"):
        LayerPlan("x", "w4g128", (8, 256), 123)


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        ('{"layers": {}}', "no 'schema'"),
        ('{"schema": "bitalloc.plan/99", "layers": {}}', "unsupported schema 'bitalloc.plan/99'"),
        ('{"schema": "bitalloc.plan/1", "model": {}}', "field 'layers': Field required"),
        ('{"schema": "bitalloc.plan/1", "model": {}, "layers": {"x": {"scheme": "w7q", "shape": [1, 1], "bits": 1}}}',
         "unknown"),
    ],
)
def test_bad_files(tmp_path, content, match):
    f = tmp_path / "p.json"
    f.write_text(content)
    with pytest.raises(PlanError, match=match):
        Plan.load(f)


def test_missing_file(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "none.json")


def test_other_model_rejected():
    with pytest.raises(PlanError, match="different model"):
        _plan().check_model({"sha256": "cd" * 32})
    _plan().check_model({"sha256": "ab" * 32})
