"""The :class:`SensitivityProfile` artifact and :func:`build_profile`, which makes one.

A profile is everything the solvers need, without the model: the selected layers, the
candidate schemes, the exact storage cost of every (layer, scheme) in bits, and one
expected-loss table per metric group (default group ``"all"``: the calibrated proxy in
nats/token of KL for causal LMs). It is saved as JSON with a schema version.

Size accounting: ``cost_bits[i, s]`` is ``Scheme.storage_bits(out, in)`` of layer i's
weight (a weight shared by several layers of one tie group is counted on the first member
only; the others get 0). ``other_bits`` is every other parameter bit at its stored dtype
(embeddings, norms, biases, non-selected layers; a tied tensor once), so the total size of
a plan is ``cost_bits[chosen].sum() + other_bits``.
"""

from __future__ import annotations
from .. import BitallocError

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .defaults import DEFAULT_REF_SCHEMES, DEFAULT_SCHEMES  # re-exported
from .layers import LayerInfo, Skipped

__all__ = [
    "PROFILE_SCHEMA",
    "ProfileError",
    "SensitivityProfile",
    "build_profile",
    "cost_table",
    "other_parameter_bits",
    "DEFAULT_SCHEMES",
    "DEFAULT_REF_SCHEMES",
]

PROFILE_SCHEMA = "bitalloc.profile/1"

log = logging.getLogger("bitalloc.sensitivity")


class ProfileError(BitallocError, ValueError):
    """A profile file or object is invalid; the message names the problem."""


def _bitalloc_version() -> str:
    try:
        from importlib.metadata import version

        return version("bitalloc")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0.1.0+local"


def _none_to_nan(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_none_to_nan(v) for v in x]
    return np.nan if x is None else x


def _array(x: Any, dtype, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A fresh numpy array from an array or nested lists (JSON null -> NaN)."""
    try:
        a = np.array(x if isinstance(x, np.ndarray) else _none_to_nan(x), dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProfileError(f"profile field {name!r} is not a numeric array ({e})") from None
    if shape is not None and a.shape != shape:
        raise ProfileError(f"profile field {name!r} has shape {a.shape}, expected {shape}")
    return a


def _jsonable(a: np.ndarray) -> list:
    if a.dtype.kind == "f":
        return [_jsonable(r) for r in a] if a.ndim > 1 else [None if not math.isfinite(v) else float(v) for v in a.tolist()]
    return a.tolist()


@dataclass(frozen=True, eq=False)
class SensitivityProfile:
    """Per-layer costs and expected losses for every candidate scheme (see module docstring).

    Arrays: ``cost_bits`` (L, S) int64; ``tables[group]`` (L, S) float64 expected loss;
    ``proxy`` (L, S) raw ``tr(ΔW H ΔWᵀ)``; ``kl_ref`` (L, R) measured metric at the
    ``ref_schemes``; ``scales`` (L,) the fitted proxy-to-metric scale per layer.
    """

    model: dict
    calibration: dict
    layers: list[LayerInfo]
    skipped: list[Skipped]
    schemes: list[str]
    cost_bits: np.ndarray
    tables: dict[str, np.ndarray]
    proxy: np.ndarray
    kl_ref: np.ndarray
    ref_schemes: list[str]
    scales: np.ndarray
    other_bits: int
    other_params: int
    metadata: dict = field(default_factory=dict)
    schema_version: str = PROFILE_SCHEMA
    # optional (older profiles have neither): per-layer input-channel saliency (fqn -> (in,)),
    # the method in metadata["saliency"]; and measured pair terms (see sensitivity.pairs)
    saliency: dict | None = None
    pairs: dict | None = None

    def __post_init__(self) -> None:
        if self.schema_version != PROFILE_SCHEMA:
            raise ProfileError(f"unknown profile schema {self.schema_version!r}; this bitalloc reads {PROFILE_SCHEMA!r}")
        from bitalloc.kernels.formats import FormatError, parse_scheme

        L, S = len(self.layers), len(self.schemes)
        if L == 0 or S == 0:
            raise ProfileError(f"profile needs at least one layer and one scheme, got {L} layers and {S} schemes")
        for s in self.schemes:
            try:
                parse_scheme(s)
            except FormatError as e:
                raise ProfileError(f"profile scheme {s!r} is invalid: {e}") from None
        if len(set(self.schemes)) != S:
            raise ProfileError("profile schemes contain duplicates")
        fqns = [layer.fqn for layer in self.layers]
        if len(set(fqns)) != L:
            raise ProfileError("profile layers contain duplicate fqns")
        object.__setattr__(self, "cost_bits", _array(self.cost_bits, np.int64, "cost_bits", (L, S)))
        object.__setattr__(self, "proxy", _array(self.proxy, np.float64, "proxy", (L, S)))
        for r in self.ref_schemes:
            if r not in self.schemes:
                raise ProfileError(f"profile ref scheme {r!r} is not one of its schemes")
        object.__setattr__(self, "kl_ref", _array(self.kl_ref, np.float64, "kl_ref", (L, len(self.ref_schemes))))
        object.__setattr__(self, "scales", _array(self.scales, np.float64, "scales", (L,)))
        if not self.tables:
            raise ProfileError("profile has no loss tables")
        tables = {str(g): _array(t, np.float64, f"tables.{g}", (L, S)) for g, t in self.tables.items()}
        object.__setattr__(self, "tables", tables)
        if (self.cost_bits < 0).any():
            raise ProfileError("profile cost_bits must be non-negative")
        if int(self.other_bits) < 0 or int(self.other_params) < 0:
            raise ProfileError("profile other_bits/other_params must be non-negative")
        object.__setattr__(self, "other_bits", int(self.other_bits))
        object.__setattr__(self, "other_params", int(self.other_params))
        if self.saliency is not None:
            if not isinstance(self.saliency, dict):
                raise ProfileError("profile field 'saliency' must be an object of layer -> vector")
            sal = {}
            for layer in self.layers:
                if layer.fqn in self.saliency:
                    v = _array(self.saliency[layer.fqn], np.float64, f"saliency.{layer.fqn}", (layer.in_features,))
                    if not np.isfinite(v).all():
                        raise ProfileError(f"profile field 'saliency.{layer.fqn}' has NaN or inf entries")
                    sal[layer.fqn] = v
            extra = set(self.saliency) - set(fqns)
            if extra:
                raise ProfileError(f"profile saliency names unknown layer(s): {sorted(extra)[:3]}")
            object.__setattr__(self, "saliency", sal)
        if self.pairs is not None:
            from .pairs import check_pairs

            object.__setattr__(self, "pairs", check_pairs(self.pairs, fqns, self.schemes))

    # -- access ----------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def fqns(self) -> list[str]:
        return [layer.fqn for layer in self.layers]

    def layer_index(self, fqn: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.fqn == fqn:
                return i
        raise KeyError(f"layer {fqn!r} is not in the profile")

    def scheme_index(self, name: str) -> int:
        try:
            return self.schemes.index(name)
        except ValueError:
            raise KeyError(f"scheme {name!r} is not in the profile (schemes: {', '.join(self.schemes)})") from None

    def table(self, group: str = "all") -> np.ndarray:
        if group not in self.tables:
            raise KeyError(f"metric group {group!r} is not in the profile (groups: {', '.join(self.tables)})")
        return self.tables[group]

    @property
    def fingerprint(self) -> dict:
        return self.model.get("fingerprint", {})

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "calibration": self.calibration,
            "layers": [layer.to_dict() for layer in self.layers],
            "skipped": [s.to_dict() for s in self.skipped],
            "schemes": list(self.schemes),
            "ref_schemes": list(self.ref_schemes),
            "cost_bits": self.cost_bits.tolist(),
            "other_bits": self.other_bits,
            "other_params": self.other_params,
            "tables": {g: _jsonable(t) for g, t in self.tables.items()},
            "proxy": _jsonable(self.proxy),
            "kl_ref": _jsonable(self.kl_ref),
            "scales": _jsonable(self.scales),
            "metadata": self.metadata,
            **({"saliency": {f: _jsonable(v) for f, v in self.saliency.items()}} if self.saliency is not None else {}),
            **({"pairs": self.pairs} if self.pairs is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Any) -> SensitivityProfile:
        if not isinstance(d, dict):
            raise ProfileError(f"profile must be a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if version != PROFILE_SCHEMA:
            raise ProfileError(f"unknown profile schema {version!r}; this bitalloc reads {PROFILE_SCHEMA!r}")
        required = (
            "model", "calibration", "layers", "skipped", "schemes", "ref_schemes", "cost_bits",
            "other_bits", "other_params", "tables", "proxy", "kl_ref", "scales",
        )  # fmt: skip
        missing = [k for k in required if k not in d]
        if missing:
            raise ProfileError(f"profile is missing field(s): {', '.join(missing)}")
        try:
            layers = [LayerInfo.from_dict(x) for x in d["layers"]]
            skipped = [Skipped.from_dict(x) for x in d["skipped"]]
        except (TypeError, ValueError) as e:
            raise ProfileError(f"profile field 'layers' or 'skipped' is invalid: {e}") from None
        if not isinstance(d["tables"], dict):
            raise ProfileError("profile field 'tables' must be an object of group -> table")
        return cls(
            model=d["model"],
            calibration=d["calibration"],
            layers=layers,
            skipped=skipped,
            schemes=list(d["schemes"]),
            cost_bits=d["cost_bits"],
            tables=dict(d["tables"]),
            proxy=d["proxy"],
            kl_ref=d["kl_ref"],
            ref_schemes=list(d["ref_schemes"]),
            scales=d["scales"],
            other_bits=d["other_bits"],
            other_params=d["other_params"],
            metadata=d.get("metadata") or {},
            schema_version=version,
            saliency=d.get("saliency"),
            pairs=d.get("pairs"),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temp file + rename); returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, allow_nan=False)
            f.write("\n")
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityProfile:
        """Read a saved profile; any problem is a one-line :class:`ProfileError`."""
        p = Path(path)
        if not p.is_file():
            raise ProfileError(f"profile file {str(p)!r} does not exist")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ProfileError(f"profile file {str(p)!r} is not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ProfileError as e:
            raise ProfileError(f"{p}: {e}") from None


# ---------------------------------------------------------------------------------------
# costs


def cost_table(layers: Sequence[LayerInfo], schemes: Sequence[Any]) -> np.ndarray:
    """``(L, S)`` exact storage bits; a shared weight is counted on its first layer only."""
    from .proxy import as_scheme

    from bitalloc.kernels.formats import ggml_fits, is_ggml

    sch = [as_scheme(s) for s in schemes]
    out = np.zeros((len(layers), len(sch)), dtype=np.int64)
    seen_groups: set[str] = set()
    for i, layer in enumerate(layers):
        if layer.tie_group is not None and layer.tie_group in seen_groups:
            continue
        if layer.tie_group is not None:
            seen_groups.add(layer.tie_group)
        # a ggml type whose block does not divide the rows is no candidate there (cost 0, loss NaN)
        out[i] = [0 if is_ggml(s) and not ggml_fits(s.name, layer.in_features)
                  else s.storage_bits(layer.out_features, layer.in_features) for s in sch]
    return out


def other_parameter_bits(model: torch.nn.Module, layers: Sequence[LayerInfo]) -> tuple[int, int]:
    """(bits, count) of all parameters other than the selected layers' weights, at their
    stored dtype; a tensor shared by several names (tied) is counted once."""
    from .models import _storage_key

    modules = dict(model.named_modules(remove_duplicate=False))
    quantized = {_storage_key(modules[layer.fqn].weight) for layer in layers}
    seen: set = set()
    bits = count = 0
    for _, p in model.named_parameters(remove_duplicate=False):
        key = _storage_key(p)
        if key in seen or key in quantized:
            continue
        seen.add(key)
        bits += p.numel() * p.element_size() * 8
        count += p.numel()
    return int(bits), int(count)


# ---------------------------------------------------------------------------------------
# building a profile


def _strided(net, batches: list[dict], stride: int) -> list[dict]:
    """Score the metric at every ``stride``-th position only (positions stride-1, 2·stride-1, ...).

    The forward still runs every token (attention needs them); only the LM head and the
    KL, about half the cost of one measurement on SmolLM2 (49152-word vocabulary), shrink.
    Neighbouring positions are strongly correlated, so little information is lost. Needs
    a model whose forward takes ``logits_to_keep`` (transformers' causal LMs); others
    are scored at every position.
    """
    import inspect

    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"kl_stride must be a positive integer, got {stride!r}")
    if stride == 1 or "logits_to_keep" not in inspect.signature(net.forward).parameters:
        return batches
    out = []
    for b in batches:
        T = b["input_ids"].shape[1]
        out.append({**b, "logits_to_keep": torch.arange(stride - 1, T, stride)})
    return out


def build_profile(
    model: Any = "smollm2",
    schemes: Sequence[Any] = DEFAULT_SCHEMES,
    calibration: Any = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    ref_schemes: Sequence[Any] = DEFAULT_REF_SCHEMES,
    progress: bool = True,
    *,
    quantize_tied: bool = False,
    batch_size: int = 4,
    kl_samples: int | None = None,
    kl_stride: int = 1,
    hessian_dtype: torch.dtype = torch.float32,
    log_fn: Callable[[str], None] | None = None,
    groups: Any = None,
    measured: bool = False,
    workers: int | None = None,
    ray_address: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    saliency: str = "hessian",
    quantizer: str = "rtn",
    pairs: str | None = None,
    pair_schemes: Sequence[Any] | None = None,
    pair_ref: Any = None,
    hessians_out: str | os.PathLike | None = None,
    on_hessians: Callable[[dict], None] | None = None,
) -> SensitivityProfile:
    """Profile a model: layers, calibration data, Hessians, proxy, reference KL, costs.

    ``model`` is a spec string (see :mod:`sensitivity.models`) or a :class:`LoadedModel`.
    ``calibration`` is a :class:`CalibrationSpec` (default: 8 × 256 self-generated tokens),
    or a ready (n, seq) id tensor / encoder dict. ``ref_schemes`` (each must be one of
    ``schemes``) are measured for every layer (one forward pass set per layer each) and
    calibrate the proxy (:func:`calibrate_proxy`); ``kl_samples`` limits the rows used for
    those measurements (default: all). Skipped layers and progress notes go to ``log_fn``
    (default: the ``bitalloc.sensitivity`` logger).

    Memory (SmolLM2, 8 × 256 tokens): the float32 model (0.54 GB), one Hessian per distinct
    layer input (0.4 GB; each activation-quantized format in ``schemes`` adds two more
    matrices per input for the exact activation-error proxy), the reference log-probs
    (tokens × vocab × 4 bytes, 0.4 GB) and one cached block output per block (0.14 GB).

    ``groups`` (:mod:`sensitivity.groups`: patterns + metric per group, every layer in
    exactly one) measures each layer's ref schemes with its group's metric (all groups'
    metrics from one forward) and gives one table per group (other groups' rows 0).

    ``measured=True``: every (layer, scheme) is measured end to end
    (:mod:`sensitivity.runner`; in-process, or on Ray with ``workers`` / ``ray_address``,
    results appended to the JSONL ``checkpoint`` and resumed from it); the measured table
    is the solver's table and its ref-scheme columns calibrate the proxy (``scales``).
    Otherwise a plain local loop measures the ref schemes only; the per-(layer, scheme)
    work item is :func:`measure_item` either way.

    ``saliency`` (``"hessian"``, ``"obq"`` or ``"fisher"``, :mod:`sensitivity.saliency`)
    chooses the channels split schemes keep high, in the proxy and the measurements alike;
    the vectors are stored in the profile (``saliency``) so a plan records the same channels.
    ``quantizer`` (``"rtn"`` or ``"gptq"``, reusing the collected Hessians) quantizes the
    weights of the proxy and measured tables; recorded in ``metadata["options"]["quantizer"]``.

    ``pairs`` (``"full"`` or ``"reduced"``, needs ``measured=True``): also measure the
    same-block pair interactions (:mod:`sensitivity.pairs`) as joint items of the same run
    and checkpoint, over ``pair_schemes`` (default: all schemes; reduced: at ``pair_ref``,
    default the first pair scheme); stored in the profile's ``pairs`` field.
    ``hessians_out``: save the Hessians there (:mod:`sensitivity.hessian_store`; what a
    GPTQ plan is applied with), recorded with its sha256 in ``metadata["hessians"]``.
    ``on_hessians``: called with ``{fqn: H or accumulator}`` once the tables are done (the
    llama.cpp target keeps their diagonals as its importance matrix).
    """
    from .calibration import CalibrationSpec, as_batches, load_calibration, tokens_sha256
    from .hessian import collect_input_statistics
    from .layers import find_layers
    from .models import LoadedModel, fingerprint, load_model
    from .proxy import as_scheme, calibrate_proxy, compute_reference, measure_kl_deltas, proxy_table
    from .groups import measure_ref_columns, setup_grouping

    say = log_fn or log.info
    t_start = time.perf_counter()
    walls: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        walls[name] = round(time.perf_counter() - t0, 3)
        return time.perf_counter()

    scheme_objs = [as_scheme(s) for s in schemes]
    names = [s.name for s in scheme_objs]
    if len(set(names)) != len(names):
        raise ProfileError(f"schemes contain duplicates: {names}")
    refs = [as_scheme(r).name for r in ref_schemes]
    for r in refs:
        if r not in names:
            raise ProfileError(f"ref scheme {r!r} is not one of the schemes ({', '.join(names)})")
    if not refs:
        raise ProfileError("ref_schemes must name at least one scheme to calibrate the proxy")

    t = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    net, tok = loaded.model, loaded.tokenizer
    t = lap("load", t)
    fp = fingerprint(net)
    t = lap("fingerprint", t)

    layers, skipped = find_layers(net, include, exclude, quantize_tied=quantize_tied)
    say(f"{len(layers)} layers selected, {len(skipped)} skipped")
    grouping = setup_grouping(groups, layers)  # GroupError (one line) if they do not partition the layers
    if pairs is not None and grouping is not None:
        raise ProfileError("pair terms with metric groups are not supported: pairs are measured in one metric")
    if pairs is not None and not measured:
        raise ProfileError("pair terms need the measured table (measured=True): M's diagonal is measured")
    for s in skipped:
        say(f"skipped {s}")

    if calibration is None:
        calibration = CalibrationSpec()
    if isinstance(calibration, CalibrationSpec):
        calib_desc = calibration.describe()
        what = "sentences" if loaded.kind == "encoder" else calibration.source
        say(f"calibration: {what}, {calibration.n_samples} x {calibration.seq_len} tokens (seed {calibration.seed})")
        data = load_calibration(calibration, net, tok, loaded.kind)
    else:
        data = calibration
        calib_desc = {"source": "provided"}
    ids = data["input_ids"] if isinstance(data, dict) else data
    calib_desc.update(tokens=int(ids.numel()), shape=list(ids.shape), tokens_sha256=tokens_sha256(data))
    t = lap("calibration", t)

    from .proxy import QUANTIZERS
    from .saliency import SALIENCY_METHODS, fisher_diagonals, layer_saliencies

    if saliency not in SALIENCY_METHODS:
        raise ProfileError(f"saliency must be one of {SALIENCY_METHODS}, got {saliency!r}")
    if quantizer not in QUANTIZERS:
        raise ProfileError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    if quantizer != "rtn" and grouping is not None:
        raise ProfileError("metric groups with quantizer 'gptq' are not supported yet")
    setup = None
    if measured:
        # the workers' setup (saliency values are added once computed); a mismatched
        # checkpoint is refused now, not after minutes of Hessians and proxy
        from .runner import Checkpoint, checkpoint_header

        setup = _worker_setup(loaded, data, calib_desc, fp, kl_samples=kl_samples, kl_stride=kl_stride,
                              batch_size=batch_size, include=include, exclude=exclude, quantize_tied=quantize_tied,
                              quantizer=quantizer, saliency=saliency, grouping=grouping)
        if checkpoint is not None:
            Checkpoint(checkpoint, checkpoint_header(setup, names, quantizer=quantizer)).check()

    acts = sorted({s.act for s in scheme_objs if s.act != "a16"})
    stats = collect_input_statistics(net, layers, data, progress, batch_size=batch_size, dtype=hessian_dtype, act_formats=acts)
    t = lap("hessians", t)
    say(f"hessians: {len({id(a) for a in stats.values()})} distinct layer inputs in {walls['hessians']:.1f} s")

    fisher = fisher_diagonals(net, layers, data, batch_size=batch_size, progress=progress) if saliency == "fisher" else None
    sal = layer_saliencies(net, layers, saliency, hessians=stats, fisher=fisher)
    del fisher
    t = lap("saliency", t)
    proxy = proxy_table(net, layers, stats, scheme_objs, progress, act_stats=stats if acts else None,
                        quantizer=quantizer, saliency=sal)
    t = lap("proxy", t)
    say(f"proxy: {len(layers)} layers x {len(names)} schemes in {walls['proxy']:.1f} s; measuring {', '.join(refs)}")

    measure_info = None
    pair_field = None
    if measured:
        measured_table, measure_info, metric_name, replay = _measure_all(
            loaded, setup, layers, names, data, stats, progress, say,
            workers=workers, ray_address=ray_address, checkpoint=checkpoint, saliency=sal, grouping=grouping,
            pairs=(pairs, [as_scheme(x).name for x in (pair_schemes or names)],
                   None if pair_ref is None else ([as_scheme(pair_ref).name] * 2 if isinstance(pair_ref, str)
                                                  else [as_scheme(x).name for x in pair_ref])) if pairs else None)
        pair_field = measure_info.pop("pairs_field", None)
        kl = measured_table[:, [names.index(r) for r in refs]]
    else:
        kl_data = data
        if kl_samples is not None:
            kl_data = {k: v[:kl_samples] for k, v in data.items()} if isinstance(data, dict) else data[:kl_samples]
        kl_batches = _strided(net, as_batches(kl_data, batch_size), kl_stride)
        metric_set = grouping.metric_set if grouping is not None else None
        reference = compute_reference(net, layers, kl_batches, metric_set, progress, batch_size=batch_size)
        metric_name = reference.metric.name
        if quantizer == "rtn" and saliency == "hessian":
            kl = measure_ref_columns(net, layers, reference, refs, progress, stats, grouping)
        else:  # the same items with this quantizer / these split channels (no metric groups here)
            from .proxy import measure_item

            kl = np.array([[measure_item(net, layer, r, reference, stats.get(layer.fqn), quantizer=quantizer,
                                         saliency=sal[layer.fqn]) for r in refs] for layer in layers], dtype=np.float64)
        replay = reference.replay
        reference.free()
    t = lap("measure", t)

    table, scales = calibrate_proxy(proxy, kl, [names.index(r) for r in refs])
    if measured:
        table = measured_table
    costs = cost_table(layers, scheme_objs)
    other_bits, other_params = other_parameter_bits(net, layers)
    hess_rec = None
    if hessians_out is not None:
        from .hessian_store import save_hessians

        hess_rec = save_hessians(hessians_out, stats, tokens_sha256=calib_desc.get("tokens_sha256"))
    if on_hessians is not None:
        on_hessians(stats)
    walls["total"] = round(time.perf_counter() - t_start, 3)
    del stats

    metadata = {
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bitalloc_version": _bitalloc_version(),
        "torch_version": torch.__version__,
        "wall_s": walls,
        "metric": metric_name,
        "loss_units": "nats/token (KL vs unquantized)" if metric_name == "kl" else f"{metric_name} delta",
        "options": {
            "include": list(include),
            "exclude": list(exclude),
            "quantize_tied": quantize_tied,
            "batch_size": batch_size,
            "kl_samples": kl_samples,
            "kl_stride": kl_stride,
            "hessian_dtype": str(hessian_dtype).replace("torch.", ""),
            "block_replay": replay,
            # "rtn": round-to-nearest with the per-group clip search (kernels.quant); "gptq": kernels.gptq
            "quantizer": "rtn-clip" if quantizer == "rtn" else quantizer,
        },
        "quantizer": quantizer,
        "saliency": saliency,
        **({"hessians": hess_rec} if hess_rec else {}),
        "table": "measured" if measured else "calibrated-proxy",
    }
    if measure_info is not None:
        metadata["measure"] = measure_info
    if grouping is not None:
        metadata.update(grouping.metadata())
    return SensitivityProfile(
        model={"spec": loaded.spec, "kind": loaded.kind, "description": loaded.description, "fingerprint": fp},
        calibration=calib_desc,
        layers=list(layers),
        skipped=list(skipped),
        schemes=names,
        cost_bits=costs,
        tables=grouping.split(table, [layer.fqn for layer in layers]) if grouping is not None else {"all": table},
        proxy=proxy,
        kl_ref=kl,
        ref_schemes=refs,
        scales=scales,
        other_bits=other_bits,
        other_params=other_params,
        metadata=metadata,
        saliency={f: v.numpy().astype(np.float64) for f, v in sal.items()},
        pairs=pair_field,
    )


def _is_16bit(net: torch.nn.Module) -> bool:
    """Whether every floating parameter already holds a float16 value."""
    with torch.no_grad():
        return all(
            p.dtype == torch.float16 or torch.equal(p, p.to(torch.float16).to(p.dtype))
            for p in net.parameters() if p.is_floating_point()
        )


def _measure_all(loaded, setup, layers, names, data, stats, progress, say, *, workers, ray_address, checkpoint,
                 saliency=None, pairs=None, grouping=None):
    """The measured (L, S) table through :mod:`sensitivity.runner` (in-process or on Ray).

    ``setup`` (from :func:`_worker_setup`) gets the per-layer ``saliency`` values here.
    With metric groups every item scores every group's metric from one forward; the table
    holds each layer's value in its own group's metric (``grouping.split`` makes the
    per-group tables). Groups reach Ray workers as JSON (patterns and built-in metric
    names); groups with callables run in-process only."""
    from .runner import WorkerContext, checkpoint_header, run_items

    if saliency is not None:
        setup = dataclasses.replace(setup, saliency_values={f: v.tolist() for f, v in saliency.items()})
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    context = None
    if not address and not workers:
        context = WorkerContext(setup, loaded=loaded, data=data, hessians=stats, saliency=saliency, grouping=grouping)
    elif grouping is not None and setup.groups is None:
        raise ProfileError("metric groups with callables (layer matchers or metric functions) cannot be shipped to "
                           "Ray workers; use name patterns and built-in metric names, or measure in-process")
    fqns = [layer.fqn for layer in layers]
    items = [(f, s) for f in fqns for s in names]
    pair_list = None
    if pairs is not None:
        from .pairs import block_pairs, pair_items

        model_kind, pair_names, ref = pairs
        bad = [x for x in pair_names + list(ref or []) if x not in names]
        if bad:
            raise ProfileError(f"pair scheme {bad[0]!r} is not one of the schemes")
        pair_list = block_pairs(layers)
        joint = pair_items(pair_list, pair_names, model_kind, ref)
        say(f"pair terms ({model_kind}): {len(pair_list)} same-block pairs -> {len(joint)} joint items")
        items += joint
    say(f"measuring {len(items)} items ({len(fqns)} layers x {len(names)} schemes)"
        + (f" on Ray ({'cluster ' + address if address else f'{workers} local workers'})" if context is None else " in-process")
        + (f"; checkpoint {checkpoint}" if checkpoint else ""))
    header = checkpoint_header(setup, names, quantizer=setup.quantizer)
    res = run_items(setup, items, checkpoint=checkpoint, header=header, workers=workers, address=address,
                    context=context, progress=progress, log_fn=say)
    replay = bool(context.reference.replay) if context is not None else bool(
        (res.info.get("worker_info") or [{}])[0].get("block_replay", False))
    if context is not None:
        context.reference.free()
    if pair_list is not None:
        from .pairs import SEP, pairs_from_values

        single = {k: v[setup.metric] for k, v in res.values.items() if SEP not in k[0]}
        joint_v = {k: v[setup.metric] for k, v in res.values.items() if SEP in k[0]}
        res.info["pairs_field"] = pairs_from_values(pair_list, pair_names, single, joint_v, model_kind, ref,
                                                    setup.metric)
        res.info["pair_items"] = len(joint_v)
    if grouping is not None:
        own = grouping.group_of()
        table = np.array([[res.values[(f, s)][own[f]] for s in names] for f in fqns], dtype=np.float64)
        return table, res.info, "groups", replay
    return res.table(fqns, names, setup.metric), res.info, setup.metric, replay


def _worker_setup(loaded, data, calib_desc, fp, *, kl_samples, kl_stride, batch_size, include, exclude,
                  quantize_tied, quantizer, saliency="hessian", grouping=None):
    """What every measuring worker needs (and what the checkpoint header hashes); the
    saliency values are added by :func:`_measure_all` once they are computed."""
    from .runner import WorkerSetup

    ids = data["input_ids"] if isinstance(data, dict) else data
    calib = {k: v for k, v in calib_desc.items() if k not in ("tokens", "shape", "tokens_sha256")}
    return WorkerSetup(
        model=loaded.spec,
        calibration=calib,
        tokens=ids.tolist(),
        attention_mask=data["attention_mask"].tolist() if isinstance(data, dict) and "attention_mask" in data else None,
        tokens_sha256=calib_desc["tokens_sha256"],
        fingerprint_sha256=fp["sha256"],
        weights="16bit" if _is_16bit(loaded.model) else "as-loaded",
        kl_samples=kl_samples,
        kl_stride=kl_stride,
        batch_size=batch_size,
        metric="cosine" if loaded.kind == "encoder" else "kl",
        include=tuple(include),
        exclude=tuple(exclude),
        quantize_tied=quantize_tied,
        quantizer=quantizer,
        saliency=saliency,
        groups=_groups_json(grouping),
    )


def _groups_json(grouping) -> list | None:
    """The groups as JSON for workers (None if there are none or one is not expressible)."""
    if grouping is None:
        return None
    out = []
    for g in grouping.groups:
        if callable(g.match) or not isinstance(g.metric, str):
            return None
        out.append({"name": g.name, "match": list(g.match), "metric": g.metric, "options": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in g.options.items()}})
    return out

