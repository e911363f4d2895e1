"""The declared schema of a saved :class:`~bitalloc.allocator.plan.Plan` (``bitalloc.plan/1``).

Strict pydantic models (no coercion, unknown fields are errors), checked by
``Plan.from_dict`` / ``Plan.load`` before any field is used; scheme names and exact bit
counts are then checked by ``LayerPlan`` itself.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import Field

from bitalloc.sensitivity.profile_schema import Finite, NonNegInt, Strict

__all__ = ["PlanFile", "LayerEntry"]

PosInt = Annotated[int, Field(ge=1)]
Name = Annotated[str, Field(min_length=1, max_length=1024)]


class LayerEntry(Strict):
    scheme: Name
    shape: Annotated[list[PosInt], Field(min_length=2, max_length=2)]
    bits: NonNegInt
    loss: dict[str, Optional[Finite]] = Field(default_factory=dict)
    high_idx: Optional[list[NonNegInt]] = None


class PlanFile(Strict):
    schema_: str = Field(alias="schema")
    bitalloc_version: Optional[str] = None
    label: str = ""
    created_at: str = ""
    model: dict[str, Any]
    budget: dict[str, Any] = Field(default_factory=dict)
    predicted: dict[str, Any] = Field(default_factory=dict)
    solver: dict[str, Any] = Field(default_factory=dict)
    profile: dict[str, Any] = Field(default_factory=dict)
    rules: list[Annotated[list[Name], Field(min_length=2, max_length=2)]] = Field(default_factory=list)
    default: Optional[Name] = None
    layers: dict[Name, LayerEntry]
    quantization: dict[str, Any] = Field(default_factory=dict)
