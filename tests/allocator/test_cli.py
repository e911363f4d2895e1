"""Every documented kind of bad input: one line on stderr, exit code 2, no traceback."""
import json
import subprocess
import sys

import pytest

from bitalloc.allocator.cli import main


def run_cli(capsys, *args):
    rc = main(["--quiet", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc, err, match):
    assert rc == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("bitalloc: error: ")
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def plan_path(tiny_profile, tmp_path_factory):
    _, prof_path = tiny_profile
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["solve", str(prof_path), "--budget", "4bpw", "--out", str(out)]) == 0
    return out


def test_help_for_every_command(capsys):
    for cmd in (None, "profile", "solve", "sweep", "apply", "eval", "run"):
        assert main(([cmd] if cmd else []) + ["--help"]) == 0  # in-process callers get argparse's code back
        assert "usage: bitalloc" in capsys.readouterr().out


def test_solve_writes_a_plan_within_budget(tiny_profile, plan_path):
    plan = json.loads(plan_path.read_text())
    assert plan["schema"] == "bitalloc.plan/1"
    assert plan["predicted"]["bpw"] <= 4.0
    assert plan["solver"]["status"] == "optimal"


def test_unknown_scheme(capsys, tiny_profile):
    rc, _, err = run_cli(capsys, "solve", tiny_profile[1], "--budget", "4bpw", "--schemes", "w9g7")
    assert_clean_error(rc, err, "w9g7")
    rc, _, err = run_cli(capsys, "profile", "--model", "random:llama-tiny", "--schemes", "w4g128,banana")
    assert_clean_error(rc, err, "banana")


def test_malformed_budget(capsys, tiny_profile):
    rc, _, err = run_cli(capsys, "solve", tiny_profile[1], "--budget", "3.5bits")
    assert_clean_error(rc, err, "malformed budget '3.5bits'")


def test_budget_outside_achievable_range(capsys, tiny_profile):
    rc, _, err = run_cli(capsys, "solve", tiny_profile[1], "--budget", "1bpw")
    assert_clean_error(rc, err, "below the smallest achievable")
    rc, _, err = run_cli(capsys, "solve", tiny_profile[1], "--budget", "10kB")
    assert_clean_error(rc, err, "below the smallest achievable")


def test_plan_for_another_model(capsys, plan_path, tmp_path):
    d = json.loads(plan_path.read_text())
    d["model"]["fingerprint"]["sha256"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d))
    rc, _, err = run_cli(capsys, "eval", "--model", "random:llama-tiny", "--plan", other, "--windows", "2",
                         "--seq-len", "16")
    assert_clean_error(rc, err, "different model")
    rc, _, err = run_cli(capsys, "eval", "--model", "random:gpt2-tiny", "--plan", plan_path, "--windows", "2",
                         "--seq-len", "16")
    assert rc == 2 and "bitalloc: error:" in err


@pytest.mark.parametrize("content,match", [("{oops", "not valid JSON"),
                                           ('{"schema": "bitalloc.plan/7", "layers": {}}', "unsupported schema 'bitalloc.plan/7'")])
def test_corrupt_or_wrong_version_plan(capsys, tmp_path, content, match):
    p = tmp_path / "plan.json"
    p.write_text(content)
    rc, _, err = run_cli(capsys, "apply", "--model", "random:llama-tiny", "--plan", p, "--out", tmp_path / "q")
    assert_clean_error(rc, err, match)


def test_corrupt_or_wrong_version_profile(capsys, tiny_profile, tmp_path):
    p = tmp_path / "prof.json"
    p.write_text("{not json")
    rc, _, err = run_cli(capsys, "solve", p, "--budget", "4bpw")
    assert_clean_error(rc, err, "prof.json")
    d = json.loads(tiny_profile[1].read_text())
    d["schema_version" if "schema_version" in d else "schema"] = "bitalloc.profile/99"
    p.write_text(json.dumps(d))
    rc, _, err = run_cli(capsys, "solve", p, "--budget", "4bpw")
    assert_clean_error(rc, err, "bitalloc.profile/99")
    rc, _, err = run_cli(capsys, "solve", tmp_path / "missing.json", "--budget", "4bpw")
    assert_clean_error(rc, err, "missing.json")


def test_empty_or_short_calibration_text(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc, _, err = run_cli(capsys, "profile", "--model", "random:llama-tiny", "--calib", empty, "--out", tmp_path / "p.json")
    assert_clean_error(rc, err, "empty")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    rc, _, err = run_cli(capsys, "profile", "--model", "random:llama-tiny", "--calib", short, "--n-samples", "4",
                         "--seq-len", "64", "--out", tmp_path / "p.json")
    assert_clean_error(rc, err, "tokens")
    rc, _, err = run_cli(capsys, "profile", "--model", "random:llama-tiny", "--calib", tmp_path / "nope.txt")
    assert_clean_error(rc, err, "nope.txt")


def test_pattern_matching_no_layer(capsys, tiny_profile, tmp_path):
    rc, _, err = run_cli(capsys, "profile", "--model", "random:llama-tiny", "--exclude", "*.nothing_here",
                         "--out", tmp_path / "p.json")
    assert_clean_error(rc, err, "*.nothing_here")
    rc, _, err = run_cli(capsys, "solve", tiny_profile[1], "--budget", "4bpw", "--pin", "zzz.*=w8")
    assert_clean_error(rc, err, "zzz.*")


def test_missing_model_path(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "profile", "--model", tmp_path / "no_such_model", "--out", tmp_path / "p.json")
    assert_clean_error(rc, err, "no_such_model")


def test_bad_config(capsys, tmp_path):
    c = tmp_path / "c.toml"
    c.write_text("[solve]\nbudgets = ['3 apples']\n")
    rc, _, err = run_cli(capsys, "run", c)
    assert_clean_error(rc, err, "3 apples")


def test_console_script_exit_code(tmp_path):
    """The real entry point, in a subprocess: exit status 2 and no traceback."""
    r = subprocess.run([sys.executable, "-m", "bitalloc.allocator.cli", "solve", str(tmp_path / "x.json"), "--budget", "4bpw"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("bitalloc: error:")


def _group_config(tmp_path, groups: str) -> "Path":
    c = tmp_path / "groups.toml"
    c.write_text(
        '[model]\nspec = "random:llama-tiny"\n'
        '[calibration]\nn_samples = 2\nseq_len = 16\nkl_samples = 2\nkl_stride = 1\n'
        '[profile]\nschemes = ["w2g64z", "w4g128z", "fp16"]\nref_schemes = ["w2g64z"]\n'
        + groups + f'[output]\ndir = "{(tmp_path / "out").as_posix()}"\n')
    return c


@pytest.mark.parametrize("groups, match", [
    ('[[profile.groups]]\nname = "a"\nmatch = ["*"]\n[[profile.groups]]\nname = "b"\nmatch = ["*.nothing_here"]\n',
     "matches no profiled layer"),
    ('[[profile.groups]]\nname = "a"\nmatch = ["*"]\n[[profile.groups]]\nname = "b"\nmatch = ["*.mlp.*"]\n',
     "in several metric groups"),
    ('[[profile.groups]]\nname = "a"\nmatch = ["*"]\nmetric = "perplexity-ish"\n', "unknown metric"),
    ('[[profile.groups]]\nname = "a"\nmatch = ["*.self_attn.*"]\n', "in no metric group"),
])
def test_bad_metric_groups(capsys, tmp_path, groups, match):
    rc, _, err = run_cli(capsys, "run", _group_config(tmp_path, groups))
    assert_clean_error(rc, err, match)


def test_checkpoint_of_another_configuration_is_refused(capsys, tmp_path):
    base = ["profile", "--model", "random:llama-tiny", "--n-samples", "2", "--seq-len", "16", "--kl-stride", "1",
            "--schemes", "w2g64z,fp16", "--ref-schemes", "w2g64z", "--measured", "--out", tmp_path / "p.json"]
    rc, _, _ = run_cli(capsys, *base, "--kl-samples", "2")
    assert rc == 0
    ck = next(tmp_path.glob("*.jsonl"))
    before = ck.read_bytes()
    rc, _, err = run_cli(capsys, *base, "--kl-samples", "1", "--overwrite")
    assert_clean_error(rc, err, "kl_samples")
    assert ck.read_bytes() == before, "a mismatching checkpoint must not be touched"
