"""Authentication: tokens required off loopback, 401 without a valid bearer token, tokens stored hashed."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys

import pytest

from bitalloc.allocator.service.auth import AuthError, is_loopback, load_token_file
from svc_helpers import start_server

TOKEN = "s3cret-token-0123456789abcdef"
OTHER = "another-token-for-bob-42424242"


@pytest.fixture(scope="module")
def authed(tmp_path_factory):
    d = tmp_path_factory.mktemp("auth")
    tf = d / "tokens.txt"
    tf.write_text(f"# team tokens\n{TOKEN}\n\nsha256:{hashlib.sha256(OTHER.encode()).hexdigest()}\n")
    s = start_server(d / "state", "--token-file", str(tf))
    yield s
    s.stop()


def test_requests_need_a_valid_token(authed, tiny_profile_path):
    h = authed.http
    assert h.get("/v1/health").status_code == 200  # liveness stays open
    assert h.get("/openapi.json").status_code == 200
    for method, path in (("GET", "/v1/profiles"), ("POST", "/v1/plans"), ("GET", "/v1/jobs/job_" + "a" * 32),
                         ("POST", "/v1/profiles/upload"), ("GET", "/v1/artifacts/" + "0" * 64)):
        r = h.request(method, path, content=b"{}")
        assert r.status_code == 401, (path, r.text)
        assert r.json()["field"] == "authorization" and r.headers["www-authenticate"] == "Bearer"
    assert h.get("/v1/profiles", headers={"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"}).status_code == 401
    assert h.get("/v1/profiles", headers={"Authorization": TOKEN}).status_code == 401  # not a bearer header
    assert h.post("/v1/plans", content=b"{not json", headers={"content-type": "application/json"}).status_code == 401
    ok = h.get("/v1/profiles", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    assert h.get("/v1/profiles", headers={"Authorization": f"Bearer {OTHER}"}).status_code == 200  # the sha256: line

    import bitalloc

    with pytest.raises(bitalloc.ServiceError) as e:
        bitalloc.Client(authed.url).profiles()
    assert e.value.status == 401
    c = bitalloc.Client(authed.url, token=TOKEN)
    pid = c.upload_profile(tiny_profile_path)["id"]
    assert c.solve(pid, "5bpw")["predicted"]["bpw"] <= 5
    c.close()


def test_tokens_are_stored_hashed(authed):
    db = authed.state / "bitalloc.db"
    con = sqlite3.connect(db)
    hashes = {r[0] for r in con.execute("SELECT hash FROM tokens")}
    con.close()
    assert hashes == {hashlib.sha256(t.encode()).hexdigest() for t in (TOKEN, OTHER)}
    for f in authed.state.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f


def _serve(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "bitalloc.allocator.cli", "serve", "--port", "0",
                           "--state-dir", str(tmp_path / "st"), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.org"])
def test_refuses_non_loopback_without_tokens(tmp_path, host):
    r = _serve(tmp_path, "--host", host)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "without authentication" in r.stderr and "--token-file" in r.stderr
    assert "listening" not in r.stdout


def test_bad_token_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    r = _serve(tmp_path, "--token-file", str(empty))
    assert r.returncode == 2 and "holds no token" in r.stderr
    r = _serve(tmp_path, "--token-file", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "cannot be read" in r.stderr
    short = tmp_path / "short.txt"
    short.write_text("abc\n")
    with pytest.raises(AuthError, match="at least 16"):
        load_token_file(short)


def test_is_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "example.org", "localhost.evil"))
