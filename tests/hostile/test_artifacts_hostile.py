"""Hostile measured checkpoints (through ``bitalloc profile --measured``), hostile saved
quantized models (``load_quantized``), measured values checked as they arrive, and a few
checks of the installed ``bitalloc`` command in a subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitalloc import BitallocError
from bitalloc.allocator.cli import main

from hostile_util import assert_one_error, snapshot

MEASURED = ["profile", "--model", "random:llama-tiny", "--schemes", "w2g32z,w4g32", "--ref-schemes", "w2g32z",
            "--n-samples", "2", "--seq-len", "16", "--kl-samples", "1", "--measured",
            "--include", "*.layers.0.self_attn.*"]


def _item_line(text: str, fn) -> str:
    lines = text.splitlines()
    rec = json.loads(lines[1])
    lines[1] = fn(rec)
    return "\n".join(lines) + "\n"


CHECKPOINT = [
    ("ckpt-nan", lambda t: _item_line(t, lambda r: json.dumps({**r, "values": {"kl": math.nan}})), "is not a finite number"),
    ("ckpt-infinity", lambda t: _item_line(t, lambda r: json.dumps({**r, "values": {"kl": math.inf}})), "is not a finite number"),
    ("ckpt-value-string", lambda t: _item_line(t, lambda r: json.dumps({**r, "values": {"kl": "0.1"}})), "not an item record"),
    ("ckpt-value-bool", lambda t: _item_line(t, lambda r: json.dumps({**r, "values": {"kl": True}})), "not an item record"),
    ("ckpt-no-values", lambda t: _item_line(t, lambda r: json.dumps({"layer": r["layer"], "scheme": r["scheme"]})),
     "not an item record"),
    ("ckpt-extra-field", lambda t: _item_line(t, lambda r: json.dumps({**r, "evil": 1})), "not an item record"),
    ("ckpt-layer-number", lambda t: _item_line(t, lambda r: json.dumps({**r, "layer": 3})), "not an item record"),
    ("ckpt-deep-line", lambda t: _item_line(t, lambda r: "[" * 100_000), "not valid JSON"),
    ("ckpt-garbage-header", lambda t: "garbage\n" + t.split("\n", 1)[1], "no valid header line"),
    ("ckpt-header-edited", lambda t: t.replace('"kl_stride": 2', '"kl_stride": 3', 1), "header was edited"),
]


@pytest.mark.parametrize("case", CHECKPOINT, ids=[c[0] for c in CHECKPOINT])
def test_hostile_checkpoint(case, ws, capsys):
    _, mutate, match = case
    m = ws / "measured"
    for f in ("mprof.json", "mprof.arrays.safetensors"):
        (m / f).unlink()  # the profile is re-made from the (damaged) checkpoint
    ck = m / "mprof.measure-checkpoint.jsonl"
    ck.write_text(mutate(ck.read_text()))
    before = snapshot(ws)
    capsys.readouterr()
    rc = main(["--quiet", *MEASURED, "--out", str(m / "mprof.json")])
    err = capsys.readouterr().err
    line = assert_one_error(rc, err, match)
    if case[0] in ("ckpt-nan", "ckpt-infinity"):
        assert "model.layers.0.self_attn" in line  # the item is named
    assert snapshot(ws) == before, "the checkpoint or an output changed"


def test_nan_measurement_is_never_merged():
    """A NaN arriving from a worker is an error naming the item; nothing is recorded."""
    from bitalloc.sensitivity.runner import RunnerError, run_items

    seen = []

    class Ctx:
        def evaluate(self, fqn, scheme):
            return {"kl": math.nan if scheme == "w2" else 0.5}

        def info(self):
            return {}

    with pytest.raises(RunnerError, match=r"layer 'b', scheme 'w2'.*not a finite number"):
        run_items(None, [("a", "w4"), ("b", "w2"), ("c", "w4")], context=Ctx(), progress=False,
                  on_result=lambda k, v: seen.append(k), log_fn=lambda m: None)
    assert seen == [("a", "w4")]


def _edit(path: Path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


QUANTIZED = [
    ("q-envelope-deep", lambda q: (q / "quantized.json").write_text("[" * 100_000), "nested too deeply"),
    ("q-envelope-nan", lambda q: (q / "quantized.json").write_text(
        (q / "quantized.json").read_text().replace('"packed_weight_bytes": ', '"packed_weight_bytes": NaN, "x": ', 1)), "NaN"),
    ("q-envelope-not-json", lambda q: (q / "quantized.json").write_text("{"), "is not valid JSON"),
    ("q-packed-string", lambda q: _edit(q / "quantized.json", lambda d: d.update(packed_weight_bytes="12")), "packed_weight_bytes"),
    ("q-unknown-field", lambda q: _edit(q / "quantized.json", lambda d: d.update(surprise=1)), "surprise"),
    ("q-alias-number", lambda q: _edit(q / "quantized.json", lambda d: d["aliases"].update(a=1)), "aliases.a"),
    ("q-sha-not-hex", lambda q: _edit(q / "quantized.json", lambda d: d["safetensors"].update(sha256="x")), "safetensors.sha256"),
    ("q-schema", lambda q: _edit(q / "quantized.json", lambda d: d.update(schema="bitalloc.quantized/0")), "bitalloc.quantized/0"),
    ("q-spec-missing", lambda q: _edit(q / "quantized.json", lambda d: d.pop("spec")), "spec"),
    ("q-tensors-truncated", lambda q: (q / "model.safetensors").write_bytes((q / "model.safetensors").read_bytes()[:100]),
     "checksum"),
    ("q-plan-deep", lambda q: (q / "plan.json").write_text("{\"a\":" * 50_000), "nested too deeply"),
    ("q-plan-missing", lambda q: (q / "plan.json").unlink(), "plan.json is missing"),
]


@pytest.mark.parametrize("case", QUANTIZED, ids=[c[0] for c in QUANTIZED])
def test_hostile_quantized_model(case, ws):
    from bitalloc.allocator.quantized_io import load_quantized

    _, mutate, match = case
    mutate(ws / "qmodel")
    before = snapshot(ws)
    with pytest.raises(BitallocError) as e:
        load_quantized(ws / "qmodel")
    msg = str(e.value)
    assert "\n" not in msg and match in msg, msg
    assert snapshot(ws) == before


def _cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "bitalloc.allocator.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_subprocess_argparse_error_is_one_line(tmp_path):
    r = _cli("solve", "--budget", cwd=tmp_path)
    assert_one_error(r.returncode, r.stderr, "--budget")
    assert r.stdout == ""


def test_subprocess_out_equal_to_input_is_refused(ws):
    before = snapshot(ws)
    r = _cli("solve", ws / "profile.json", "--budget", "4bpw", "--out", ws / "profile.json", cwd=ws)
    assert_one_error(r.returncode, r.stderr, "is also an input")
    assert snapshot(ws) == before


def test_subprocess_debug_shows_the_traceback(ws):
    (ws / "bad.json").write_text("[" * 100_000)
    r = _cli("--debug", "solve", ws / "bad.json", "--budget", "4bpw", "--out", ws / "x.json", cwd=ws)
    assert r.returncode != 0 and "Traceback" in r.stderr and "nested too deeply" in r.stderr
