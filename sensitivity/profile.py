"""The :class:`SensitivityProfile` artifact (the pipeline that makes one: :mod:`.build`).

A profile is everything the solvers need, without the model: the selected layers, the
candidate schemes, the exact storage cost of every (layer, scheme) in bits, and one
expected-loss table per metric group (default group ``"all"``: the calibrated proxy in
nats/token of KL for causal LMs). It is saved as JSON in the common envelope
(``schema: bitalloc.profile/3``, :mod:`.artifact`), its bulk arrays (per-layer channel
saliency, the channels each split scheme keeps high, full pair terms) in a safetensors
sidecar ``<name>.arrays.safetensors`` whose sha256 the JSON records. Earlier versions are
still read: ``/2`` (the same, without the split channels: they are chosen from the stored
saliency by the same rule, :mod:`.split_channels`) and ``/1`` (``schema_version``,
everything inline); both call the measured reference values ``kl_ref``, which ``/3``
calls ``ref_values`` (a ``/3`` file written before the rename may still say ``kl_ref``;
never both). Loading validates the file against the declared schema
(:mod:`.profile_schema`) before any field is used.

Size accounting: ``cost_bits[i, s]`` is ``Scheme.storage_bits(out, in)`` of layer i's
weight (a weight shared by several layers of one tie group is counted on the first member
only; the others get 0). ``other_bits`` is every other parameter bit at its stored dtype
(embeddings, norms, biases, non-selected layers; a tied tensor once), so the total size of
a plan is ``cost_bits[chosen].sum() + other_bits``.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import atomic_path, check_schema, envelope, file_sha256, read_json, validate, write_json
from .defaults import DEFAULT_REF_SCHEMES, DEFAULT_SCHEMES  # re-exported
from .errors import ProfileError  # re-exported: defined beside the code that raises it
from .layer_info import LayerInfo, Skipped
from .split_channels import SPLIT_PREFIX, check_split_channels, high_channels, split_from_sidecar, split_to_sidecar

__all__ = [
    "PROFILE_SCHEMA",
    "ProfileError",
    "SensitivityProfile",
    "PROFILE_SCHEMA_V1",
    "PROFILE_SCHEMA_V2",
    "DEFAULT_SCHEMES",
    "DEFAULT_REF_SCHEMES",
]

PROFILE_SCHEMA = "bitalloc.profile/3"
PROFILE_SCHEMA_V2 = "bitalloc.profile/2"  # no split_channels (read: chosen from the saliency)
PROFILE_SCHEMA_V1 = "bitalloc.profile/1"  # everything inline, the version under "schema_version"
MAX_PROFILE_BYTES = 1 << 30

# the build pipeline (build_profile, ProfileConfig, cost_table, ...) lives in .build (not re-exported here)


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
    ``proxy`` (L, S) raw ``tr(ΔW H ΔWᵀ)``; ``ref_values`` (L, R) the metric (KL, or the
    model's own) measured at each of the ``ref_schemes``, which calibrates the proxy;
    ``scales`` (L,) the fitted proxy-to-metric scale per layer.

    ``kl_ref`` is the deprecated old name of ``ref_values`` (a read-only property, and a
    constructor keyword), kept for one release.
    """

    model: dict
    calibration: dict
    layers: list[LayerInfo]
    skipped: list[Skipped]
    schemes: list[str]
    cost_bits: np.ndarray
    tables: dict[str, np.ndarray]
    proxy: np.ndarray
    ref_values: np.ndarray
    ref_schemes: list[str]
    scales: np.ndarray
    other_bits: int
    other_params: int
    metadata: dict = field(default_factory=dict)
    schema_version: str = PROFILE_SCHEMA  # the version this object follows (loading upgrades a /1 profile)
    # optional (older profiles have neither): per-layer input-channel saliency (fqn -> (in,)),
    # the method in metadata["saliency"]; and measured pair terms (see sensitivity.pairs)
    saliency: dict | None = None
    pairs: dict | None = None
    # optional (/3): fqn -> {k: (k,) int64 ascending}, the channels the split schemes with
    # k high channels keep (the ones measured); absent: chosen from the saliency
    split_channels: dict | None = None
    # optional (/3): (L, S) the output-Fisher estimate of each (layer, scheme)'s KL per token
    # (sensitivity.fisher_refs), a second, independent estimate of the table: the solver's
    # candidate calibrations (allocator.candidates) mix it with the measured one
    fisher: np.ndarray | None = None
    # optional (/3): (L, S) the same estimate with the calibration text's next tokens as labels,
    # beside a ``fisher`` with labels sampled from the model (fisher_labels="both"): the
    # candidate calibrations solve on each
    fisher_text: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.schema_version not in (PROFILE_SCHEMA, PROFILE_SCHEMA_V2, PROFILE_SCHEMA_V1):
            raise ProfileError(f"unknown profile schema {self.schema_version!r}; this bitalloc reads {PROFILE_SCHEMA!r}")
        object.__setattr__(self, "schema_version", PROFILE_SCHEMA)
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
        object.__setattr__(self, "ref_values",
                           _array(self.ref_values, np.float64, "ref_values", (L, len(self.ref_schemes))))
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
        if self.split_channels is not None:
            object.__setattr__(self, "split_channels", check_split_channels(self.split_channels, self.layers))
        for name in ("fisher", "fisher_text"):
            if getattr(self, name) is not None:
                fisher = _array(getattr(self, name), np.float64, name, (L, S))
                if not (np.isfinite(fisher).all() and (fisher >= 0).all()):
                    raise ProfileError(f"profile field {name!r} must hold finite non-negative values")
                object.__setattr__(self, name, fisher)
        if self.fisher_text is not None and self.fisher is None:
            raise ProfileError("profile field 'fisher_text' needs 'fisher' beside it")

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

    def high_channels(self, layer: int | str, scheme: str) -> tuple[int, ...] | None:
        """The ascending input channels ``scheme`` keeps high in a layer (index or fqn), the
        ones the profile measured; None when the scheme has no split or the profile no saliency."""
        i = layer if isinstance(layer, int) else self.layer_index(layer)
        return high_channels(self.split_channels, self.saliency, self.layers[i], scheme)

    @property
    def kl_ref(self) -> np.ndarray:
        """Deprecated: the old name of :attr:`ref_values` (the values are any metric's, not only KL)."""
        return self.ref_values

    @property
    def fingerprint(self) -> dict:
        return self.model.get("fingerprint", {})

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        """The whole profile as one JSON-able dict (bulk arrays inline; :meth:`save` moves
        them to the sidecar)."""
        return {
            "schema": PROFILE_SCHEMA,
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
            "ref_values": _jsonable(self.ref_values),
            "scales": _jsonable(self.scales),
            "metadata": self.metadata,
            **({"saliency": {f: _jsonable(v) for f, v in self.saliency.items()}} if self.saliency is not None else {}),
            **({"pairs": self.pairs} if self.pairs is not None else {}),
            **({"split_channels": {f: {str(k): v.tolist() for k, v in per_k.items()}
                                   for f, per_k in self.split_channels.items()}}
               if self.split_channels is not None else {}),
            **({"fisher": _jsonable(self.fisher)} if self.fisher is not None else {}),
            **({"fisher_text": _jsonable(self.fisher_text)} if self.fisher_text is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "profile", *, arrays: dict | None = None) -> SensitivityProfile:
        """Validate ``d`` against the declared schema (:mod:`.profile_schema`), then build
        the profile; ``arrays``: the sidecar's tensors when ``d`` refers to one."""
        from .profile_schema import ProfileFile

        if not isinstance(d, dict):
            raise ProfileError(f"{where}: profile must be a JSON object, got {type(d).__name__}")
        d, ref_key = _upgrade(d, where)
        d = {k: _lists(v) for k, v in d.items()}  # numpy arrays of an in-memory dict -> the JSON form
        required = (
            "model", "calibration", "layers", "skipped", "schemes", "ref_schemes", "cost_bits",
            "other_bits", "other_params", "tables", "proxy", ref_key, "scales",
        )  # fmt: skip
        missing = [k for k in required if k not in d]
        if missing:
            raise ProfileError(f"{where}: profile is missing field(s): {', '.join(missing)}")
        f = validate(ProfileFile, d, where, error=ProfileError)
        saliency, pairs, split = f.saliency, f.pairs, f.split_channels
        if f.arrays is not None:
            if arrays is None:
                raise ProfileError(f"{where}: field 'arrays' names the sidecar {f.arrays.file!r}; load the profile "
                                   "from its file (SensitivityProfile.load) so the sidecar is read")
            saliency, pairs, split = _from_sidecar(arrays, saliency, pairs, split, where)
        try:
            return cls(
                model=d["model"], calibration=d["calibration"],
                layers=[LayerInfo(**x.model_dump()) for x in f.layers],
                skipped=[Skipped(**x.model_dump()) for x in f.skipped],
                schemes=list(f.schemes), cost_bits=f.cost_bits, tables=dict(f.tables), proxy=f.proxy,
                ref_values=f.ref_values,
                ref_schemes=list(f.ref_schemes), scales=f.scales, other_bits=f.other_bits, other_params=f.other_params,
                metadata=d.get("metadata") or {}, saliency=saliency, pairs=pairs, split_channels=split,
                fisher=f.fisher, fisher_text=f.fisher_text,
            )
        except ProfileError as e:
            raise ProfileError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:  # LayerInfo's cross-field rules
            raise ProfileError(f"{where}: field 'layers': {' '.join(str(e).split())}") from None

    def to_json_bytes(self) -> bytes:
        """One self-contained JSON document, bulk arrays inline (no sidecar): what the
        allocation service stores and what a client uploads; :meth:`load` reads it."""
        import json

        return (json.dumps(self.to_dict(), allow_nan=False) + "\n").encode()

    def save(self, path: str | os.PathLike, *, command: Any = None) -> Path:
        """Write the JSON (and the bulk-array sidecar, first) atomically; returns the path."""
        p = Path(path)
        d = self.to_dict()
        tensors = _to_sidecar(d)
        head = envelope(PROFILE_SCHEMA, **({"command": command} if command is not None else {}))
        if tensors:
            from safetensors.numpy import save_file

            side = p.with_name(sidecar_name(p))
            with atomic_path(side) as tmp:
                save_file(tensors, str(tmp), metadata={"bitalloc": PROFILE_SCHEMA})
            head["arrays"] = {"file": side.name, "sha256": file_sha256(side), "bytes": side.stat().st_size,
                              "tensors": len(tensors)}
        write_json(p, {**head, **d})
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityProfile:
        """Read a saved profile (this version or the previous); any problem is a one-line
        :class:`ProfileError` naming the file and the field."""
        p = Path(path)
        where = f"profile file {str(p)!r}"
        d = read_json(p, "profile", error=ProfileError, max_bytes=MAX_PROFILE_BYTES)
        arrays = None
        if isinstance(d, dict):
            _upgrade(d, where)  # an unknown version is said before anything else
        ref = d.get("arrays") if isinstance(d, dict) else None
        if ref is not None:
            from .profile_schema import ArraysRef

            r = validate(ArraysRef, ref, where, error=ProfileError, prefix="arrays")
            arrays = _read_sidecar(p.with_name(r.file), r, where)
        return cls.from_dict(d, where, arrays=arrays)


_dataclass_init = SensitivityProfile.__init__
_REF_POSITION = [f.name for f in fields(SensitivityProfile)].index("ref_values")


def _init(self, *args: Any, kl_ref: Any = None, **kwargs: Any) -> None:
    """The dataclass's ``__init__``, also taking ``ref_values`` by its deprecated old name."""
    if kl_ref is not None:
        if "ref_values" in kwargs or len(args) > _REF_POSITION:
            raise TypeError("SensitivityProfile() got both 'ref_values' and its old name 'kl_ref'")
        kwargs["ref_values"] = kl_ref
    _dataclass_init(self, *args, **kwargs)


_init.__signature__ = inspect.signature(_dataclass_init)  # what help() and IDEs show: the fields
SensitivityProfile.__init__ = _init


def _lists(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return _jsonable(v) if v.dtype.kind == "f" else v.tolist()
    if isinstance(v, dict):
        return {k: _lists(x) for k, x in v.items()}
    return v


def sidecar_name(path: str | os.PathLike) -> str:
    """``profile.json`` -> ``profile.arrays.safetensors``."""
    p = Path(path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return f"{stem}.arrays.safetensors"


_REF, _OLD_REF = "ref_values", "kl_ref"  # the field's /3 name and its /1, /2 (and early /3) one


def _upgrade(d: dict, where: str) -> tuple[dict, str]:
    """A /1 profile (``schema_version``) or a /2 one as a /3 dict, the schema checked either
    way; and the name the file gives the reference values (see :func:`_ref_key`)."""
    if "schema_version" in d:
        version = check_schema(d["schema_version"], PROFILE_SCHEMA, where, readable=(PROFILE_SCHEMA_V1,),
                               error=ProfileError)
        if version != PROFILE_SCHEMA_V1 or "schema" in d:
            raise ProfileError(f"{where}: unknown profile schema {d['schema_version']!r} (field 'schema_version' is "
                               f"the /1 format's; this bitalloc writes 'schema': {PROFILE_SCHEMA!r})")
        d = {k: v for k, v in d.items() if k != "schema_version"}
        d["schema"] = PROFILE_SCHEMA
        return d, _ref_key(d, version, where)
    version = check_schema(d.get("schema"), PROFILE_SCHEMA, where, readable=(PROFILE_SCHEMA_V2,), error=ProfileError)
    return {**d, "schema": PROFILE_SCHEMA}, _ref_key(d, version, where)


def _ref_key(d: dict, version: str, where: str) -> str:
    """``kl_ref`` in a /1 or /2 file (``ref_values`` there is an unknown field); in a /3
    file ``ref_values`` or, as /3 files written before the rename have it, ``kl_ref``, never
    both. The one the file has (the one it should have when it has neither)."""
    if version != PROFILE_SCHEMA:
        if _REF in d:
            raise ProfileError(f"{where}: field {_REF!r} is not in a {version!r} profile (there it is {_OLD_REF!r}; "
                               f"{_REF!r} is {PROFILE_SCHEMA!r}'s)")
        return _OLD_REF
    if _REF in d and _OLD_REF in d:
        raise ProfileError(f"{where}: field {_OLD_REF!r} is the old name of field {_REF!r}; a profile has one "
                           "of them, not both")
    return _OLD_REF if _OLD_REF in d else _REF


_SAL, _TERMS = "saliency/", "pairs.terms/"


def _to_sidecar(d: dict) -> dict:
    """Move the bulk arrays out of ``d`` (in place) into ``name -> array`` (float64; int64 channels)."""
    tensors = split_to_sidecar(d.pop("split_channels", None) or {})
    for fqn, v in (d.pop("saliency", None) or {}).items():
        tensors[_SAL + fqn] = np.asarray(v, dtype=np.float64)
    pairs = d.get("pairs")
    if isinstance(pairs, dict) and isinstance(pairs.get("terms"), dict):
        for k, v in pairs["terms"].items():
            tensors[_TERMS + k] = np.asarray(v, dtype=np.float64)
        d["pairs"] = {k: v for k, v in pairs.items() if k != "terms"}
    return tensors


def _read_sidecar(side: Path, ref, where: str) -> dict:
    if not side.is_file():
        raise ProfileError(f"{where}: field 'arrays': the sidecar {str(side)!r} is missing (it travels with the JSON)")
    if side.stat().st_size != ref.bytes or file_sha256(side) != ref.sha256:
        raise ProfileError(f"{where}: field 'arrays': {str(side)!r} does not match the recorded sha256 "
                           "(replaced, truncated or edited after saving)")
    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(side))
    except Exception as e:  # noqa: BLE001 - any corrupt sidecar is the same one-line error
        raise ProfileError(f"{where}: sidecar {str(side)!r} is not a valid safetensors file ({e})") from None
    if len(tensors) != ref.tensors:
        raise ProfileError(f"{where}: sidecar {str(side)!r} holds {len(tensors)} arrays, the JSON records {ref.tensors}")
    return tensors


def _from_sidecar(arrays: dict, saliency, pairs, split, where: str):
    if saliency is not None or split is not None:
        raise ProfileError(f"{where}: field {'saliency' if saliency is not None else 'split_channels'!r} is both "
                           "inline and in the sidecar")
    sal, terms, split = {}, {}, {}
    for k, v in arrays.items():
        if k.startswith(SPLIT_PREFIX):
            split_from_sidecar(k, v, split, where)
            continue
        if v.dtype != np.float64:
            raise ProfileError(f"{where}: sidecar array {k!r} is {v.dtype}, expected float64")
        if k.startswith(_SAL):
            sal[k[len(_SAL):]] = v
        elif k.startswith(_TERMS):
            terms[k[len(_TERMS):]] = v.tolist()
        else:
            raise ProfileError(f"{where}: sidecar array {k!r} is not a saliency vector, split channels or pair term")
    if terms:
        if not isinstance(pairs, dict) or "terms" in pairs:
            raise ProfileError(f"{where}: the sidecar holds pair terms but field 'pairs' does not expect them")
        pairs = {**pairs, "terms": terms}
    return (sal or None), pairs, (split or None)
