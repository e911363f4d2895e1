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

from .. import BitallocError

__all__ = ["atomic_write", "atomic_path", "write_json", "write_text", "write_bytes", "file_sha256", "ArtifactError", "OutputError",
           "envelope", "parse_json", "read_json", "check_schema", "validate", "check_output"]


def _plain_mode(fd: int) -> None:
    """mkstemp makes 0600 files; an artifact gets the mode a plain ``open`` would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
                 newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it to ``path``,
    on any error remove it (:func:`atomic_path`). The parent folder is created if missing."""
    binary = "b" in mode
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if binary else encoding,
                                        newline=None if binary else newline) as f:
        yield f


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that take a file name (safetensors'
    ``save_file``); renamed to ``path`` on success (after an fsync), removed on any error."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    _plain_mode(fd)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
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


# ---------------------------------------------------------------------------------------
# the envelope: one `schema` key, provenance, version checks, hostile-input-safe reading

class ArtifactError(BitallocError, ValueError):
    """An artifact file is unreadable, too large, too deeply nested, of an unknown version,
    or does not match its declared schema; the message names the file and the field."""


class OutputError(BitallocError, ValueError):
    """An output path cannot be written, would overwrite an input, or already exists."""


MAX_JSON_BYTES = 1 << 30  # 1 GiB: far above any profile (SmolLM2 measured: ~0.3 MB + sidecar)
MAX_DEPTH = 64  # JSON nesting; bitalloc's own artifacts need < 10


def envelope(schema: str, **fields: Any) -> dict:
    """The common head of every JSON artifact: ``schema``, the bitalloc version and the
    creation time; ``fields`` (inputs' hashes, the command/options) follow."""
    import datetime as _dt

    from .. import __version__

    return {"schema": schema, "bitalloc_version": __version__,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **fields}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows (a finite number was expected)")


def _depth_ok(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return False
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return True


def parse_json(text: str | bytes, where: str, *, error: type[Exception] = ArtifactError,
               max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that never raises anything but ``error`` (one line naming ``where``):
    invalid JSON, NaN/Infinity literals, nesting deeper than ``max_depth``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where} is not UTF-8 text (byte {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise error(f"{where} is nested too deeply (more than {max_depth} levels of [ or {{)") from None
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # NaN / Infinity
        raise error(f"{where}: {e}") from None
    if not _depth_ok(obj, max_depth):
        raise error(f"{where} is nested too deeply (more than {max_depth} levels of [ or {{)")
    return obj


def read_json(path: str | os.PathLike, what: str, *, error: type[Exception] = ArtifactError,
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Read a JSON artifact: missing, unreadable, oversized, non-UTF-8, invalid, NaN or
    too deeply nested input is ``error`` with one line naming the file."""
    p = Path(path)
    where = f"{what} file {str(p)!r}"
    if not p.exists():
        raise error(f"{where} does not exist")
    if not p.is_file():
        raise error(f"{where} is not a regular file")
    size = p.stat().st_size
    if size > max_bytes:
        raise error(f"{where} is {size} bytes, more than the {max_bytes} bytes a {what} may have")
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{where} cannot be read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise error(f"{where} is more than the {max_bytes} bytes a {what} may have")
    return parse_json(data, where, error=error, max_depth=max_depth)


def check_schema(found: Any, expected: str, where: str, *, readable: tuple[str, ...] = (),
                 error: type[Exception] = ArtifactError) -> str:
    """The artifact's ``schema`` string, if it is ``expected`` or one of the ``readable``
    previous versions; otherwise one line saying what this bitalloc reads."""
    if found == expected or found in readable:
        return found
    kinds = " or ".join(repr(s) for s in (expected, *readable))
    if not isinstance(found, str):
        raise error(f"{where}: field 'schema' must be a string like {expected!r}, got {_short(found)}")
    raise error(f"{where}: unsupported schema {found!r} (this bitalloc reads {kinds})")


def _short(v: Any, n: int = 40) -> str:
    s = repr(v) if not isinstance(v, (dict, list)) else f"a JSON {'object' if isinstance(v, dict) else 'array'}"
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def validate(model: Any, data: Any, where: str, *, error: type[Exception] = ArtifactError, prefix: str = ""):
    """Validate ``data`` against a pydantic model (strict, extra fields forbidden); the
    first problem is ``error``: ``<where>: field 'a.b[3]': <what was expected> (got ...)``."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(x for x in (prefix, _loc(err.get("loc", ()))) if x)
        msg = err.get("msg", "invalid")
        got = "" if err.get("type") == "missing" else f" (got {_short(err.get('input'))})"
        field_s = f"field {loc!r}" if loc else "the top level"
        raise error(f"{where}: {field_s}: {msg}{got}") from None
    except RecursionError:
        raise error(f"{where} is nested too deeply") from None


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            if str(part).startswith(("function-", "list[", "dict[", "tuple[", "union[", "nullable[", "str", "int", "float", "bool")) and out:
                continue  # pydantic's internal union / validator steps
            out += ("." if out else "") + str(part)
    return out


def check_output(path: str | os.PathLike, *, inputs: Any = (), overwrite: bool = False, what: str = "output",
                 directory: bool = False) -> Path:
    """Before any expensive step: refuse an output that is one of the ``inputs``, that
    already exists (unless ``overwrite``), or whose folder cannot be written.
    Returns the path. ``directory``: the output is a folder (it may exist empty)."""
    p = Path(path)
    for i in inputs or ():
        if i is None or (isinstance(i, str) and i in ("generated", "")):
            continue
        q = Path(i)
        try:
            same = q.exists() and p.exists() and os.path.samefile(p, q)
        except OSError:
            same = False
        if same or p.resolve() == q.resolve():
            raise OutputError(f"{what} {str(p)!r} is also an input ({str(q)!r}); choose another output path")
    if p.exists():
        if directory:
            if not p.is_dir():
                raise OutputError(f"{what} {str(p)!r} exists and is not a directory")
            if any(p.iterdir()) and not overwrite:
                raise OutputError(f"{what} folder {str(p)!r} already exists and is not empty; pass --overwrite to replace it")
        elif p.is_dir():
            raise OutputError(f"{what} {str(p)!r} is a directory, a file path was expected")
        elif not overwrite:
            raise OutputError(f"{what} {str(p)!r} already exists; pass --overwrite to replace it")
    parent = p if (directory and p.is_dir()) else p.parent
    probe = parent
    while not probe.exists():  # the nearest existing ancestor must be a writable folder
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{what} {str(p)!r} cannot be created: {str(probe)!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {str(p)!r} cannot be written: no write permission in {str(probe)!r}")
    return p
