"""Fixtures of the service tests: a real server process (loopback, ephemeral port), a real profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from svc_helpers import SCHEMES, TINY, start_server


@pytest.fixture(scope="session")
def tiny_profile_path(tmp_path_factory) -> Path:
    """A real profile (bitalloc.profile, as `bitalloc profile` makes it) of the tiny random Llama."""
    import bitalloc

    d = tmp_path_factory.mktemp("svc-prof")
    cli_path = d / "tiny-cli.json"  # the JSON + its bulk-array sidecar, as `bitalloc profile` writes them
    prof = bitalloc.profile(TINY["model"], n_samples=2, seq_len=16, kl_samples=2, kl_stride=1, schemes=SCHEMES,
                            out=cli_path, progress=False, log=None)
    path = d / "tiny.json"  # the self-contained form the upload route takes (what Client.upload_profile sends)
    path.write_bytes(prof.to_json_bytes())
    return path


@pytest.fixture(scope="session")
def tiny_cli_profile_path(tiny_profile_path) -> Path:
    return tiny_profile_path.with_name("tiny-cli.json")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """BITALLOC_TEST_DB=postgres runs the module's server on a throwaway PostgreSQL instead of
    SQLite (the whole route suite against it; test_service_postgres.py does so always)."""
    import contextlib
    import os

    with contextlib.ExitStack() as stack:
        db = []
        if os.environ.get("BITALLOC_TEST_DB", "sqlite") == "postgres":
            from pg_helpers import Postgres

            pg = stack.enter_context(Postgres())
            db = ["--db-url", pg.create_database("bitalloc")]
        s = start_server(tmp_path_factory.mktemp("svc") / "state",
                         "--export-target", "stub=export_target_stub:export",
                         "--export-target", "broken=export_target_stub:broken", "--max-body-mb", "1",
                         "--max-upload-mb", "2", *db)
        stack.callback(s.stop)
        yield s


@pytest.fixture(scope="module")
def profile_id(server, tiny_profile_path) -> str:
    r = server.http.post("/v1/profiles/upload", content=tiny_profile_path.read_bytes(),
                         headers={"content-type": "application/json"})
    assert r.status_code in (200, 201), r.text
    return r.json()["id"]
