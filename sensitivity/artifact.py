"""Writing artifacts safely: temporary file in the same folder, fsync, rename into place.

Every artifact bitalloc writes (profiles, plans, checkpoints' headers, quantized models,
exports, the service's files) goes through :func:`atomic_write`, so a crash or a full disk
never leaves a partial file or a stray temporary under the output name. Pure stdlib (no
torch): solvers-free layers and the service can use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_write", "write_json", "write_text", "write_bytes", "file_sha256"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it to ``path``,
    on any error remove it. The parent folder is created if missing."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    binary = "b" in mode
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = None) -> Path:
    """JSON (no NaN/inf: ``allow_nan=False``), written atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False)
    with atomic_write(path) as f:
        f.write(text + "\n")
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
