"""What a measuring worker needs and does: the plain, JSON-able :class:`WorkerSetup` and the
:class:`WorkerContext` that rebuilds the model, calibration batches and reference pass from
it once, then evaluates (layer, scheme) items (see :mod:`sensitivity.runner`).
"""

from __future__ import annotations

import os
import resource
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import RunnerError

__all__ = ["WORKER_METRICS", "PAIR_SEP", "PROXY_ITEM", "Key", "WorkerSetup", "WorkerContext", "worker_info"]

# the metrics (names of sensitivity.metrics.METRICS) a measured table can be made with
WORKER_METRICS = ("kl", "cosine")

Key = tuple[str, str]  # (layer fqn, scheme name); a joint item: ("a|b", "sa|sb")
PAIR_SEP = "|"
PROXY_ITEM = "@proxy"  # (fqn, PROXY_ITEM): the layer's proxy row, {scheme: tr(ΔW H ΔWᵀ)} (finite cells)


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
    # the default profile's items (sensitivity.profile_ray): Hessian shards accumulate these
    # activation formats' statistics too; proxy rows cover these schemes
    act_formats: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()
    # block streaming (sensitivity.streamed_items): each worker reads the model (a directory
    # or GGUF path) a unit at a time under this many bytes; Hessians accumulate in hessian_dtype
    max_memory: int | None = None
    hessian_dtype: str = "float32"
    # the output-Fisher item (sensitivity.fisher_item; streamed: sensitivity.stream_fisher): label
    # kind(s), their seed and the schemes it scores (saliency_values then hold the proxy's saliency)
    fisher_labels: str = "sampled"
    fisher_seed: int = 0
    fisher_schemes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise RunnerError(f"worker setup needs a model spec string, got {self.model!r}")
        if self.metric not in WORKER_METRICS:
            raise RunnerError(f"unknown metric {self.metric!r}; known metrics: {', '.join(WORKER_METRICS)}")
        if self.weights not in ("16bit", "as-loaded"):
            raise RunnerError(f"worker setup weights must be '16bit' or 'as-loaded', got {self.weights!r}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "act_formats", tuple(self.act_formats))
        object.__setattr__(self, "schemes", tuple(self.schemes))
        object.__setattr__(self, "fisher_schemes", tuple(self.fisher_schemes))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("include", "exclude", "act_formats", "schemes", "fisher_schemes"):
            d[k] = list(getattr(self, k))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WorkerSetup:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def with_data(cls, model: str, data: Any, calib_desc: dict, **settings: Any) -> WorkerSetup:
        """A setup carrying the driver's calibration rows ``data`` (an id tensor or an
        ``{input_ids, attention_mask}`` dict), its description and hash (``calib_desc``, as a
        profile records it), so every worker measures exactly those tokens."""
        ids = data["input_ids"] if isinstance(data, dict) else data
        mask = data.get("attention_mask") if isinstance(data, dict) else None
        calib = {k: v for k, v in calib_desc.items() if k not in ("tokens", "shape", "tokens_sha256")}
        return cls(model=model, calibration=calib, tokens=ids.tolist(),
                   attention_mask=None if mask is None else mask.tolist(),
                   tokens_sha256=calib_desc["tokens_sha256"], **settings)

    def token_data(self) -> Any:
        """The driver's calibration rows as sent (ids, or a dict with the mask), None if not sent."""
        if self.tokens is None:
            return None
        import torch

        ids = torch.tensor(self.tokens, dtype=torch.int64)
        if self.attention_mask is None:
            return ids
        return {"input_ids": ids, "attention_mask": torch.tensor(self.attention_mask, dtype=torch.int64)}

    def check_tokens(self, data: Any) -> None:
        """A :class:`RunnerError` if ``data`` is not the driver's calibration (``tokens_sha256``)."""
        from .calibration import tokens_sha256

        if self.tokens_sha256 is not None and tokens_sha256(data) != self.tokens_sha256:
            raise RunnerError("worker calibration tokens differ from the driver's (tokens_sha256 mismatch)")

    def check_fingerprint(self, sha: str) -> None:
        """A :class:`RunnerError` if the worker's weights (``sha``) are not the driver's."""
        if self.fingerprint_sha256 is not None and sha != self.fingerprint_sha256:
            raise RunnerError(f"worker loaded model {self.model!r} with fingerprint {sha[:12]}, expected "
                              f"{self.fingerprint_sha256[:12]}: the workers see other weights than the driver")


def worker_info(n_items: int, setup_s: float, replay: bool | None) -> dict:
    """What a worker reports of itself (``WorkerContext.info``): process, peak memory, threads, work."""
    import torch

    return {"pid": os.getpid(), "host": socket.gethostname(), "peak_rss_mb": round(_peak_rss_mb(), 1),
            "torch_threads": torch.get_num_threads(), "items": n_items, "setup_s": round(setup_s, 3),
            "block_replay": replay}


def _metric(name: str):
    from .metrics import get_metric

    return get_metric(name)


class WorkerContext:
    """A model, its calibration batches and the reference pass, built once; evaluates items.

    Built from a :class:`WorkerSetup` alone (what a Ray actor does), or in-process from
    objects the caller already has (``loaded``: a LoadedModel whose weights are already as
    ``setup.weights`` says, ``data``: the calibration data, ``hessians``: fqn -> Hessian),
    which avoids loading and computing them twice. Measurement is the same either way.
    """

    def __init__(self, setup: WorkerSetup, *, loaded: Any = None, data: Any = None, hessians: dict | None = None,
                 saliency: dict | None = None, grouping: Any = None, shared: dict | None = None) -> None:
        import torch

        from .calibration import CalibrationSpec, load_calibration
        from .layers import find_layers
        from .models import fingerprint, load_model, round_to_16bit
        from .metrics import strided_batches
        from .proxy import compute_reference

        t0 = time.perf_counter()
        self.setup = setup
        if loaded is None:
            loaded = load_model(setup.model)
            if setup.weights == "16bit":
                round_to_16bit(loaded.model)
            if setup.fingerprint_sha256 is not None:
                setup.check_fingerprint(fingerprint(loaded.model)["sha256"])
        self.loaded = loaded
        net = loaded.model
        self.layers, _ = find_layers(net, setup.include, setup.exclude, quantize_tied=setup.quantize_tied)
        self.by_fqn = {layer.fqn: layer for layer in self.layers}
        if data is None:
            data = setup.token_data()
            if data is None:
                known = {f.name for f in fields(CalibrationSpec)}
                spec = CalibrationSpec(**{k: v for k, v in setup.calibration.items() if k in known})
                data = load_calibration(spec, net, loaded.tokenizer, loaded.kind)
            setup.check_tokens(data)
        self.data = data
        self.hessians = hessians if hessians is not None else (shared or {}).get("hessians")
        from .calibration import as_batches, first_rows

        batches = strided_batches(net, as_batches(first_rows(data, setup.kl_samples), setup.batch_size), setup.kl_stride)
        if grouping is None and setup.groups:
            from .groups import setup_grouping

            grouping = setup_grouping(setup.groups, self.layers)
        self.grouping = grouping
        metric = grouping.metric_set if grouping is not None else _metric(setup.metric)
        # the reference pass is computed when an item first needs it (Hessian shards do not)
        self._reference_of = lambda: compute_reference(net, self.layers, batches, metric, False,
                                                       batch_size=setup.batch_size)
        self._reference = None
        self.metric_name = setup.metric
        self._saliency = saliency if saliency is not None else (
            {f: torch.tensor(v, dtype=torch.float64) for f, v in setup.saliency_values.items()}
            if setup.saliency_values is not None else None)
        self.setup_s = time.perf_counter() - t0
        self.n_items = 0

    @property
    def reference(self) -> Any:
        """The 16-bit reference pass (:func:`proxy.compute_reference`), computed on first use."""
        if self._reference is None:
            self._reference = self._reference_of()
        return self._reference

    def _hessian(self, fqn: str, scheme) -> Any:
        layer = self.by_fqn[fqn]
        if not scheme.n_high(layer.in_features) and (self.setup.quantizer == "rtn" or not scheme.is_quantized):
            return None
        return self._hessian_any(fqn)

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

        if fqn == "@hessians":  # sensitivity.hessian_shards.SHARD_LAYER
            return self._hessian_shard(scheme)
        if fqn == "@fisher":  # sensitivity.fisher_item.FISHER_KEY
            return self._fisher()
        if scheme == PROXY_ITEM:
            return self._proxy_row(fqn)
        if PAIR_SEP in fqn or PAIR_SEP in scheme:
            return self._evaluate_joint(fqn, scheme)
        if fqn not in self.by_fqn:
            raise RunnerError(f"layer {fqn!r} is not among the worker's selected layers")
        s = as_scheme(scheme)
        v = measure_item(self.loaded.model, self.by_fqn[fqn], s, self.reference, self._hessian(fqn, s),
                         quantizer=self.setup.quantizer, saliency=self.saliency_of(fqn))
        self.n_items += 1
        return v if isinstance(v, dict) else {self.metric_name: float(v)}

    def _hessian_shard(self, rows: str) -> Any:
        """A :class:`~sensitivity.hessian_shards.ShardStats` of calibration rows ``rows<a>-<b>``."""
        from .hessian_shards import compute_shard, shard_rows

        out = compute_shard(self.loaded.model, self.layers, self.data, shard_rows(rows),
                            batch_size=self.setup.batch_size, act_formats=self.setup.act_formats)
        self.n_items += 1
        return out

    def _fisher(self) -> dict[str, float]:
        """The output-Fisher pass over the whole model as one item
        (:func:`~.fisher_refs.fisher_ref_tables` for ``setup.fisher_schemes``, the driver's
        saliency; GPTQ's Hessians from the driver's ``shared``), encoded by
        :func:`~.fisher_item.encode_tables`."""
        from .fisher_item import encode_tables
        from .fisher_refs import fisher_ref_tables

        s = self.setup
        if not s.fisher_schemes:
            raise RunnerError("the Fisher item needs setup.fisher_schemes")
        hessians = self.hessians if s.quantizer != "rtn" else None
        tables, info = fisher_ref_tables(self.loaded.model, self.layers, self.data, s.fisher_schemes, hessians,
                                         quantizer=s.quantizer, saliency=self._saliency, stride=s.kl_stride,
                                         labels=s.fisher_labels, seed=s.fisher_seed)
        self.n_items += 1
        return encode_tables(self.layers, s.fisher_schemes, s.fisher_labels, tables, info)

    def _proxy_row(self, fqn: str) -> dict[str, float]:
        """The layer's proxy row over ``setup.schemes`` from the context's (the driver's) Hessians;
        a cell that is no candidate (NaN) is left out."""
        import math

        from .proxy import proxy_table

        assert self.setup.schemes, "proxy items need setup.schemes"
        if fqn not in self.by_fqn:
            raise RunnerError(f"layer {fqn!r} is not among the worker's selected layers")
        h = self._hessian_any(fqn)
        sal = self.saliency_of(fqn)
        row = proxy_table(self.loaded.model, [self.by_fqn[fqn]], {fqn: h}, self.setup.schemes, False,
                          act_stats={fqn: h} if self.setup.act_formats else None, quantizer=self.setup.quantizer,
                          saliency={fqn: sal} if sal is not None else None)[0]
        self.n_items += 1
        return {s: float(v) for s, v in zip(self.setup.schemes, row) if math.isfinite(v)}

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
        from .proxy import hessian_tensor, module_at, quantize_layer_weight

        cache = self.__dict__.setdefault("_wcache", {})
        key = (fqn, scheme.name)
        if key not in cache:
            layer = self.by_fqn[fqn]
            w = get_weight(module_at(self.loaded.model, fqn), layer.module_type).detach().to(torch.float32)
            h = self._hessian(fqn, scheme)
            wq = quantize_layer_weight(w, scheme, hessian_tensor(h) if h is not None else None,
                                       quantizer=self.setup.quantizer, saliency=self.saliency_of(fqn))
            size = wq.numel() * wq.element_size()
            used = sum(t.numel() * t.element_size() for t in cache.values())
            if used + size > self.JOINT_CACHE_BYTES:
                return wq
            cache[key] = wq
        return cache[key]

    def info(self) -> dict:
        return worker_info(self.n_items, self.setup_s,
                           bool(self._reference.replay) if self._reference is not None else None)
