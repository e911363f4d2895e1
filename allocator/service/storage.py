"""Content-addressed artifact files in the state directory.

Layout (everything the service writes lives under the state dir)::

    STATE/bitalloc.db            the database (SQLite default; metadata only)
    STATE/artifacts/ab/abcd…     one file per artifact, named by its sha256
    STATE/jobs/job_…/            a job's working folder (request, checkpoint, logs)
    STATE/tmp/                   uploads being received

An artifact's id is the sha256 of its bytes, so the same bytes are stored once and an id
names exactly one content. Writes are atomic (:mod:`bitalloc.sensitivity.artifact`: temp
file in the same folder, fsync, rename). Ids are checked against ``^[0-9a-f]{64}$`` before
any path is built, and the built path is checked to be inside the artifacts folder: no id
reaches the filesystem outside the state dir.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from pathlib import Path

from bitalloc.sensitivity.artifact import atomic_write, file_sha256, write_bytes

from .errors import ApiError

__all__ = ["ArtifactStore", "check_id", "ID_RE"]

ID_RE = re.compile(r"^[0-9a-f]{64}$")
JOB_RE = re.compile(r"^job_[0-9a-f]{32}$")


def check_id(value: str, field: str = "id", pattern: re.Pattern = ID_RE) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ApiError(422, f"{field}: {value!r} is not a valid id (expected {pattern.pattern})", field)
    return value


class ArtifactStore:
    def __init__(self, state_dir: str | os.PathLike):
        self.state = Path(state_dir).resolve()
        self.root = self.state / "artifacts"
        self.tmp = self.state / "tmp"
        self.jobs = self.state / "jobs"
        for d in (self.root, self.tmp, self.jobs):
            d.mkdir(parents=True, exist_ok=True)

    def _inside(self, p: Path, root: Path) -> Path:
        rp = p.resolve()
        if root not in rp.parents:
            raise ApiError(422, "id resolves outside the state directory", "id")
        return rp

    def path(self, aid: str) -> Path:
        check_id(aid)
        return self._inside(self.root / aid[:2] / aid, self.root)

    def job_dir(self, job_id: str) -> Path:
        check_id(job_id, "id", JOB_RE)
        return self._inside(self.jobs / job_id, self.jobs)

    def exists(self, aid: str) -> bool:
        return self.path(aid).is_file()

    def put_bytes(self, data: bytes) -> str:
        aid = hashlib.sha256(data).hexdigest()
        p = self.path(aid)
        if not p.is_file():
            write_bytes(p, data)
        return aid

    def put_file(self, src: str | os.PathLike, *, move: bool = False) -> str:
        """Store a file (copied atomically, or moved when it is on the same filesystem and
        ``move``); returns its id."""
        src = Path(src)
        aid = file_sha256(src)
        dest = self.path(aid)
        if dest.is_file():
            if move:
                src.unlink()
            return aid
        if move:
            with open(src, "rb") as f:
                os.fsync(f.fileno())
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            _fsync_dir(dest.parent)
            return aid
        with open(src, "rb") as f, atomic_write(dest, "wb") as out:
            for block in iter(lambda: f.read(1 << 20), b""):
                out.write(block)
        return aid

    def put_tree(self, folder: str | os.PathLike) -> str:
        """A folder (an export's output) as one uncompressed tar artifact (sorted, no owners, mtime 0)."""
        folder = Path(folder)
        tmp = self.tmp / f".tree-{os.getpid()}-{id(folder)}.tar"
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for p in sorted(folder.rglob("*")):
                info = tar.gettarinfo(str(p), arcname=str(p.relative_to(folder)))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                if p.is_file():
                    with open(p, "rb") as f:
                        tar.addfile(info, f)
                elif p.is_dir():
                    tar.addfile(info)
        return self.put_file(tmp, move=True)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
