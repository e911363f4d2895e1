"""The paths users take, end to end on the random-weight tiny Llama (plumbing, not quality):
``bitalloc run CONFIG``; ``profile -> solve -> apply -> eval``; a saved quantized model
evaluated from disk (``eval --quantized DIR``); ``sweep``."""

from __future__ import annotations

import csv
import json
import math

import pytest

from bitalloc.allocator.cli import main

SCHEMES = "w2g64z,w3g128z,w4g128z,w8,fp16"


def cli(capsys, *args) -> str:
    rc = main(["--quiet", *map(str, args)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _table_rows(out: str) -> dict[str, list[str]]:
    """The eval table: model name -> its cells."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) >= 6 and cells[0] not in ("model", "(") and not set(cells[0]) <= set("-|"):
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("paths")
    return d


def test_profile_solve_apply_eval(capsys, pipeline):
    d = pipeline
    out = cli(capsys, "profile", "--model", "random:llama-tiny", "--n-samples", 4, "--seq-len", 32,
              "--metric-samples", 2, "--schemes", SCHEMES, "--out", d / "prof.json")
    assert "profile:" in out and (d / "prof.json").is_file()
    prof = json.loads((d / "prof.json").read_text())
    assert prof["schemes"] == SCHEMES.split(",")

    cli(capsys, "solve", d / "prof.json", "--budget", "4bpw", "--out", d / "plan.json")
    plan = json.loads((d / "plan.json").read_text())
    assert plan["predicted"]["bpw"] <= 4.0 + 1e-9
    assert set(l["scheme"] for l in plan["layers"].values()) <= set(SCHEMES.split(","))

    out = cli(capsys, "apply", "--model", "random:llama-tiny", "--plan", d / "plan.json", "--out", d / "q")
    assert "quantized" in out
    assert {"plan.json", "quantized.json", "model.safetensors"} <= {p.name for p in (d / "q").iterdir()}

    # the plan applied in memory and the saved model loaded from disk are the same model
    out = cli(capsys, "eval", "--model", "random:llama-tiny", "--plan", d / "plan.json", "--quantized", d / "q",
              "--windows", 2, "--seq-len", 32)
    rows = _table_rows(out)
    assert {"fp16", "plan", "q"} <= set(rows), out
    ppl_plan, ppl_disk, ppl_ref = (float(rows[k][2]) for k in ("plan", "q", "fp16"))
    assert math.isfinite(ppl_ref) and ppl_ref > 1
    assert ppl_disk == pytest.approx(ppl_plan, rel=1e-4)
    assert float(rows["q"][1]) == pytest.approx(plan["predicted"]["bpw"], abs=1e-3)  # bpw read from the saved plan
    assert float(rows["q"][3]) > 0  # KL against the 16-bit model: the quantized model differs


def test_eval_quantized_takes_the_reference_from_the_saved_model(capsys, pipeline):
    d = pipeline
    if not (d / "q").is_dir():
        pytest.skip("needs test_profile_solve_apply_eval's saved model")
    out = cli(capsys, "eval", "--quantized", d / "q", "--windows", 2, "--seq-len", 32)  # no --model: its spec
    rows = _table_rows(out)
    assert {"fp16", "q"} <= set(rows), out


def test_eval_quantized_of_another_model_is_refused(capsys, pipeline):
    d = pipeline
    if not (d / "q").is_dir():
        pytest.skip("needs test_profile_solve_apply_eval's saved model")
    rc = main(["--quiet", "eval", "--model", "random:gpt2-tiny", "--quantized", str(d / "q"), "--windows", "1",
               "--seq-len", "16"])
    _, err = capsys.readouterr()
    assert rc == 2 and err.startswith("bitalloc: error: "), err


def test_sweep_writes_a_plan_per_budget(capsys, tiny_profile, tmp_path):
    _, prof_path = tiny_profile
    out = cli(capsys, "sweep", prof_path, "--budgets", "3bpw,4bpw,5bpw", "--out-dir", tmp_path / "plans")
    plans = sorted((tmp_path / "plans").glob("*.json"))
    assert len(plans) == 3, out
    bpw = sorted(json.loads(p.read_text())["predicted"]["bpw"] for p in plans)
    assert [b <= cap + 1e-9 for b, cap in zip(bpw, (3, 4, 5))] == [True] * 3
    assert bpw[0] < bpw[2]  # more budget, more bits
    losses = [json.loads(p.read_text())["predicted"]["loss_total"] for p in plans]
    assert len(set(losses)) > 1


def test_run_config_end_to_end(capsys, tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(f"""
[model]
spec = "random:llama-tiny"
[calibration]
n_samples = 4
seq_len = 32
kl_samples = 2
[profile]
schemes = {json.dumps(SCHEMES.split(","))}
[solve]
budgets = ["3bpw", "4bpw"]
[eval]
n_windows = 2
seq_len = 32
[output]
dir = "{tmp_path / 'out'}"
""")
    cli(capsys, "run", cfg)
    out = tmp_path / "out"
    for name in ("profile.json", "results.csv", "config.json", "timings.json"):
        assert (out / name).is_file(), name
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    methods = {(r["method"], r["budget"]) for r in rows}
    assert ("fp16", "-") in methods
    assert {("bitalloc", "3bpw"), ("bitalloc", "4bpw"), ("uniform", "3bpw"), ("uniform", "4bpw")} <= methods
    for r in rows:
        assert math.isfinite(float(r["ppl"])) and float(r["ppl"]) > 1
        if r["method"] == "bitalloc":
            assert float(r["bpw"]) <= float(r["budget"].removesuffix("bpw")) + 1e-9
    assert len(list((out / "plans").glob("*.json"))) >= 4
    # a second run refuses to replace the results unless told, and then reuses the profile
    assert main(["--quiet", "run", str(cfg)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    cli(capsys, "run", cfg, "--overwrite")
    assert json.loads((out / "timings.json").read_text()).get("profile_s") is None


def tiny_run_config(tmp_path, profile: str = "", solve: str = ""):
    """A one-budget (3.5 bpw) run of the tiny random Llama, no baselines, output in tmp_path/out;
    ``profile`` / ``solve``: extra lines of those sections."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
[model]
spec = "random:llama-tiny"
[calibration]
n_samples = 4
seq_len = 32
kl_samples = 1
[profile]
schemes = {json.dumps(SCHEMES.split(","))}
{profile}
[solve]
budgets = ["3.5bpw"]
{solve}
[eval]
n_windows = 2
seq_len = 32
baselines = false
[output]
dir = "{tmp_path / 'out'}"
""")
    return cfg


def test_run_config_vllm_target_ties_fused_layers(capsys, tmp_path):
    """[solve] target = "vllm": every plan of the run gives q/k/v and gate/up one scheme each."""
    cli(capsys, "run", tiny_run_config(tmp_path, solve='target = "vllm"'))
    plan = json.loads((tmp_path / "out" / "plans" / "bitalloc-3.5bpw.json").read_text())
    layers = plan["layers"]
    blocks = {f.rsplit(".", 1)[0] for f in layers if ".self_attn." in f}
    assert blocks
    for b in blocks:
        assert len({layers[f"{b}.{p}_proj"]["scheme"] for p in "qkv"}) == 1, b
    mlps = {f.rsplit(".", 1)[0] for f in layers if ".mlp." in f}
    for m in mlps:
        assert layers[f"{m}.gate_proj"]["scheme"] == layers[f"{m}.up_proj"]["scheme"], m


@pytest.mark.parametrize("body,msg", [
    ('[profile]\ntarget = "onnx"', "[profile] target must be bitalloc or llamacpp"),
    ('[solve]\ntarget = "tgi"', "[solve] target must be vllm"),
    ('[profile]\ntarget = "llamacpp"\n[solve]\ntarget = "vllm"', "does not go with"),
    ('[profile]\ntarget = "llamacpp"\nquantizer = "gptq"', "uses ggml's quantizer"),
    ('[profile]\nref_method = "guess"', "[profile] ref_method must be auto, measured, fisher or hybrid"),
    ('[profile]\nref_method = "fisher"\nmeasured = true', "does not go with"),
    ('[profile]\ntarget = "llamacpp"\nfisher_table = true', "target = llamacpp"),
    ('[solve]\nselect = "yes"', "select"),
    ('[solve]\nselect_rows = 0', "select_rows"),
    ('[solve]\nrefine = -1', "field 'refine': Input should be greater than or equal to 0"),
    ('[solve]\nrefine = "many"', "refine"),
])
def test_run_config_errors(capsys, tmp_path, body, msg):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body + "\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err
