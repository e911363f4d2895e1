"""Hostile input against every command, file kind and config section (issue 12).

Every case: exit code 2, exactly one ``bitalloc: error: ...`` line naming what is wrong,
no traceback, and the workspace (inputs and earlier outputs) byte-for-byte unchanged with
no file added or removed. The CLI runs in-process (``bitalloc.allocator.cli.main``).
"""

from __future__ import annotations

import json
import os
import struct

import pytest

from hostile_util import assert_one_error, run_main, snapshot

P, PLAN, CAL, CFG, Q = "profile.json", "plan.json", "calib.txt", "config.toml", "qmodel"
M = "random:llama-tiny"


def edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def setitem(path_keys, value):
    def fn(d):
        o = d
        for k in path_keys[:-1]:
            o = o[k]
        o[path_keys[-1]] = value
    return fn


def delitem(*keys):
    def fn(d):
        o = d
        for k in keys[:-1]:
            o = o[k]
        del o[keys[-1]]
    return fn


def raw(name, text):
    def prep(ws):
        (ws / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return prep


def jedit(name, fn):
    def prep(ws):
        edit_json(ws / name, fn)
    return prep


def solve(*extra, out="new-plan.json"):
    return lambda ws: ["solve", str(ws / P), "--budget", "4bpw", "--out", str(ws / out), *extra]


def apply_cmd(*extra, out="new-q"):
    return lambda ws: ["apply", "--model", M, "--plan", str(ws / PLAN), "--out", str(ws / out), *extra]


def profile_cmd(*extra, out="new-profile.json"):
    return lambda ws: ["profile", "--model", M, "--n-samples", "2", "--seq-len", "16", "--kl-samples", "1",
                       "--schemes", "w2g32z,w4g32", "--ref-schemes", "w2g32z", "--out", str(ws / out), *extra]


def run_cmd(toml):
    def argv(ws):
        (ws / "bad.toml").write_text(toml) if isinstance(toml, str) else (ws / "bad.toml").write_bytes(toml)
        return ["run", str(ws / "bad.toml"), "--out-dir", str(ws / "run-out")]
    return argv


def first_layer(d):
    return d["layers"][0]


def _plan_layer(fn):
    def f(d):
        fn(d["layers"][next(iter(d["layers"]))])
    return f


# (id, prepare the workspace (or None), argv from the workspace, substring of the error line)
PROFILE_FILE = [
    ("not-json", raw(P, "{not json"), solve(), "is not valid JSON"),
    ("empty-file", raw(P, ""), solve(), "is not valid JSON"),
    ("deep-brackets", raw(P, "[" * 100_000), solve(), "nested too deeply"),
    ("deep-objects", raw(P, '{"a":' * 50_000), solve(), "nested too deeply"),
    ("deep-but-parsable", jedit(P, setitem(["metadata", "x"], json.loads("[" * 80 + "]" * 80))), solve(), "nested too deeply"),
    ("binary-garbage", raw(P, bytes(range(256)) * 50), solve(), "not UTF-8"),
    ("top-level-array", raw(P, "[1, 2, 3]"), solve(), "must be a JSON object"),
    ("top-level-string", raw(P, '"profile"'), solve(), "must be a JSON object"),
    ("nan-literal", lambda ws: (ws / P).write_text((ws / P).read_text().replace('"proxy": [[', '"proxy": [[NaN, ', 1)), solve(), "NaN"),
    ("infinity-literal", lambda ws: (ws / P).write_text((ws / P).read_text().replace('"scales": [', '"scales": [Infinity, ', 1)), solve(), "Infinity"),
    ("schema-missing", jedit(P, delitem("schema")), solve(), "field 'schema'"),
    ("schema-unknown", jedit(P, setitem(["schema"], "bitalloc.profile/99")), solve(), "bitalloc.profile/99"),
    ("schema-number", jedit(P, setitem(["schema"], 2)), solve(), "field 'schema'"),
    ("ref-schemes-number", jedit(P, setitem(["ref_schemes"], 3)), solve(), "ref_schemes"),
    ("schemes-string", jedit(P, setitem(["schemes"], "w4g32")), solve(), "schemes"),
    ("schemes-empty", jedit(P, setitem(["schemes"], [])), solve(), "schemes"),
    ("layers-empty", jedit(P, setitem(["layers"], [])), solve(), "layers"),
    ("layers-item-number", jedit(P, setitem(["layers", 0], 7)), solve(), "layers[0]"),
    ("layer-negative-out", jedit(P, lambda d: first_layer(d).update(out_features=-64)), solve(), "layers[0].out_features"),
    ("layer-string-in", jedit(P, lambda d: first_layer(d).update(in_features="64")), solve(), "layers[0].in_features"),
    ("layer-module-type", jedit(P, lambda d: first_layer(d).update(module_type="Conv2d")), solve(), "layers[0].module_type"),
    ("layer-extra-field", jedit(P, lambda d: first_layer(d).update(evil=1)), solve(), "layers[0].evil"),
    ("layer-n-params", jedit(P, lambda d: first_layer(d).update(n_params=1)), solve(), "n_params"),
    ("layer-bias-string", jedit(P, lambda d: first_layer(d).update(bias="no")), solve(), "layers[0].bias"),
    ("unknown-top-field", jedit(P, setitem(["surprise"], 1)), solve(), "surprise"),
    ("missing-tables", jedit(P, delitem("tables")), solve(), "tables"),
    ("tables-list", jedit(P, setitem(["tables"], [[0.0]])), solve(), "tables"),
    ("tables-short-row", jedit(P, lambda d: d["tables"]["all"][0].pop()), solve(), "tables.all"),
    ("tables-string-cell", jedit(P, lambda d: d["tables"]["all"][0].__setitem__(0, "0.1")), solve(), "tables.all"),
    ("cost-negative", jedit(P, lambda d: d["cost_bits"][0].__setitem__(0, -5)), solve(), "cost_bits[0][0]"),
    ("cost-float", jedit(P, lambda d: d["cost_bits"][0].__setitem__(0, 1.5)), solve(), "cost_bits[0][0]"),
    ("cost-bool", jedit(P, lambda d: d["cost_bits"][0].__setitem__(0, True)), solve(), "cost_bits[0][0]"),
    ("cost-huge", jedit(P, lambda d: d["cost_bits"][0].__setitem__(0, 10**40)), solve(), "cost_bits"),
    ("other-bits-string", jedit(P, setitem(["other_bits"], "123")), solve(), "other_bits"),
    ("scales-string", jedit(P, lambda d: d["scales"].__setitem__(0, "x")), solve(), "scales[0]"),
    ("scheme-invalid", jedit(P, lambda d: d["schemes"].__setitem__(0, "w9q")), solve(), "w9q"),
    ("scheme-duplicate", jedit(P, lambda d: d["schemes"].__setitem__(1, d["schemes"][0])), solve(), "duplicates"),
    ("layer-duplicate", jedit(P, lambda d: d["layers"].__setitem__(1, d["layers"][0])), solve(), "duplicate"),
    ("ref-not-scheme", jedit(P, setitem(["ref_schemes"], ["w8"])), solve(), "w8"),
    ("fingerprint-not-hex", jedit(P, setitem(["model", "fingerprint", "sha256"], "zz")), solve(), "model.fingerprint.sha256"),
    ("sidecar-missing", lambda ws: (ws / "profile.arrays.safetensors").unlink(), solve(), "sidecar"),
    ("sidecar-edited", lambda ws: (ws / "profile.arrays.safetensors").write_bytes(
        (ws / "profile.arrays.safetensors").read_bytes()[:-8] + b"\0" * 8), solve(), "sha256"),
    ("sidecar-path-traversal", jedit(P, setitem(["arrays", "file"], "../etc.safetensors")), solve(), "arrays.file"),
    ("sidecar-sha-not-hex", jedit(P, setitem(["arrays", "sha256"], "abc")), solve(), "arrays.sha256"),
    ("inline-and-sidecar", jedit(P, setitem(["saliency"], {})), solve(), "saliency"),
    ("oversized-sparse", lambda ws: os.truncate(ws / P, (1 << 30) + 1), solve(), "bytes"),
    ("profile-is-directory", lambda ws: (ws / "pdir.json").mkdir(),
     lambda ws: ["solve", str(ws / "pdir.json"), "--budget", "4bpw", "--out", str(ws / "x.json")], "not a regular file"),
    ("profile-missing", None, lambda ws: ["solve", str(ws / "nope.json"), "--budget", "4bpw", "--out", str(ws / "x.json")],
     "does not exist"),
    ("profile-dev-zero", None, lambda ws: ["solve", "/dev/zero", "--budget", "4bpw", "--out", str(ws / "x.json")],
     "not a regular file"),
]

PLAN_FILE = [
    ("plan-not-json", raw(PLAN, "{oops"), apply_cmd(), "is not valid JSON"),
    ("plan-deep", raw(PLAN, "[" * 100_000), apply_cmd(), "nested too deeply"),
    ("plan-nan-loss", lambda ws: (ws / PLAN).write_text((ws / PLAN).read_text().replace('"loss": {', '"loss": {"z": NaN, ', 1)),
     apply_cmd(), "NaN"),
    ("plan-schema", jedit(PLAN, setitem(["schema"], "bitalloc.plan/7")), apply_cmd(), "bitalloc.plan/7"),
    ("plan-no-schema", jedit(PLAN, delitem("schema")), apply_cmd(), "schema"),
    ("plan-missing-layers", jedit(PLAN, delitem("layers")), apply_cmd(), "field 'layers'"),
    ("plan-layers-list", jedit(PLAN, setitem(["layers"], [])), apply_cmd(), "field 'layers'"),
    ("plan-bits-string", jedit(PLAN, _plan_layer(lambda lp: lp.update(bits="4096"))), apply_cmd(), ".bits"),
    ("plan-shape-3", jedit(PLAN, _plan_layer(lambda lp: lp.update(shape=[1, 2, 3]))), apply_cmd(), ".shape"),
    ("plan-shape-negative", jedit(PLAN, _plan_layer(lambda lp: lp.update(shape=[-64, 64]))), apply_cmd(), ".shape"),
    ("plan-bits-wrong", jedit(PLAN, _plan_layer(lambda lp: lp.update(bits=lp["bits"] + 1))), apply_cmd(), "bits recorded"),
    ("plan-scheme-invalid", jedit(PLAN, _plan_layer(lambda lp: lp.update(scheme="w7q"))), apply_cmd(), "w7q"),
    ("plan-unknown-field", jedit(PLAN, setitem(["extra"], True)), apply_cmd(), "extra"),
    ("plan-rule-short", jedit(PLAN, setitem(["rules"], [["*"]])), apply_cmd(), "rules[0]"),
    ("plan-rule-bad-regex", jedit(PLAN, setitem(["rules"], [["re:(", "w4g32"]])), apply_cmd(), "regular expression"),
    ("plan-default-invalid", jedit(PLAN, setitem(["default"], "w1x")), apply_cmd(), "default"),
    ("plan-high-idx-negative", jedit(PLAN, _plan_layer(lambda lp: lp.update(high_idx=[-1]))), apply_cmd(), ".high_idx"),
    ("plan-top-array", raw(PLAN, "[]"), apply_cmd(), "not a bitalloc plan"),
    ("plan-loss-string", jedit(PLAN, _plan_layer(lambda lp: lp.update(loss={"all": "small"}))), apply_cmd(), ".loss.all"),
]

FLAGS = [
    ("budget-garbage", None, lambda ws: ["solve", str(ws / P), "--budget", "lots", "--out", str(ws / "x.json")], "lots"),
    ("budget-zero", None, lambda ws: ["solve", str(ws / P), "--budget", "0bpw", "--out", str(ws / "x.json")], "0bpw"),
    ("budget-too-small", None, lambda ws: ["solve", str(ws / P), "--budget", "0.5bpw", "--out", str(ws / "x.json")],
     "below the smallest"),
    ("pin-bad-regex", None, solve("--pin", "re:(=w4g32"), "not a valid regular expression"),
    ("pin-no-equals", None, solve("--pin", "model.layers.0.*"), "PATTERN=SCHEME"),
    ("pin-unknown-scheme", None, solve("--pin", "*=w8"), "w8"),
    ("pin-matches-nothing", None, solve("--pin", "nothing.*=w4g32"), "matches no layer"),
    ("pin-conflict", None, solve("--pin", "*q_proj=w4g32", "--pin", "*q_proj=fp16"), "pinned to both"),
    ("forbid-all-repeated", None, solve(*[a for s in ("w2g32z", "w4g32", "fp16")
                                          for a in ("--forbid", f"model.layers.0.self_attn.q_proj={s}")]),
     "no scheme left for layer model.layers.0.self_attn.q_proj"),
    ("forbid-bad-regex", None, solve("--forbid", "re:[=w4g32"), "not a valid regular expression"),
    ("schemes-unknown", None, solve("--schemes", "w4g32,w5x"), "w5x"),
    ("group-weight-malformed", None, solve("--group-weight", "all"), "GROUP=NUMBER"),
    ("group-weight-unknown", None, solve("--group-weight", "nope=2"), "nope"),
    ("group-weight-nan", None, solve("--group-weight", "all=nan"), "all"),
    ("time-limit-text", None, solve("--time-limit", "soon"), "--time-limit"),
    ("method-unknown", None, solve("--method", "magic"), "magic"),
    ("unknown-flag", None, solve("--frobnicate"), "--frobnicate"),
    ("no-command", None, lambda ws: [], "COMMAND"),
    ("unknown-command", None, lambda ws: ["explode"], "explode"),
    ("solve-out-is-profile", None, lambda ws: ["solve", str(ws / P), "--budget", "4bpw", "--out", str(ws / P)],
     "is also an input"),
    ("solve-out-is-sidecar", None, lambda ws: ["solve", str(ws / P), "--budget", "4bpw", "--out",
                                               str(ws / "profile.arrays.safetensors")], "is also an input"),
    ("solve-out-exists", None, lambda ws: ["solve", str(ws / P), "--budget", "4bpw", "--out", str(ws / PLAN)],
     "--overwrite"),
    ("solve-out-under-file", None, lambda ws: ["solve", str(ws / P), "--budget", "4bpw", "--out", str(ws / CAL / "p.json")],
     "not a directory"),
    ("solve-out-is-dir", None, lambda ws: ["solve", str(ws / P), "--budget", "4bpw", "--out", str(ws / Q)], "is a directory"),
    ("sweep-existing-plan", lambda ws: (ws / "plans").mkdir() or (ws / "plans" / "plan-4bpw.json").write_text("{}"),
     lambda ws: ["sweep", str(ws / P), "--budgets", "3bpw,4bpw", "--out-dir", str(ws / "plans")], "--overwrite"),
    ("sweep-out-dir-is-file", None, lambda ws: ["sweep", str(ws / P), "--budgets", "4bpw", "--out-dir", str(ws / CAL)],
     "not a directory"),
    ("sweep-budget-garbage", None, lambda ws: ["sweep", str(ws / P), "--budgets", "4bpw,xyz", "--out-dir", str(ws / "pl")],
     "xyz"),
    ("apply-out-existing-model", None, apply_cmd(out=Q), "--overwrite"),
    ("apply-out-is-plan", None, lambda ws: ["apply", "--model", M, "--plan", str(ws / PLAN), "--out", str(ws / PLAN)],
     "is also an input"),
    ("apply-plan-missing", None, lambda ws: ["apply", "--model", M, "--plan", str(ws / "none.json"), "--out", str(ws / "o")],
     "does not exist"),
    ("eval-plan-missing", None, lambda ws: ["eval", "--model", M, "--plan", str(ws / "none.json")], "does not exist"),
    ("eval-windows-text", None, lambda ws: ["eval", "--model", M, "--windows", "many"], "--windows"),
]

PROFILE_CMD = [
    ("profile-out-is-calib", None, lambda ws: profile_cmd("--calib", str(ws / CAL), out=CAL)(ws), "is also an input"),
    ("profile-out-exists", None, profile_cmd(out=P), "--overwrite"),
    ("profile-out-under-file", None, profile_cmd(out=f"{CAL}/p.json"), "not a directory"),
    ("profile-scheme-invalid", None, lambda ws: profile_cmd()(ws) + ["--schemes", "w9"], "w9"),
    ("profile-ref-not-scheme", None, lambda ws: profile_cmd()(ws) + ["--ref-schemes", "w8"], "w8"),
    ("profile-include-bad-regex", None, profile_cmd("--include", "re:["), "not a valid regular expression"),
    ("profile-exclude-bad-regex", None, profile_cmd("--exclude", "re:(?P<"), "not a valid regular expression"),
    ("profile-n-samples-zero", None, profile_cmd("--n-samples", "0"), "n_samples"),
    ("profile-seq-len-one", None, profile_cmd("--seq-len", "1"), "seq_len"),
    ("profile-kl-stride-zero", None, profile_cmd("--kl-stride", "0"), "kl_stride"),
    ("profile-n-samples-text", None, profile_cmd("--n-samples", "eight"), "--n-samples"),
    ("profile-calib-missing", None, lambda ws: profile_cmd("--calib", str(ws / "nope.txt"))(ws), "no such file"),
    ("profile-pairs-unmeasured", None, profile_cmd("--pairs", "full"), "measured"),
    ("profile-checkpoint-unmeasured", None, lambda ws: profile_cmd("--checkpoint-dir", str(ws / "ck"))(ws), "--measured"),
    ("profile-saliency-unknown", None, profile_cmd("--saliency", "vibes"), "vibes"),
    ("profile-max-memory-bad", None, profile_cmd("--max-memory", "12parsecs"), "max_memory"),
    ("profile-max-memory-tiny", None, profile_cmd("--max-memory", "1000"), "at least 1MiB"),
    ("profile-max-memory-fisher-saliency", None, profile_cmd("--max-memory", "1GiB", "--saliency", "fisher"), "saliency"),
    ("profile-max-memory-not-directory", None, profile_cmd("--max-memory", "1GiB"), "model directory"),
    ("profile-model-unknown", None, lambda ws: ["profile", "--model", "no-such-model", "--out", str(ws / "o.json")],
     "no-such-model"),
    ("gguf-truncated-header", raw("bad.gguf", b"GGUF" + struct.pack("<I", 3) + b"\x01\x00"),
     lambda ws: ["profile", "--model", str(ws / "bad.gguf"), "--out", str(ws / "o.json")], "truncated"),
    ("gguf-huge-counts", raw("bad.gguf", b"GGUF" + struct.pack("<IQQ", 3, 2**40, 2**40) + b"\0" * 64),
     lambda ws: ["profile", "--model", str(ws / "bad.gguf"), "--out", str(ws / "o.json")], "claims"),
    ("gguf-torn-metadata", raw("bad.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 500) + b"k" * 20),
     lambda ws: ["profile", "--model", str(ws / "bad.gguf"), "--out", str(ws / "o.json")], "GGUF"),
    ("gguf-no-magic", raw("bad.gguf", b"not a gguf at all" * 4),
     lambda ws: ["profile", "--model", str(ws / "bad.gguf"), "--out", str(ws / "o.json")], "no 'GGUF' magic"),
    ("gguf-version", raw("bad.gguf", b"GGUF" + struct.pack("<IQQ", 99, 0, 0)),
     lambda ws: ["profile", "--model", str(ws / "bad.gguf"), "--out", str(ws / "o.json")], "version 99"),
]

CONFIG = [
    ("cfg-baselines-string", None, run_cmd('[eval]\nbaselines = "no"\n'), "baselines"),
    ("cfg-measured-string", None, run_cmd('[profile]\nmeasured = "yes"\n'), "measured"),
    ("cfg-n-samples-string", None, run_cmd('[calibration]\nn_samples = "8"\n'), "n_samples"),
    ("cfg-n-samples-zero", None, run_cmd("[calibration]\nn_samples = 0\n"), "n_samples"),
    ("cfg-n-samples-float", None, run_cmd("[calibration]\nn_samples = 1.5\n"), "n_samples"),
    ("cfg-seed-negative", None, run_cmd("[calibration]\nseed = -1\n"), "seed"),
    ("cfg-unknown-section", None, run_cmd("[turbo]\nx = 1\n"), "turbo"),
    ("cfg-unknown-key", None, run_cmd("[solve]\nbudget = \"4bpw\"\n"), "budget"),
    ("cfg-invalid-toml", None, run_cmd("[solve\nbudgets = 1"), "not valid TOML"),
    ("cfg-schemes-string", None, run_cmd('[profile]\nschemes = "w4g32"\n'), "schemes"),
    ("cfg-budgets-empty", None, run_cmd("[solve]\nbudgets = []\n"), "budgets"),
    ("cfg-budget-garbage", None, run_cmd('[solve]\nbudgets = ["4bpw", "huge"]\n'), "huge"),
    ("cfg-include-bad-regex", None, run_cmd('[profile]\ninclude = ["re:("]\n'), "regular expression"),
    ("cfg-group-weight-string", None, run_cmd('[solve]\ngroup_weights = {all = "x"}\n'), "group_weights"),
    ("cfg-not-utf8", None, run_cmd(b"[model]\nspec = \"\xff\xfe\"\n"), "UTF-8"),
    ("cfg-missing", None, lambda ws: ["run", str(ws / "none.toml")], "does not exist"),
    ("cfg-spec-number", None, run_cmd("[model]\nspec = 5\n"), "spec"),
    ("cfg-section-not-table", None, run_cmd("profile = 5\n"), "[profile]"),
    ("cfg-text-empty", None, run_cmd('[eval]\ntext = ""\n'), "text"),
    ("cfg-method-unknown", None, run_cmd('[solve]\nmethod = "guess"\n'), "guess"),
    ("cfg-workers-negative", None, run_cmd("[profile]\nworkers = -2\n"), "workers"),
    ("cfg-oversized", lambda ws: (ws / "big.toml").touch() or os.truncate(ws / "big.toml", 2 << 20),
     lambda ws: ["run", str(ws / "big.toml")], "bytes"),
    ("cfg-saliency-unknown", None, run_cmd('[profile]\nsaliency = "vibes"\n'), "vibes"),
    ("run-results-exist", lambda ws: (ws / "run-out").mkdir() or (ws / "run-out" / "results.json").write_text("[]"),
     lambda ws: ["run", str(ws / CFG), "--out-dir", str(ws / "run-out")], "--overwrite"),
    ("run-out-dir-is-file", None, lambda ws: ["run", str(ws / CFG), "--out-dir", str(ws / CAL)], "not a directory"),
    ("cfg-kl-stride-bool", None, run_cmd("[calibration]\nkl_stride = true\n"), "kl_stride"),
]

CASES = PROFILE_FILE + PLAN_FILE + FLAGS + PROFILE_CMD + CONFIG


def test_case_ids_are_distinct():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile(case, ws, capsys):
    _, prep, argv, match = case
    if prep is not None:
        prep(ws)
    args = argv(ws)  # some argv builders write their input file
    before = snapshot(ws)
    capsys.readouterr()
    rc = run_main(["--quiet", *args])
    err = capsys.readouterr().err
    assert_one_error(rc, err, match)
    assert snapshot(ws) == before, "an input or an earlier output changed"
