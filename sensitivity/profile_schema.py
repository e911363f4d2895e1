"""The declared schema of a saved :class:`~bitalloc.sensitivity.profile.SensitivityProfile`.

Pydantic models, strict (no type coercion: ``"1"`` is not 1, ``"no"`` is not a boolean)
and closed (an unknown field is an error), checked before any field is used, so a hostile
or damaged file is one line naming the file and the field. Shapes, scheme names and
cross-field rules are checked afterwards by the profile itself (``__post_init__``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

__all__ = ["ProfileFile", "LayerModel", "SkippedModel", "ArraysRef", "Finite", "NonNegInt", "Strict"]

Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
Name = Annotated[str, Field(min_length=1, max_length=1024)]
Row = list[Optional[Finite]]  # JSON null: a value that was not measured (NaN in memory)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class Open(BaseModel):
    """A section with required typed fields that may carry more (provenance)."""

    model_config = ConfigDict(extra="allow", strict=True)


class LayerModel(Strict):
    fqn: Name
    module_type: Literal["Linear", "Conv1D"]
    out_features: PosInt
    in_features: PosInt
    n_params: PosInt
    block: Optional[str] = None
    block_index: Optional[NonNegInt] = None
    tie_group: Optional[str] = None
    bias: bool = False


class SkippedModel(Strict):
    fqn: str
    reason: str


class Fingerprint(Open):
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ModelSection(Open):
    spec: Optional[str] = None
    fingerprint: Optional[Fingerprint] = None


class ArraysRef(Strict):
    """The safetensors sidecar holding a profile's bulk arrays (saliency, split channels, pair terms)."""

    file: Annotated[str, Field(pattern=r"^[^/\\]+\.safetensors$", max_length=255)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bytes: NonNegInt
    tensors: NonNegInt


class ProfileFile(Strict):
    schema_: str = Field(alias="schema")
    bitalloc_version: Optional[str] = None
    created_at: Optional[str] = None
    model: ModelSection
    calibration: dict[str, Any]
    layers: Annotated[list[LayerModel], Field(min_length=1)]
    skipped: list[SkippedModel]
    schemes: Annotated[list[Name], Field(min_length=1)]
    ref_schemes: list[Name]
    cost_bits: list[list[NonNegInt]]
    other_bits: NonNegInt
    other_params: NonNegInt
    tables: Annotated[dict[Name, list[Row]], Field(min_length=1)]
    proxy: list[Row]
    # (L, R) the metric measured at each reference scheme; "kl_ref" is the /1 and /2 spelling
    # (and that of /3 files written before the rename): the profile lets a file have one of
    # the two as its version allows, never both (SensitivityProfile.from_dict)
    ref_values: list[Row] = Field(validation_alias=AliasChoices("ref_values", "kl_ref"))
    scales: Row
    metadata: dict[str, Any] = Field(default_factory=dict)
    saliency: Optional[dict[Name, list[Finite]]] = None
    pairs: Optional[dict[str, Any]] = None
    # fqn -> {"k": the k channels a split scheme keeps high}; checked further by the profile
    split_channels: Optional[dict[Name, dict[str, list[NonNegInt]]]] = None
    # (L, S) the output-Fisher KL estimate of every (layer, scheme) (sensitivity.fisher_refs)
    fisher: Optional[list[Row]] = None
    # (L, S) the same with the calibration text's next tokens as labels, next to a sampled-label
    # ``fisher`` (a profile made with fisher_labels="both")
    fisher_text: Optional[list[Row]] = None
    arrays: Optional[ArraysRef] = None
