"""Shared, session-scoped artifacts for the hostile-input suite (random:llama-tiny: plumbing only).

Each test gets a fresh workspace folder holding copies of valid files (a profile with its
sidecar, a plan, a calibration text, a run config); the tests break one thing, run the
CLI in-process, and check the exit code, the single ``bitalloc: error:`` line and that no
file of the workspace changed, appeared or vanished.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SCHEMES = ["w2g32z", "w4g32", "fp16"]


@pytest.fixture(scope="session")
def golden(tmp_path_factory):
    """Valid artifacts, made once: profile (+ sidecar), plan, measured checkpoint, saved model."""
    import bitalloc
    from bitalloc.allocator.cli import main

    d = tmp_path_factory.mktemp("golden")
    bitalloc.profile("random:llama-tiny", schemes=SCHEMES, ref_schemes=["w2g32z"], n_samples=2, seq_len=16,
                     kl_samples=1, out=d / "profile.json", progress=False, log=None)
    assert main(["--quiet", "solve", str(d / "profile.json"), "--budget", "4bpw", "--out", str(d / "plan.json")]) == 0
    (d / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (d / "config.toml").write_text('[model]\nspec = "random:llama-tiny"\n[eval]\nbaselines = true\n')
    m = d / "measured"
    m.mkdir()
    assert main(["--quiet", "profile", "--model", "random:llama-tiny", "--schemes", "w2g32z,w4g32",
                 "--ref-schemes", "w2g32z", "--n-samples", "2", "--seq-len", "16", "--kl-samples", "1",
                 "--measured", "--include", "*.layers.0.self_attn.*", "--out", str(m / "mprof.json")]) == 0
    q = d / "qmodel"
    assert main(["--quiet", "apply", "--model", "random:llama-tiny", "--plan", str(d / "plan.json"),
                 "--out", str(q)]) == 0
    return d


@pytest.fixture
def ws(golden, tmp_path):
    """A workspace with copies of the golden files."""
    for f in golden.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
        else:
            shutil.copytree(f, tmp_path / f.name)
    return tmp_path
