"""The benchmark scripts' driver (experiments/_driver.py) on the random-weight tiny Llama, so
the scripts cannot rot silently: profile (built, then reused), solve, evaluate through one
quantized-layer cache on two texts, results JSON; and the scripts on the driver stay on the
public API (no private bitalloc names, no sys.path edits)."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
ON_DRIVER = ("quality_benchmark.py", "measured_vs_proxy.py", "highimpact_benchmark.py", "smollm2_groups.py",
             "main_job_variants.py", "_driver.py")
TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 20


@pytest.fixture()
def driver(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    for name in ("_driver", "_data"):
        sys.modules.pop(name, None)
    import _driver

    return _driver


@pytest.fixture()
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for name in ("wikitext2-valid.txt", "wikitext2-test.txt", "tinyshakespeare.txt"):
        (d / name).write_text(TEXT)
    return d


def _args(driver, data, out, *extra):
    ap = argparse.ArgumentParser()
    driver.add_args(ap, out="unused", budgets="3,4")
    return ap.parse_args(["--model", "random:llama-tiny", "--data", str(data), "--out", str(out), "--calib-samples",
                          "2", "--calib-len", "32", "--kl-samples", "1", "--windows", "2", "--seq-len", "32",
                          "--other-windows", "2", "--quiet", *extra])


def test_driver_core_path(driver, data, tmp_path):
    import bitalloc

    a = _args(driver, data, tmp_path / "out")
    bench = driver.Bench(a)
    assert bench.budgets == ["3bpw", "4bpw"]
    schemes = ["w2g64z", "w4g128z", "w8"]
    prof = bench.profile("profile.json", schemes=schemes, ref_schemes=["w2g64z"])
    assert list(prof.schemes) == schemes and (tmp_path / "out" / "profile.json").is_file()
    assert prof.calibration["path"] == str(data / "wikitext2-valid.txt")

    plans = {b: bitalloc.solve(prof, b) for b in bench.budgets}
    plans["again"] = plans["3bpw"]
    res = bench.evaluate(plans)
    assert set(res) == {"fp16", "3bpw", "4bpw", "again"}
    assert res["fp16"]["kl"] == 0.0 and res["fp16"]["other_ppl"] > 1.0
    for k in ("3bpw", "4bpw"):
        r = res[k]
        assert r["ppl"] > 1.0 and r["kl"] >= 0.0 and 0.0 <= r["top1"] <= 1.0 and r["other_ppl"] > 1.0
        assert r["same_allocation_as"] is None
    assert res["again"]["same_allocation_as"] == "3bpw" and res["again"]["ppl"] == res["3bpw"]["ppl"]
    assert bench.cache, "the plans' quantized layers go through the one cache"
    n_cached = len(bench.cache)
    assert bench.evaluate({"same": plans["4bpw"]})["same"]["ppl"] == res["4bpw"]["ppl"]  # scored once per run
    assert len(bench.cache) == n_cached

    path = bench.write({"rows": [{"method": "x", "ppl": float("nan")}]})
    out = json.loads(path.read_text())
    assert out["model"] == "random:llama-tiny" and out["rows"][0]["ppl"] is None  # strict JSON
    assert out["calibration"]["n_samples"] == 2 and out["eval"]["n_windows"] == 2 and out["eval"]["other"]
    assert "3bpw" in driver.table([{"budget": "3bpw", "method": "m", "bpw": 3.0, "ppl": 9.0}])

    # the same settings reuse the saved profile; other settings rebuild it
    again = driver.Bench(a)
    assert again.profile("profile.json", schemes=schemes, ref_schemes=["w2g64z"]).metadata["created_at"] == \
        prof.metadata["created_at"]
    assert again.walls["profile profile.json"] == 0.0
    assert driver.budget_names("2.5, 3bpw,120MB") == ["2.5bpw", "3bpw", "120MB"]


def _private_uses(script: str) -> list[str]:
    """Private names the script takes from bitalloc: ``from bitalloc.x import _y``,
    ``bitalloc._x`` modules, and ``mod._y`` on a name bound to a bitalloc module."""
    tree = ast.parse((EXPERIMENTS / script).read_text(), script)
    bound, private = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("bitalloc"):
                private += [m for m in node.module.split(".") if m.startswith("_")]
                private += [a.name for a in node.names if a.name.startswith("_")]
                bound |= {a.asname or a.name for a in node.names}
            elif node.module.startswith("_") and node.module != "__future__":
                assert node.module in ("_data", "_driver"), f"{script} imports {node.module}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("bitalloc"):
                    private += [m for m in a.name.split(".") if m.startswith("_")]
                    bound.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sys":
            assert node.attr != "path", f"{script} edits sys.path"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                private.append(node.attr)
    return private


@pytest.mark.parametrize("script", ON_DRIVER)
def test_scripts_on_the_public_api(script):
    assert not _private_uses(script), f"{script} uses private bitalloc names"


@pytest.fixture()
def tiny_profile_path(tmp_path):
    import bitalloc

    path = tmp_path / "profile.json"
    bitalloc.profile("random:llama-tiny", n_samples=2, seq_len=32, kl_samples=1, out=path, progress=False, log=None)
    return path


def test_paired_eval_rebuilds_plans_and_compares_windows(monkeypatch, tiny_profile_path):
    """experiments/paired_eval.py: a plan rebuilt from an allocation record equals the solved
    plan layer for layer and byte for byte; the paired ratio is exp of the mean NLL
    difference, with an interval that holds 1 for equal plans and lies below 1 when A wins
    every window."""
    import numpy as np

    import bitalloc

    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    sys.modules.pop("paired_eval", None)
    import paired_eval

    prof = bitalloc.load_profile(tiny_profile_path)
    plan = bitalloc.solve(prof, "3bpw")
    names = sorted(l.fqn for l in prof.layers)  # an allocation file's order, not the profile's
    record = {"schemes": [plan.layers[n].scheme for n in names], "budget": {"text": "3bpw"},
              "predicted": {"total_bytes": plan.predicted["total_bytes"]}}
    again = paired_eval.rebuild(prof, names, record, "tiny-3bpw")
    assert {f: lp.scheme for f, lp in again.layers.items()} == {f: lp.scheme for f, lp in plan.layers.items()}
    with pytest.raises(AssertionError, match="bytes"):
        paired_eval.rebuild(prof, names, {**record, "predicted": {"total_bytes": 1}}, "tiny-3bpw")
    with pytest.raises(AssertionError, match="layers"):
        paired_eval.rebuild(prof, names[:-1] + ["x.weight"], record, "tiny-3bpw")

    from bitalloc.allocator.report import paired_ratio  # what paired_eval.py compares with

    b = np.array([100.0, 120.0, 90.0, 110.0])
    same = paired_ratio(b, b, 10)
    assert same["ratio"] == 1.0 and same["lo"] == 1.0 == same["hi"] and same["a_wins"] == 0
    better = paired_ratio(b - 1.0, b, 10)
    assert better["ratio"] == pytest.approx(np.exp(-4.0 / 40)) and better["hi"] < 1.0 and better["a_wins"] == 4



def test_quality_benchmark_reads_earlier_plans_from_a_folder_or_an_allocations_file(driver, tiny_profile_path, tmp_path):
    """quality_benchmark.py --compare-plans takes a folder of plans or the allocations.json
    summarised from one, and reads the same schemes from both (the folder form named ``Plan``
    without importing it until session 41)."""
    import bitalloc

    sys.modules.pop("quality_benchmark", None)
    import quality_benchmark

    prof = bitalloc.load_profile(tiny_profile_path)
    plans = tmp_path / "plans"
    plans.mkdir()
    for b in ("3bpw", "4bpw"):
        bitalloc.solve(prof, b).save(plans / f"tiny-{b}.json")
    driver.write_allocations(plans, tmp_path / "allocations.json")
    from_folder = quality_benchmark.earlier_schemes(str(plans))
    assert set(from_folder) == {"tiny-3bpw", "tiny-4bpw"} and len(from_folder["tiny-3bpw"]) == len(prof.layers)
    assert from_folder != {k: {} for k in from_folder} and from_folder["tiny-3bpw"] != from_folder["tiny-4bpw"]
    assert quality_benchmark.earlier_schemes(str(tmp_path / "allocations.json")) == from_folder


def test_paired_eval_splits_the_loss_into_kl_and_the_rest(monkeypatch, tiny_profile_path):
    """paired_eval.py --decompose: the per-window NLL is the one window_nll scores, KL(p ‖ q) is
    zero for the 16-bit model itself and equals torch's kl_div for a quantized plan, the
    entropies match a direct computation, and ΔNLL = KL + C per token."""
    import numpy as np
    import torch

    import bitalloc

    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    sys.modules.pop("paired_eval", None)
    import paired_eval

    loaded = bitalloc.load("random:llama-tiny", log=None)
    vocab = loaded.model.config.vocab_size
    windows = torch.randint(0, vocab, (5, 24), generator=torch.Generator().manual_seed(0))  # (W, T), batch 4 + 1
    ref, ref_nll = paired_eval.reference_logp(loaded.model, windows)
    assert [tuple(r.shape) for r in ref] == [(4, 23, vocab), (1, 23, vocab)]
    fp16_nll, tokens = paired_eval.window_nll(loaded.model, windows)
    np.testing.assert_allclose(ref_nll, fp16_nll, rtol=1e-6)
    self_split = paired_eval.window_split(loaded.model, windows, ref)
    np.testing.assert_allclose(self_split["nll"], fp16_nll, rtol=1e-6)
    assert np.abs(self_split["kl"]).max() < 1e-2 * tokens, "the 16-bit model is its own reference (float16 storage only)"
    np.testing.assert_allclose(self_split["h_q"], self_split["h_p"], rtol=1e-2)
    at_t = paired_eval.temperature_nll(ref, windows, [1.0, 100.0])
    assert at_t["1.0"] == pytest.approx(fp16_nll.sum() / (len(windows) * tokens), rel=1e-3)
    assert at_t["100.0"] == pytest.approx(np.log(vocab), rel=1e-2), "a very hot softmax is uniform"

    qmodel = bitalloc.apply(loaded, bitalloc.solve(bitalloc.load_profile(tiny_profile_path), "3bpw"))
    s = paired_eval.window_split(qmodel, windows, ref)
    q_nll, _ = paired_eval.window_nll(qmodel, windows)
    np.testing.assert_allclose(s["nll"], q_nll, rtol=1e-6)
    with torch.no_grad():
        lq = torch.log_softmax(qmodel(input_ids=windows, use_cache=False).logits[:, :-1].float(), -1)  # (W, T-1, V)
        lp = torch.cat(ref).float()
        kl = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).sum(1).double().numpy()
        h_q = -(lq.exp() * lq).sum(-1).sum(1).double().numpy()
    assert kl.min() > 0, "a 3 bpw plan moves the tiny model's predictions"
    np.testing.assert_allclose(s["kl"], kl, rtol=1e-4)
    np.testing.assert_allclose(s["h_q"], h_q, rtol=1e-4)

    m = paired_eval.split_means(s, fp16_nll, tokens)
    n = len(windows) * tokens
    assert m["d_nll"] == pytest.approx((q_nll - fp16_nll).sum() / n)
    assert m["kl"] == pytest.approx(kl.sum() / n, rel=1e-4)
    assert m["d_nll"] == pytest.approx(m["kl"] + m["c"])
    assert m["d_entropy"] == pytest.approx((s["h_q"] - s["h_p"]).sum() / n)


def test_fisher_pairs_script_solves_with_and_without_the_pairs(monkeypatch, tiny_profile_path, tmp_path):
    """experiments/fisher_pairs.py on the tiny Llama: projections cached as safetensors, three
    plans per budget within it, the exact MILP's quadratic objective no worse than the separable
    plan's under the same pair terms, and a second run reusing the projections."""
    import json

    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    sys.modules.pop("fisher_pairs", None)
    import fisher_pairs

    args = ["--profile", str(tiny_profile_path), "--rows", "4", "--budgets", "3bpw", "--time-limit", "60",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    assert fisher_pairs.main(args) == 0
    assert (tmp_path / "work" / "projections-r4-s0.safetensors").is_file()
    summary = json.loads((tmp_path / "out" / "fisher-pairs.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"separable", "fisher-qp", "fisher-qp-raw"}
    assert all(r["bpw"] <= 3.0 + 1e-9 for r in rows.values())
    assert summary["projections"]["rows"] == 4 and summary["shrunk"]["terms"] > 0
    if rows["fisher-qp"]["status"] == "optimal":
        assert rows["fisher-qp"]["objective"] <= rows["separable"]["objective"] + 1e-9
    alloc = json.loads((tmp_path / "out" / "allocations-fisher-pairs.json").read_text())
    assert set(alloc["plans"]) == {"separable-3bpw", "fisher-qp-3bpw", "fisher-qp-raw-3bpw"}
    again = json.loads((tmp_path / "work" / "projections-r4-s0.json").read_text())["seconds"]
    assert fisher_pairs.main(args) == 0  # the cached projections: same summary numbers
    summary2 = json.loads((tmp_path / "out" / "fisher-pairs.json").read_text())
    assert summary2["projections"]["seconds"] == again and summary2["shrunk"] == summary["shrunk"]


def test_select_text_script_measures_every_candidate_and_reproduces_the_run_selection(monkeypatch, tmp_path):
    """experiments/select_text.py on the tiny Llama with a Fisher table (several candidate
    calibrations): one row per distinct candidate plan, every text's loss change measured, and
    its ``kl_cal`` rule picks the plan the run's own selection (select_plan on
    selection_fitness, same rows) picks."""
    import json

    import bitalloc
    from bitalloc.allocator.candidates import candidate_tables, select_plan

    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    sys.modules.pop("select_text", None)
    import select_text

    path = tmp_path / "profile.json"
    prof = bitalloc.profile("random:llama-tiny", n_samples=4, seq_len=32, kl_samples=1, fisher_table=True, out=path,
                            progress=False, log=None)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(TEXT)
    (data / "b.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    out = tmp_path / "select.json"
    args = ["--profile", str(path), "--out", str(out), "--budgets", "3bpw,5bpw", "--data", str(data), "--windows", "2",
            "--seq-len", "16", "--select-rows", "2", "--gen-rows", "2"]
    assert select_text.main([*args, "--text", "a.txt", "--text", "b.txt"]) == 0
    res = json.loads(out.read_text())
    n_tables = len(candidate_tables(prof))
    assert n_tables > 1
    for b in ("3bpw", "5bpw"):
        rows = [r for r in res["rows"] if r["budget"] == b]
        assert rows and sum(len(r["tables"]) for r in rows) == n_tables  # each table's plan, measured once
        assert all(r["kl_cal"] >= 0 and r["kl_gen"] >= 0 and {"dnll_a", "dnll_b"} <= set(r) for r in rows)
        plan = select_plan(prof, b, bitalloc.selection_fitness("random:llama-tiny", path, rows=2), ties=False)
        assert plan.solver["select"]["chosen"] in res["choices"][b]["kl_cal"]["tables"]
    assert select_text.main([*args, "--text", "missing.txt"]) == 2


def test_peers_table_keeps_each_sources_provenance_and_merges_the_allocations_beside(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    sys.modules.pop("peers_table", None)
    import peers_table

    def run(name, method, layers, schemes, profile):
        d = tmp_path / name
        d.mkdir()
        row = {"method": method, "budget": "4bpw", "bpw": 4.0, "ppl": 30.0, "kl": 0.1, "other_ppl": 45.0, "other_kl": 0.1}
        (d / "results.json").write_text(json.dumps({
            "schema": "bitalloc.peers-benchmark/1", "eval": {"windows": 2, "seq_len": 32, "other_windows": 2},
            "fp16_ppl": 28.0, "profile": {"path": profile}, "settings": {"seed": 0}, "rows": [row]}))
        (d / "allocations.json").write_text(json.dumps({"schema": "bitalloc.allocations/1", "layers": layers, "plans": {
            f"{method}-4bpw": {"budget": "4bpw", "schemes": schemes}}}))
        return d / "results.json"

    a = run("a", "bitalloc-default", ["l0", "l1"], ["w4", "w8"], "/p/a.json")
    b = run("b", "exllamav3", ["l1", "l2"], ["w3", "w4"], "/p/b.json")
    out = tmp_path / "results-merged.json"
    assert peers_table.main([str(a), f"{b}:exllamav3=exl3", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(s["file"], s["profile"]["path"]) for s in doc["sources"]] == [(str(a), "/p/a.json"), (str(b), "/p/b.json")]
    assert {r["method"] for r in doc["rows"]} == {"bitalloc-default", "exl3"}
    alloc = json.loads((tmp_path / "allocations-merged.json").read_text())
    assert alloc["layers"] == ["l0", "l1", "l2"]
    assert alloc["plans"]["bitalloc-default-4bpw"]["schemes"] == ["w4", "w8", None]
    assert alloc["plans"]["exl3-4bpw"]["schemes"] == [None, "w3", "w4"]
