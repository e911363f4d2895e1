"""The service on a real PostgreSQL (``bitalloc serve --db-url postgresql+psycopg://...``).

One throwaway PostgreSQL 16 server for the module (pg_helpers: the ``pgserver`` wheel's binaries,
run as ``nobody`` when the tests run as root), a fresh database per test, the real server as a
subprocess. Never skipped: a PostgreSQL that cannot start fails here, with its log.

What differs from SQLite and is checked here: migrations run by several servers at once (DDL
and the version table raced), column types PostgreSQL enforces and SQLite does not (VARCHAR
lengths, 32-bit INTEGER, NUL characters in text), concurrent writers that are not serialized by
a database-wide lock (duplicate plan and job requests), connections dropped by a ``kill -9``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pg_helpers import Postgres, PostgresUnavailable
from svc_helpers import TINY, start_server


@pytest.fixture(scope="module")
def pg():
    try:
        server = Postgres()
    except PostgresUnavailable as e:  # fail, never skip: a skip would hide the breakage on CI
        pytest.fail(f"the PostgreSQL for these tests could not start: {e}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def fresh(pg):
    """(database name, --db-url) of a new, empty database."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    return name, pg.create_database(name)


def _wait_job(http, jid: str, timeout: float = 240.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = http.get(f"/v1/jobs/{jid}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {jid} not finished after {timeout}s: {job}")


def _upload(http, data: bytes) -> httpx.Response:
    return http.post("/v1/profiles/upload", content=data, headers={"content-type": "application/json"})


def _column_types(pg, name: str) -> dict[tuple[str, str], str]:
    rows = pg.query(name, "SELECT table_name, column_name, data_type FROM information_schema.columns "
                          "WHERE table_schema = 'public'")
    return {(t, c): d for t, c, d in rows}


def _no_tracebacks(server) -> None:
    log = (server.state.parent / f"{server.state.name}-server.log").read_text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_migrations_on_a_fresh_database_then_a_second_start_is_a_no_op(pg, fresh, tmp_path):
    from bitalloc.allocator.service.db import MIGRATIONS, SCHEMA_VERSION

    name, url = fresh
    state = tmp_path / "state"
    a = start_server(state, "--db-url", url)
    try:
        health = a.http.get("/v1/health")
        assert health.status_code == 200 and health.json()["schema_version"] == SCHEMA_VERSION
    finally:
        a.stop()
    applied = pg.query(name, "SELECT version, description, applied_at FROM schema_migrations ORDER BY version")
    assert [r[0] for r in applied] == [m[0] for m in MIGRATIONS]
    assert {t for (t, _c) in _column_types(pg, name)} == {"schema_migrations", "jobs", "artifacts", "profiles",
                                                         "plans", "tokens"}
    assert not (state / "bitalloc.db").exists()  # the state dir holds files only; no SQLite beside PostgreSQL

    b = start_server(state, "--db-url", url)
    try:
        assert b.http.get("/v1/health").json()["schema_version"] == SCHEMA_VERSION
    finally:
        b.stop()
    assert pg.query(name, "SELECT version, description, applied_at FROM schema_migrations ORDER BY version") == applied
    _no_tracebacks(a)


def test_servers_starting_together_migrate_once(pg, fresh, tmp_path):
    """A team's servers (or a restart racing a second instance) may first meet an empty
    database at the same moment: the migrations run once, none of the starts fails."""
    from bitalloc.allocator.service.db import MIGRATIONS, Database

    name, url = fresh
    n = 6
    barrier = threading.Barrier(n)

    def open_db(_):
        barrier.wait()
        db = Database(url)
        try:
            return db.version()
        finally:
            db.dispose()

    with ThreadPoolExecutor(n) as ex:
        versions = list(ex.map(open_db, range(n)))
    assert versions == [MIGRATIONS[-1][0]] * n
    assert [r[0] for r in pg.query(name, "SELECT version FROM schema_migrations ORDER BY version")] == \
        [m[0] for m in MIGRATIONS]

    with ThreadPoolExecutor(2) as ex:  # and two real servers, each on its own state dir, at once
        servers = list(ex.map(lambda i: start_server(tmp_path / f"s{i}", "--db-url", url), range(2)))
    try:
        for s in servers:
            assert s.http.get("/v1/health").status_code == 200
    finally:
        for s in servers:
            s.stop()


def test_column_types_postgres_enforces(pg, fresh):
    """SQLite stores any integer in INTEGER and any length in VARCHAR(n); PostgreSQL does not.
    Artifact sizes are BIGINT (an export passes 2 GiB), text that comes from a request is TEXT;
    a database made by schema 1 is brought there by the next migration."""
    from bitalloc.allocator.service import db as _db

    name, url = fresh
    db = _db.Database(url)
    try:
        types = _column_types(pg, name)
        assert types[("artifacts", "bytes")] == "bigint"
        for col in ("model_spec", "model_sha256", "table_kind"):
            assert types[("profiles", col)] == "text", col
        big = 5 << 30
        assert db.insert(_db.artifacts, id="a" * 64, kind="export", media_type="application/x-tar", bytes=big,
                         filename="x" * 300 + ".tar", created_at=time.time())
        assert db.one(_db.artifacts, "a" * 64)["bytes"] == big

        # a schema-1 database (as the first release made it on PostgreSQL) upgrades in place
        pg.query(name, "DELETE FROM artifacts; DELETE FROM schema_migrations WHERE version > 1; "
                       "ALTER TABLE artifacts ALTER COLUMN bytes TYPE INTEGER, ALTER COLUMN filename TYPE VARCHAR(200); "
                       "ALTER TABLE profiles ALTER COLUMN model_spec TYPE VARCHAR(200), "
                       "ALTER COLUMN model_sha256 TYPE VARCHAR(64), ALTER COLUMN table_kind TYPE VARCHAR(32); "
                       "ALTER TABLE jobs DROP COLUMN error_kind")
        assert db.version() == 1
        assert db.migrate() == [v for v, _d, _s in _db.MIGRATIONS if v > 1]
        assert _column_types(pg, name) == types
        assert db.insert(_db.artifacts, id="b" * 64, kind="export", media_type="application/x-tar", bytes=big,
                         filename="y.tar", created_at=time.time())
    finally:
        db.dispose()


def test_profiles_plans_jobs_and_a_restart_keep_everything(pg, fresh, tmp_path, tiny_profile_path):
    name, url = fresh
    state = tmp_path / "state"
    a = start_server(state, "--db-url", url)
    try:
        up = _upload(a.http, tiny_profile_path.read_bytes())
        assert up.status_code == 201, up.text
        pid = up.json()["id"]
        assert _upload(a.http, tiny_profile_path.read_bytes()).status_code == 200  # stored once
        meta = a.http.get(f"/v1/profiles/{pid}").json()
        assert meta["model"]["spec"] == "random:llama-tiny" and meta["bytes"] == tiny_profile_path.stat().st_size

        body = {"profile": pid, "budget": "5bpw", "pins": {"*.down_proj": "w8"}}
        plan = a.http.post("/v1/plans", json=body)
        assert plan.status_code == 201, plan.text
        assert plan.json()["layers"]["model.layers.0.mlp.down_proj"] == "w8"
        again = a.http.post("/v1/plans", json=body)
        assert again.status_code == 200 and again.json() == plan.json()
        plan_text = a.http.get(f"/v1/plans/{plan.json()['id']}").text
        assert json.loads(plan_text)["layers"] and json.loads(plan_text)["profile"]["sha256"] == pid

        job = a.http.post("/v1/profiles", json={**TINY, "schemes": ["w3g128z", "w4g128z"], "seed": 3})
        assert job.status_code == 202, job.text
        done = _wait_job(a.http, job.json()["id"])
        assert done["state"] == "done" and done["progress"]["done"] == done["progress"]["total"], done
        jpid = done["result"]["profile_id"]
        jplan = a.http.post("/v1/plans", json={"profile": jpid, "budget": "4.4bpw"})
        assert jplan.status_code == 201, jplan.text
        listed = a.http.get("/v1/profiles").json()["profiles"]
        _no_tracebacks(a)
    finally:
        if a.proc.poll() is None:
            a.kill9()  # a crash, not a shutdown: PostgreSQL sees the connections drop

    b = start_server(state, "--db-url", url)
    try:
        assert b.http.get(f"/v1/jobs/{done['id']}").json() == done
        assert b.http.get(f"/v1/plans/{plan.json()['id']}").text == plan_text
        assert b.http.get("/v1/profiles").json()["profiles"] == listed
        assert {p["id"] for p in listed} == {pid, jpid}
        again = b.http.post("/v1/plans", json=body)
        assert again.status_code == 200 and again.json() == plan.json()
        assert b.http.post("/v1/plans", json={"profile": jpid, "budget": "4.4bpw"}).json()["id"] == jplan.json()["id"]
        _no_tracebacks(b)
    finally:
        b.stop()
    counts = pg.query(name, "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM plans), "
                            "(SELECT count(*) FROM profiles), (SELECT count(*) FROM artifacts)")
    assert counts == [(1, 2, 2, 4)]


@pytest.fixture(scope="module")
def shared(pg, tmp_path_factory, tiny_profile_path):
    """One server on one PostgreSQL database for the concurrency tests, with the tiny profile."""
    url = pg.create_database("shared")
    s = start_server(tmp_path_factory.mktemp("pg-shared") / "state", "--db-url", url)
    pid = _upload(s.http, tiny_profile_path.read_bytes()).json()["id"]
    yield s, pid
    s.stop()


def _together(n: int, fn):
    barrier = threading.Barrier(n)

    def go(i):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(go, range(n)))


def test_concurrent_duplicate_plan_requests_give_one_plan(pg, shared):
    s, pid = shared
    body = {"profile": pid, "budget": "4.25bpw", "forbid": {"*.q_proj": ["w2g64z"]}}
    with httpx.Client(base_url=s.url, timeout=120, limits=httpx.Limits(max_connections=16)) as http:
        answers = _together(12, lambda i: http.post("/v1/plans", json=body))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 11 + [201], [r.text for r in answers]
    assert len({json.dumps(r.json(), sort_keys=True) for r in answers}) == 1
    plan_id = answers[0].json()["id"]
    assert pg.query("shared", "SELECT count(*) FROM plans WHERE id = %s", (plan_id,)) == [(1,)]

    # distinct requests at once: each its own plan, no lost or doubled rows
    with httpx.Client(base_url=s.url, timeout=120, limits=httpx.Limits(max_connections=16)) as http:
        many = _together(8, lambda i: http.post("/v1/plans", json={"profile": pid, "budget": f"{3 + i / 4}bpw"}))
    assert all(r.status_code == 201 for r in many), [r.text for r in many]
    ids = {r.json()["id"] for r in many}
    assert len(ids) == 8
    assert pg.query("shared", "SELECT count(*) FROM plans WHERE id = ANY(%s)", (list(ids),)) == [(8,)]


def test_concurrent_duplicate_profile_jobs_give_one_job(pg, shared):
    s, _pid = shared
    body = {**TINY, "schemes": ["w2g64z", "w8"], "measured": True, "seed": 41}
    with httpx.Client(base_url=s.url, timeout=120) as http:
        answers = _together(8, lambda i: http.post("/v1/profiles", json=body))
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] + [409] * 7, [r.text for r in answers]
    jid = next(r.json()["id"] for r in answers if r.status_code == 202)
    assert all(r.json()["job"] == jid for r in answers if r.status_code == 409)
    assert s.http.delete(f"/v1/jobs/{jid}").json()["state"] == "cancelled"
    assert pg.query("shared", "SELECT count(*) FROM jobs WHERE request LIKE %s", ('%"seed":41%',)) == [(1,)]


def test_profile_text_postgres_would_refuse(pg, shared, tiny_profile_path):
    """An uploaded profile's model spec is free text: longer than any VARCHAR limit is stored
    as it is; a NUL character (PostgreSQL text cannot hold one) is a 422 naming the field."""
    s, _pid = shared
    d = json.loads(tiny_profile_path.read_bytes())
    d["model"]["spec"] = "local:/" + "m" * 400
    r = _upload(s.http, json.dumps(d).encode())
    assert r.status_code == 201, r.text
    assert s.http.get(f"/v1/profiles/{r.json()['id']}").json()["model"]["spec"] == d["model"]["spec"]

    d["model"]["spec"] = "random:llama-tiny\x00"
    r = _upload(s.http, json.dumps(d).encode())
    assert r.status_code == 422 and r.json()["field"] == "body" and "NUL" in r.json()["error"], r.text
    _no_tracebacks(s)


def test_an_unreachable_database_is_a_one_line_error(pg, tmp_path):
    with pytest.raises(RuntimeError, match="server did not start"):
        start_server(tmp_path / "state", "--db-url", pg.url("no_such_database"))
    log = (tmp_path / "state-server.log").read_text()
    assert "no_such_database" in log and "does not exist" in log and "Traceback" not in log, log


def test_sqlite_schema_1_upgrades_too(tmp_path):
    """Migration 2 is PostgreSQL's; on SQLite (64-bit INTEGER, unenforced VARCHAR) it is a
    recorded no-op. Migration 3 adds ``jobs.error_kind``. A state dir made by schema 1 keeps its rows."""
    import sqlalchemy as sa

    from bitalloc.allocator.service import db as _db

    url = _db.default_url(tmp_path)
    old = sa.create_engine(url)
    with old.begin() as c:  # what the schema-1 server left: its tables, a failed job, one artifact, version 1
        _db.metadata.create_all(c, tables=list(_db._V1))
        c.execute(sa.text("ALTER TABLE jobs DROP COLUMN error_kind"))  # schema 3's column
        c.execute(_db.schema_migrations.insert().values(version=1, description="v1", applied_at=0.0))
        c.execute(_db.artifacts.insert().values(id="c" * 64, kind="plan", media_type="application/json", bytes=5,
                                                filename="p.json", created_at=0.0))
        c.execute(sa.text("INSERT INTO jobs (id, kind, state, request, created_at, error, attempts, cancel_requested) "
                          "VALUES ('job_old', 'profile', 'failed', '{}', 0.0, 'an old failure', 1, 0)"))
    old.dispose()
    db = _db.Database(url)
    try:
        assert db.version() == _db.SCHEMA_VERSION == 3
        assert db.one(_db.artifacts, "c" * 64)["bytes"] == 5
        old_job = db.one(_db.jobs, "job_old")  # kept, and of no known kind: it failed before kinds were recorded
        assert old_job["error"] == "an old failure" and old_job["error_kind"] is None
        assert db.insert(_db.artifacts, id="d" * 64, kind="export", media_type="application/x-tar", bytes=5 << 30,
                         filename="x" * 300, created_at=0.0)
        assert db.one(_db.artifacts, "d" * 64)["bytes"] == 5 << 30
    finally:
        db.dispose()
