"""The service's database: jobs, profiles, plans, artifacts and token hashes (SQLAlchemy Core).

Default: SQLite in the state dir (``sqlite:///STATE/bitalloc.db``) in WAL mode with a busy
timeout, so request threads and the job manager share it safely and a ``kill -9`` loses
nothing that was committed. Any SQLAlchemy URL works (``--db-url
postgresql+psycopg://...`` for a team; the driver is then the user's to install).

Migrations are versioned: :data:`MIGRATIONS` is an append-only list of ``(version,
description, steps)``; :func:`migrate` applies the missing ones in order, each in one
transaction, and records it in ``schema_migrations``. A database newer than this code is
refused. Never edit a released migration: add the next one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text

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
    Column("result", Text),  # JSON
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Integer, nullable=False, default=0),
)
artifacts = Table(
    "artifacts", metadata,
    Column("id", String(64), primary_key=True),  # sha256 of the file
    Column("kind", String(16), nullable=False),  # profile | plan | export
    Column("media_type", String(80), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("filename", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
)
profiles = Table(
    "profiles", metadata,
    Column("id", String(64), primary_key=True),  # = its artifact id
    Column("model_spec", String(200)),
    Column("model_sha256", String(64), index=True),
    Column("n_layers", Integer, nullable=False),
    Column("schemes", Text, nullable=False),  # JSON list
    Column("groups", Text, nullable=False),  # JSON list
    Column("table_kind", String(32)),  # measured | calibrated-proxy
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


# (version, description, step): append only
MIGRATIONS: list[tuple[int, str, Callable[[sa.Connection], None]]] = [
    (1, "jobs, artifacts, profiles, plans, tokens", _create(_V1)),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


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
            else:
                self.engine = sa.create_engine(url, pool_pre_ping=True)
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
