"""The declared schema of a saved quantized model's envelope, ``quantized.json``."""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import Field

from bitalloc.sensitivity.profile_schema import NonNegInt, Strict

__all__ = ["QuantizedFile"]

Name = Annotated[str, Field(min_length=1, max_length=1024)]


class TensorFile(Strict):
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bytes: NonNegInt
    n_tensors: NonNegInt


class QuantizedFile(Strict):
    schema_: str = Field(alias="schema")
    spec: Name
    model: dict[str, Any]
    safetensors: TensorFile
    packed_weight_bytes: NonNegInt
    predicted_quantized_bytes: Optional[NonNegInt] = None
    layers: Optional[dict[Name, Name]] = None
    aliases: dict[Name, Name]
    derived: dict[Name, Name]
    dtypes: dict[Name, Name]
    bitalloc_version: Optional[str] = None
