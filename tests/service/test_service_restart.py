"""Nothing lost: kill -9 the server in the middle of a measured profiling job, restart it on the
same state dir; the job resumes from its checkpoint and ends with the profile an uninterrupted
run gives, and the finished jobs, profiles and plans are all still there."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np

import bitalloc
from svc_helpers import TINY, start_server

# enough items (14 layers x 11 schemes) and tokens that the job is still running when the server
# is killed, even on an idle machine (with 4 schemes x 64 tokens it could finish between polls)
MEASURED = ["w2g64z", "w2g32z", "w3g128z", "w3g64z", "w3g32z", "w4g128z", "w4g64z", "w4g32z", "w5g128z", "w6g128z", "w8"]
ARGS = dict(TINY, seq_len=256)


def _wait(http, jid, pred, timeout=300.0, poll=0.1):
    """The job's view once ``pred`` holds for it."""
    return _wait_for(lambda: (lambda job: job if pred(job) else None)(http.get(f"/v1/jobs/{jid}").json()),
                     f"job {jid} to reach the condition", timeout=timeout, poll=poll)


def _items(path) -> int:
    return max(0, len(path.read_bytes().splitlines()) - 1) if path.exists() else 0


def _wait_for(pred, what: str, timeout: float = 300.0, poll: float = 0.005):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _worker_pid(server_pid: int, jid: str) -> int | None:
    """The job's worker process: a child of the server whose command line names the job."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == server_pid and "bitalloc.allocator.service.worker" in cmd and jid in cmd:
            return int(proc.name)
    return None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_kill9_mid_job_then_restart_resumes(tmp_path, tiny_profile_path):
    state = tmp_path / "state"
    a = start_server(state)
    try:
        pid_up = a.http.post("/v1/profiles/upload", content=tiny_profile_path.read_bytes(),
                             headers={"content-type": "application/json"}).json()["id"]
        plan = a.http.post("/v1/plans", json={"profile": pid_up, "budget": "5bpw"})
        assert plan.status_code == 201
        plan_text = a.http.get(f"/v1/plans/{plan.json()['id']}").text
        quick = a.http.post("/v1/profiles", json={**TINY, "schemes": ["w4g128z"]}).json()
        quick_done = _wait(a.http, quick["id"], lambda j: j["state"] in ("done", "failed"))
        assert quick_done["state"] == "done", quick_done

        job = a.http.post("/v1/profiles", json={**ARGS, "schemes": MEASURED, "measured": True})
        assert job.status_code == 202
        jid = job.json()["id"]
        ckpt = state / "jobs" / jid / "profile.measure-checkpoint.jsonl"
        # freeze the worker once it has measured 10 items, so "mid-job" holds however fast the
        # machine is (the whole job can finish between two 0.5 s progress reports); the server's
        # kill -9 then takes the stopped worker with it (PR_SET_PDEATHSIG: SIGKILL)
        worker = _wait_for(lambda: _items(ckpt) >= 10 and _worker_pid(a.proc.pid, jid), "10 measured items")
        os.kill(worker, signal.SIGSTOP)
        n_stopped = _items(ckpt)
        mid = a.http.get(f"/v1/jobs/{jid}").json()
        assert mid["state"] == "running", mid
        a.kill9()
    finally:
        if a.proc.poll() is None:
            a.kill9()
    _wait_for(lambda: not Path(f"/proc/{worker}").exists() or _zombie(worker), "the worker to die with the server", timeout=10)
    n_killed = _items(ckpt)
    time.sleep(1.0)
    assert _items(ckpt) == n_killed, "the job's worker outlived the server"
    total = 14 * len(MEASURED)
    assert 10 <= n_stopped == n_killed < total

    b = start_server(state)
    try:
        done = _wait(b.http, jid, lambda j: j["state"] in ("done", "failed", "cancelled"), poll=0.5)
        assert done["state"] == "done" and done["attempts"] == 2, done
        assert done["progress"]["total"] == total and done["progress"]["done"] == total, done
        served = b.http.get(f"/v1/artifacts/{done['result']['profile_id']}")
        prof = bitalloc.SensitivityProfile.from_dict(served.json())
        m = prof.metadata["measure"]
        assert m["resumed"] >= n_killed and m["resumed"] + m["computed"] == total

        # the finished job, the uploaded profile and the plan are all still there, unchanged
        assert b.http.get(f"/v1/jobs/{quick['id']}").json() == quick_done
        assert b.http.get(f"/v1/plans/{plan.json()['id']}").text == plan_text
        assert b.http.get(f"/v1/profiles/{pid_up}").status_code == 200
        again = b.http.post("/v1/plans", json={"profile": pid_up, "budget": "5bpw"})
        assert again.status_code == 200 and again.json()["id"] == plan.json()["id"]
    finally:
        b.stop()

    fresh = bitalloc.profile(ARGS["model"], n_samples=ARGS["n_samples"], seq_len=ARGS["seq_len"],
                             kl_samples=ARGS["kl_samples"], kl_stride=ARGS["kl_stride"], schemes=MEASURED,
                             measured=True, progress=False, log=None)
    got, want = prof.to_dict(), json.loads(json.dumps(fresh.to_dict()))
    for k in want:
        if k != "metadata":
            assert got[k] == want[k], k
    assert np.array_equal(prof.table(), fresh.table())
    assert got["metadata"]["request"] == want["metadata"]["request"]
