"""`bitalloc peer`: a peer's plans from a profile, through the real CLI entry point."""

from __future__ import annotations

import json

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


def test_peer_bad_input_is_one_line(tiny_profile_path, tmp_path, capsys):
    from bitalloc.allocator.cli import main

    rc = main(["peer", "hawq-v3", "--profile", str(tiny_profile_path), "--budget", "lots", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "budget" in err.lower(), err
    rc = main(["peer", "nosuch", "--profile", str(tiny_profile_path), "--budget", "4bpw", "--out", str(tmp_path)])
    assert rc == 2 and "invalid choice" in capsys.readouterr().err
