"""bitalloc.allocator.solve with method qp / qp-relax / separable, split channels in the plan, GPTQ plans (issue 5)."""

import pytest
import torch

from bitalloc.allocator.executor import ExecutorError, apply
from bitalloc.allocator.plan import Plan
from bitalloc.allocator.solve import AllocationError, InfeasibleBudget, solve
from bitalloc.sensitivity.calibration import CalibrationSpec
from bitalloc.sensitivity.build import build_profile

CAL = CalibrationSpec(n_samples=2, seq_len=16)
ONE_BLOCK = ["re:layers\\.0\\.(self_attn\\.(q|o)_proj|mlp\\.down_proj)"]
SCHEMES = ["w2g32z", "w2g32z+h3r0.1", "w3g32z", "w4g32"]


@pytest.fixture(scope="module")
def prof():
    return build_profile("random:llama-tiny", schemes=SCHEMES, ref_schemes=["w2g32z"], calibration=CAL,
                         include=ONE_BLOCK, progress=False, measured=True, pairs="reduced", pair_ref="w2g32z")


@pytest.mark.parametrize("method", ["qp", "qp-relax", "separable", "ilp"])
def test_qp_methods(prof, method):
    plan = solve(prof, "3.2bpw", method=method, time_limit_s=30)
    assert plan.predicted["bpw"] <= 3.2
    s = plan.solver
    assert s["method"] == method and s["solve_time_s"] >= 0
    if method != "ilp":
        assert "interaction" in s and s["pairs"]["model"] == "reduced"
        assert s["objective"] == pytest.approx(s["diagonal"] + s["interaction"])
    if method == "qp":
        assert s["status"] == "optimal" and s["gap"] <= 1e-6
    assert Plan.from_dict(plan.to_dict()).quantization["saliency"] == "hessian"


def test_qp_not_worse_than_separable(prof):
    q = solve(prof, "3.0bpw", method="qp")
    sep = solve(prof, "3.0bpw", method="separable")
    assert q.solver["objective"] <= sep.solver["objective"] + 1e-12


def test_split_plan_records_profile_channels(prof):
    from bitalloc.sensitivity.saliency import select_split_channels

    plan = solve(prof, "5bpw", method="qp", pins={"re:.*": "w2g32z+h3r0.1"})
    for fqn, lp in plan.layers.items():
        layer = prof.layers[prof.layer_index(fqn)]
        want = select_split_channels(prof.saliency[fqn], lp.scheme, layer.in_features).tolist()
        assert list(lp.high_idx) == want


def test_qp_errors(prof):
    with pytest.raises(InfeasibleBudget):
        solve(prof, "1.0bpw", method="qp")
    import dataclasses

    noprs = dataclasses.replace(prof, pairs=None)
    with pytest.raises(AllocationError, match="pair terms"):
        solve(noprs, "3bpw", method="qp")
    with pytest.raises(AllocationError, match="method"):
        solve(prof, "3bpw", method="magic")


def test_gptq_plan_needs_hessians(tmp_path):
    from bitalloc.sensitivity.hessian import collect_input_statistics
    from bitalloc.sensitivity.hessian_store import load_hessians, save_hessians
    from bitalloc.sensitivity.layers import find_layers
    from bitalloc.sensitivity.models import load_model, round_to_16bit

    p = build_profile("random:llama-tiny", schemes=["w2g32z", "w2g32z+h3r0.1", "w4g32"], ref_schemes=["w2g32z"],
                      calibration=CAL, include=ONE_BLOCK, progress=False, quantizer="gptq", saliency="obq")
    plan = solve(p, "5bpw", pins={"re:q_proj": "w2g32z+h3r0.1"})
    assert plan.quantizer == "gptq"
    lm = load_model("random:llama-tiny")
    round_to_16bit(lm.model)
    with pytest.raises(ExecutorError, match="gptq"):
        apply(lm.model, plan)
    layers, _ = find_layers(lm.model, ONE_BLOCK)
    ids = torch.randint(0, 100, (2, 16))
    stats = collect_input_statistics(lm.model, layers, ids, False)
    rec = save_hessians(tmp_path / "h.safetensors", stats)
    H = load_hessians(rec["path"], sha256=rec["sha256"])
    q = apply(lm.model, plan, hessians=rec["path"])
    r = apply(lm.model, dataclasses_replace_quant(plan, "rtn"))
    fqn = next(f for f, lp in plan.layers.items() if "+h" in lp.scheme)
    gq, rq = q.get_submodule(fqn), r.get_submodule(fqn)
    assert torch.equal(gq.high_idx.long(), torch.tensor(plan.layers[fqn].high_idx))
    w = lm.model.get_submodule(fqn).weight.detach().float()
    Ht = H[fqn]
    err = lambda m: float((((m.dequantized_weight() - w) @ Ht) * (m.dequantized_weight() - w)).sum())
    assert err(gq) <= err(rq) * 1.05  # GPTQ's output error is no worse than RTN's on its own Hessian
    (tmp_path / "h.safetensors").write_bytes(b"corrupt")
    with pytest.raises(ExecutorError):
        apply(lm.model, plan, hessians=str(tmp_path / "h.safetensors"))


def dataclasses_replace_quant(plan, quantizer):
    import dataclasses

    return dataclasses.replace(plan, quantization={**plan.quantization, "quantizer": quantizer})


def test_gptq_profile_saves_hessians_and_plan_finds_them(tmp_path):
    from bitalloc.sensitivity.models import load_model, round_to_16bit

    p = build_profile("random:llama-tiny", schemes=["w2g32z", "w4g32"], ref_schemes=["w2g32z"], calibration=CAL,
                      include=ONE_BLOCK, progress=False, quantizer="gptq", hessians_out=tmp_path / "p.hessians.safetensors")
    rec = p.metadata["hessians"]
    assert rec["layers"] == 3 and len(rec["sha256"]) == 64
    plan = solve(p, "3.0bpw")
    assert plan.quantization["hessians"]["sha256"] == rec["sha256"]
    lm = load_model("random:llama-tiny")
    round_to_16bit(lm.model)
    apply(lm.model, plan)  # found at the recorded path, checksum verified
    (tmp_path / "p.hessians.safetensors").unlink()
    with pytest.raises(ExecutorError, match="hessians="):
        apply(lm.model, plan)


def test_cli_solve_method_qp(prof, tmp_path, capsys):
    from bitalloc.allocator.cli import main

    path = prof.save(tmp_path / "p.json")
    out = tmp_path / "plan.json"
    assert main(["solve", str(path), "--budget", "3.2bpw", "--method", "qp", "--time-limit", "20",
                 "--out", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.solver["method"] == "qp" and plan.solver["status"] == "optimal"


def test_recorded_hessians_are_found_beside_a_moved_profile(tmp_path):
    """``recorded_hessians``: the recorded path, then the same file name beside the profile;
    the recorded sha256 still checked; one line naming where it looked when neither exists."""
    import shutil

    from bitalloc.sensitivity.hessian_store import HessianStoreError, recorded_hessians, save_hessians

    H = {"a": torch.eye(3), "b": 2 * torch.eye(3)}
    rec = save_hessians(tmp_path / "run" / "profile.hessians.safetensors", H, tokens_sha256="t0")
    assert torch.equal(recorded_hessians(rec, tokens_sha256="t0")["b"], H["b"])
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "run"), moved)
    got = recorded_hessians(rec, beside=moved / "profile.json")
    assert set(got) == {"a", "b"} and torch.equal(got["a"], H["a"])
    with pytest.raises(HessianStoreError, match="other calibration tokens"):
        recorded_hessians(rec, beside=moved / "profile.json", tokens_sha256="t1")
    (moved / "profile.hessians.safetensors").write_bytes(b"replaced")
    with pytest.raises(HessianStoreError, match="sha256"):
        recorded_hessians(rec, beside=moved / "profile.json")
    with pytest.raises(HessianStoreError, match=r"missing \(looked for .*run.*, .*elsewhere"):
        recorded_hessians(rec, beside=tmp_path / "elsewhere" / "profile.json")
    with pytest.raises(HessianStoreError, match="no Hessian file is recorded"):
        recorded_hessians(None)
