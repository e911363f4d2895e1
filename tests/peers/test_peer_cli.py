"""`bitalloc peer`: a peer's plans from a profile, through the real CLI entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_profile_path(tmp_path_factory):
    import bitalloc

    path = tmp_path_factory.mktemp("peercli") / "profile.json"
    bitalloc.profile("random:llama-tiny", n_samples=4, seq_len=32, kl_samples=1, out=path,
                     schemes=["w2g32z", "w3g32z", "w4g32z", "w8"], progress=False, log=None)
    return path


@pytest.mark.parametrize("method,extra", [("exllamav2", []), ("bitalloc", ["--refine", "4"]),
                                          ("evopress", ["--generations", "2", "--offspring", "3"]),
                                          ("uniform", [])])
def test_peer_writes_plans_within_budget(tiny_profile_path, tmp_path, method, extra, capsys):
    from bitalloc.allocator.cli import main

    out = tmp_path / "plans"
    rc = main(["--quiet", "peer", method, "--profile", str(tiny_profile_path), "--budget", "4.5bpw",
               "--budget", "6bpw", "--out", str(out), "--rows", "2", *extra])
    assert rc == 0, capsys.readouterr().err
    for b in ("4.5bpw", "6bpw"):
        plan = json.loads((out / f"{method}-{b}.json").read_text())
        if method == "uniform":  # the nearest uniform format not below the budget, by design
            assert len({lp["scheme"] for lp in plan["layers"].values()}) == 1
            continue
        assert plan["predicted"]["bpw"] <= float(b[:-3]) + 1e-9, plan["predicted"]
        if method == "bitalloc":
            assert plan["solver"]["refine"]["evaluations"] <= 4 + 1
        elif method != "uniform":
            assert plan["solver"]["method"] == method


def test_peer_exllamav3_measures_once_per_base(tiny_profile_path, tmp_path, capsys):
    """--base per-budget (the default): each budget's plan starts from its own base, and a
    base shared by two budgets is measured once."""
    import numpy as np

    from bitalloc.allocator import api
    from bitalloc.allocator.arrays import n_weights
    from bitalloc.allocator.cli import main

    prof = api.load_profile(tiny_profile_path)
    bpw = np.asarray(prof.cost_bits).sum(axis=0) / n_weights(prof)  # (S,) each uniform plan's bpw
    w3, w4 = bpw[prof.schemes.index("w3g32z")], bpw[prof.schemes.index("w4g32z")]
    budgets = [f"{w3 + (w4 - w3) / 3:.4f}bpw", f"{w3 + 2 * (w4 - w3) / 3:.4f}bpw", "9bpw"]  # two above w3, one above w8
    out = tmp_path / "plans"
    rc = main(["peer", "exllamav3", "--profile", str(tiny_profile_path), *[x for b in budgets for x in ("--budget", b)],
               "--out", str(out), "--rows", "1"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert printed.count("exllamav3 (base w3g32z)") == 1 and printed.count("exllamav3 (base w8)") == 1, printed
    bases = [json.loads((out / f"exllamav3-{api.parse_budget(b).name}.json").read_text())["solver"]["peer"]
             ["score_settings"]["base"] for b in budgets]
    assert bases == ["w3g32z", "w3g32z", "w8"], bases
    rc = main(["peer", "exllamav3", "--profile", str(tiny_profile_path), "--budget", "9bpw", "--out", str(out),
               "--rows", "1", "--base", "lowest"])
    assert rc == 0 and "exllamav3 (base w2g32z)" in capsys.readouterr().out


def test_peer_bad_input_is_one_line(tiny_profile_path, tmp_path, capsys):
    from bitalloc.allocator.cli import main

    rc = main(["peer", "hawq-v3", "--profile", str(tiny_profile_path), "--budget", "lots", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "budget" in err.lower(), err
    rc = main(["peer", "nosuch", "--profile", str(tiny_profile_path), "--budget", "4bpw", "--out", str(tmp_path)])
    assert rc == 2 and "invalid choice" in capsys.readouterr().err
    for method, base in (("exllamav3", "w5"), ("higgs", "w8")):
        rc = main(["peer", method, "--profile", str(tiny_profile_path), "--budget", "4bpw", "--out", str(tmp_path),
                   "--base", base])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "--base" in err, err


def test_peer_on_a_gptq_profile_quantizes_with_its_hessians(tmp_path, capsys):
    """A gptq profile's peer scores quantize with GPTQ on the Hessians the profile recorded
    (found beside the profile after a move); without them, one line names what is missing."""
    import shutil

    import bitalloc
    from bitalloc.allocator.cli import main

    first = tmp_path / "made"
    prof = bitalloc.profile("random:llama-tiny", n_samples=4, seq_len=32, kl_samples=1, quantizer="gptq",
                            out=first / "profile.json", schemes=["w2g32z", "w4g32z", "w8"], progress=False, log=None)
    hess = prof.metadata["hessians"]["path"]
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    rc = main(["--quiet", "peer", "higgs", "--profile", str(moved / "profile.json"), "--budget", "5bpw",
               "--out", str(tmp_path / "plans"), "--rows", "1"])
    assert rc == 0, capsys.readouterr().err
    plan = json.loads((tmp_path / "plans" / "higgs-5bpw.json").read_text())
    assert plan["solver"]["method"] == "higgs"
    (moved / Path(hess).name).unlink()
    rc = main(["peer", "higgs", "--profile", str(moved / "profile.json"), "--budget", "5bpw",
               "--out", str(tmp_path / "plans2"), "--rows", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Hessian" in err, err


def test_peer_refuses_a_calibration_text_that_changed(tmp_path, capsys):
    """The peer scores run on the profile's own calibration rows, rebuilt from its text file and
    checked against the hash the profile recorded: an edited text is one line, exit 2, before
    any score is computed."""
    import bitalloc
    from bitalloc.allocator.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and more{i % 13}." for i in range(3000)))
    path = tmp_path / "profile.json"
    bitalloc.profile("random:llama-tiny", calibration=str(text), n_samples=4, seq_len=32, kl_samples=1, out=path,
                     schemes=["w3g32z", "w8"], progress=False, log=None)
    rc = main(["--quiet", "peer", "higgs", "--profile", str(path), "--budget", "5bpw", "--out", str(tmp_path / "a"),
               "--rows", "1"])
    assert rc == 0, capsys.readouterr().err
    text.write_text(text.read_text().replace(" and ", " or "))
    # a fresh process, as a user runs it: stderr is that one line, without the import-time notes
    # of the libraries transformers pulls in (torchao's CUDA-only extensions, torch deprecations)
    r = subprocess.run([sys.executable, "-m", "bitalloc.allocator.cli", "peer", "higgs", "--profile", str(path),
                        "--budget", "5bpw", "--out", str(tmp_path / "b"), "--rows", "1"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("bitalloc: error: ") and "calibration tokens cannot be reproduced" in r.stderr
    assert not (tmp_path / "b").exists()
