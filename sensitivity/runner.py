"""The measured-table runner: (layer, scheme) work items, in-process or on Ray, checkpointed.

A *work item* is one (layer fqn, scheme name): quantize that layer alone with that scheme,
run the calibration batches, and measure the metric against the 16-bit model
(:func:`sensitivity.proxy.measure_item`). Items are idempotent and independent, so they
can run anywhere, in any order, more than once; the value of an item is a dict
``metric name -> float`` (one entry today; metric groups add more).

Everything a worker needs is one plain, JSON-able :class:`WorkerSetup` (model spec,
calibration description and token ids, KL options, metric name, layer selection, the
expected model fingerprint). A :class:`WorkerContext` rebuilds the model, the calibration
batches and the reference pass from it once, then evaluates items.

Three modes, one code path (:func:`run_items`), identical results:

* in-process (default; Ray is never imported): one context in this process;
* ``workers=N``: a local Ray instance (``ray.init(num_cpus=N)``), one actor per worker,
  each loading the model once and using ``cpu_count // N`` torch threads;
* ``address=ADDR`` (or the ``RAY_ADDRESS`` environment variable): an existing cluster.

Items are pulled dynamically (two in flight per actor); results stream back and are
appended to a :class:`Checkpoint` (JSONL, flushed and fsynced per line) as they arrive.
An actor that dies (its process or its whole node lost) has its in-flight items queued
again for the others, and a replacement actor is started where resources allow. A killed
run resumes from the checkpoint: the same command again skips every finished item.
"""

from __future__ import annotations
from .. import BitallocError

import hashlib
import json
import math
import logging
import os
import resource
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_SCHEMA",
    "RunnerError",
    "CheckpointError",
    "WorkerSetup",
    "WorkerContext",
    "Checkpoint",
    "RunResult",
    "checkpoint_header",
    "run_items",
    "check_ray_address",
]

CHECKPOINT_SCHEMA = "bitalloc.measure-checkpoint/1"
METRICS = ("kl", "cosine")
IN_FLIGHT_PER_ACTOR = 2

log = logging.getLogger("bitalloc.sensitivity")

Key = tuple[str, str]  # (layer fqn, scheme name); a joint item: ("a|b", "sa|sb")
PAIR_SEP = "|"


class RunnerError(BitallocError, ValueError):
    """The measured run cannot go on as asked (bad setup, unreachable cluster, ...)."""


class CheckpointError(RunnerError):
    """A checkpoint file belongs to another model or configuration, or is unreadable."""


# ---------------------------------------------------------------------------------------
# the worker's setup and context


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to rebuild the measurement, as plain JSON-able values.

    ``calibration`` holds :class:`~sensitivity.calibration.CalibrationSpec` fields;
    ``tokens`` (optional) the calibration ids as nested lists (and ``attention_mask`` for
    encoders) so every worker measures exactly the driver's data without regenerating it;
    ``tokens_sha256`` / ``fingerprint_sha256`` (optional) are checked after rebuilding.
    ``weights``: ``"16bit"`` rounds every parameter to float16 values after loading (what
    :func:`allocator.api.load` does), ``"as-loaded"`` keeps them. ``metric``: ``kl``
    (next-token KL, causal LMs) or ``cosine`` (pooled-embedding 1 - cos, encoders).
    """

    model: str
    calibration: dict = field(default_factory=dict)
    tokens: Any = None
    attention_mask: Any = None
    tokens_sha256: str | None = None
    fingerprint_sha256: str | None = None
    weights: str = "16bit"
    kl_samples: int | None = None
    kl_stride: int = 1
    batch_size: int = 4
    metric: str = "kl"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    quantize_tied: bool = False
    # how split channels are chosen and weights quantized (sensitivity.saliency, proxy.QUANTIZERS);
    # saliency_values: fqn -> (in,) list, the driver's vectors (workers then use exactly those)
    quantizer: str = "rtn"
    saliency: str = "hessian"
    saliency_values: Any = None
    # metric groups (sensitivity.groups): [{name, match: [patterns], metric, options}], JSON only;
    # every item then measures each group's metric from one forward ({group: value})
    groups: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise RunnerError(f"worker setup needs a model spec string, got {self.model!r}")
        if self.metric not in METRICS:
            raise RunnerError(f"unknown metric {self.metric!r}; known metrics: {', '.join(METRICS)}")
        if self.weights not in ("16bit", "as-loaded"):
            raise RunnerError(f"worker setup weights must be '16bit' or 'as-loaded', got {self.weights!r}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WorkerSetup:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _metric(name: str):
    from .proxy import CosineMetric, KLMetric

    return KLMetric() if name == "kl" else CosineMetric()


class WorkerContext:
    """A model, its calibration batches and the reference pass, built once; evaluates items.

    Built from a :class:`WorkerSetup` alone (what a Ray actor does), or in-process from
    objects the caller already has (``loaded``: a LoadedModel whose weights are already as
    ``setup.weights`` says, ``data``: the calibration data, ``hessians``: fqn -> Hessian),
    which avoids loading and computing them twice. Measurement is the same either way.
    """

    def __init__(self, setup: WorkerSetup, *, loaded: Any = None, data: Any = None, hessians: dict | None = None,
                 saliency: dict | None = None, grouping: Any = None) -> None:
        import torch

        from .calibration import CalibrationSpec, load_calibration, tokens_sha256
        from .layers import find_layers
        from .models import fingerprint, load_model, round_to_16bit
        from .profile import _strided
        from .proxy import compute_reference

        t0 = time.perf_counter()
        self.setup = setup
        if loaded is None:
            loaded = load_model(setup.model)
            if setup.weights == "16bit":
                round_to_16bit(loaded.model)
            if setup.fingerprint_sha256 is not None:
                sha = fingerprint(loaded.model)["sha256"]
                if sha != setup.fingerprint_sha256:
                    raise RunnerError(
                        f"worker loaded model {setup.model!r} with fingerprint {sha[:12]}, expected "
                        f"{setup.fingerprint_sha256[:12]}: the workers see other weights than the driver"
                    )
        self.loaded = loaded
        net = loaded.model
        self.layers, _ = find_layers(net, setup.include, setup.exclude, quantize_tied=setup.quantize_tied)
        self.by_fqn = {layer.fqn: layer for layer in self.layers}
        if data is None:
            if setup.tokens is not None:
                ids = torch.tensor(setup.tokens, dtype=torch.int64)
                data = ids if setup.attention_mask is None else {
                    "input_ids": ids, "attention_mask": torch.tensor(setup.attention_mask, dtype=torch.int64)}
            else:
                known = {f.name for f in fields(CalibrationSpec)}
                spec = CalibrationSpec(**{k: v for k, v in setup.calibration.items() if k in known})
                data = load_calibration(spec, net, loaded.tokenizer, loaded.kind)
            if setup.tokens_sha256 is not None and tokens_sha256(data) != setup.tokens_sha256:
                raise RunnerError("worker calibration tokens differ from the driver's (tokens_sha256 mismatch)")
        self.data = data
        self.hessians = hessians
        kl_data = data
        if setup.kl_samples is not None:
            kl_data = {k: v[: setup.kl_samples] for k, v in data.items()} if isinstance(data, dict) else data[: setup.kl_samples]
        from .calibration import as_batches

        batches = _strided(net, as_batches(kl_data, setup.batch_size), setup.kl_stride)
        if grouping is None and setup.groups:
            from .groups import setup_grouping

            grouping = setup_grouping(setup.groups, self.layers)
        self.grouping = grouping
        metric = grouping.metric_set if grouping is not None else _metric(setup.metric)
        self.reference = compute_reference(net, self.layers, batches, metric, False, batch_size=setup.batch_size)
        self.metric_name = setup.metric
        self._saliency = saliency if saliency is not None else (
            {f: torch.tensor(v, dtype=torch.float64) for f, v in setup.saliency_values.items()}
            if setup.saliency_values is not None else None)
        self.setup_s = time.perf_counter() - t0
        self.n_items = 0

    def _hessian(self, fqn: str, scheme) -> Any:
        layer = self.by_fqn[fqn]
        if not scheme.n_high(layer.in_features) and (self.setup.quantizer == "rtn" or not scheme.is_quantized):
            return None
        if self.hessians is None:
            from .hessian import collect_input_statistics

            self.hessians = collect_input_statistics(
                self.loaded.model, self.layers, self.data, False, batch_size=self.setup.batch_size)
        return self.hessians.get(fqn)

    def saliency_of(self, fqn: str):
        """The layer's split-channel saliency: the driver's vector, else computed by ``setup.saliency``."""
        if self._saliency is None:
            self._saliency = {}
        if fqn not in self._saliency:
            from .saliency import fisher_diagonals, layer_saliencies

            layer = self.by_fqn[fqn]
            if self.setup.saliency == "hessian":
                return None  # measure_item's default (diag(H)·‖W_j‖²)
            fisher = None
            if self.setup.saliency == "fisher":
                if not hasattr(self, "_fisher"):
                    self._fisher = fisher_diagonals(self.loaded.model, self.layers, self.data,
                                                    batch_size=self.setup.batch_size)
                fisher = self._fisher
            hs = {fqn: self._hessian_any(fqn)} if self.setup.saliency == "obq" else None
            self._saliency[fqn] = layer_saliencies(self.loaded.model, [layer], self.setup.saliency,
                                                   hessians=hs, fisher=fisher)[fqn]
        return self._saliency[fqn]

    def _hessian_any(self, fqn: str):
        if self.hessians is None:
            from .hessian import collect_input_statistics

            self.hessians = collect_input_statistics(
                self.loaded.model, self.layers, self.data, False, batch_size=self.setup.batch_size)
        return self.hessians.get(fqn)

    def evaluate(self, fqn: str, scheme: str) -> dict[str, float]:
        """The item's values: ``{metric name: measured delta}``.

        A pair item (:mod:`sensitivity.pairs`) joins layers and schemes with ``|``
        (``"a|b"``, ``"sa|sb"``): those layers quantized together.
        """
        from .proxy import as_scheme, measure_item

        if PAIR_SEP in fqn or PAIR_SEP in scheme:
            return self._evaluate_joint(fqn, scheme)
        if fqn not in self.by_fqn:
            raise RunnerError(f"layer {fqn!r} is not among the worker's selected layers")
        s = as_scheme(scheme)
        v = measure_item(self.loaded.model, self.by_fqn[fqn], s, self.reference, self._hessian(fqn, s),
                         quantizer=self.setup.quantizer, saliency=self.saliency_of(fqn))
        self.n_items += 1
        return v if isinstance(v, dict) else {self.metric_name: float(v)}

    def _evaluate_joint(self, fqn: str, scheme: str) -> dict[str, float]:
        from .pairs import measure_joint
        from .proxy import as_scheme

        fqns, schemes = fqn.split(PAIR_SEP), scheme.split(PAIR_SEP)
        if len(fqns) != len(schemes):
            raise RunnerError(f"joint item {fqn!r} / {scheme!r}: {len(fqns)} layers but {len(schemes)} schemes")
        parts = []
        for f, sn in zip(fqns, schemes):
            if f not in self.by_fqn:
                raise RunnerError(f"layer {f!r} is not among the worker's selected layers")
            s = as_scheme(sn)
            parts.append((self.by_fqn[f], s, self._hessian(f, s), self.saliency_of(f), self._joint_weight(f, s)))
        v = measure_joint(self.loaded.model, parts, self.reference, quantizer=self.setup.quantizer)
        self.n_items += 1
        return v if isinstance(v, dict) else {self.metric_name: float(v)}

    def warmup(self) -> None:
        """One throw-away measurement (lazy imports, allocator warm-up) so item timings are steady."""
        if self.layers:
            from .proxy import measure_item

            measure_item(self.loaded.model, self.layers[0], "w8", self.reference, None)

    JOINT_CACHE_BYTES = 1 << 30  # fake-quantized weights kept for joint items (a layer recurs in 6 pairs per block)

    def _joint_weight(self, fqn: str, scheme) -> Any:
        """The (out, in) fake-quantized weight of a layer in a scheme, cached up to JOINT_CACHE_BYTES."""
        import torch

        from .layers import get_weight
        from .proxy import _hessian_tensor, _module, quantize_layer_weight

        cache = self.__dict__.setdefault("_wcache", {})
        key = (fqn, scheme.name)
        if key not in cache:
            layer = self.by_fqn[fqn]
            w = get_weight(_module(self.loaded.model, fqn), layer.module_type).detach().to(torch.float32)
            h = self._hessian(fqn, scheme)
            wq = quantize_layer_weight(w, scheme, _hessian_tensor(h) if h is not None else None,
                                       quantizer=self.setup.quantizer, saliency=self.saliency_of(fqn))
            size = wq.numel() * wq.element_size()
            used = sum(t.numel() * t.element_size() for t in cache.values())
            if used + size > self.JOINT_CACHE_BYTES:
                return wq
            cache[key] = wq
        return cache[key]

    def info(self) -> dict:
        import torch

        return {"pid": os.getpid(), "host": socket.gethostname(), "peak_rss_mb": round(_peak_rss_mb(), 1),
                "torch_threads": torch.get_num_threads(), "items": self.n_items, "setup_s": round(self.setup_s, 3),
                "block_replay": bool(self.reference.replay)}


# ---------------------------------------------------------------------------------------
# checkpoint


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
    return {
        "schema": CHECKPOINT_SCHEMA,
        "model": {"spec": setup.model, "fingerprint_sha256": model_sha256 or setup.fingerprint_sha256},
        "config_sha256": _sha(config),
        "config": config,
    }


def _check_finite(key: Key, values: dict, where: str) -> None:
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
    configuration is a :class:`CheckpointError`: nothing is merged.
    """

    def __init__(self, path: str | os.PathLike, header: dict) -> None:
        self.path = Path(path)
        self.header = header
        self.duplicates = 0
        self.dropped_tail = False
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
                    if not isinstance(rec, dict) or set(rec) != {"layer", "scheme", "values"}:
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
                _check_finite(key, values, f"checkpoint {str(self.path)!r} line {n + 1}")
                values = {k: float(v) for k, v in values.items()}
                if key in done:
                    self.duplicates += 1
                else:
                    done[key] = values
                good_end = end
            pos = end
        if good_end < len(raw):
            with open(self.path, "r+b") as f:  # cut the torn tail so the next line starts clean
                f.truncate(good_end)
        self._f = open(self.path, "a", encoding="utf-8")
        return done

    def append(self, key: Key, values: dict) -> None:
        rec = {"layer": key[0], "scheme": key[1], "values": values}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# ---------------------------------------------------------------------------------------
# running


@dataclass
class RunResult:
    """Values of every requested item and how the run went."""

    values: dict[Key, dict]
    info: dict

    def table(self, fqns: Sequence[str], schemes: Sequence[str], metric: str = "kl"):
        import numpy as np

        out = np.full((len(fqns), len(schemes)), np.nan, dtype=np.float64)
        for i, f in enumerate(fqns):
            for j, s in enumerate(schemes):
                v = self.values.get((f, s))
                if v is not None and metric in v:
                    out[i, j] = v[metric]
        return out


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """A quick TCP check that ``host:port`` answers; a :class:`RunnerError` if it does not."""
    if address in ("auto", "local"):
        return
    hp = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hp.rpartition(":")
    if not sep or not port.isdigit():
        raise RunnerError(f"Ray address {address!r} must look like HOST:PORT (or ray://HOST:PORT)")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise RunnerError(f"cannot reach the Ray cluster at {address!r} ({e.strerror or type(e).__name__})") from None


class _Progress:
    def __init__(self, enabled: bool, total: int, initial: int, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="item", smoothing=0.1)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_items(
    setup: WorkerSetup,
    items: Iterable[Key],
    *,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
    header: dict | None = None,
    workers: int | None = None,
    address: str | None = None,
    context: WorkerContext | None = None,
    threads_per_worker: int | None = None,
    progress: bool = True,
    on_result: Callable[[Key, dict], None] | None = None,
    max_item_failures: int = 3,
    stall_timeout_s: float = 600.0,
    wait_all_ready: bool = False,
    log_fn: Callable[[str], None] | None = None,
) -> RunResult:
    """Evaluate every (layer fqn, scheme name) item; values come back as a dict per item.

    ``checkpoint`` (a :class:`Checkpoint` or a path; a path needs ``header``, default
    :func:`checkpoint_header` of ``setup`` with the items' schemes) holds finished items:
    they are skipped, new ones appended as they arrive. Mode: ``address`` (or env
    ``RAY_ADDRESS``) -> that Ray cluster; ``workers=N`` -> a local Ray instance with N
    actors; neither -> in-process (``context`` if given, else one built from ``setup``;
    Ray is not imported). ``on_result(key, values)`` is called for each new result.
    ``wait_all_ready``: on Ray, hand out items only once every worker has loaded (for
    timing; by default the first ready worker starts at once).
    """
    say = log_fn or log.info
    items = list(dict.fromkeys((str(f), str(s)) for f, s in items))
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and workers is not None and workers < 1:
        raise RunnerError(f"workers must be a positive integer, got {workers!r}")
    if not address and workers is not None and (not isinstance(workers, int) or workers < 1):
        raise RunnerError(f"workers must be a positive integer, got {workers!r}")
    mode = "ray-cluster" if address else ("ray-local" if workers else "in-process")

    ckpt = checkpoint
    if ckpt is not None and not isinstance(ckpt, Checkpoint):
        schemes = list(dict.fromkeys(s for _, s in items))
        ckpt = Checkpoint(ckpt, header or checkpoint_header(setup, schemes))
    done: dict[Key, dict] = ckpt.load() if ckpt is not None else {}
    if ckpt is not None and (ckpt.dropped_tail or ckpt.duplicates):
        say(f"checkpoint {ckpt.path}: {len(done)} items"
            + (", a torn last line dropped" if ckpt.dropped_tail else "")
            + (f", {ckpt.duplicates} duplicate line(s) ignored" if ckpt.duplicates else ""))
    todo = [k for k in items if k not in done]
    values = {k: done[k] for k in items if k in done}
    info = {"mode": mode, "workers": None if mode == "in-process" else workers, "address": address,
            "items": len(items), "resumed": len(values), "computed": 0, "resubmitted": 0, "actor_failures": 0,
            "checkpoint": str(ckpt.path) if ckpt is not None else None}
    if values:
        say(f"resuming: {len(values)} of {len(items)} items already in {ckpt.path}")
    t0 = time.perf_counter()

    def record(key: Key, v: dict) -> None:
        if key in values:  # a duplicate (e.g. a resubmitted item that also finished): first wins
            return
        _check_finite(key, v, "measured")  # never merged, never checkpointed
        values[key] = v
        info["computed"] += 1
        if ckpt is not None:
            ckpt.append(key, v)
        if on_result is not None:
            on_result(key, v)

    bar = _Progress(progress, len(items), len(values), f"measure ({mode})")
    try:
        if todo:
            if mode == "in-process":
                ctx = context or WorkerContext(setup)
                for key in todo:
                    record(key, ctx.evaluate(*key))
                    bar.update()
                info["worker_info"] = [ctx.info()]
            else:
                _run_ray(setup, todo, record, bar, info, workers=workers, address=address,
                         threads_per_worker=threads_per_worker, max_item_failures=max_item_failures,
                         stall_timeout_s=stall_timeout_s, wait_all_ready=wait_all_ready, say=say)
    finally:
        bar.close()
        if ckpt is not None and not isinstance(checkpoint, Checkpoint):
            ckpt.close()
    info["wall_s"] = round(time.perf_counter() - t0, 3)
    if info["computed"] and info["wall_s"] > 0:
        info["items_per_s"] = round(info["computed"] / info["wall_s"], 4)
    missing = [k for k in items if k not in values]
    if missing:
        raise RunnerError(f"{len(missing)} item(s) were not measured, e.g. {missing[0]}")
    return RunResult(values, info)


def _actor_class(ray):
    @ray.remote(max_restarts=0, max_task_retries=0)
    class MeasureWorker:
        def __init__(self, setup: dict, threads: int) -> None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import torch

            torch.set_num_threads(max(1, int(threads)))
            self.ctx = WorkerContext(WorkerSetup.from_dict(setup))
            self.ctx.warmup()

        def ready(self) -> dict:
            return self.ctx.info()

        def evaluate(self, fqn: str, scheme: str) -> dict:
            return self.ctx.evaluate(fqn, scheme)

        def info(self) -> dict:
            return self.ctx.info()

    return MeasureWorker


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    lines = [x for x in s.splitlines() if x.strip()]
    # Ray wraps the remote traceback; the cause is on its last line
    return (lines[-1] if lines else type(e).__name__)[:500]


def _run_ray(setup, todo, record, bar, info, *, workers, address, threads_per_worker, max_item_failures,
             stall_timeout_s, wait_all_ready, say) -> None:
    if address:
        check_ray_address(address)
    try:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    except ImportError:  # pragma: no cover - ray is a dependency
        raise RunnerError("the Ray runner needs the 'ray' package (pip install ray)") from None
    started = False
    t_init = time.perf_counter()
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, object_store_memory=128 * 1024 * 1024)
        except Exception as e:  # noqa: BLE001 - any failure to start/connect is one error line
            raise RunnerError(f"cannot start or connect to Ray{f' at {address!r}' if address else ''}: {_first_line(e)}") from None
        started = True
    info["ray_init_s"] = round(time.perf_counter() - t_init, 3)
    try:
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
            info["workers"] = workers
        if threads_per_worker is None:
            threads_per_worker = max(1, (os.cpu_count() or 1) // workers) if not address else 1
        info["threads_per_worker"] = threads_per_worker
        Worker = _actor_class(ray)
        setup_d = setup.to_dict()

        actors: dict[int, Any] = {}  # actor id -> handle
        ready_refs: dict[Any, int] = {}  # ready() ref -> actor id
        live: set[int] = set()
        in_flight: dict[Any, tuple[int, Key]] = {}  # evaluate ref -> (actor id, key)
        load: dict[int, int] = {}
        queue = deque(todo)
        failures: dict[Key, int] = {}
        next_id = [0]
        startup_failures = [0]
        worker_info: dict[int, dict] = {}

        def spawn() -> None:
            aid = next_id[0]
            next_id[0] += 1
            h = Worker.options(num_cpus=1).remote(setup_d, threads_per_worker)
            actors[aid] = h
            load[aid] = 0
            ready_refs[h.ready.remote()] = aid

        def lose(aid: int, why: str) -> None:
            if aid not in actors:
                return
            info["actor_failures"] += 1
            live.discard(aid)
            h = actors.pop(aid)
            for ref, (a, key) in list(in_flight.items()):
                if a == aid:
                    del in_flight[ref]
                    queue.appendleft(key)  # skipped at dispatch if it finished meanwhile
                    info["resubmitted"] += 1
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            say(f"worker {aid} lost ({why}); {len(live)} live, re-queued its items")
            if info["actor_failures"] > 4 * workers + len(todo):
                raise RunnerError(f"too many lost workers ({info['actor_failures']}); last: {why}")
            spawn()  # a replacement; it joins when (if) the cluster has room for it

        t_start = time.perf_counter()
        t_first = None
        for _ in range(workers):
            spawn()
        last_progress = time.monotonic()
        remaining = set(todo)
        while remaining:
            for aid in list(live) if (not wait_all_ready or "startup_s" in info) else ():
                while load[aid] < IN_FLIGHT_PER_ACTOR and queue:
                    key = queue.popleft()
                    if key not in remaining:
                        continue
                    in_flight[actors[aid].evaluate.remote(*key)] = (aid, key)
                    load[aid] += 1
                    if t_first is None:
                        t_first = time.perf_counter()
            waiting = list(ready_refs) + list(in_flight)
            if not waiting:
                raise RunnerError("no Ray workers left to run the remaining items")
            done_refs, _ = ray.wait(waiting, num_returns=1, timeout=5.0)
            if not done_refs:
                if time.monotonic() - last_progress > stall_timeout_s:
                    raise RunnerError(f"no progress for {stall_timeout_s:.0f} s ({len(live)} live workers, "
                                      f"{len(remaining)} items left); is the cluster big enough?")
                continue
            ref = done_refs[0]
            if ref in ready_refs:
                aid = ready_refs.pop(ref)
                try:
                    worker_info[aid] = ray.get(ref)
                    live.add(aid)
                    if len(live) == workers and "startup_s" not in info:
                        info["startup_s"] = round(time.perf_counter() - t_start, 3)  # all workers loaded
                    last_progress = time.monotonic()
                except RayTaskError as e:  # the worker's setup raised: the same everywhere
                    raise RunnerError(f"Ray worker setup failed: {_first_line(e)}") from None
                except RayActorError as e:
                    startup_failures[0] += 1
                    if startup_failures[0] > 2 * workers + 2:
                        raise RunnerError(f"Ray workers keep dying at startup: {_first_line(e)}") from None
                    lose(aid, f"died at startup: {_first_line(e)}")
                continue
            aid, key = in_flight.pop(ref)
            if aid in load:
                load[aid] -= 1
            try:
                v = ray.get(ref)
            except RayTaskError as e:
                raise RunnerError(f"item {key} failed: {_first_line(e)}") from None
            except RayActorError as e:
                failures[key] = failures.get(key, 0) + 1
                if failures[key] > max_item_failures:
                    raise RunnerError(f"item {key} lost its worker {failures[key]} times; giving up") from None
                queue.appendleft(key)
                info["resubmitted"] += 1
                lose(aid, _first_line(e))
                continue
            last_progress = time.monotonic()
            if key in remaining:
                remaining.discard(key)
                record(key, v)
                bar.update()
        info["measure_s"] = round(time.perf_counter() - (t_first or t_start), 3)  # first item out to last back
        # per-worker statistics (peak RSS etc.) from the workers still alive
        refs = {aid: actors[aid].info.remote() for aid in live}
        for aid, r in refs.items():
            try:
                worker_info[aid] = ray.get(r, timeout=30)
            except (RayActorError, GetTimeoutError):
                pass
        info["worker_info"] = [worker_info[a] for a in sorted(worker_info)]
        for h in actors.values():
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
    finally:
        if started:
            ray.shutdown()
