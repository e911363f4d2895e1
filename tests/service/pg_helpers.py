"""A throwaway PostgreSQL server for the service tests, from the binaries in the ``pgserver`` wheel.

The ``pgserver`` distribution (a test extra, pinned in constraints.txt) bundles a PostgreSQL 16
build, so CI gets a real server through pip alone. Only its binaries are used here: its
``get_server()`` runs as root by creating a system user (``useradd pgserver``) and widening the
permissions of every folder above the data directory, which a test should not do to a machine.
PostgreSQL itself refuses to run as root, so when the tests run as root the server runs as the
unprivileged ``nobody`` account instead (a fresh data directory under the system temp folder,
owned by it; when ``nobody`` cannot reach the virtual environment, say one under a 0700 home,
the binaries are copied in there too, 0.3 s); otherwise as the current user. It listens on 127.0.0.1 on a free port (and on a
Unix socket in its own folder), with fsync off: it holds test data only.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["Postgres", "PostgresUnavailable"]


class PostgresUnavailable(RuntimeError):
    """The bundled PostgreSQL could not be set up or started (the message says why)."""


def bin_dir() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresUnavailable("the `pgserver` distribution (PostgreSQL binaries) is not installed: "
                                  "pip install -c constraints.txt -e '.[test]'")
    d = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    if not (d / "postgres").exists():
        raise PostgresUnavailable(f"no postgres binary in {d}")
    return d


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # preexec_fn (runs after the uid change, which would clear it)
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Postgres:
    """``with Postgres() as pg: pg.url("db")``; ``create_database(name)`` gives a fresh, empty database."""

    def __init__(self, *, timeout: float = 60.0, copy_binaries: bool | None = None):
        self.bin = bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="bitalloc-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.as_user: dict = {}
        try:
            if os.geteuid() == 0:  # "root" execution of the PostgreSQL server is not permitted
                try:
                    pw = pwd.getpwnam("nobody")
                except KeyError:
                    raise PostgresUnavailable("running as root and there is no `nobody` account to run "
                                              "PostgreSQL as (it refuses to run as root)") from None
                os.chown(self.root, pw.pw_uid, pw.pw_gid)
                self.root.chmod(0o700)
                self.as_user = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
                if copy_binaries or (copy_binaries is None and not self._runs_as(pw)):
                    self.bin = self._copy_binaries(pw)
                if not self._runs_as(pw):
                    raise PostgresUnavailable(f"the account {pw.pw_name!r} (PostgreSQL refuses to run as root) cannot "
                                              f"run {self.bin / 'postgres'} in {self.root}: {self._why}")
            self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                       "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions"], "initdb")
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    # -- life cycle ------------------------------------------------------------------------
    def _runs_as(self, pw) -> bool:
        """Can the server's account reach the binaries and the data folder?"""
        try:
            r = subprocess.run([str(self.bin / "postgres"), "--version"], capture_output=True, text=True,
                               env=self._env(), cwd=self.root, timeout=60, **self.as_user)
        except OSError as e:  # the child could not enter cwd or exec the binary
            self._why = f"{type(e).__name__}: {e}"
            return False
        self._why = (r.stderr or r.stdout).strip()[-500:]
        return r.returncode == 0

    def _copy_binaries(self, pw) -> Path:
        """bin/, lib/ and share/ (and the wheel's bundled libpq, which initdb finds by a relative
        RPATH) into the server's own folder, rather than widening permissions above the venv."""
        src = self.bin.parent  # .../site-packages/pgserver/pginstall
        dst = self.root / "pkg" / "pgserver" / "pginstall"
        for sub in ("bin", "lib", "share"):
            shutil.copytree(src / sub, dst / sub, symlinks=True)
        libs = src.parent.parent / "pgserver.libs"
        if libs.is_dir():
            shutil.copytree(libs, self.root / "pkg" / "pgserver.libs", symlinks=True)
        for d, _dirs, files in os.walk(self.root / "pkg"):
            for name in [*_dirs, *files, None]:
                os.lchown(os.path.join(d, name) if name else d, pw.pw_uid, pw.pw_gid)
        return dst / "bin"

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return {**env, "LC_ALL": "C", "TZ": "UTC", "HOME": str(self.root)}

    def _run(self, cmd: list[str], what: str) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True, env=self._env(), cwd=self.root, timeout=120,
                           **self.as_user)
        if r.returncode != 0:
            raise PostgresUnavailable(f"{what} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")

    def _start(self, timeout: float) -> None:
        import psycopg

        for attempt in range(3):  # a free port can be taken between the probe and the bind
            self.port = _free_port()
            log = open(self.logfile, "ab")
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=300", "-c", "shared_buffers=32MB"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._env(), cwd=self.root,
                preexec_fn=_die_with_parent, **self.as_user)
            log.close()
            t0 = time.monotonic()
            while time.monotonic() - t0 < timeout:
                if self.proc.poll() is not None:
                    break
                try:
                    psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                    return
                except psycopg.OperationalError:
                    time.sleep(0.1)
            text = self.log()
            if self.proc.poll() is None:
                self._terminate()
                raise PostgresUnavailable(f"PostgreSQL did not accept connections within {timeout}s; its log:\n{text[-3000:]}")
            if "could not bind" in text and attempt < 2:
                continue
            raise PostgresUnavailable(f"PostgreSQL exited with code {self.proc.returncode}; its log:\n{text[-3000:]}")

    def _terminate(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: roll back sessions, stop
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def stop(self) -> None:
        self._terminate()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- use -------------------------------------------------------------------------------
    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL ``bitalloc serve --db-url`` takes."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def query(self, database: str, sql: str, params=None) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.dsn(database), autocommit=True) as c:
            cur = c.execute(sql, params)
            return cur.fetchall() if cur.description else []
