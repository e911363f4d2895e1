"""Candidate calibrations of a profile and the plan chosen among them end to end (allocator.candidates)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import bitalloc
from bitalloc.allocator.candidates import CANDIDATES, candidate_tables, select_plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_user_paths import SCHEMES, cli, tiny_run_config  # noqa: E402


@pytest.fixture(scope="module")
def fisher_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("cand") / "profile.json"
    prof = bitalloc.profile("random:llama-tiny", n_samples=4, seq_len=32, kl_samples=2, fisher_table=True, out=path,
                            progress=False, log=None)
    return prof, path


def test_tables_of_a_measured_profile_with_fisher(fisher_profile):
    prof, _ = fisher_profile
    tabs = candidate_tables(prof)
    assert list(tabs) == [n for n in CANDIDATES if not n.endswith("-text")]  # no text-label table here
    np.testing.assert_array_equal(tabs["profile"], prof.table())
    np.testing.assert_array_equal(tabs["fisher"], prof.fisher)
    ri = [prof.scheme_index(r) for r in prof.ref_schemes]
    np.testing.assert_allclose(tabs["fisher-refs"][:, ri], prof.fisher[:, ri], rtol=1e-9)
    # mix: the geometric mean of the two tables (Fisher in the measured references' units)
    ok = prof.ref_values > 0
    c = np.exp(np.median(np.log(prof.ref_values[ok] / prof.fisher[:, ri][ok])))
    np.testing.assert_allclose(tabs["mix"], np.sqrt(prof.table() * c * prof.fisher), rtol=1e-12)
    assert set(candidate_tables(prof, ["profile", "mix"])) == {"profile", "mix"}
    with pytest.raises(ValueError, match="unknown candidate"):
        candidate_tables(prof, ["profile", "best"])


def test_text_label_candidates(fisher_profile):
    """A profile with both Fisher tables: the four Fisher calibrations again on the text-label
    table, each equal to the same calibration of a profile whose only table is that one."""
    import dataclasses

    prof, _ = fisher_profile
    F2 = prof.fisher * np.linspace(0.5, 2.0, prof.n_layers)[:, None]  # another estimate of the same cells
    both = dataclasses.replace(prof, fisher_text=F2)
    alone = candidate_tables(dataclasses.replace(prof, fisher=F2))
    tabs = candidate_tables(both)
    assert list(tabs) == list(CANDIDATES)
    for name in ("fisher-refs", "fisher", "mix", "mix-refs"):
        np.testing.assert_array_equal(tabs[name + "-text"], alone[name])
        np.testing.assert_array_equal(tabs[name], candidate_tables(prof)[name])
    from bitalloc.allocator.candidates import with_table

    assert with_table(both, "mix-text").table() is not None
    with pytest.raises(ValueError, match="fisher-labels both"):
        with_table(prof, "mix-text")


def test_a_profile_without_fisher_has_one_candidate(tiny_profile):
    prof, _ = tiny_profile
    assert list(candidate_tables(prof)) == ["profile"]
    calls = []
    plan = select_plan(prof, "4bpw", lambda cs: calls.append(cs) or [0.0] * len(cs), ties=False)
    assert calls == [] and plan.solver["select"]["chosen"] == "profile"  # nothing to choose: nothing measured
    plan = select_plan(prof, "4bpw", lambda cs: calls.append(cs) or [float(k) for k in range(len(cs))])
    assert plan.solver["select"]["candidates"] == ["profile", "profile+tied"]


def test_select_keeps_the_lowest_measured_plan(fisher_profile):
    prof, path = fisher_profile
    seen = []

    def fitness(choices):  # a stand-in measurement: more 8-bit layers is "better"
        seen.extend(choices)
        w8 = prof.scheme_index("w8")
        return [-float((np.asarray(c) == w8).sum()) + 1e-3 * k for k, c in enumerate(choices)]

    plan = select_plan(prof, "4bpw", fitness, profile_path=path)
    sel = plan.solver["select"]
    assert sel["candidates"] == [n for c in CANDIDATES if not c.endswith("-text") for n in (c, c + "+tied")]
    assert len(seen) == sel["distinct_plans"] <= 2 * len(CANDIDATES)  # identical plans measured once
    assert sel["fitness"][sel["chosen"]] == min(sel["fitness"].values())
    assert plan.bpw <= 4.0 + 1e-9 and "refine" not in sel
    # the chosen plan is exactly that candidate table's plan (tied: as vLLM's fusions), with the file's hash
    import dataclasses

    table = candidate_tables(prof)[sel["chosen"].removesuffix("+tied")]
    alone = bitalloc.solve(dataclasses.replace(prof, tables={"all": table}), "4bpw",
                           **({"target": "vllm"} if sel["chosen"].endswith("+tied") else {}))
    assert {f: lp.scheme for f, lp in plan.layers.items()} == {f: lp.scheme for f, lp in alone.layers.items()}
    assert plan.profile["sha256"]


def test_screen_measures_every_plan_briefly_and_the_best_fully(fisher_profile):
    """select_plan(screen=, keep=): every distinct plan on the cheap fitness, only the ``keep``
    best on the full one, and the choice is the full fitness's best among those finalists, even
    where the screen ranked another first."""
    prof, path = fisher_profile
    w8 = prof.scheme_index("w8")
    full_calls, screen_calls = [], []

    def n8(c):
        return float((np.asarray(c) == w8).sum())

    def screen(choices):  # ranks plans by their 8-bit layers, more is better
        screen_calls.append(len(choices))
        return [-n8(c) for c in choices]

    def fitness(choices):  # disagrees with the screen: the fewest 8-bit layers win
        full_calls.append([n8(c) for c in choices])
        return [n8(c) for c in choices]

    plan = select_plan(prof, "4bpw", fitness, screen=screen, keep=2, profile_path=path)
    sel = plan.solver["select"]
    assert sel["distinct_plans"] > 2, "the tiny profile's candidates must differ for this test"
    assert screen_calls == [sel["distinct_plans"]] and sel["finalists"] == 2
    assert len(full_calls) == 1 and len(full_calls[0]) == 2
    finalists, dropped = set(sel["fitness"]), set(sel["screen"]) - set(sel["fitness"])
    assert dropped and max(sel["screen"][n] for n in finalists) <= min(sel["screen"][n] for n in dropped)
    assert sorted(set(sel["fitness"].values())) == sorted(set(full_calls[0]))
    assert sel["fitness"][sel["chosen"]] == min(full_calls[0]) and sel["chosen"] in finalists
    # keep >= the distinct plans: no screen, every plan measured in full
    again = select_plan(prof, "4bpw", fitness, screen=screen, keep=sel["distinct_plans"], profile_path=path)
    assert "screen" not in again.solver["select"] and len(full_calls[-1]) == sel["distinct_plans"]
    assert screen_calls == [sel["distinct_plans"]]


def test_tied_candidates_tie_fused_inputs(fisher_profile):
    prof, _ = fisher_profile
    plan = select_plan(prof, "3.5bpw", lambda cs: [0.0 if k == 1 else 1.0 for k in range(len(cs))], names=["profile"])
    sel = plan.solver["select"]
    assert sel["chosen"] == "profile+tied" and plan.solver["ties"] == "fused inputs"
    assert "target" not in plan.solver.get("options", {})  # a choice among plans, not a serving target
    for b in range(2):
        qkv = {plan.layers[f"model.layers.{b}.self_attn.{m}_proj"].scheme for m in "qkv"}
        gate_up = {plan.layers[f"model.layers.{b}.mlp.{m}_proj"].scheme for m in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1, (qkv, gate_up)


def test_refine_improves_the_chosen_plan_within_its_constraints(fisher_profile):
    """--refine N: a local search from the chosen plan on the same fitness, within the exact
    budget and the allowed schemes; never more than N new measurements; skipped for a target."""
    prof, path = fisher_profile
    fp16 = prof.scheme_index("fp16")
    rows = np.arange(prof.n_layers)
    calls = []

    def fitness(choices):  # a stand-in measurement the profile's table does not predict: the Fisher table's sum
        calls.append(len(choices))
        return [float(prof.fisher[rows, np.asarray(c)].sum()) for c in choices]

    base = select_plan(prof, "4bpw", fitness, ties=False, names=["profile"], forbid={"*": ["fp16"]})
    n_select = len(calls)
    plan = select_plan(prof, "4bpw", fitness, ties=False, names=["profile"], refine=12, forbid={"*": ["fp16"]},
                       profile_path=path)
    ref = plan.solver["select"]["refine"]
    assert base.solver["select"]["distinct_plans"] == 1 and n_select == 0  # one candidate: nothing to choose
    assert 0 < ref["evaluations"] <= 12 and sum(calls[n_select:]) == 1 + ref["evaluations"]  # the start, then N
    assert ref["fitness"] < ref["fitness_start"] and ref["moves"] > 0
    from bitalloc.allocator.solve import choice_of

    choice = choice_of(prof, plan)
    assert fitness([choice])[0] == ref["fitness"]
    assert plan.bpw <= 4.0 + 1e-9 and not (choice == fp16).any()
    # under a serving target single-layer moves would break the fusions: skipped, said why
    tied = select_plan(prof, "4bpw", fitness, refine=4, target="vllm")
    assert "skipped" in tied.solver["select"]["refine"]


def test_run_selects_among_candidates(capsys, tmp_path):
    """[solve] select = true with a Fisher table: each budget's plan records the measured candidates."""
    cli(capsys, "run", tiny_run_config(tmp_path, profile="fisher_table = true",
                                       solve="select = true\nselect_rows = 2\nrefine = 3\nselect_ties = true"))
    plan = json.loads((tmp_path / "out" / "plans" / "bitalloc-3.5bpw.json").read_text())
    sel = plan["solver"]["select"]
    assert sel["refine"]["evaluations"] <= 3 and sel["refine"]["fitness"] <= sel["refine"]["fitness_start"]
    assert sel["chosen"].removesuffix("+tied") in CANDIDATES and sel["fitness"]
    assert any(k.endswith("+tied") for k in sel["fitness"]), "select_ties adds the tied candidates"
    if sel["distinct_plans"] > 1:
        assert sel["fitness"][sel["chosen"]] == min(sel["fitness"].values())
        assert all(v > 0 for v in sel["fitness"].values())  # real KL of quantized models
    prof = bitalloc.load_profile(tmp_path / "out" / "profile.json")
    assert prof.fisher is not None and prof.metadata["request"]["fisher_table"] is True


def test_run_on_a_text_file_selects_among_both_label_kinds(capsys, tmp_path):
    """The run's defaults on a calibration text file: both Fisher tables (fisher_labels auto),
    so the '-text' calibrations are candidates too; select_screen / select_keep / select_metric
    reach the selection and are recorded."""
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    cfg = tiny_run_config(tmp_path, solve='select_rows = 2\nselect_screen = 1\nselect_keep = 2\nselect_metric = "nll"')
    cfg.write_text(cfg.read_text().replace("[calibration]\n", f'[calibration]\nsource = "{text}"\n'))
    cli(capsys, "run", cfg)
    prof = bitalloc.load_profile(tmp_path / "out" / "profile.json")
    assert prof.fisher is not None and prof.fisher_text is not None
    assert prof.metadata["options"]["fisher"]["labels"] == "both"
    sel = json.loads((tmp_path / "out" / "plans" / "bitalloc-3.5bpw.json").read_text())["solver"]["select"]
    assert any(n.endswith("-text") for n in sel["candidates"]) and len(sel["candidates"]) == len(CANDIDATES)
    if sel["distinct_plans"] > 2:  # screened: every plan once on one row, the two best on both
        assert len(sel["screen"]) == len(sel["candidates"]) and sel["finalists"] == 2
        assert len(set(sel["fitness"].values())) <= 2
    assert sel["chosen"] in sel["fitness"]


def test_selection_fitness_rows(tiny_profile):
    """The last rows by default; ``skip`` measures the rows before them instead (another set)."""
    from bitalloc.allocator.solve import choice_of

    prof, path = tiny_profile
    choice = choice_of(prof, bitalloc.solve(prof, "3bpw"))
    last = bitalloc.selection_fitness("random:llama-tiny", path, rows=2)([choice])[0]
    again = bitalloc.selection_fitness("random:llama-tiny", path, rows=2)([choice])[0]
    before = bitalloc.selection_fitness("random:llama-tiny", path, rows=2, skip=2)([choice])[0]
    assert last == again and before != last and last > 0 and before > 0
    with pytest.raises(AssertionError, match="skip"):
        bitalloc.selection_fitness("random:llama-tiny", path, rows=2, skip=4)
    # screen_rows: the screen is the same KL on the last of those rows, the full fitness unchanged
    fit = bitalloc.selection_fitness("random:llama-tiny", path, rows=2, screen_rows=1)
    assert fit([choice])[0] == last and fit.screen is not None
    assert fit.screen([choice])[0] == bitalloc.selection_fitness("random:llama-tiny", path, rows=1)([choice])[0]
    assert bitalloc.selection_fitness("random:llama-tiny", path, rows=2).screen is None


def test_add_fisher_table_to_a_stored_profile(tiny_profile):
    """A measured profile gets the Fisher table of its own calibration rows (rebuilt, hash-checked)."""
    prof, path = tiny_profile
    assert prof.fisher is None
    out = bitalloc.add_fisher_table(path, "random:llama-tiny", rows=2)
    assert out.fisher.shape == (prof.n_layers, len(prof.schemes)) and (out.fisher >= 0).all()
    info = out.metadata["options"]["fisher"]
    assert info["added"] and info["rows"] == 2 and info["stride"] == prof.metadata["options"]["kl_stride"]
    np.testing.assert_array_equal(out.table(), prof.table())  # the profile's own table is untouched
    assert list(candidate_tables(out)) == [n for n in CANDIDATES if not n.endswith("-text")]
    both = bitalloc.add_fisher_table(path, "random:llama-tiny", rows=2, labels="both")
    np.testing.assert_array_equal(both.fisher, out.fisher)  # the sampled table, as before
    assert both.fisher_text.shape == out.fisher.shape and not np.allclose(both.fisher_text, out.fisher)
    assert list(candidate_tables(both)) == list(CANDIDATES)
    with pytest.raises(ValueError, match="fingerprints differ"):
        bitalloc.add_fisher_table(path, "random:gpt2-tiny")


def test_cli_profile_fisher_and_solve_on_a_candidate(capsys, tmp_path, tiny_profile):
    from bitalloc.allocator.cli import main

    prof_path = tmp_path / "p.json"
    cli(capsys, "profile", "--model", "random:llama-tiny", "--n-samples", "2", "--seq-len", "16",
        "--schemes", SCHEMES, "--ref-method", "fisher", "--fisher-table", "--out", prof_path)
    prof = bitalloc.load_profile(prof_path)
    assert prof.metadata["options"]["ref_method"] == "fisher" and prof.fisher is not None
    cli(capsys, "solve", prof_path, "--budget", "4bpw", "--table", "fisher", "--out", tmp_path / "plan.json")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["solver"]["table"] == "fisher"
    # a profile without a Fisher table: one line naming the problem
    _, plain = tiny_profile
    assert main(["solve", str(plain), "--budget", "4bpw", "--table", "mix", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "table 'mix' is not available" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.json").exists()
    # both label kinds: the text-label table is a candidate too; without it, one line again
    both_path = tmp_path / "both.json"
    cli(capsys, "profile", "--model", "random:llama-tiny", "--n-samples", "2", "--seq-len", "16",
        "--schemes", SCHEMES, "--ref-method", "fisher", "--fisher-table", "--fisher-labels", "both", "--out", both_path)
    both = bitalloc.load_profile(both_path)
    np.testing.assert_allclose(both.fisher, prof.fisher, rtol=1e-12)  # the sampled table, as above
    assert both.fisher_text is not None
    cli(capsys, "solve", both_path, "--budget", "4bpw", "--table", "fisher-text", "--out", tmp_path / "plan2.json")
    assert json.loads((tmp_path / "plan2.json").read_text())["solver"]["table"] == "fisher-text"
    assert main(["solve", str(prof_path), "--budget", "4bpw", "--table", "fisher-text", "--out", str(tmp_path / "y.json")]) == 2
    err = capsys.readouterr().err
    assert "table 'fisher-text' is not available" in err and "--fisher-labels both" in err and err.count("\n") == 1, err
    assert main(["profile", "--model", "random:llama-tiny", "--fisher-labels", "both", "--out", str(tmp_path / "z.json")]) == 2
    err = capsys.readouterr().err
    assert "fisher_table" in err and err.count("\n") == 1, err


def test_run_default_profile_on_local_ray(capsys, tmp_path):
    """[profile] workers = 2 without measured = true: the run's default profile (hybrid references,
    Fisher table, selection) has its Hessian shards and proxy rows on a local Ray instance, and
    the same reference values and Fisher table as in-process (float rounding: the Ray path's
    Hessians are reduced in float64)."""
    base = tmp_path / "base"
    base.mkdir()
    cli(capsys, "run", tiny_run_config(base, profile='ref_method = "hybrid"\nfisher_table = true'))
    cli(capsys, "run", tiny_run_config(tmp_path, profile='ref_method = "hybrid"\nfisher_table = true\nworkers = 2'))
    p0 = bitalloc.load_profile(base / "out" / "profile.json")
    p1 = bitalloc.load_profile(tmp_path / "out" / "profile.json")
    ray = p1.metadata["ray"]
    assert ray["hessians"]["mode"] == "ray-local" and ray["proxy"]["computed"] == p1.n_layers
    np.testing.assert_allclose(p1.ref_values, p0.ref_values, rtol=1e-5)  # measured ones equal, the rest Fisher-based
    np.testing.assert_allclose(p1.fisher, p0.fisher, rtol=1e-5)
    np.testing.assert_allclose(p1.proxy, p0.proxy, rtol=1e-5)
    plan = json.loads((tmp_path / "out" / "plans" / "bitalloc-3.5bpw.json").read_text())
    assert plan["solver"]["select"]["chosen"]


@pytest.fixture(scope="module")
def gptq_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("gptq") / "profile.json"
    prof = bitalloc.profile("random:llama-tiny", n_samples=4, seq_len=32, kl_samples=2, quantizer="gptq",
                            fisher_table=True, out=path, progress=False, log=None)
    return prof, path


def test_selection_of_a_gptq_profile_measures_the_executors_weights(gptq_profile):
    """A gptq profile's selection quantizes each layer with GPTQ and the Hessians the profile
    recorded: the weights it measures are the ones the executor packs for the chosen plan, and
    its KL is not the rtn weights' KL."""
    import dataclasses

    import torch

    from bitalloc.allocator.solve import choice_of
    from bitalloc.sensitivity.hessian_store import load_hessians
    from bitalloc.sensitivity.peer_context import PeerContext
    from bitalloc.sensitivity.proxy import module_at

    prof, path = gptq_profile
    assert prof.metadata["quantizer"] == "gptq" and Path(prof.metadata["hessians"]["path"]).is_file()
    plan = bitalloc.solve(prof, "3bpw")
    choice = choice_of(prof, plan)
    gptq = bitalloc.selection_fitness("random:llama-tiny", path, rows=2)([choice])[0]
    rtn_prof = dataclasses.replace(prof, metadata={**prof.metadata, "quantizer": "rtn"})
    rtn = bitalloc.selection_fitness("random:llama-tiny", rtn_prof, rows=2)([choice])[0]
    assert gptq > 0 and rtn > 0 and gptq != rtn

    loaded = bitalloc.load("random:llama-tiny")
    H = load_hessians(prof.metadata["hessians"]["path"])
    ctx = PeerContext(loaded.model, prof.layers, list(prof.schemes), [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}],
                      quantizer="gptq", hessians=H)
    applied = bitalloc.apply(loaded, plan)
    checked = 0
    for i, layer in enumerate(prof.layers):
        q = module_at(applied, layer.fqn)
        if hasattr(q, "dequantized_weight"):
            torch.testing.assert_close(ctx.quantized(i, int(choice[i])), q.dequantized_weight().to(torch.float32),
                                       rtol=0, atol=1e-6, msg=layer.fqn)
            checked += 1
    assert checked == sum(1 for lp in plan.layers.values() if lp.scheme != "fp16") > 0


def test_fisher_table_and_selection_find_a_moved_gptq_profiles_hessians(gptq_profile, tmp_path):
    """The Hessian file is looked for where the profile records it, then beside the profile (a
    run folder moved as a whole); with neither, one line naming what is missing."""
    import shutil

    prof, path = gptq_profile
    rec = prof.metadata["hessians"]
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(path, moved / "profile.json")
    shutil.copy(rec["path"], moved / Path(rec["path"]).name)
    for p in (path.parent / p.name for p in path.parent.glob("profile.arrays*")):
        shutil.copy(p, moved / p.name)
    moved_prof = bitalloc.load_profile(moved / "profile.json")
    missing = __import__("dataclasses").replace(
        moved_prof, metadata={**moved_prof.metadata, "hessians": {**rec, "path": str(tmp_path / "gone.safetensors")}})
    out = bitalloc.add_fisher_table(moved / "profile.json", "random:llama-tiny", rows=2)
    np.testing.assert_allclose(out.fisher, bitalloc.add_fisher_table(path, "random:llama-tiny", rows=2).fisher,
                               rtol=1e-12)
    with pytest.raises(ValueError, match="gptq profile: the recorded Hessian file is missing.*gone.safetensors"):
        bitalloc.selection_fitness("random:llama-tiny", missing, rows=2)
    from bitalloc.sensitivity.hessian_store import load_hessians

    H = load_hessians(rec["path"])  # given as a dict, nothing is looked for
    assert bitalloc.selection_fitness("random:llama-tiny", missing, rows=2, hessians=H)


def test_run_config_gptq_selects_and_evaluates(capsys, tmp_path):
    """[profile] quantizer = "gptq" in the main job: the Fisher table, the selection among the
    candidate plans and the evaluation all quantize with GPTQ (this failed after the profile
    before: the selection took rtn profiles only)."""
    out = cli(capsys, "run", tiny_run_config(tmp_path, profile='quantizer = "gptq"'))
    assert "bitalloc" in out
    plan = json.loads((tmp_path / "out" / "plans" / "bitalloc-3.5bpw.json").read_text())
    assert plan["quantization"]["quantizer"] == "gptq" and "select" in plan["solver"]
    assert Path(plan["quantization"]["hessians"]["path"]).is_file()


def test_selection_fitness_nll_is_the_increase_of_the_text_loss(tiny_profile):
    """metric="nll": the mean next-token cross-entropy of the selection rows with the plan's
    layers quantized, minus the 16-bit model's, computed here with a plain forward of the
    executor's packed model; not the KL."""
    import torch

    from bitalloc.allocator.context import profile_calibration
    from bitalloc.allocator.solve import choice_of

    prof, path = tiny_profile
    plan = bitalloc.solve(prof, "3bpw")
    choice = choice_of(prof, plan)
    nll = bitalloc.selection_fitness("random:llama-tiny", path, rows=2, metric="nll")([choice])[0]
    kl = bitalloc.selection_fitness("random:llama-tiny", path, rows=2)([choice])[0]
    loaded = bitalloc.load("random:llama-tiny", log=None)
    ids = profile_calibration(loaded, prof)[-2:]  # (2, T): the last two rows

    @torch.no_grad()
    def loss(model) -> float:
        logits = model(input_ids=ids).logits[:, :-1].double()  # (2, T-1, V): the last position has no label
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()

    direct = loss(bitalloc.apply(loaded, plan)) - loss(loaded.model)
    assert nll == pytest.approx(direct, rel=1e-3, abs=1e-6) and nll != pytest.approx(kl, rel=1e-3)
    with pytest.raises(ValueError, match="selection metric"):
        bitalloc.selection_fitness("random:llama-tiny", path, rows=2, metric="ppl")
