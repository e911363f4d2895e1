"""The measured-table runner: in-process vs Ray, a lost node, a killed job, checkpoint rules.

Random-weight tiny Llama (plumbing only), a few schemes. The Ray tests start real local
Ray instances / a ``ray.cluster_utils.Cluster`` and are marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from sens_helpers import checkpoint_lines, sigkill_when

from bitalloc.sensitivity.runner import (
    CHECKPOINT_SCHEMA,
    Checkpoint,
    CheckpointError,
    RunnerError,
    WorkerContext,
    WorkerSetup,
    checkpoint_header,
    run_items,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMES = ["w2g64z", "w3g128z", "w4g128z"]


@pytest.fixture(scope="module")
def setup():
    return WorkerSetup(model="random:llama-tiny", calibration=dict(source="generated", n_samples=2, seq_len=32, seed=0),
                       kl_samples=2, kl_stride=1)


@pytest.fixture(scope="module")
def ctx(setup):
    return WorkerContext(setup)


@pytest.fixture(scope="module")
def items(ctx):
    fqns = [layer.fqn for layer in ctx.layers]
    return [(f, s) for f in fqns for s in SCHEMES]


@pytest.fixture(scope="module")
def baseline(setup, ctx, items):
    """The uninterrupted in-process result everything else must equal."""
    res = run_items(setup, items, context=ctx, progress=False)
    assert res.info["mode"] == "in-process" and res.info["computed"] == len(items)
    return res


def _table(res, items):
    fqns = list(dict.fromkeys(f for f, _ in items))
    return res.table(fqns, SCHEMES)


def _item_lines(path: Path) -> list[dict]:
    return checkpoint_lines(path)


# ---------------------------------------------------------------------------------------
# in-process and checkpoint rules (fast)


def test_values_are_metric_dicts(baseline, items):
    assert len(items) >= 12
    v = baseline.values[items[0]]
    assert set(v) == {"kl"} and v["kl"] > 0
    t = _table(baseline, items)
    assert np.isfinite(t).all() and (t[:, 0] >= t[:, 2]).all()  # 2-bit hurts at least as much as 4-bit


@pytest.mark.slow
def test_ray_not_imported_in_process(setup, ctx, items):
    code = textwrap.dedent(f"""
        import sys
        from bitalloc.sensitivity.runner import WorkerSetup, run_items
        s = WorkerSetup(model="random:llama-tiny", calibration=dict(source="generated", n_samples=1, seq_len=8, seed=0))
        run_items(s, [({items[0][0]!r}, "w4g128z")], progress=False)
        assert "ray" not in sys.modules, "ray imported"
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_checkpoint_resume_skips_finished(tmp_path, setup, ctx, items, baseline):
    path = tmp_path / "c.jsonl"
    first = run_items(setup, items[:5], checkpoint=path, context=ctx, progress=False)
    assert first.info["computed"] == 5
    lines = path.read_text().splitlines()
    head = json.loads(lines[0])
    assert head["schema"] == CHECKPOINT_SCHEMA and len(lines) == 6
    seen = []
    res = run_items(setup, items, checkpoint=path, context=ctx, progress=False, on_result=lambda k, v: seen.append(k))
    assert res.info["resumed"] == 5 and res.info["computed"] == len(items) - 5
    assert set(seen) == set(items[5:])
    assert np.array_equal(_table(res, items), _table(baseline, items))
    again = run_items(setup, items, checkpoint=path, context=ctx, progress=False)
    assert again.info["computed"] == 0 and again.info["resumed"] == len(items)


def test_duplicate_lines_never_corrupt(tmp_path, setup, ctx, items, baseline):
    path = tmp_path / "c.jsonl"
    run_items(setup, items, checkpoint=path, context=ctx, progress=False)
    with open(path, "a") as f:  # a duplicate with a wrong value and an exact duplicate
        f.write(json.dumps({"layer": items[0][0], "scheme": items[0][1], "values": {"kl": 123.0}}) + "\n")
        f.write(path.read_text().splitlines()[2] + "\n")
    ck = Checkpoint(path, checkpoint_header(setup, SCHEMES))
    done = ck.load()
    ck.close()
    assert ck.duplicates == 2 and done[items[0]] == baseline.values[items[0]]
    res = run_items(setup, items, checkpoint=path, context=ctx, progress=False)
    assert res.info["computed"] == 0
    assert np.array_equal(_table(res, items), _table(baseline, items))


def test_truncated_last_line_is_ignored(tmp_path, setup, ctx, items, baseline):
    path = tmp_path / "c.jsonl"
    run_items(setup, items[:6], checkpoint=path, context=ctx, progress=False)
    raw = path.read_bytes()
    path.write_bytes(raw[:-9])  # killed in the middle of writing line 7 (item 6)
    res = run_items(setup, items, checkpoint=path, context=ctx, progress=False)
    assert res.info["resumed"] == 5 and res.info["computed"] == len(items) - 5
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + len(items)
    for line in lines:
        json.loads(line)  # the torn tail was cut, nothing glued onto it
    assert np.array_equal(_table(res, items), _table(baseline, items))


def test_mismatched_header_is_an_error(tmp_path, setup, ctx, items):
    path = tmp_path / "c.jsonl"
    run_items(setup, items[:2], checkpoint=path, context=ctx, progress=False)
    before = path.read_bytes()
    other_model = checkpoint_header(setup, SCHEMES, model_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="another model"):
        run_items(setup, items, checkpoint=path, header=other_model, context=ctx, progress=False)
    other = WorkerSetup(**{**setup.to_dict(), "kl_stride": 2})
    with pytest.raises(CheckpointError, match="another configuration.*kl_stride"):
        run_items(other, items, checkpoint=path, context=ctx, progress=False)
    with pytest.raises(CheckpointError, match="another configuration.*schemes"):
        run_items(setup, [(items[0][0], "w8")], checkpoint=path, context=ctx, progress=False)
    assert path.read_bytes() == before  # never merged, never rewritten
    path.write_text("not json\n")
    with pytest.raises(CheckpointError, match="no valid header"):
        run_items(setup, items, checkpoint=path, context=ctx, progress=False)


def test_bad_setup():
    with pytest.raises(RunnerError, match="unknown metric 'banana'"):
        WorkerSetup(model="random:llama-tiny", metric="banana")


def test_unreachable_address(setup, items):
    t = time.perf_counter()
    with pytest.raises(RunnerError, match="cannot reach the Ray cluster at '127.0.0.1:1'"):
        run_items(setup, items, address="127.0.0.1:1", progress=False)
    with pytest.raises(RunnerError, match="HOST:PORT"):
        run_items(setup, items, address="nonsense", progress=False)
    assert time.perf_counter() - t < 15


def test_cli_errors(capsys, tmp_path):
    from bitalloc.allocator.cli import main

    for args, match in (
        (["--measured", "--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster"),
        (["--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster"),  # the default profile goes to Ray too
        (["--checkpoint-dir", str(tmp_path)], "--checkpoint-dir is for"),
        (["--measured", "--workers", "0"], "workers must be a positive integer"),
    ):
        rc = main(["--quiet", "profile", "--model", "random:llama-tiny", "--out", str(tmp_path / "p.json"), *args])
        err = capsys.readouterr().err
        lines = [x for x in err.strip().splitlines() if x.strip()]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("bitalloc: error: ") and match in lines[0], lines[0]


def test_measured_profile_api_and_config(tmp_path):
    import bitalloc
    from bitalloc.allocator.config import ConfigError, RunConfig

    out = tmp_path / "p.json"
    prof = bitalloc.profile("random:llama-tiny", n_samples=2, seq_len=16, kl_samples=2, kl_stride=1,
                             schemes=["w2g64z", "w3g128z", "w4g128z", "fp16"], measured=True, out=out,
                             progress=False, log=None)
    assert prof.metadata["table"] == "measured" and prof.metadata["measure"]["mode"] == "in-process"
    ck = tmp_path / "p.measure-checkpoint.jsonl"
    assert len(ck.read_text().splitlines()) == 1 + prof.n_layers * 4
    t = prof.table()
    assert (t[:, 3] == 0).all() and (t[:, 0] > 0).all()
    assert prof.ref_schemes == ["w2g64z", "w3g128z", "w4g128z"]  # the defaults
    assert np.array_equal(prof.ref_values, t[:, :3])  # the ref columns calibrate the proxy
    again = bitalloc.profile("random:llama-tiny", n_samples=2, seq_len=16, kl_samples=2, kl_stride=1,
                              schemes=["w2g64z", "w3g128z", "w4g128z", "fp16"], measured=True, out=out,
                              progress=False, log=None)
    assert again.metadata["measure"]["computed"] == 0
    assert np.array_equal(again.table(), t)
    from bitalloc.allocator import api

    assert api.solve(prof, "4bpw").predicted["bpw"] <= 4.0
    cfg = RunConfig.from_dict({"profile": {"measured": True, "workers": 2}})
    assert cfg.profile.workers == 2
    # the default (calibrated-proxy) profile runs on Ray too: its Hessian shards and proxy rows
    assert RunConfig.from_dict({"profile": {"workers": 2}}).profile_config().workers == 2
    with pytest.raises(ConfigError, match="workers"):
        RunConfig.from_dict({"profile": {"workers": -1}})


def test_mismatched_checkpoint_refused_before_statistics(tmp_path, monkeypatch):
    """A checkpoint of another configuration is refused before the Hessians are collected
    (minutes on a real model), not after; the file is left untouched."""
    import bitalloc
    import bitalloc.sensitivity.hessian as hessian

    kw = dict(n_samples=2, seq_len=16, kl_samples=2, schemes=["w2g64z", "w4g128z"], ref_schemes=["w2g64z"],
              measured=True, out=tmp_path / "p.json", progress=False, log=None)
    bitalloc.profile("random:llama-tiny", kl_stride=1, **kw)
    ck = tmp_path / "p.measure-checkpoint.jsonl"
    before = ck.read_bytes()

    def boom(*a, **k):
        raise AssertionError("statistics collected before the checkpoint was checked")

    monkeypatch.setattr(hessian, "collect_input_statistics", boom)
    with pytest.raises(CheckpointError, match="another configuration.*kl_stride"):
        bitalloc.profile("random:llama-tiny", kl_stride=2, **kw)
    assert ck.read_bytes() == before


# ---------------------------------------------------------------------------------------
# real Ray (slow)


@pytest.mark.slow
def test_local_ray_equals_in_process(setup, items, baseline):
    res = run_items(setup, items, workers=2, progress=False, wait_all_ready=True)
    assert res.info["mode"] == "ray-local" and res.info["workers"] == 2
    assert res.info["computed"] == len(items)
    assert len(res.info["worker_info"]) == 2
    assert all(w["peak_rss_mb"] > 0 and w["torch_threads"] >= 1 for w in res.info["worker_info"])
    assert len({w["pid"] for w in res.info["worker_info"]}) == 2
    assert np.array_equal(_table(res, items), _table(baseline, items))


@pytest.mark.slow
def test_worker_node_removed_mid_run(setup, items, baseline, tmp_path):
    from ray.cluster_utils import Cluster

    # the removed node is noticed within 5 s; a 2 s threshold (4 checks) failed once on a loaded 2-core machine
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 10}})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    removed = []

    def kill_one(key, values):
        if len(removed) == 0 and sum(1 for _ in seen) >= 3:
            cluster.remove_node(nodes[1])
            removed.append(key)

    seen = []
    try:
        res = run_items(setup, items, address=cluster.address, workers=2, threads_per_worker=1, progress=False,
                        checkpoint=tmp_path / "c.jsonl", stall_timeout_s=120, wait_all_ready=True,
                        on_result=lambda k, v: (seen.append(k), kill_one(k, v)))
    finally:
        cluster.shutdown()
    assert removed, "the node was never removed"
    assert res.info["mode"] == "ray-cluster" and res.info["actor_failures"] >= 1
    assert res.info["resubmitted"] >= 1  # the lost node's in-flight items ran elsewhere
    assert res.info["computed"] == len(items) and len(set(seen)) == len(items) == len(seen)
    assert len(_item_lines(tmp_path / "c.jsonl")) == len(items)
    assert np.array_equal(_table(res, items), _table(baseline, items))


SLOW_PROFILE = """
import sys, time
import bitalloc.sensitivity.proxy as proxy
_measure = proxy.measure_item
def slow(*a, **k):
    time.sleep(0.1)
    return _measure(*a, **k)
proxy.measure_item = slow
from bitalloc.allocator.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_job_resumes(tmp_path):
    import bitalloc

    args = ["--quiet", "profile", "--model", "random:llama-tiny", "--n-samples", "2", "--seq-len", "16",
            "--kl-samples", "2", "--kl-stride", "1", "--schemes", ",".join(SCHEMES), "--measured",
            "--out", str(tmp_path / "run" / "p.json")]
    ck = tmp_path / "run" / "p.measure-checkpoint.jsonl"
    sigkill_when(SLOW_PROFILE, args, lambda: len(_item_lines(ck)) >= 8)
    n_done = len({(r["layer"], r["scheme"]) for r in _item_lines(ck)})
    assert 8 <= n_done
    from bitalloc.allocator.cli import main

    assert main(args) == 0  # the same command again
    prof = bitalloc.load_profile(tmp_path / "run" / "p.json")
    m = prof.metadata["measure"]
    total = prof.n_layers * len(SCHEMES)
    assert n_done < total
    assert m["resumed"] == n_done and m["computed"] == total - n_done
    fresh = bitalloc.profile("random:llama-tiny", n_samples=2, seq_len=16, kl_samples=2, kl_stride=1, schemes=SCHEMES,
                              measured=True, progress=False, log=None)
    assert np.array_equal(prof.table(), fresh.table())
    assert np.array_equal(prof.ref_values, fresh.ref_values)


def test_kept_workers_block_and_model_reuse_rule():
    """kept_workers nests as one block and is per thread; a kept worker reuses its model only
    for the same model, weights and fingerprint, never for block streaming."""
    import dataclasses
    import threading

    from bitalloc.sensitivity.runner_ray import _same_model, kept_workers, keeping_workers

    assert not keeping_workers()
    with kept_workers():
        assert keeping_workers()
        with kept_workers():
            assert keeping_workers()
        assert keeping_workers()  # the inner block did not close the outer one
        seen = []
        t = threading.Thread(target=lambda: seen.append(keeping_workers()))
        t.start()
        t.join()
        assert seen == [False]  # another thread (a service job) has its own
    assert not keeping_workers()
    a = WorkerSetup(model="random:llama-tiny", fingerprint_sha256="ab" * 32)
    assert _same_model(a, dataclasses.replace(a, kl_samples=1))
    assert not _same_model(a, dataclasses.replace(a, model="random:gpt2-tiny"))
    assert not _same_model(a, dataclasses.replace(a, weights="16bit" if a.weights != "16bit" else "as-loaded"))
    assert not _same_model(a, dataclasses.replace(a, fingerprint_sha256="cd" * 32))
    assert not _same_model(dataclasses.replace(a, fingerprint_sha256=None), dataclasses.replace(a, fingerprint_sha256=None))
    assert not _same_model(a, dataclasses.replace(a, max_memory=1 << 30))
    s = dataclasses.replace(a, max_memory=1 << 30)
    assert _same_model(s, dataclasses.replace(s, kl_samples=1))  # streamed under the same limit
    assert not _same_model(s, dataclasses.replace(s, max_memory=2 << 30))
