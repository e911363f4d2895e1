"""The service's database: jobs, profiles, plans, artifacts and token hashes (SQLAlchemy Core).

Default: SQLite in the state dir (``sqlite:///STATE/bitalloc.db``) in WAL mode with a busy
timeout, so request threads and the job manager share it safely and a ``kill -9`` loses
nothing that was committed. Any SQLAlchemy URL works; PostgreSQL (``--db-url
postgresql+psycopg://USER@HOST/DB``, the driver ``psycopg[binary]``) is tested against a real
server (tests/service/test_service_postgres.py). One server per database: on start a server
queues again every job left ``running``, which assumes no other server is running them.

Migrations are versioned: :data:`MIGRATIONS` is an append-only list of ``(version,
description, steps)``; :func:`migrate` applies the missing ones in order, each in one
transaction, and records it in ``schema_migrations``. A database newer than this code is
refused. Never edit a released migration: add the next one. Migration 1 creates the tables as
they are defined below (the current schema), so every later step must also hold on a database
that already has its change. On PostgreSQL the migrations run under an advisory lock: servers
that meet an empty database at the same moment migrate it once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table, Text

from bitalloc import BitallocError

__all__ = ["Database", "SCHEMA_VERSION", "MIGRATIONS", "DatabaseError"]


class DatabaseError(BitallocError, ValueError):
    """The database cannot be opened or is of another version."""


metadata = MetaData()

schema_migrations = Table(
    "schema_migrations", metadata,
    Column("version", Integer, primary_key=True),
    Column("description", String(200), nullable=False),
    Column("applied_at", Float, nullable=False),
)
jobs = Table(
    "jobs", metadata,
    Column("id", String(40), primary_key=True),
    Column("kind", String(16), nullable=False),  # "profile" | "export"
    Column("state", String(16), nullable=False, index=True),  # queued running done failed cancelled
    Column("request", Text, nullable=False),  # JSON
    Column("dedupe_key", String(80), unique=True, nullable=True),  # request hash while queued/running
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("progress_done", Integer),
    Column("progress_total", Integer),
    Column("eta_s", Float),
    Column("error", Text),
    Column("error_kind", String(16)),  # v3: a failed job's "input" (the request) | "internal" (ours)
    Column("result", Text),  # JSON
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Integer, nullable=False, default=0),
)
artifacts = Table(
    "artifacts", metadata,
    Column("id", String(64), primary_key=True),  # sha256 of the file
    Column("kind", String(16), nullable=False),  # profile | plan | export
    Column("media_type", String(80), nullable=False),
    Column("bytes", BigInteger, nullable=False),  # exports pass 2 GiB (v2: PostgreSQL's INTEGER is 32-bit)
    Column("filename", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)
profiles = Table(
    "profiles", metadata,
    Column("id", String(64), primary_key=True),  # = its artifact id
    # v2: TEXT, as an uploaded profile says them (PostgreSQL enforces VARCHAR(n); SQLite does not)
    Column("model_spec", Text),
    Column("model_sha256", Text, index=True),
    Column("n_layers", Integer, nullable=False),
    Column("schemes", Text, nullable=False),  # JSON list
    Column("groups", Text, nullable=False),  # JSON list
    Column("table_kind", Text),  # measured | calibrated-proxy
    Column("source", String(16), nullable=False),  # job | upload
    Column("job_id", String(40)),
    Column("created_at", Float, nullable=False),
)
plans = Table(
    "plans", metadata,
    Column("id", String(64), primary_key=True),  # sha256 of the canonical request
    Column("profile_id", String(64), nullable=False, index=True),
    Column("artifact_id", String(64), nullable=False),
    Column("request", Text, nullable=False),
    Column("summary", Text, nullable=False),  # JSON: the POST answer
    Column("created_at", Float, nullable=False),
)
tokens = Table(
    "tokens", metadata,
    Column("hash", String(64), primary_key=True),  # sha256 of the token; the token itself is never stored
    Column("label", String(200)),
    Column("created_at", Float, nullable=False),
)

_V1 = (schema_migrations, jobs, artifacts, profiles, plans, tokens)


def _create(tables) -> Callable[[sa.Connection], None]:
    return lambda conn: metadata.create_all(conn, tables=list(tables))


def _v2_widen(conn: sa.Connection) -> None:
    """Artifact sizes to BIGINT, a profile's free text to TEXT. SQLite: nothing to do (its
    INTEGER is 64-bit and VARCHAR(n) is not enforced); PostgreSQL refused an export over 2 GiB
    and an uploaded profile whose model spec passed 200 characters (a 500)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("ALTER TABLE artifacts ALTER COLUMN bytes TYPE BIGINT, ALTER COLUMN filename TYPE TEXT"))
        conn.execute(sa.text("ALTER TABLE profiles ALTER COLUMN model_spec TYPE TEXT, "
                             "ALTER COLUMN model_sha256 TYPE TEXT, ALTER COLUMN table_kind TYPE TEXT"))


def _v3_error_kind(conn: sa.Connection) -> None:
    """A failed job says whose the failure is: ``input`` (the request cannot be done: a
    calibration text too short, a plan the target cannot express; do not retry it unchanged)
    or ``internal`` (the worker crashed or raised anything else). A database made fresh has
    the column already (version 1 creates the tables as they are now)."""
    if "error_kind" not in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}:
        conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN error_kind VARCHAR(16)"))


# (version, description, step): append only
MIGRATIONS: list[tuple[int, str, Callable[[sa.Connection], None]]] = [
    (1, "jobs, artifacts, profiles, plans, tokens", _create(_V1)),
    (2, "artifact sizes BIGINT, profile text TEXT (PostgreSQL)", _v2_widen),
    (3, "jobs.error_kind: whether a failed job's request or bitalloc was at fault", _v3_error_kind),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


_MIGRATION_LOCK_KEY = int.from_bytes(b"bitalloc", "big") >> 1  # any fixed 63-bit key of ours


def default_url(state_dir: str | Path) -> str:
    return f"sqlite:///{Path(state_dir).resolve() / 'bitalloc.db'}"


class Database:
    def __init__(self, url: str):
        self.url = url
        try:
            if url.startswith("sqlite"):
                self.engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                                               pool_size=16, max_overflow=48)
                sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            else:  # 40 connections at most: one for each of the request threads (anyio's default limit)
                self.engine = sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=32)
            self.migrate()
        except sa.exc.ArgumentError as e:
            raise DatabaseError(f"--db-url {url!r} is not a database URL ({e})") from None
        except sa.exc.NoSuchModuleError as e:
            raise DatabaseError(f"--db-url {url!r}: no driver for it ({e})") from None
        except sa.exc.OperationalError as e:
            raise DatabaseError(f"cannot open the database {url!r}: {str(e.orig).splitlines()[0]}") from None

    # -- migrations --------------------------------------------------------------------
    def version(self) -> int:
        with self.engine.connect() as c:
            if not sa.inspect(c).has_table("schema_migrations"):
                return 0
            v = c.execute(sa.select(sa.func.max(schema_migrations.c.version))).scalar()
            return int(v or 0)

    def migrate(self) -> list[int]:
        with self._migration_lock():
            have = self.version()
            if have > SCHEMA_VERSION:
                raise DatabaseError(f"the database is at schema version {have}, newer than this bitalloc ({SCHEMA_VERSION})")
            done = []
            for v, desc, step in MIGRATIONS:
                if v <= have:
                    continue
                with self.engine.begin() as c:
                    step(c)
                    c.execute(schema_migrations.insert().values(version=v, description=desc, applied_at=time.time()))
                done.append(v)
            return done

    @contextmanager
    def _migration_lock(self):
        """PostgreSQL: a session advisory lock around the version check and the steps, so two
        servers starting on one empty database do not both create the tables (the second
        failed with a duplicate ``pg_class`` key). Released when its connection closes, so a
        server killed mid-migration leaves no lock behind."""
        if self.engine.dialect.name != "postgresql":
            yield
            return
        with self.engine.connect() as c:
            c.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            c.commit()
            try:
                yield
            finally:
                c.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_KEY})
                c.commit()

    # -- small helpers -----------------------------------------------------------------
    def one(self, table: Table, key: Any, col: str = "id") -> dict | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(table).where(table.c[col] == key)).mappings().first()
            return dict(row) if row else None

    def insert(self, table: Table, **values) -> bool:
        """Insert a row; False when the key (or a unique column) already exists."""
        try:
            with self.engine.begin() as c:
                c.execute(table.insert().values(**values))
            return True
        except sa.exc.IntegrityError:
            return False

    def update(self, table: Table, key: Any, where: dict | None = None, **values) -> int:
        """Update one row by id (and ``where`` column equalities); returns rows changed."""
        q = table.update().where(table.c.id == key)
        for k, v in (where or {}).items():
            q = q.where(table.c[k].in_(v) if isinstance(v, (list, tuple, set)) else table.c[k] == v)
        with self.engine.begin() as c:
            return c.execute(q.values(**values)).rowcount

    def rows(self, table: Table, *, where: dict | None = None, order=None, limit: int | None = None,
             offset: int = 0) -> list[dict]:
        q = sa.select(table)
        for k, v in (where or {}).items():
            q = q.where(table.c[k].in_(v) if isinstance(v, (list, tuple, set)) else table.c[k] == v)
        if order is not None:
            q = q.order_by(order)
        if limit is not None:
            q = q.limit(limit).offset(offset)
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)
