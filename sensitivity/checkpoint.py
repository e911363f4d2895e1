"""The measured run's checkpoint: an append-only JSONL file of finished (layer, scheme)
items behind a header that says which model and configuration they are valid for."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CheckpointError, RunnerError
from .worker import Key, WorkerSetup

__all__ = ["CHECKPOINT_SCHEMA", "checkpoint_header", "Checkpoint", "item_file_name", "make_header"]

CHECKPOINT_SCHEMA = "bitalloc.measure-checkpoint/1"
_ITEM = {"layer", "scheme", "values"}
_FILE_ITEM = _ITEM | {"file", "sha256"}  # an item whose value is too large for a line (Hessian shards)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def checkpoint_header(setup: WorkerSetup, schemes: Sequence[str], *, quantizer: str = "rtn", model_sha256: str | None = None) -> dict:
    """The first line of a checkpoint: what its results are valid for.

    ``config`` holds everything a value depends on besides the layer: the calibration
    tokens (sha256) and description, the candidate schemes, the metric, the KL options and
    the quantizer, and the layer selection (it decides which blocks the reference caches
    for prefix replay); ``config_sha256`` hashes it. The runner mode and worker count are
    not part of it (results are identical).
    """
    config = {
        "calibration": {k: v for k, v in setup.calibration.items()},
        "tokens_sha256": setup.tokens_sha256,
        "schemes": list(schemes),
        "metric": {"name": setup.metric} if not setup.groups else {"groups": setup.groups},
        "kl_samples": setup.kl_samples,
        "kl_stride": setup.kl_stride,
        "batch_size": setup.batch_size,
        "weights": setup.weights,
        "layers": {"include": list(setup.include), "exclude": list(setup.exclude), "quantize_tied": setup.quantize_tied},
        # "rtn" is round-to-nearest with the per-group clip search since kernels.quant grew it:
        # recorded as "rtn-clip" so checkpoints of plain min-max RTN never merge with these
        "quantizer": "rtn-clip" if quantizer == "rtn" else quantizer,
    }
    if setup.saliency != "hessian":  # only when not the default, so older checkpoints keep their hash
        config["saliency"] = setup.saliency
    return make_header(CHECKPOINT_SCHEMA, setup, config, model_sha256=model_sha256)


def make_header(schema: str, setup: WorkerSetup, config: dict, *, model_sha256: str | None = None) -> dict:
    """A checkpoint header: ``schema``, the model, ``config`` and its sha256 (what :class:`Checkpoint` checks)."""
    return {
        "schema": schema,
        "model": {"spec": setup.model, "fingerprint_sha256": model_sha256 or setup.fingerprint_sha256},
        "config_sha256": _sha(config),
        "config": config,
    }


def item_file_name(key: Key) -> str:
    """A file name made of an item's key, unique per key."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{key[0]}.{key[1]}").strip("._")[:80]
    return f"{stem}.{_sha(list(key))[:10]}.safetensors"


def check_finite(key, values: dict, where: str) -> None:
    """A measured value must be a finite number: NaN or inf is an error naming the item."""
    for metric, v in values.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if isinstance(v, bool) or not math.isfinite(f):
            raise RunnerError(f"{where} item (layer {key[0]!r}, scheme {key[1]!r}): {metric} = {v!r} is not a finite "
                              "number; the measurement is refused (check the model's numerics for this layer)")


class Checkpoint:
    """An append-only JSONL file of finished items, validated against a header.

    Line 1 is the header (:func:`checkpoint_header`); every other line is one finished
    item ``{"layer", "scheme", "values"}``, written, flushed and fsynced as it arrives. A
    torn last line (the process was killed mid-write) is dropped (and cut off before the
    next append). A duplicate item keeps its first value. A header for another model or
    configuration is a :class:`CheckpointError`: nothing is merged. An item whose value is
    large (a Hessian shard) keeps it in a file of :attr:`files_dir` written atomically before
    its line, which records the file's name and sha256 (``"file"``, ``"sha256"``); a line
    whose file is missing or changed does not count (the item runs again).
    """

    def __init__(self, path: str | os.PathLike, header: dict) -> None:
        self.path = Path(path)
        self.header = header
        self.duplicates = 0
        self.dropped_tail = False
        self.lost_files = 0
        self.files: dict[Key, Path] = {}  # items whose value has a file (see append)
        self.files_dir = self.path.with_suffix(".files")
        self._f = None

    def _mismatch(self, have: dict) -> str | None:
        want = self.header
        if have.get("schema") != want["schema"]:
            return f"schema {have.get('schema')!r}, this bitalloc writes {want['schema']!r}"
        hm, wm = have.get("model") or {}, want["model"]
        if hm.get("fingerprint_sha256") != wm.get("fingerprint_sha256"):
            return (f"it was made for another model ({hm.get('spec')!r}, fingerprint "
                    f"{str(hm.get('fingerprint_sha256'))[:12]}; this run: {wm.get('spec')!r}, "
                    f"{str(wm.get('fingerprint_sha256'))[:12]})")
        try:
            edited = have.get("config_sha256") != _sha(have.get("config"))
        except (TypeError, ValueError, RecursionError):
            edited = True
        if edited:
            return "its header was edited (config does not match config_sha256)"
        if have.get("config_sha256") != want["config_sha256"]:
            hc, wc = have.get("config") or {}, want["config"]
            diff = sorted(k for k in set(hc) | set(wc) if hc.get(k) != wc.get(k))
            return f"it was made with another configuration (differs in: {', '.join(diff) or 'config hash'})"
        return None

    def _validate_header(self, rec: Any) -> None:
        """Raise :class:`CheckpointError` unless ``rec`` (the parsed first line, None if
        missing or torn) is a header for this model and configuration."""
        if not isinstance(rec, dict):
            raise CheckpointError(f"checkpoint {str(self.path)!r} has no valid header line; delete it or choose another checkpoint folder")
        why = self._mismatch(rec)
        if why:
            raise CheckpointError(f"checkpoint {str(self.path)!r} does not match this run: {why}; "
                                  "delete it or choose another checkpoint folder")

    def check(self) -> None:
        """Raise :class:`CheckpointError` now if an existing file was made for another model or
        configuration (reads the header line only; creates nothing). Lets a run refuse a
        mismatched checkpoint before it spends minutes on statistics it would then discard."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb") as f:
            first = f.readline()
        try:
            rec = json.loads(first) if first.endswith(b"\n") else None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            rec = None
        self._validate_header(rec)

    def load(self) -> dict[Key, dict]:
        """Read (or create) the file; returns the finished items. Opens it for appending."""
        done: dict[Key, dict] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.header, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._f = open(self.path, "a", encoding="utf-8")
            return done
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        good_end = 0  # byte offset after the last complete, valid line
        pos = 0
        for n, line in enumerate(lines):
            complete = pos + len(line) < len(raw)  # followed by a newline
            end = pos + len(line) + 1
            try:
                rec = json.loads(line) if line.strip() else None
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                rec = False
            if n == 0:
                self._validate_header(rec if complete else None)
                good_end = end
            elif rec is None and not line.strip():
                if complete:
                    good_end = end
            elif not complete or rec is False:
                if complete and any(x.strip() for x in lines[n + 1 :]):
                    raise CheckpointError(f"checkpoint {str(self.path)!r} line {n + 1} is not valid JSON; delete it or choose another checkpoint folder")
                self.dropped_tail = True
                break
            else:
                try:
                    if not isinstance(rec, dict) or set(rec) not in (_ITEM, _FILE_ITEM):
                        raise TypeError
                    if set(rec) == _FILE_ITEM and not all(isinstance(rec[k], str) for k in ("file", "sha256")):
                        raise TypeError
                    key = (rec["layer"], rec["scheme"])
                    if not all(isinstance(x, str) for x in key) or not isinstance(rec["values"], dict):
                        raise TypeError
                    values = {str(k): v for k, v in rec["values"].items()}
                    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
                        raise TypeError
                except (KeyError, TypeError, ValueError):
                    raise CheckpointError(f"checkpoint {str(self.path)!r} line {n + 1} is not an item record "
                                          '{"layer": str, "scheme": str, "values": {metric: number}}') from None
                check_finite(key, values, f"checkpoint {str(self.path)!r} line {n + 1}")
                values = {k: float(v) for k, v in values.items()}
                if key in done:
                    self.duplicates += 1
                elif "file" in rec and not self._file_ok(key, rec):
                    self.lost_files += 1  # its file is missing or not what was written: the item runs again
                else:
                    done[key] = values
                good_end = end
            pos = end
        if good_end < len(raw):
            with open(self.path, "r+b") as f:  # cut the torn tail so the next line starts clean
                f.truncate(good_end)
        self._f = open(self.path, "a", encoding="utf-8")
        return done

    def _file_ok(self, key: Key, rec: dict) -> bool:
        """Whether the file a line references is in :attr:`files_dir` with the recorded sha256."""
        from .artifact import file_sha256

        p = self.files_dir / rec["file"]
        if Path(rec["file"]).name != rec["file"] or not p.is_file() or file_sha256(p) != rec["sha256"]:
            return False
        self.files[key] = p
        return True

    def file_for(self, key: Key) -> Path:
        """Where an item's file goes: :func:`item_file_name` in :attr:`files_dir`."""
        return self.files_dir / item_file_name(key)

    def append(self, key: Key, values: dict, *, file: Path | None = None) -> None:
        """Record a finished item (fsynced). ``file``: its value's file (already written
        atomically, in :attr:`files_dir`), recorded with its sha256; on load the item counts
        as finished only while that file is there, unchanged."""
        rec = {"layer": key[0], "scheme": key[1], "values": values}
        if file is not None:
            from .artifact import file_sha256

            assert Path(file).parent == self.files_dir, f"item file {file} is not in {self.files_dir}"
            rec.update(file=Path(file).name, sha256=file_sha256(file))
            self.files[key] = Path(file)
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
