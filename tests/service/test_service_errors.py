"""Malformed requests: every one a 4xx JSON answer naming the field, never a 500; no path escapes the state dir."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from svc_helpers import TINY

P = "{pid}"  # replaced by the uploaded profile's id
UNKNOWN = "0" * 64

# (name, method, path, json body or raw bytes, expected status, expected field)
BAD = [
    # POST /v1/plans
    ("plan: no budget", "POST", "/v1/plans", {"profile": P}, 422, "budget"),
    ("plan: no profile", "POST", "/v1/plans", {"budget": "3bpw"}, 422, "profile"),
    ("plan: unknown field", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "bugdet": 1}, 422, "bugdet"),
    ("plan: malformed budget", "POST", "/v1/plans", {"profile": P, "budget": "3.5 bits"}, 422, "budget"),
    ("plan: negative budget", "POST", "/v1/plans", {"profile": P, "budget": -3.0}, 422, "budget"),
    ("plan: budget of the wrong type", "POST", "/v1/plans", {"profile": P, "budget": [3.5]}, 422, "budget"),
    ("plan: boolean budget", "POST", "/v1/plans", {"profile": P, "budget": True}, 422, "budget"),
    ("plan: unreachable budget", "POST", "/v1/plans", {"profile": P, "budget": "1bpw"}, 422, "budget"),
    ("plan: unreachable byte budget", "POST", "/v1/plans", {"profile": P, "budget": "10kB"}, 422, "budget"),
    ("plan: unknown method", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "method": "magic"}, 422, "method"),
    ("plan: qp without pair terms", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "method": "qp"}, 422, "method"),
    ("plan: unknown backend", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "backend": "gurobi"}, 422, "backend"),
    ("plan: bad scheme name in pins", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "pins": {"*": "w9g7"}}, 422, "pins"),
    ("plan: pin to a scheme not profiled", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "pins": {"*.q_proj": "w4g64z"}}, 422, "pins.*.q_proj"),
    ("plan: pin pattern matching nothing", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "pins": {"*.nope": "w8"}}, 422, "pins.*.nope"),
    ("plan: pins of the wrong type", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "pins": ["*=w8"]}, 422, "pins"),
    ("plan: forbid not a list", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "forbid": {"*": "w8"}}, 422, "forbid.*"),
    ("plan: forbid everything", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "forbid": {"*": ["w2g64z", "w3g128z", "w4g128z", "w8"]}}, 422, "forbid"),
    ("plan: unknown metric group", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "group_weights": {"attn": 2.0}}, 422, "group_weights"),
    ("plan: negative group weight", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "group_weights": {"all": -1.0}}, 422, "group_weights"),
    ("plan: scheme list with a bad name", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "schemes": ["w4g128z", "int4"]}, 422, "schemes"),
    ("plan: time limit zero", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "time_limit_s": 0}, 422, "time_limit_s"),
    ("plan: unknown profile", "POST", "/v1/plans", {"profile": UNKNOWN, "budget": "5bpw"}, 404, "profile"),
    ("plan: profile id with traversal", "POST", "/v1/plans", {"profile": "../../etc/passwd", "budget": "5bpw"}, 422, "profile"),
    ("plan: a profile for another model", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "model_sha256": "f" * 64}, 409, "model_sha256"),
    ("plan: Fisher table the profile lacks", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "table": "mix"}, 422, "table"),
    ("plan: unknown table", "POST", "/v1/plans", {"profile": P, "budget": "5bpw", "table": "best"}, 422, "table"),
    ("plan: not JSON", "POST", "/v1/plans", b"{budget: 3.5", 400, "body"),
    ("plan: a JSON list", "POST", "/v1/plans", [1, 2], 422, None),
    ("plan: empty body", "POST", "/v1/plans", b"", 422, None),
    # POST /v1/profiles
    ("profile: unknown model", "POST", "/v1/profiles", {"model": "gpt-17"}, 422, "model"),
    ("profile: model path", "POST", "/v1/profiles", {"model": "/etc"}, 422, "model"),
    ("profile: n_samples a string", "POST", "/v1/profiles", {"n_samples": "8"}, 422, "n_samples"),
    ("profile: n_samples a float", "POST", "/v1/profiles", {"n_samples": 8.5}, 422, "n_samples"),
    ("profile: seq_len zero", "POST", "/v1/profiles", {"seq_len": 0}, 422, "seq_len"),
    ("profile: unknown scheme", "POST", "/v1/profiles", {"schemes": ["w4g128", "w17"]}, 422, "schemes"),
    ("profile: duplicate schemes", "POST", "/v1/profiles", {"schemes": ["w4g128", "w4g128"]}, 422, "schemes"),
    ("profile: empty schemes", "POST", "/v1/profiles", {"schemes": []}, 422, "schemes"),
    ("profile: ref scheme not among the schemes", "POST", "/v1/profiles", {"schemes": ["w4g128"], "ref_schemes": ["w8"]}, 422, "ref_schemes"),
    ("profile: pairs without measured", "POST", "/v1/profiles", {"pairs": "full"}, 422, "pairs"),
    ("profile: unknown ref_method", "POST", "/v1/profiles", {"ref_method": "guess"}, 422, "ref_method"),
    ("profile: fisher references with measured", "POST", "/v1/profiles", {"ref_method": "fisher", "measured": True}, 422, "ref_method"),
    ("profile: measure_every zero", "POST", "/v1/profiles", {"ref_method": "hybrid", "measure_every": 0}, 422, "measure_every"),
    ("profile: unknown saliency", "POST", "/v1/profiles", {"saliency": "random"}, 422, "saliency"),
    ("profile: calibration file path", "POST", "/v1/profiles", {"calibration": "/etc/passwd"}, 422, "calibration"),
    ("profile: empty calibration text", "POST", "/v1/profiles", {"calibration": {"text": ""}}, 422, "calibration.text"),
    ("profile: bad regex pattern", "POST", "/v1/profiles", {"include": ["re:(("]}, 422, "include"),
    ("profile: group with an unknown metric", "POST", "/v1/profiles", {"groups": [{"name": "a", "match": ["*"], "metric": "bleu"}]}, 422, "groups"),
    ("profile: unknown field", "POST", "/v1/profiles", {"workers": 4}, 422, "workers"),
    ("profile: max_memory not a size", "POST", "/v1/profiles", {"max_memory": "12 parsecs"}, 422, "max_memory"),
    ("profile: max_memory below 1 MiB", "POST", "/v1/profiles", {"max_memory": 1000}, 422, "max_memory"),
    ("profile: max_memory with GPTQ", "POST", "/v1/profiles", {"max_memory": "1GiB", "quantizer": "gptq"}, 422, "quantizer"),
    ("profile: max_memory with Fisher saliency", "POST", "/v1/profiles", {"max_memory": "1GiB", "saliency": "fisher"}, 422, "saliency"),
    ("profile: max_memory on a random model", "POST", "/v1/profiles", {"max_memory": "1GiB", "model": "random:llama-tiny"}, 422, "model"),
    # uploads
    ("upload: not JSON", "POST", "/v1/profiles/upload", b"\x00\x01 not json", 422, "body"),
    ("upload: a plan, not a profile", "POST", "/v1/profiles/upload", {"schema": "bitalloc.plan/1", "layers": {}}, 422, "body"),
    ("upload: wrong schema version", "POST", "/v1/profiles/upload", {"schema_version": "bitalloc.profile/99"}, 422, "body"),
    ("upload: empty", "POST", "/v1/profiles/upload", b"", 400, "body"),
    # jobs, ids, routes
    ("job: malformed id", "GET", "/v1/jobs/123", None, 422, "id"),
    ("job: unknown id", "GET", "/v1/jobs/job_" + "a" * 32, None, 404, "id"),
    ("job: cancel unknown", "DELETE", "/v1/jobs/job_" + "b" * 32, None, 404, "id"),
    ("profile: unknown id", "GET", f"/v1/profiles/{UNKNOWN}", None, 404, "id"),
    ("profile: malformed id", "GET", "/v1/profiles/xyz", None, 422, "id"),
    ("frontier: too many points", "GET", f"/v1/profiles/{P}/frontier?points=100000", None, 422, "points"),
    ("frontier: points not a number", "GET", f"/v1/profiles/{P}/frontier?points=many", None, 422, "points"),
    ("frontier: unknown profile", "GET", f"/v1/profiles/{UNKNOWN}/frontier", None, 404, "id"),
    ("plan: unknown id", "GET", f"/v1/plans/{UNKNOWN}", None, 404, "id"),
    ("artifact: unknown id", "GET", f"/v1/artifacts/{UNKNOWN}", None, 404, "id"),
    ("artifact: uppercase id", "GET", f"/v1/artifacts/{'A' * 64}", None, 422, "id"),
    ("export: unknown target", "POST", "/v1/exports", {"plan": UNKNOWN, "target": "no-such-target"}, 400, "target"),
    ("export: unknown plan", "POST", "/v1/exports", {"plan": UNKNOWN, "target": "stub"}, 404, "plan"),
    ("export: options of the wrong type", "POST", "/v1/exports", {"plan": UNKNOWN, "target": "stub", "options": {"a": [1]}}, 422, "options.a"),
    ("route: unknown", "GET", "/v1/nothing", None, 404, None),
    ("route: wrong method", "PUT", "/v1/plans", {"a": 1}, 405, None),
]


def _send(server, method, path, payload, pid):
    path = path.replace(P, pid)
    if isinstance(payload, (bytes, bytearray)):
        return server.http.request(method, path, content=payload, headers={"content-type": "application/json"})
    if payload is None:
        return server.http.request(method, path)
    text = json.dumps(payload).replace(P, pid)
    return server.http.request(method, path, content=text, headers={"content-type": "application/json"})


def test_enough_distinct_bad_requests():
    assert len({b[0] for b in BAD}) == len(BAD) >= 30


@pytest.mark.parametrize("name,method,path,payload,status,field", BAD, ids=[b[0] for b in BAD])
def test_bad_request(server, profile_id, name, method, path, payload, status, field):
    r = _send(server, method, path, payload, profile_id)
    assert r.status_code == status, (name, r.status_code, r.text)
    body = r.json()
    assert set(body) >= {"error", "field"} and isinstance(body["error"], str) and body["error"]
    if field is not None:
        assert body["field"] == field, (name, body)


def test_oversized_bodies(server, profile_id):
    big = {"profile": profile_id, "budget": "5bpw", "pins": {}, "pad": "x" * (2 << 20)}  # over --max-body-mb 1
    r = server.http.post("/v1/plans", content=json.dumps(big), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"

    def chunks():  # no Content-Length: counted while it streams
        yield b'{"profile": "' + profile_id.encode() + b'", "budget": "5bpw", "x": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    r = server.http.post("/v1/plans", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"

    up = server.http.post("/v1/profiles/upload", content=b" " * (3 << 20), headers={"content-type": "application/json"})
    assert up.status_code == 413  # over --max-upload-mb 2

    def upload_chunks():
        for _ in range(48):
            yield b" " * 65536

    up = server.http.post("/v1/profiles/upload", content=upload_chunks(), headers={"content-type": "application/json"})
    assert up.status_code == 413 and up.json()["field"] == "body"
    assert not any(server.state.joinpath("tmp").iterdir())  # the partial upload is gone
    assert server.http.get("/v1/health").status_code == 200


def test_upload_multipart_refused(server):
    r = server.http.post("/v1/profiles/upload", files={"file": ("p.json", b"{}")})
    assert r.status_code == 415 and r.json()["field"] == "content-type"


def _raw(server, target: str) -> tuple[int, bytes]:
    """Send a request line as written (no client-side normalisation of '..')."""
    host, port = server.url.split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("target", [
    "/v1/artifacts/../../../../etc/passwd",
    "/v1/artifacts/..%2f..%2f..%2fetc%2fpasswd",
    "/v1/artifacts/%2e%2e%2f%2e%2e%2fbitalloc.db",
    "/v1/artifacts/..",
    "/v1/plans/..%2F..%2Fbitalloc.db",
    "/v1/profiles/%2e%2e/frontier",
    "/v1/jobs/job_..%2F..%2F..%2Fetc",
    "/v1/artifacts/" + "0" * 62 + "%2F..",
])
def test_traversal_attempts(server, target):
    status, body = _raw(server, target)
    assert 400 <= status < 500, (target, status, body[:200])
    assert b"root:" not in body and b"SQLite format" not in body
    assert "error" in json.loads(body)


def test_concurrent_duplicate_submissions(server):
    body = {**TINY, "schemes": ["w2g64z", "w8"], "measured": True, "seed": 99}
    answers = []

    def post():
        answers.append(server.http.post("/v1/profiles", json=body))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] + [409] * 5, [r.text for r in answers]
    job = next(r.json() for r in answers if r.status_code == 202)
    assert all(r.json()["job"] == job["id"] and r.json()["field"] == "body" for r in answers if r.status_code == 409)
    server.http.delete(f"/v1/jobs/{job['id']}")  # frees the request again
    again = server.http.post("/v1/profiles", json=body)
    assert again.status_code == 202 and again.json()["id"] != job["id"]
    server.http.delete(f"/v1/jobs/{again.json()['id']}")


def test_no_500_in_the_server_log(server):
    log = (server.state.parent / f"{server.state.name}-server.log").read_text()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]


def test_profile_jobs_use_the_servers_ray_cluster(tmp_path, monkeypatch):
    """A server started with --ray-address hands it to every profile job, the default
    (calibrated-proxy) profile too, not only measured tables."""
    import bitalloc
    from bitalloc.allocator.service import worker

    seen = []
    monkeypatch.setattr(bitalloc, "profile", lambda model, **kw: seen.append((model, kw)))

    class Rep:
        def progress(self, *a, **k):
            pass

    for measured in (False, True):
        spec = {"kind": "profile", "ray_address": "10.0.0.1:6379",
                "request": {"model": "random:llama-tiny", "calibration": "generated", "measured": measured}}
        worker._run_profile(tmp_path, spec, Rep())
    assert [kw["ray_address"] for _, kw in seen] == ["10.0.0.1:6379"] * 2
    spec["ray_address"] = None
    worker._run_profile(tmp_path, spec, Rep())
    assert "ray_address" not in seen[-1][1]
