"""`bitalloc export`: compressed-tensors checkpoints that transformers / compressed-tensors load to
bitalloc's exact weights, torchao FqnToConfig, vLLM ties and kernel rules, and bad input."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

import bitalloc
from bitalloc.allocator.cli import main
from bitalloc.allocator.export import PLAN_COPY, REPORT_NAME, ExportError, export
from bitalloc.allocator.export_ct import pack_dense, unpack_dense
from bitalloc.allocator.plan import LayerPlan, Plan
from bitalloc.kernels.formats import parse_scheme
from bitalloc.sensitivity.models import fingerprint

SPEC = "random:llama-tiny"
SYM = ["w2g32", "w3g64", "w4g128", "w8", "w4", "w4g32", "w3"]  # g128 on 64 inputs: regrouped (exact)
ASYM = ["w4g32z", "w3g64z", "w2g32z", "w8z", "w4z", "w5g32z", "w6g64z"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/allocator/conftest.py


@pytest.fixture(scope="module")
def loaded():
    return bitalloc.load(SPEC, log=None)


def _linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def make_plan(loaded, schemes, spec: str = SPEC) -> Plan:
    """A plan cycling through ``schemes`` over the model's linear layers (lm_head stays tied and unplanned)."""
    m = loaded.model
    layers = {}
    for i, n in enumerate(_linears(m)):
        s = schemes[i % len(schemes)] if isinstance(schemes, list) else schemes(n)
        shape = tuple(m.get_submodule(n).weight.shape)
        layers[n] = LayerPlan(n, s, shape, parse_scheme(s).storage_bits(*shape))
    return Plan(model={"spec": spec, "fingerprint": fingerprint(m)}, layers=layers, label="test")


def _ids(n: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, 260, (n, t), generator=torch.Generator().manual_seed(7))


def _st(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------------------------------
# the bitstream layout, against compressed-tensors' own functions


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(3, 37), (5, 64), (1, 1)])
def test_pack_dense_is_compressed_tensors_layout(bits, shape):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits * 100 + shape[1])
    v = torch.randint(0, 2**bits, shape, generator=g)
    signed = (v - 2 ** (bits - 1)).to(torch.int8)
    ours = pack_dense(v, bits)
    assert ours.dtype == torch.int32 and ours.shape == (shape[0], -(-shape[1] * bits // 32))
    assert torch.equal(ours, pack_to_int32(signed, bits))
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape)), signed)
    assert torch.equal(unpack_dense(ours, bits, shape[1]), v)
    # along the output dimension (zero-points)
    assert torch.equal(pack_dense(v.t(), bits).t(), pack_to_int32(signed, bits, packed_dim=0))


# ---------------------------------------------------------------------------------------
# compressed-tensors


@pytest.fixture(scope="module")
def sym_export(loaded, tmp_path_factory):
    plan = make_plan(loaded, SYM)
    out = tmp_path_factory.mktemp("ct") / "sym"
    env = export(plan, "compressed-tensors", out, log=None)
    return plan, out, env


def test_symmetric_mixed_checkpoint_loads_in_transformers_with_bitalloc_logits(loaded, sym_export):
    from transformers import AutoModelForCausalLM

    plan, out, env = sym_export
    qmodel = bitalloc.apply(loaded, plan)
    ids = _ids()
    with torch.no_grad():
        ref = qmodel(input_ids=ids).logits
        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        got = hf(input_ids=ids).logits
        for fqn in plan.layers:  # the very weights bitalloc dequantizes
            assert torch.equal(hf.get_submodule(fqn).weight, qmodel.get_submodule(fqn).dequantized_weight()), fqn
        assert torch.equal(got, ref)
        hf16 = AutoModelForCausalLM.from_pretrained(str(out))  # config dtype: float16
        assert next(hf16.parameters()).dtype == torch.float16
        got16 = hf16(input_ids=ids).logits.float()
    assert (got16 - ref).abs().max() <= 1e-2 * ref.abs().max()  # fp16 compute rounding only


def test_config_groups_ignore_and_files(loaded, sym_export):
    plan, out, env = sym_export
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and cfg["dtype"] == "float16"
    groups = qc["config_groups"].values()
    assert len(qc["config_groups"]) == len(SYM)  # one per distinct scheme
    targets = [t for g in groups for t in g["targets"]]
    assert sorted(targets) == sorted(plan.layers)  # exact names, each once
    assert qc["ignore"] == ["lm_head"]
    by_layer = {t: g["weights"] for g in groups for t in g["targets"]}
    q0 = by_layer["model.layers.0.self_attn.q_proj"]
    assert q0 == {"num_bits": 2, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False}
    assert by_layer["model.layers.0.self_attn.o_proj"]["strategy"] == "channel"  # w8
    assert Plan.load(out / PLAN_COPY).to_dict()["layers"] == plan.to_dict()["layers"]
    rep = json.loads((out / REPORT_NAME).read_text())
    assert rep["schema"] == "bitalloc.export/1" and rep["target"] == "compressed-tensors"
    st = _st(out)
    assert st["model.layers.0.self_attn.q_proj.weight_packed"].shape == (64, 64 * 2 // 32)
    assert st["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float16
    assert st["model.layers.0.self_attn.q_proj.weight_shape"].tolist() == [64, 64]


def test_report_bytes_beside_the_plan(sym_export):
    plan, out, env = sym_export
    b = env["report"]["bytes"]
    ct, ba = b["parts"]["ct"], b["parts"]["bitalloc"]
    assert b["exported_quantized"] == sum(ct.values())
    assert b["plan_predicted_quantized"] == plan.quantized_bits / 8 == sum(ba.values())
    assert ct["weight_shape"] == 16 * len(plan.layers)
    assert ct["weight_packed"] == ba["codes"]  # inputs are multiples of 32: no padding difference
    assert ct["weight_scale"] == ba["scales"]  # w4g128 on 64 inputs is one group either way (SmolLM2 test: repeats)
    assert (out / "model.safetensors").stat().st_size == env["report"]["weights_file"]["bytes"]
    row = next(r for r in env["report"]["layers"] if r["scheme"] == "w4g128")
    assert row["regrouped"].startswith("g128 -> g64")


def test_asymmetric_checkpoint_decompresses_bit_exact_through_compressed_tensors(loaded, tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    plan = make_plan(loaded, ASYM)
    out = tmp_path / "asym"
    env = export(plan, "compressed-tensors", out, model=loaded, log=None)  # an already loaded model
    assert env["options"]["model"] == SPEC
    qmodel = bitalloc.apply(loaded, plan)
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    st = _st(out)
    seen = 0
    for scheme in qc.config_groups.values():
        assert scheme.weights.symmetric is False
        for fqn in scheme.targets:
            sd = {k.rsplit(".", 1)[1]: v for k, v in st.items() if k.rsplit(".", 1)[0] == fqn}
            assert sd["weight_zero_point"].dtype == torch.int32
            ref = qmodel.get_submodule(fqn).dequantized_weight()  # float32, exact
            w16 = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]  # in the stored fp16 scale dtype
            assert torch.equal(w16, ref.to(torch.float16)), fqn
            sd["weight_scale"] = sd["weight_scale"].float()
            w32 = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
            assert torch.equal(w32, ref), fqn
            seen += 1
    assert seen == len(plan.layers)


def test_inexpressible_schemes_error_or_fall_back(loaded, tmp_path):
    for bad in ("fp4g32", "w3g64z+h4r0.05", "fp8g128", "w8a8"):
        plan = make_plan(loaded, ["w4g32", bad])
        with pytest.raises(ExportError, match=rf"layer model\.layers\.0\.self_attn\.k_proj: scheme {bad.replace('+', '[+]')} cannot"):
            export(plan, "compressed-tensors", tmp_path / "x", log=None)
        assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    plan = make_plan(loaded, ["w4g32", "fp4g32", "w8a8"])
    env = export(plan, "compressed-tensors", tmp_path / "fb", fallback=["fp16,weight-only"], log=None)
    qc = json.loads((tmp_path / "fb" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.self_attn.k_proj" in qc["ignore"]  # fp4g32 kept 16-bit
    assert any("model.layers.0.self_attn.v_proj" in g["targets"] and g["weights"]["strategy"] == "channel"
               for g in qc["config_groups"].values())  # w8a8 -> its weights, w8
    st = _st(tmp_path / "fb")
    assert st["model.layers.0.self_attn.k_proj.weight"].dtype == torch.float16
    assert env["report"]["bytes"]["fp16_layers_exported"] > 0


def test_plan_for_another_model_is_refused(loaded, tmp_path):
    plan = make_plan(loaded, ["w4g32"])
    other = Plan(model={"spec": SPEC, "fingerprint": {"sha256": "0" * 64}}, layers=plan.layers)
    with pytest.raises(ExportError, match="different model"):
        export(other, "compressed-tensors", tmp_path / "o", log=None)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------
# CLI and the output directory


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main(["--quiet", *argv])
    cap = capsys.readouterr()
    return rc, cap.err.strip()


def test_cli_bad_input_one_line_exit_2(loaded, tmp_path, capsys):
    plan_p = make_plan(loaded, ["w4g32"]).save(tmp_path / "plan.json")
    out = tmp_path / "out"
    rc, err = _cli(capsys, "export", str(plan_p), "--to", "onnx", "--out", str(out))
    assert rc == 2 and err.startswith("bitalloc: error: unknown export target 'onnx'") and "\n" not in err
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _cli(capsys, "export", str(plan_p), "--to", "compressed-tensors", "--out", str(out))
    assert rc == 2 and "not empty" in err and "--overwrite" in err and "\n" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = _cli(capsys, "export", str(plan_p), "--to", "compressed-tensors", "--out", str(blocker / "sub"))
    assert rc == 2 and err.startswith("bitalloc: error: cannot write") and "\n" not in err
    rc, err = _cli(capsys, "export", str(plan_p), "--to", "compressed-tensors", "--out", str(out), "--fallback", "bogus")
    assert rc == 2 and "--fallback 'bogus'" in err
    rc, err = _cli(capsys, "export", str(plan_p), "--to", "compressed-tensors", "--out", str(out), "--overwrite")
    assert rc == 0 and (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out", "plan.json"]  # no partial directories


def test_failure_while_writing_leaves_nothing(loaded, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    with pytest.raises(ExportError, match="cannot write the export to .*: No space left on device"):
        export(make_plan(loaded, ["w4g32"]), "compressed-tensors", out, overwrite=True, log=None)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "previous export"


def test_no_permission_is_one_line(loaded, tmp_path, monkeypatch, capsys):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    plan_p = make_plan(loaded, ["w4g32"]).save(tmp_path / "plan.json")
    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    rc, err = _cli(capsys, "export", str(plan_p), "--to", "compressed-tensors", "--out", str(tmp_path / "o"))
    assert rc == 2 and err == f"bitalloc: error: cannot write to {str(tmp_path)!r}: Permission denied"


# ---------------------------------------------------------------------------------------
# torchao


def test_torchao_config_applies_on_cpu(loaded, tmp_path):
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    from bitalloc.allocator.export_torchao import load_config

    plan = make_plan(loaded, ["w4g32", "w3g64z", "w8", "fp16", "w2g32z", "w6g64"])
    env = export(plan, "torchao", tmp_path / "ao", log=None)
    cfg = load_config(tmp_path / "ao" / "torchao_config.json")
    snippet = runpy.run_path(str(tmp_path / "ao" / "torchao_config.py"))  # the file bitalloc just wrote
    assert snippet["config"] == cfg
    fresh = bitalloc.load(SPEC, log=None).model
    ids = _ids()
    with torch.no_grad():
        ref = fresh(input_ids=ids).logits
    quantize_(fresh, cfg, filter_fn=None)
    for fqn, lp in plan.layers.items():
        w = fresh.get_submodule(fqn).weight
        s = parse_scheme(lp.scheme)
        if not s.is_quantized:
            assert type(w) is torch.nn.Parameter and w.dtype == torch.float32, fqn
            continue
        assert type(w).__name__ == "IntxUnpackedToInt8Tensor", fqn
        assert w.target_dtype == getattr(torch, f"int{s.weight.bits}"), fqn
        assert tuple(w.block_size) == (1, s.weight.group_size or lp.shape[1]), fqn
        assert w.scale.dtype == torch.float16
    with torch.no_grad():
        got = fresh(input_ids=ids).logits
    assert torch.isfinite(got).all() and not torch.equal(got, ref)
    assert env["report"]["files"] == ["torchao_config.json", "torchao_config.py"]


def test_torchao_unsupported_and_fallbacks(loaded, tmp_path):
    pytest.importorskip("torchao")
    for bad in ("fp4g32", "w2g64z+h3r0.05", "w4g32a8"):
        with pytest.raises(ExportError, match=r"layer model\.layers\.0\.self_attn\.k_proj: scheme .* cannot be exported to torchao"):
            export(make_plan(loaded, ["w4g32", bad]), "torchao", tmp_path / "t", log=None)
    with pytest.raises(ExportError, match="does not divide"):
        export(make_plan(loaded, ["w4g128"]), "torchao", tmp_path / "t", log=None)
    env = export(make_plan(loaded, ["w4g128", "fp4g32"]), "torchao", tmp_path / "t", fallback=["regroup", "fp16"], log=None)
    rows = {r["layer"]: r for r in env["report"]["layers"]}
    assert rows["model.layers.0.self_attn.q_proj"]["torchao"]["group_size"] == 64
    assert rows["model.layers.0.self_attn.k_proj"]["torchao"] is None


# ---------------------------------------------------------------------------------------
# vLLM: ties at solve time, kernel families


def test_vllm_kernel_families():
    from bitalloc.allocator.vllm import kernel_families

    ok = lambda *a: [k for k, why in kernel_families(*a).items() if why is None]  # noqa: E731
    assert ok(4, True, 128, 4096, 4096) == ["marlin", "machete", "exllama", "triton"]
    assert ok(4, False, 64, 4096, 4096) == ["marlin", "machete"]
    assert ok(8, False, None, 4096, 4096) == ["machete"]
    assert ok(8, True, 32, 4096, 4096) == ["marlin", "exllama"]
    assert ok(3, True, 128, 4096, 4096) == [] and ok(2, False, 64, 4096, 4096) == []
    assert "in % 128" in kernel_families(4, True, 64, 960, 576)["marlin"]  # SmolLM2's fused qkv_proj


def test_solve_target_vllm_ties_fused_modules(tiny_profile, tmp_path, capsys):
    from bitalloc.allocator.vllm import fused_groups

    prof, path = tiny_profile
    groups = fused_groups(l.fqn for l in prof.layers)
    assert ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj") in groups
    assert ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj") in groups
    for budget in ("3bpw", "4bpw", "5bpw"):
        plan = bitalloc.solve(prof, budget, target="vllm")
        for g in groups:
            assert len({plan.layers[f].scheme for f in g}) == 1, (budget, g)
        assert plan.solver["options"]["target"] == "vllm" and plan.bpw <= float(budget[:-3]) + 1e-9
    rc = main(["--quiet", "solve", str(path), "--budget", "3.5bpw", "--target", "vllm", "--out", str(tmp_path / "p.json")])
    capsys.readouterr()
    assert rc == 0 and Plan.load(tmp_path / "p.json").solver["options"]["target"] == "vllm"


def test_solve_target_vllm_leaves_out_what_compressed_tensors_cannot_hold(tiny_profile, tmp_path):
    """The default candidates hold high-impact splits; a plan solved for vLLM never uses one, so
    it always exports (a split has no compressed-tensors counterpart)."""
    from bitalloc.allocator.errors import AllocationError

    prof, _path = tiny_profile
    splits = [s for s in prof.schemes if parse_scheme(s).high is not None]
    assert splits, "the default candidate schemes should include high-impact splits"
    pair = ["w3g128z", "w3g128z+h8csr0.02"]  # the split loses less; with room for it, it is chosen
    free = bitalloc.solve(prof, "8bpw", schemes=pair)
    assert any(lp.scheme == pair[1] for lp in free.layers.values()), "no split chosen when free"
    plan = bitalloc.solve(prof, "8bpw", schemes=pair, target="vllm")
    assert {lp.scheme for lp in plan.layers.values()} == {pair[0]}
    assert all(parse_scheme(lp.scheme).high is None for lp in bitalloc.solve(prof, "4.5bpw", target="vllm").layers.values())
    report = export(plan, "compressed-tensors", tmp_path / "ct", model="random:llama-tiny", log=None)
    assert (tmp_path / "ct" / "config.json").is_file() and report
    with pytest.raises(AllocationError, match="none of the candidate schemes can be exported for target 'vllm'"):
        bitalloc.solve(prof, "4.5bpw", target="vllm", schemes=splits)


# ---------------------------------------------------------------------------------------
# SmolLM2 once (real weights; 576-wide inputs exercise the regrouping of g128)


@pytest.mark.slow
def test_smollm2_export_loads_in_transformers_and_decompresses_exactly(tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    sm = bitalloc.load("smollm2", log=None)
    sym = make_plan(sm, ["w4g128", "w3g64", "w8", "w2g32", "w4"], spec="smollm2")
    env = export(sym, "compressed-tensors", tmp_path / "sym", log=None)
    st = _st(tmp_path / "sym")
    assert st["model.layers.0.self_attn.q_proj.weight_scale"].shape == (576, 9)  # g128 on 576 inputs -> g64, repeated
    b = env["report"]["bytes"]["parts"]
    assert b["ct"]["weight_scale"] > b["bitalloc"]["scales"] and b["ct"]["weight_packed"] == b["bitalloc"]["codes"]
    assert (tmp_path / "sym" / "tokenizer.json").is_file() or (tmp_path / "sym" / "tokenizer_config.json").is_file()
    ids = sm.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = bitalloc.apply(sm, sym)(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sym"), dtype=torch.float32)(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()

    asym = make_plan(sm, lambda n: "w4g128z" if "layers.3." in n else "fp16", spec="smollm2")
    export(asym, "compressed-tensors", tmp_path / "asym", log=None)
    qmodel = bitalloc.apply(sm, asym)
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "asym" / "config.json").read_text())["quantization_config"])
    st = _st(tmp_path / "asym")
    for scheme in qc.config_groups.values():
        for fqn in scheme.targets:
            sd = {k.rsplit(".", 1)[1]: v for k, v in st.items() if k.rsplit(".", 1)[0] == fqn}
            sd["weight_scale"] = sd["weight_scale"].float()
            w = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
            assert torch.equal(w, qmodel.get_submodule(fqn).dequantized_weight()), fqn


def test_gpt2_conv1d_layers_are_refused(tmp_path):
    g = bitalloc.load("random:gpt2-tiny", log=None)
    from transformers.pytorch_utils import Conv1D

    convs = [n for n, m in g.model.named_modules() if isinstance(m, Conv1D)]
    w = g.model.get_submodule(convs[0]).weight
    shape = (w.shape[1], w.shape[0])
    plan = Plan(model={"spec": "random:gpt2-tiny", "fingerprint": fingerprint(g.model)},
                layers={convs[0]: LayerPlan(convs[0], "w4g32", shape, parse_scheme("w4g32").storage_bits(*shape))})
    with pytest.raises(ExportError, match="Conv1D"):
        export(plan, "compressed-tensors", tmp_path / "g", log=None)
    assert not list(tmp_path.iterdir())
