"""Solver use of metric groups on small synthetic two-group profiles (no model)."""

from __future__ import annotations

import numpy as np
import pytest

import importlib

S = importlib.import_module("bitalloc.allocator.solve")  # the module (allocator.solve is the API function)
from bitalloc.allocator.policy import GroupPolicy, group_scales
from bitalloc.sensitivity.layers import LayerInfo
from bitalloc.sensitivity.profile import SensitivityProfile

SCHEMES = ["w2g64z", "w3g128z", "w4g128z", "w8", "fp16"]


def _profile(scale_b: float = 1.0, n_a: int = 4, n_b: int = 4, tables=None) -> SensitivityProfile:
    """Group "a" (KL-like units) and group "b" (another metric, ``scale_b`` times the units)."""
    rng = np.random.default_rng(0)
    layers = [LayerInfo(f"a.{i}", "Linear", 64, 64, 64 * 64, f"a.{i}", i) for i in range(n_a)]
    layers += [LayerInfo(f"b.{i}", "Linear", 64, 64, 64 * 64, f"b.{i}", i) for i in range(n_b)]
    L = len(layers)
    from bitalloc.sensitivity.build import cost_table

    cost = cost_table(layers, SCHEMES)
    base = np.array([1.0, 0.25, 0.06, 0.001, 0.0])
    sens = rng.uniform(0.5, 2.0, L)
    t = sens[:, None] * base[None, :]
    a_rows = np.arange(L) < n_a
    ta = np.where(a_rows[:, None], t, 0.0)
    tb = np.where(~a_rows[:, None], t * scale_b, 0.0)
    tables = tables or {"a": ta, "b": tb}
    meta = {"groups": {"a": {"metric": "kl", "layers": [l.fqn for l in layers[:n_a]]},
                       "b": {"metric": "sqnr", "layers": [l.fqn for l in layers[n_a:]]}}}
    return SensitivityProfile(
        model={"spec": "synthetic"}, calibration={}, layers=layers, skipped=[], schemes=SCHEMES, cost_bits=cost,
        tables=tables, proxy=np.ones((L, len(SCHEMES))), ref_values=np.ones((L, 1)), ref_schemes=["w3g128z"],
        scales=np.ones(L), other_bits=0, other_params=0, metadata=meta)


def _bits(plan, prefix):
    return sum(lp.bits for f, lp in plan.layers.items() if f.startswith(prefix))


def test_normalisation_makes_units_irrelevant():
    """Group b's table in 1000x larger units: raw sums favour b, 'ref' normalisation does not care."""
    p1, p1000 = _profile(1.0), _profile(1000.0)
    q1 = S.solve(p1, "3.5bpw", method="dp")
    q1000 = S.solve(p1000, "3.5bpw", method="dp")  # auto -> "ref" with two groups
    assert {k: v.scheme for k, v in q1.layers.items()} == {k: v.scheme for k, v in q1000.layers.items()}
    raw = S.solve(p1000, "3.5bpw", method="dp", group_norm="none")
    assert _bits(raw, "b.") > _bits(q1000, "b.")  # raw units: group b hogs the bits
    sc = group_scales(p1000, "ref")
    k = SCHEMES.index("w3g128z")
    assert sc["b"] == pytest.approx(p1000.tables["b"][:, k].sum())
    assert q1000.solver["groups"]["normalize"] == "ref"


def test_weights_change_the_allocation():
    p = _profile()
    even = S.solve(p, "3.5bpw", method="dp")
    heavy_a = S.solve(p, "3.5bpw", method="dp", group_weights={"a": 20.0})
    assert _bits(heavy_a, "a.") > _bits(even, "a.")
    assert heavy_a.predicted["loss"]["a"] < even.predicted["loss"]["a"]


def test_group_limit_is_respected():
    p = _profile()
    free = S.solve(p, "3.5bpw")
    eps = free.predicted["loss"]["a"] * 0.7
    capped = S.solve(p, "3.5bpw", group_limits={"a": eps})
    assert capped.predicted["loss"]["a"] <= eps * (1 + 1e-9)
    assert capped.predicted["loss"]["b"] >= free.predicted["loss"]["b"]
    assert capped.predicted["quantized_bits"] <= capped.predicted["capacity_bits"]
    with pytest.raises(S.AllocationError, match="cannot be met"):
        S.solve(p, "3bpw", group_limits={"a": 1e-6})


def test_group_shares_are_respected():
    p = _profile()
    plan = S.solve(p, "4bpw", group_shares={"a": 0.6, "b": 0.4})
    cap = plan.predicted["capacity_bits"]
    assert _bits(plan, "a.") <= int(0.6 * cap) and _bits(plan, "b.") <= int(0.4 * cap)
    assert _bits(plan, "a.") > _bits(plan, "b.")
    rep = plan.solver["groups"]["shares"]
    assert rep["a"]["used_bits"] == _bits(plan, "a.") and rep["a"]["capacity_bits"] == int(0.6 * cap)
    with pytest.raises(S.AllocationError, match="below its smallest achievable"):
        S.solve(p, "4bpw", group_shares={"a": 0.95, "b": 0.05})


@pytest.mark.parametrize("kw, msg", [
    ({"group_weights": {"x": 1.0}}, "unknown metric group"),
    ({"group_shares": {"a": 1.0}}, "every group a share"),
    ({"group_shares": {"a": 0.7, "b": 0.7}}, "sum to at most 1"),
    ({"group_shares": {"a": 0.5, "b": 0.5}, "group_weights": {"a": 2.0}}, "no effect"),
    ({"group_norm": "max"}, "group_norm"),
    ({"group_limits": {"a": float("nan")}}, "finite"),
])
def test_policy_errors(kw, msg):
    with pytest.raises(S.AllocationError, match=msg):
        S.solve(_profile(), "3.5bpw", **kw)


def test_single_group_profile_unchanged():
    """An ungrouped profile ('all') is solved on raw units, as before (no normalisation)."""
    p = _profile()
    one = SensitivityProfile.from_dict({**p.to_dict(), "tables": {"all": p.tables["a"] + p.tables["b"]}, "metadata": {}})
    assert GroupPolicy().mode(one) == "none"
    plan = S.solve(one, "3.5bpw")
    assert "groups" not in plan.solver
    assert S.loss_table(one).tolist() == one.tables["all"].tolist()


def test_cli_and_config_group_policies(tmp_path, capsys):
    from bitalloc.allocator.cli import main
    from bitalloc.allocator.config import ConfigError, RunConfig

    path = _profile().save(tmp_path / "p.json")
    assert main(["--quiet", "solve", str(path), "--budget", "4bpw", "--group-share", "a=0.6", "--group-share", "b=0.4",
                 "--out", str(tmp_path / "plan.json")]) == 0
    assert main(["--quiet", "solve", str(path), "--budget", "3.5bpw", "--group-limit", "a=1e-9",
                 "--out", str(tmp_path / "plan2.json")]) == 2
    assert "cannot be met" in capsys.readouterr().err
    assert main(["--quiet", "sweep", str(path), "--budgets", "3bpw,4bpw", "--group-weight", "a=3", "--group-norm", "range",
                 "--out-dir", str(tmp_path / "plans")]) == 0
    assert main(["--quiet", "solve", str(path), "--budget", "4bpw", "--group-weight", "a"]) == 2
    assert "GROUP=NUMBER" in capsys.readouterr().err
    cfg = RunConfig.from_dict({"profile": {"groups": [{"name": "attn", "match": ["*.self_attn.*"], "metric": "kl",
                                                       "exclude_positions": [0]},
                                                      {"name": "mlp", "match": ["*.mlp.*"], "metric": "sqnr"}]},
                               "solve": {"group_weights": {"attn": 2.0}, "group_norm": "range"}})
    assert cfg.group_policy().weights == {"attn": 2.0} and cfg.to_dict()["profile"]["groups"][0]["name"] == "attn"
    with pytest.raises(ConfigError, match="unknown metric 'klx'"):
        RunConfig.from_dict({"profile": {"groups": [{"name": "a", "match": ["*"], "metric": "klx"}]}})
    with pytest.raises(ConfigError, match=r"\[solve\] group_shares sum"):
        RunConfig.from_dict({"solve": {"group_shares": {"a": 0.8, "b": 0.8}}})
