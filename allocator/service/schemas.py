"""The service's request bodies: strict pydantic models, unknown fields refused.

Each model mirrors a CLI command (``bitalloc profile``, ``bitalloc solve``, ``bitalloc
export``) field for field where it can; what would reach the server's filesystem (model
directories, calibration file paths, output paths) is left out on purpose: models are named
specs, calibration text travels inline and is written into the job's folder. Values are
checked with the same functions the CLI uses (``parse_scheme``, ``parse_budget``,
``parse_groups``), so a request the server accepts is one the CLI would accept.
"""

from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bitalloc.allocator.candidates import CANDIDATES
from bitalloc.sensitivity.defaults import DEFAULT_SCHEMES
from bitalloc.sensitivity.profile_config import FISHER_LABELS

__all__ = ["HEX64", "JOB_ID", "ProfileRequest", "PlanRequest", "ExportRequest", "CalibrationText", "SERVICE_MODELS"]

HEX64 = r"^[0-9a-f]{64}$"  # profile, plan and artifact ids: sha256 hex
JOB_ID = r"^job_[0-9a-f]{32}$"
# models a request may name: the built-in specs (a path would reach the server's filesystem)
SERVICE_MODELS = ("smollm2", "minilm", "random:llama-tiny", "random:gpt2-tiny", "random:bert-tiny")
MAX_SCHEMES = 64
MAX_PATTERNS = 256


class Strict(BaseModel):
    """No unknown fields, no silent type coercion ("8" is not 8, 8.5 is not an int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _check_scheme(name: str) -> str:
    from bitalloc.kernels.formats import FormatError, parse_scheme

    try:
        return parse_scheme(name).name
    except FormatError as e:
        raise ValueError(str(e)) from None


def _check_schemes(names: list[str] | None, *, unique: bool = True) -> list[str] | None:
    if names is None:
        return None
    out = [_check_scheme(n) for n in names]
    if unique and len(set(out)) != len(out):
        raise ValueError(f"schemes contain duplicates: {out}")
    return names


class CalibrationText(Strict):
    """Calibration text sent inline (at most the body size limit); the job writes it to its folder."""

    text: str = Field(min_length=1)


Pattern = Field(min_length=1, max_length=512)


class GroupSpec(Strict):
    """One metric group, as in a run config's ``[[profile.groups]]``."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    match: list[str] = Field(min_length=1, max_length=MAX_PATTERNS)
    metric: str = "kl"
    exclude_positions: list[int] | None = None
    exclude_token_ids: list[int] | None = None


class ProfileRequest(Strict):
    """``POST /v1/profiles``: the fields of ``bitalloc profile`` (server-side paths excluded)."""

    model: str = "smollm2"
    calibration: Union[Literal["generated"], CalibrationText] = "generated"
    n_samples: int = Field(8, ge=1, le=4096)
    seq_len: int = Field(256, ge=2, le=8192)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    kl_samples: int | None = Field(2, ge=1, le=4096)
    kl_stride: int = Field(2, ge=1, le=4096)
    schemes: list[str] = Field(default_factory=lambda: list(DEFAULT_SCHEMES), min_length=1, max_length=MAX_SCHEMES)
    ref_schemes: list[str] | None = Field(None, min_length=1, max_length=MAX_SCHEMES)
    include: list[str] = Field(default_factory=list, max_length=MAX_PATTERNS)
    exclude: list[str] = Field(default_factory=list, max_length=MAX_PATTERNS)
    measured: bool = False
    groups: list[GroupSpec] | None = Field(None, min_length=1, max_length=64)
    saliency: Literal["hessian", "obq", "fisher"] = "hessian"
    quantizer: Literal["rtn", "gptq"] = "rtn"
    pairs: Literal["full", "reduced"] | None = None
    pair_schemes: list[str] | None = Field(None, min_length=1, max_length=MAX_SCHEMES)
    pair_ref: str | None = None
    ref_method: Literal["measured", "fisher", "hybrid"] = "measured"
    measure_every: int = Field(3, ge=1, le=4096)
    fisher_table: bool = False
    fisher_labels: Literal[FISHER_LABELS] = "sampled"
    # block streaming: the model read a unit at a time under this size ("1.5GiB" or bytes),
    # per Ray worker when the service runs on a cluster
    max_memory: Union[str, int, None] = None

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, v):
        if v is None:
            return v
        from bitalloc.sensitivity.sizes import parse_size

        return parse_size(v, "max_memory")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v not in SERVICE_MODELS:
            raise ValueError(f"unknown model {v!r}; the service profiles the built-in specs {', '.join(SERVICE_MODELS)}")
        return v

    @field_validator("schemes", "ref_schemes", "pair_schemes")
    @classmethod
    def _schemes(cls, v):
        return _check_schemes(v)

    @field_validator("pair_ref")
    @classmethod
    def _pair_ref(cls, v):
        return None if v is None else (_check_scheme(v) and v)

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or len(p) > 512:
                raise ValueError("layer patterns must be 1-512 characters")
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"pattern {p!r} is not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _combos(self):
        canon = [_check_scheme(s) for s in self.schemes]
        for r in self.ref_schemes or ():
            if _check_scheme(r) not in canon:
                raise _FieldError("ref_schemes", f"ref scheme {r!r} is not one of the schemes")
        if self.pairs is not None and not self.measured:
            raise _FieldError("pairs", "pair terms need the measured table (measured: true)")
        if self.ref_method != "measured" and (self.measured or self.groups):
            raise _FieldError("ref_method", f"ref_method {self.ref_method!r} estimates KL references; it does not go "
                                            "with measured: true or metric groups")
        if self.fisher_table and self.groups:
            raise _FieldError("fisher_table", "a Fisher table estimates KL only; it does not go with metric groups")
        if self.pairs is not None and self.groups:
            raise _FieldError("pairs", "pair terms with metric groups are not supported")
        if (self.pair_schemes or self.pair_ref) and self.pairs is None:
            raise _FieldError("pair_schemes" if self.pair_schemes else "pair_ref", "needs pairs: 'full' or 'reduced'")
        if self.max_memory is not None and self.model != "smollm2":
            raise _FieldError("model", f"max_memory streams a model directory or GGUF file; of the service's models only "
                                       f"smollm2 is one, not {self.model!r}")
        if self.max_memory is not None:  # what block streaming does not do, refused now, not in the job
            from bitalloc.sensitivity.profile_config import ProfileConfig

            try:
                ProfileConfig.from_settings(
                    max_memory=self.max_memory, measured=self.measured, groups=tuple(self.groups or ()),
                    pairs=self.pairs, ref_method=self.ref_method, fisher_table=self.fisher_table,
                    saliency=self.saliency, quantizer=self.quantizer)
            except ValueError as e:
                m = re.search(r"profile setting '(\w+)'", str(e))
                raise _FieldError(m.group(1) if m else "max_memory", str(e)) from None
        if self.groups:
            from bitalloc.sensitivity.groups import GroupError, parse_groups

            try:
                parse_groups([g.model_dump(exclude_none=True) for g in self.groups])
            except GroupError as e:
                raise _FieldError("groups", str(e)) from None
        return self


class PlanRequest(Strict):
    """``POST /v1/plans``: the options of ``bitalloc solve`` against a stored profile."""

    profile: str = Field(pattern=HEX64)
    budget: Union[str, float]
    method: Literal["ilp", "dp", "lagrangian", "qp", "qp-relax", "separable"] = "ilp"
    backend: Literal["highs", "cbc"] = "highs"
    time_limit_s: float | None = Field(None, gt=0, le=600)
    schemes: list[str] | None = Field(None, min_length=1, max_length=MAX_SCHEMES)
    pins: dict[str, str] = Field(default_factory=dict, max_length=MAX_PATTERNS)
    forbid: dict[str, list[str]] = Field(default_factory=dict, max_length=MAX_PATTERNS)
    group_weights: dict[str, float] | None = None
    group_limits: dict[str, float] | None = None
    group_shares: dict[str, float] | None = None
    group_norm: Literal["auto", "ref", "range", "none"] = "auto"
    # the profile's candidate calibration to solve on (allocator.candidates); all but "profile"
    # need a profile made with fisher_table, the "-text" ones fisher_labels "both"
    table: Literal[CANDIDATES] = "profile"
    # the client's model (weights sha256, as in a profile's model.fingerprint): refused if the profile is for another
    model_sha256: str | None = Field(None, pattern=HEX64)

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        from bitalloc.allocator.budget import BudgetError, parse_budget

        if isinstance(v, float) and not v > 0:
            raise ValueError(f"budget must be positive, got {v!r}")
        try:
            parse_budget(v)
        except BudgetError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("schemes")
    @classmethod
    def _schemes(cls, v):
        return _check_schemes(v)

    @field_validator("pins")
    @classmethod
    def _pins(cls, v: dict[str, str]):
        for pat, s in v.items():
            if not pat:
                raise ValueError("an empty layer pattern")
            try:
                _check_scheme(s)
            except ValueError as e:
                raise ValueError(f"pins[{pat!r}]: {e}") from None
        return v

    @field_validator("forbid")
    @classmethod
    def _forbid(cls, v: dict[str, list[str]]):
        for pat, ss in v.items():
            if not pat:
                raise ValueError("an empty layer pattern")
            for s in ss:
                try:
                    _check_scheme(s)
                except ValueError as e:
                    raise ValueError(f"forbid[{pat!r}]: {e}") from None
        return v

    @field_validator("group_weights", "group_limits", "group_shares")
    @classmethod
    def _numbers(cls, v):
        import math

        for g, x in (v or {}).items():
            if not math.isfinite(x) or x < 0:
                raise ValueError(f"group {g!r}: must be a finite non-negative number, got {x!r}")
        return v


class ExportRequest(Strict):
    """``POST /v1/exports``: a stored plan into an engine's files (a job)."""

    plan: str = Field(pattern=HEX64)
    target: str = Field(min_length=1, max_length=64)
    model: str | None = None
    options: dict[str, Union[str, int, float, bool, None]] = Field(default_factory=dict, max_length=64)

    @field_validator("model")
    @classmethod
    def _model(cls, v):
        if v is not None and v not in SERVICE_MODELS:
            raise ValueError(f"unknown model {v!r}; the service exports the built-in specs {', '.join(SERVICE_MODELS)}")
        return v


class _FieldError(ValueError):
    """A cross-field problem, raised from a model validator, that names its field."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"{field}: {msg}")
        self.field, self.msg = field, msg
