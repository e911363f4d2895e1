"""The declared schema of a run configuration (``bitalloc run CONFIG.toml``), per section.

Strict pydantic models: a boolean is a TOML boolean (``baselines = "no"`` is an error, not
true), an integer an integer, unknown keys are errors; the values' meaning (scheme names,
budgets, patterns, cross-section rules) is checked by :class:`~.config.RunConfig`.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import Field

from bitalloc.sensitivity.profile_schema import Finite, Strict

__all__ = ["SECTIONS"]

NonEmpty = Annotated[str, Field(min_length=1, max_length=4096)]
PosInt = Annotated[int, Field(ge=1)]


class ModelSection(Strict):
    spec: NonEmpty = "smollm2"


class CalibrationSection(Strict):
    source: NonEmpty = "generated"
    n_samples: PosInt = 8
    seq_len: Annotated[int, Field(ge=2)] = 256
    seed: Annotated[int, Field(ge=0)] = 0
    kl_samples: PosInt = 2
    kl_stride: PosInt = 2


class ProfileSection(Strict):
    schemes: Annotated[list[NonEmpty], Field(min_length=1)] = None  # type: ignore[assignment]
    include: list[NonEmpty] = []
    exclude: list[NonEmpty] = []
    ref_schemes: list[NonEmpty] = []
    measured: bool = False
    workers: Annotated[int, Field(ge=0)] = 0
    ray_address: str = ""
    groups: list[dict[str, Any]] = []
    saliency: NonEmpty = "hessian"
    quantizer: NonEmpty = "rtn"
    target: NonEmpty = "bitalloc"
    imatrix: bool = True
    ref_method: NonEmpty = "auto"
    fisher_table: Optional[bool] = None
    fisher_labels: NonEmpty = "auto"
    measure_every: PosInt = 3


class SolveSection(Strict):
    budgets: Annotated[list[NonEmpty], Field(min_length=1)] = None  # type: ignore[assignment]
    method: NonEmpty = "ilp"
    backend: NonEmpty = "highs"
    group_weights: Optional[dict[str, Finite]] = None
    group_norm: NonEmpty = "auto"
    group_limits: Optional[dict[str, Finite]] = None
    group_shares: Optional[dict[str, Finite]] = None
    target: str = ""
    select: Optional[bool] = None
    select_rows: PosInt = 4
    select_ties: bool = False
    select_screen: Annotated[int, Field(ge=0)] = 0
    select_keep: PosInt = 3
    select_metric: NonEmpty = "kl"
    refine: Annotated[int, Field(ge=0)] = 0


class EvalSection(Strict):
    text: NonEmpty = "generated"
    n_windows: PosInt = 8
    seq_len: Annotated[int, Field(ge=2)] = 256
    baselines: bool = True
    logits_memory: str = ""


class OutputSection(Strict):
    dir: NonEmpty = "bitalloc-out"


SECTIONS = {"model": ModelSection, "calibration": CalibrationSection, "profile": ProfileSection,
            "solve": SolveSection, "eval": EvalSection, "output": OutputSection}
