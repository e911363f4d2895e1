"""How the solver uses a profile's metric groups (:class:`GroupPolicy`).

A profile made with metric groups (:mod:`sensitivity.groups`) has one loss table per group,
each in its own metric's units (KL nats/token, noise/signal ratio, 1 − cos, ...), with 0 in
the rows of layers outside the group. Three ways to combine them:

* **weighted sum** (default): one ILP over all layers minimising ``Σ_g w_g · T_g / n_g``.
  ``n_g`` normalises each group so that units do not decide the trade-off:

  - ``"ref"`` (default when the profile has several groups): the group's predicted loss
    with every one of its layers at the profile's first reference scheme (the measured
    one, e.g. ``w3g128z``), ``n_g = Σ_{i∈g} T_g[i, ref]``. A normalised group loss of 1
    means "as bad as the all-reference-scheme model"; ``w_g`` then says how many such units
    of group ``g`` trade against one of another group. Falls back to ``"range"`` when that
    sum is not positive.
  - ``"range"``: ``n_g = Σ_{i∈g} (max_s T_g[i, s] − min_s T_g[i, s])``, the group's whole
    achievable loss range (worst minus best assignment).
  - ``"none"``: raw units (the default for a single-group profile, which keeps the plans of
    ungrouped profiles exactly as before).

  Weights default to 1 for every group; a group left out of ``weights`` gets 1.
* **limits** ``{group: eps}``: extra linear constraints "predicted loss of group g (raw
  units, the profile's ``tables[g]``) ≤ eps" in the same ILP; the objective is the weighted
  sum above.
* **shares** ``{group: fraction}`` (MixDQ-style): each group gets ``fraction`` of the
  quantized-weight bit budget (floor of ``fraction × capacity`` bits) and is solved on its
  own; fractions must cover every group and sum to at most 1. Weights have no effect
  there (each group minimises its own loss) and are refused; limits still apply per group.

Config (``[solve]`` of the run TOML): ``group_weights = {attn = 2.0}``,
``group_norm = "ref"``, ``group_limits = {attn = 0.01}``, ``group_shares = {attn = 0.4,
mlp = 0.6}``. CLI: ``--group-weight G=W``, ``--group-limit G=EPS``, ``--group-share
G=FRACTION`` (repeatable), ``--group-norm {auto,ref,range,none}``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .errors import AllocationError

__all__ = ["GroupPolicy", "NORMALIZE", "group_rows", "group_scales", "raw_loss", "objective_table",
           "limit_constraints"]

NORMALIZE = ("auto", "ref", "range", "none")


def _numbers(d, what: str, *, positive: bool = False, nonneg: bool = False) -> dict[str, float] | None:
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise AllocationError(f"{what} must be a mapping of group -> number, got {type(d).__name__}")
    out = {}
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise AllocationError(f"{what}: value for group {k!r} must be a finite number, got {v!r}")
        v = float(v)
        if positive and v <= 0:
            raise AllocationError(f"{what}: value for group {k!r} must be > 0, got {v:g}")
        if nonneg and v < 0:
            raise AllocationError(f"{what}: value for group {k!r} must be >= 0, got {v:g}")
        out[str(k)] = v
    return out or None


@dataclass(frozen=True)
class GroupPolicy:
    """Group weights / normalisation, per-group loss limits, per-group budget shares."""

    weights: Mapping[str, float] | None = None
    normalize: str = "auto"
    limits: Mapping[str, float] | None = None
    shares: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _numbers(self.weights, "group_weights", nonneg=True))
        object.__setattr__(self, "limits", _numbers(self.limits, "group_limits"))
        object.__setattr__(self, "shares", _numbers(self.shares, "group_shares", positive=True))
        if self.normalize not in NORMALIZE:
            raise AllocationError(f"group_norm must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")
        if self.shares:
            total = sum(self.shares.values())
            if total > 1 + 1e-9:
                raise AllocationError(f"group_shares sum to {total:g}; they must sum to at most 1")
            if self.weights:
                raise AllocationError("group_weights have no effect with group_shares (each group is solved on its own)")

    @property
    def is_default(self) -> bool:
        return not self.weights and not self.limits and not self.shares and self.normalize == "auto"

    def mode(self, profile) -> str:
        if self.normalize != "auto":
            return self.normalize
        return "ref" if len(profile.tables) > 1 else "none"

    def check(self, profile) -> None:
        """Every named group must be one of the profile's; shares must cover them all."""
        have = list(profile.tables)
        for what, d in (("group_weights", self.weights), ("group_limits", self.limits), ("group_shares", self.shares)):
            unknown = sorted(set(d or ()) - set(have))
            if unknown:
                raise AllocationError(f"{what}: unknown metric group(s) {', '.join(unknown)}; the profile has {', '.join(have)}")
        if self.shares:
            missing = [g for g in have if g not in self.shares]
            if missing:
                raise AllocationError(f"group_shares must give every group a share; missing: {', '.join(missing)}")

    def to_dict(self) -> dict:
        return {"weights": dict(self.weights) if self.weights else None, "normalize": self.normalize,
                "limits": dict(self.limits) if self.limits else None, "shares": dict(self.shares) if self.shares else None}


def group_rows(profile) -> dict[str, np.ndarray]:
    """``{group: layer indices}`` from the profile's group assignment (``metadata["groups"]``);
    a profile without one: every layer in each table's group when there is a single table."""
    meta = (getattr(profile, "metadata", None) or {}).get("groups")
    fqns = [l.fqn for l in profile.layers]
    if isinstance(meta, Mapping) and set(meta) == set(profile.tables):
        index = {f: i for i, f in enumerate(fqns)}
        out = {}
        for g in profile.tables:
            layers = meta[g].get("layers") if isinstance(meta[g], Mapping) else None
            if not isinstance(layers, list) or any(f not in index for f in layers):
                raise AllocationError(f"profile metadata for metric group {g!r} does not list its layers")
            out[g] = np.array(sorted(index[f] for f in layers), dtype=np.int64)
        return out
    if len(profile.tables) == 1:
        return {next(iter(profile.tables)): np.arange(len(fqns))}
    raise AllocationError("the profile has several loss tables but no group assignment (metadata.groups)")


def _ref_index(profile) -> int | None:
    refs = list(getattr(profile, "ref_schemes", []) or [])
    return profile.schemes.index(refs[0]) if refs and refs[0] in profile.schemes else None


def group_scales(profile, mode: str, rows: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """``{group: n_g}`` the divisor of each group's table (1.0 for ``"none"``); ``rows``:
    :func:`group_rows` when the caller has it already."""
    if mode != "none" and rows is None:
        rows = group_rows(profile)
    out = {}
    for g, t in profile.tables.items():
        if mode == "none":
            out[g] = 1.0
            continue
        t = np.asarray(t, dtype=np.float64)[rows[g]]
        n = math.nan
        k = _ref_index(profile)
        if mode == "ref" and k is not None:
            n = float(np.nansum(t[:, k]))
        if not (math.isfinite(n) and n > 0):  # "range", or the fallback of "ref"
            with np.errstate(invalid="ignore"):
                n = float(np.nansum(np.nanmax(t, axis=1) - np.nanmin(t, axis=1))) if t.size else 0.0
        out[g] = n if math.isfinite(n) and n > 0 else 1.0
    return out


def raw_loss(profile, weights: Mapping[str, float] | None = None) -> np.ndarray:
    """``Σ_g w_g · T_g`` in raw units over the groups ``weights`` names (all, at 1, if none).

    Unlike the normalised sum, a group left out of ``weights`` counts 0 here and a zero
    weight still adds its NaNs: how raw-unit solves have always been made, kept so that their
    plans do not change."""
    tables = profile.tables
    total = np.zeros_like(np.asarray(next(iter(tables.values())), dtype=np.float64))
    for g, w in dict(weights or {g: 1.0 for g in tables}).items():
        total += w * np.asarray(tables[g], dtype=np.float64)
    return total


def objective_table(profile, policy: GroupPolicy, mode: str, scales: Mapping[str, float]) -> np.ndarray:
    """The solver's loss (L, S) for ``mode`` (:meth:`GroupPolicy.mode`): raw units for
    ``"none"``, else ``Σ_g w_g · T_g / n_g`` with ``n_g`` = ``scales[g]``."""
    if mode == "none":
        return raw_loss(profile, policy.weights)
    weights = policy.weights or {}
    total = np.zeros_like(np.asarray(next(iter(profile.tables.values())), dtype=np.float64))
    for g, t in profile.tables.items():
        w = weights.get(g, 1.0)
        if w:
            total += (w / scales[g]) * np.asarray(t, dtype=np.float64)
    return total


def limit_constraints(profile, policy: GroupPolicy, rows: np.ndarray | None = None, only: str | None = None) -> list:
    """Solver constraints ``Σ_i T_g[i, choice_i] ≤ eps_g`` (restricted to ``rows`` and to
    group ``only`` if given)."""
    from bitalloc.solvers import Constraint

    out = []
    for g, eps in (policy.limits or {}).items():
        if only is not None and g != only:
            continue
        coef = np.nan_to_num(np.asarray(profile.tables[g], dtype=np.float64), nan=0.0, posinf=1e12)
        if rows is not None:
            coef = coef[rows]
        out.append(Constraint(name=f"group_{g}_loss", coef=coef, rhs=float(eps), sense="<="))
    return out
