"""The records of a layer selection: :class:`LayerInfo` (one quantizable layer) and
:class:`Skipped` (one left out, and why). No torch: a saved profile reads them back
without loading any model code (finding the layers of a model: :mod:`.layers`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["LayerInfo", "Skipped"]


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer.

    ``n_params`` counts the weight only (the bias, if any, stays in 16-bit and is counted
    with the model's other parameters). ``block`` is the fqn prefix up to and including
    the first numeric component (``model.layers.3``), ``block_index`` that number.
    """

    fqn: str
    module_type: str  # "Linear" | "Conv1D"
    out_features: int
    in_features: int
    n_params: int
    block: str | None = None
    block_index: int | None = None
    tie_group: str | None = None
    bias: bool = False

    def __post_init__(self) -> None:
        if not self.fqn:
            raise ValueError("LayerInfo.fqn must be a non-empty string")
        if self.module_type not in ("Linear", "Conv1D"):
            raise ValueError(f"LayerInfo.module_type must be 'Linear' or 'Conv1D', got {self.module_type!r}")
        if self.out_features <= 0 or self.in_features <= 0:
            raise ValueError(f"LayerInfo {self.fqn}: shape must be positive, got ({self.out_features}, {self.in_features})")
        if self.n_params != self.out_features * self.in_features:
            raise ValueError(f"LayerInfo {self.fqn}: n_params {self.n_params} != out*in")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LayerInfo:
        return cls(**d)


@dataclass(frozen=True)
class Skipped:
    """A layer left out of the selection, and why."""

    fqn: str
    reason: str

    def __str__(self) -> str:
        return f"{self.fqn}: {self.reason}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Skipped:
        return cls(**d)
