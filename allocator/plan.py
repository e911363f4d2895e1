"""The allocation plan: fully qualified module name -> scheme, with predictions and provenance.

A plan is a per-layer map in the torchao style: a layer's scheme is found by exact name,
then by the first matching pattern rule, then the default (``None``: leave the layer as it
is). Plans made by the solver list every quantized layer by exact name; rules exist for
hand-written plans and rule-based baselines.

Serialised as a versioned JSON envelope (``schema: bitalloc.plan/1``). Loading an unknown
version, a corrupt file, or applying a plan to a different model is a clear error.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitalloc.kernels.formats import FormatError, Scheme, parse_scheme
from bitalloc.sensitivity.artifact import ArtifactError, check_schema, read_json, validate, write_json
from bitalloc.sensitivity.patterns import match_pattern

__all__ = ["Plan", "PlanError", "LayerPlan", "PLAN_SCHEMA"]

PLAN_SCHEMA = "bitalloc.plan/1"


MAX_PLAN_BYTES = 256 << 20


class PlanError(ArtifactError):
    """A plan file is unreadable, of an unknown version, or does not fit the model."""


@dataclass(frozen=True)
class LayerPlan:
    """One layer's assignment: scheme, exact bits and predicted loss per metric group."""

    fqn: str
    scheme: str
    shape: tuple[int, int]  # (out_features, in_features)
    bits: int
    loss: dict[str, float] = field(default_factory=dict)
    high_idx: tuple[int, ...] | None = None  # input channels of the high-impact part

    def __post_init__(self) -> None:
        try:
            s = parse_scheme(self.scheme)
        except FormatError as e:
            raise PlanError(f"layer {self.fqn}: {e}") from None
        expect = s.storage_bits(*self.shape)
        if self.bits != expect:
            raise PlanError(f"layer {self.fqn}: {self.bits} bits recorded but {self.scheme} on {self.shape} takes {expect}")

    def to_dict(self) -> dict:
        d = {"scheme": self.scheme, "shape": list(self.shape), "bits": self.bits, "loss": self.loss}
        if self.high_idx is not None:
            d["high_idx"] = list(self.high_idx)
        return d

    @classmethod
    def from_dict(cls, fqn: str, d: dict) -> "LayerPlan":
        hi = d.get("high_idx")
        return cls(fqn, d["scheme"], tuple(d["shape"]), int(d["bits"]), dict(d.get("loss", {})),
                   tuple(hi) if hi is not None else None)


@dataclass(frozen=True)
class Plan:
    """fqn -> scheme, predicted bytes and loss, budget, solver status, model and profile fingerprints."""

    model: dict[str, Any]  # {"spec": ..., "fingerprint": sha256, "architecture": ...}
    layers: dict[str, LayerPlan]  # ordered as in the model
    budget: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)  # bytes, bpw, loss per group
    solver: dict[str, Any] = field(default_factory=dict)  # method, status, objective, gap, time
    profile: dict[str, Any] = field(default_factory=dict)  # path, sha256, schema
    rules: tuple[tuple[str, str], ...] = ()  # (pattern, scheme), after exact names
    default: str | None = None  # scheme for layers matching nothing (None: leave as is)
    label: str = ""
    created_at: str = ""
    schema: str = PLAN_SCHEMA
    # how the executor quantizes: {"quantizer": "rtn" | "gptq", "saliency": method, "hessians": {...}}
    quantization: dict[str, Any] = field(default_factory=dict)

    @property
    def quantizer(self) -> str:
        return str(self.quantization.get("quantizer", "rtn"))

    def __post_init__(self) -> None:
        from bitalloc.sensitivity.patterns import check_pattern

        for pat, sch in self.rules:
            check_pattern(pat, "plan rule", error=PlanError)
            try:
                parse_scheme(sch)
            except FormatError as e:
                raise PlanError(f"rule {pat!r}: {e}") from None
        if self.default is not None:
            try:
                parse_scheme(self.default)
            except FormatError as e:
                raise PlanError(f"default scheme: {e}") from None

    # -- lookup ------------------------------------------------------------------------
    def scheme_for(self, fqn: str) -> Scheme | None:
        """Exact name, then the first matching pattern rule, then the default."""
        if fqn in self.layers:
            return parse_scheme(self.layers[fqn].scheme)
        for pat, sch in self.rules:
            if match_pattern(pat, fqn):
                return parse_scheme(sch)
        return parse_scheme(self.default) if self.default else None

    @property
    def quantized_bits(self) -> int:
        return sum(lp.bits for lp in self.layers.values())

    @property
    def n_weights(self) -> int:
        return sum(lp.shape[0] * lp.shape[1] for lp in self.layers.values())

    @property
    def bpw(self) -> float:
        return self.quantized_bits / max(1, self.n_weights)

    def scheme_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lp in self.layers.values():
            out[lp.scheme] = out.get(lp.scheme, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema": self.schema,
            "label": self.label,
            "created_at": self.created_at or _now(),
            "model": self.model,
            "budget": self.budget,
            "predicted": self.predicted,
            "solver": self.solver,
            "profile": self.profile,
            "rules": [list(r) for r in self.rules],
            "default": self.default,
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            **({"quantization": self.quantization} if self.quantization else {}),
        }

    def file_dict(self) -> dict:
        """The document a plan file holds (:meth:`save`, and the service's stored plans):
        :meth:`to_dict` with NaN predictions as null and the bitalloc version."""
        from bitalloc import __version__

        d = _finite_or_null(self.to_dict())  # a NaN prediction is written as null
        d.setdefault("bitalloc_version", __version__)
        return d

    def save(self, path: str | Path) -> Path:
        """Write the plan atomically (temp file beside it, fsync, rename)."""
        return write_json(path, self.file_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> "Plan":
        if not isinstance(d, dict) or "schema" not in d:
            raise PlanError(f"{source}: not a bitalloc plan (no 'schema' field)")
        check_schema(d["schema"], PLAN_SCHEMA, source, error=PlanError)
        from .plan_schema import PlanFile

        validate(PlanFile, d, source, error=PlanError)
        try:
            layers = {k: LayerPlan.from_dict(k, v) for k, v in d["layers"].items()}
            return cls(
                model=d["model"], layers=layers, budget=d.get("budget", {}), predicted=d.get("predicted", {}),
                solver=d.get("solver", {}), profile=d.get("profile", {}),
                rules=tuple(tuple(r) for r in d.get("rules", [])), default=d.get("default"),
                label=d.get("label", ""), created_at=d.get("created_at", ""), schema=d["schema"],
                quantization=dict(d.get("quantization") or {}),
            )
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{source}: corrupt plan ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        d = read_json(path, "plan", error=PlanError, max_bytes=MAX_PLAN_BYTES)
        return cls.from_dict(d, source=f"plan file {str(path)!r}")

    def check_model(self, fingerprint: dict) -> None:
        """Raise PlanError unless the plan was made for the model with this fingerprint."""
        want = self.model.get("fingerprint", {}).get("sha256")
        got = fingerprint.get("sha256")
        if want and got and want != got:
            raise PlanError(
                f"plan was made for a different model (weights sha256 {want[:12]}…, "
                f"{self.model.get('spec', '?')}); this model is {got[:12]}…"
            )


def _finite_or_null(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_null(v) for v in x]
    return x


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
