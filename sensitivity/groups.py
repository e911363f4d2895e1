"""Metric groups: which end metric judges which layers (after MixDQ / ViDiT-Q-MP).

A :class:`MetricGroup` names a set of layers (layer-name patterns, the same matcher as
layer selection and plan rules: :func:`sensitivity.patterns.match_pattern`; or, in the
Python API, a callable ``fqn -> bool``) and the metric that measures them (a name from
:data:`sensitivity.metrics.METRICS` with options and token weighting, a :class:`Metric`
or a user function). Every profiled layer must be in exactly one group.

Config (TOML, ``[profile]`` section)::

    [[profile.groups]]
    name = "attn"
    match = ["*.self_attn.*"]        # glob on the fqn, or "re:<regex>"
    metric = "kl"
    exclude_positions = [0]          # token weighting: the BOS position is not scored

    [[profile.groups]]
    name = "mlp"
    match = ["*.mlp.*"]
    metric = "sqnr"

In a profile, ``tables[group]`` is ``(L, S)`` over *all* layers: the rows of the group's
layers hold their expected loss in the group metric's units, the rows of every other layer
are 0 (so the sum of the tables is each layer's own-group loss). ``metadata["groups"]``
records, per group, its metric description, patterns and layers.
"""

from __future__ import annotations
from .. import BitallocError

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .metrics import METRICS, Metric, MetricSet, as_metric
from .patterns import match_pattern

__all__ = ["MetricGroup", "GroupError", "Grouping", "parse_groups", "assign_groups", "group_metric_set", "describe_groups",
           "setup_grouping", "measure_ref_columns"]

_WEIGHTING_KEYS = ("exclude_positions", "exclude_token_ids", "token_weights")


class GroupError(BitallocError, ValueError):
    """Metric groups are malformed or do not partition the layers; the message names them."""


@dataclass(frozen=True)
class MetricGroup:
    """One metric group: ``match`` (patterns, or a callable ``fqn -> bool``) and its metric.

    ``metric``: a built-in name (``kl``, ``nll``, ``sqnr``, ``cosine``, ``top1``), a
    :class:`Metric` instance or subclass, or a function ``(ref_outputs, outputs, batch) ->
    per-token losses``. ``options``: keyword options of the metric, including the token
    weighting (``exclude_positions``, ``exclude_token_ids``, ``token_weights``).
    """

    name: str
    match: Any = ("*",)
    metric: Any = "kl"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise GroupError(f"a metric group needs a non-empty name, got {self.name!r}")
        m = self.match
        if isinstance(m, str):
            m = (m,)
        if not callable(m):
            try:
                m = tuple(m)
            except TypeError:
                raise GroupError(f"metric group {self.name!r}: match must be patterns or a callable, got {self.match!r}") from None
            if not m or not all(isinstance(p, str) and p for p in m):
                raise GroupError(f"metric group {self.name!r}: match must be a non-empty list of patterns")
        object.__setattr__(self, "match", m)
        if isinstance(self.metric, str) and self.metric not in METRICS:
            raise GroupError(f"metric group {self.name!r}: unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        object.__setattr__(self, "options", dict(self.options or {}))

    @property
    def patterns(self) -> tuple[str, ...]:
        return () if callable(self.match) else self.match

    def matches(self, fqn: str) -> bool:
        if callable(self.match):
            return bool(self.match(fqn))
        return any(match_pattern(p, fqn) for p in self.match)

    def build_metric(self) -> Metric:
        try:
            return as_metric(self.metric, **self.options)
        except ValueError as e:
            raise GroupError(f"metric group {self.name!r}: {e}") from None

    def describe(self) -> dict:
        metric = self.metric if isinstance(self.metric, str) else getattr(self.metric, "name", None) or getattr(
            self.metric, "__name__", type(self.metric).__name__)
        opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()
                if isinstance(v, (int, float, str, bool, list, tuple))}
        return {"metric": str(metric), "options": opts,
                "match": list(self.patterns) if not callable(self.match) else "callable"}


def _group_from_mapping(d: Mapping, where: str, name: str | None = None) -> MetricGroup:
    d = dict(d)
    name = d.pop("name", name)
    if name is None:
        raise GroupError(f"{where}: a metric group needs a name")
    match = d.pop("match", None)
    if match is None:
        match = d.pop("patterns", None)
    if match is None:
        raise GroupError(f"metric group {name!r}: needs match = [layer patterns]")
    metric = d.pop("metric", "kl")
    options = dict(d.pop("options", {}) or {})
    for k in list(d):  # flat options (TOML): token weighting and metric options
        options[k] = d.pop(k)
    for k in ("exclude_positions", "exclude_token_ids"):
        if k in options and isinstance(options[k], list):
            options[k] = tuple(options[k])
    return MetricGroup(str(name), match, metric, options)


def parse_groups(spec: Any, where: str = "groups") -> list[MetricGroup] | None:
    """Groups from None (no groups: one ``"all"`` table), a list of :class:`MetricGroup` or
    of mappings (``{name, match, metric, ...options}``), or a mapping ``name -> mapping``.
    Names must be unique; unknown metric names are errors."""
    if spec is None or (isinstance(spec, (list, tuple, dict)) and len(spec) == 0):
        return None
    groups: list[MetricGroup] = []
    if isinstance(spec, Mapping):
        for name, d in spec.items():
            if isinstance(d, MetricGroup):
                groups.append(d)
            elif isinstance(d, Mapping):
                groups.append(_group_from_mapping(d, where, str(name)))
            else:
                raise GroupError(f"{where}: group {name!r} must be a table, got {d!r}")
    elif isinstance(spec, (list, tuple)):
        for i, d in enumerate(spec):
            if isinstance(d, MetricGroup):
                groups.append(d)
            elif isinstance(d, Mapping):
                groups.append(_group_from_mapping(d, f"{where}[{i}]"))
            else:
                raise GroupError(f"{where}[{i}] must be a MetricGroup or a table, got {d!r}")
    else:
        raise GroupError(f"{where} must be a list of metric groups, got {type(spec).__name__}")
    names = [g.name for g in groups]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GroupError(f"metric group names must be unique, repeated: {', '.join(dup)}")
    return groups


def _listing(items: Sequence[str], n: int = 5) -> str:
    s = ", ".join(items[:n])
    return s + (f" and {len(items) - n} more" if len(items) > n else "")


def assign_groups(groups: Sequence[MetricGroup], fqns: Sequence[str]) -> dict[str, list[str]]:
    """``{group: [fqns]}``, checking that every layer is in exactly one group and that every
    pattern matches some layer (errors name the layers / the group and pattern)."""
    groups = list(groups)
    for g in groups:
        for p in g.patterns:
            if not any(match_pattern(p, f) for f in fqns):
                raise GroupError(f"metric group {g.name!r}: pattern {p!r} matches no profiled layer")
    out: dict[str, list[str]] = {g.name: [] for g in groups}
    none, several = [], []
    for f in fqns:
        hit = [g.name for g in groups if g.matches(f)]
        if not hit:
            none.append(f)
        elif len(hit) > 1:
            several.append(f"{f} ({'/'.join(hit)})")
        else:
            out[hit[0]].append(f)
    if several:
        raise GroupError(f"{len(several)} layer(s) are in several metric groups: {_listing(several)}")
    if none:
        raise GroupError(f"{len(none)} layer(s) are in no metric group: {_listing(none)}")
    empty = [g for g, members in out.items() if not members]
    if empty:
        raise GroupError(f"metric group(s) {', '.join(map(repr, empty))} match no profiled layer")
    return out


def group_metric_set(groups: Sequence[MetricGroup]) -> MetricSet:
    """One :class:`MetricSet` holding every group's metric, keyed by group name."""
    return MetricSet({g.name: g.build_metric() for g in groups})


def describe_groups(groups: Sequence[MetricGroup], assignment: Mapping[str, Sequence[str]]) -> dict:
    return {g.name: {**g.describe(), "layers": list(assignment.get(g.name, ()))} for g in groups}


def group_of(assignment: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``{fqn: group}`` from an assignment."""
    return {f: g for g, fs in assignment.items() for f in fs}


GroupsLike = Sequence[MetricGroup] | Mapping[str, Any] | Sequence[Mapping[str, Any]] | None
SelectFn = Callable[[str], bool]


# ---------------------------------------------------------------------------------------
# profiling with groups

UNITS = {"kl": "nats/token (KL vs unquantized)", "nll": "nats/token (NLL increase)",
         "sqnr": "noise/signal power of the final hidden state", "cosine": "1 - cos of pooled embeddings",
         "top1": "fraction of tokens whose top-1 prediction changed"}


@dataclass
class Grouping:
    """Groups checked against a profile's layers, with their :class:`MetricSet`."""

    groups: list[MetricGroup]
    assignment: dict[str, list[str]]
    metric_set: MetricSet

    def group_of(self) -> dict[str, str]:
        return group_of(self.assignment)

    def split(self, table, fqns: Sequence[str]) -> dict:
        """``{group: (L, S)}``: the group's rows of ``table``, every other row 0."""
        import numpy as np

        table = np.asarray(table, dtype=np.float64)
        own = self.group_of()
        out = {}
        for g in self.groups:
            rows = np.array([own[f] == g.name for f in fqns])
            out[g.name] = np.where(rows[:, None], table, 0.0)
        return out

    def metadata(self) -> dict:
        units = {}
        for g in self.groups:
            m = self.metric_set.metrics[g.name]
            units[g.name] = UNITS.get(m.name, f"{m.name} delta")
        return {"metric": "groups", "loss_units": units, "groups": describe_groups(self.groups, self.assignment)}


def setup_grouping(groups: Any, layers: Sequence[Any]) -> Grouping | None:
    """None without groups; else the checked :class:`Grouping` for these layers."""
    parsed = parse_groups(groups)
    if parsed is None:
        return None
    fqns = [getattr(layer, "fqn", layer) for layer in layers]
    assignment = assign_groups(parsed, fqns)
    return Grouping(parsed, assignment, group_metric_set(parsed))


def measure_ref_columns(model, layers: Sequence[Any], reference, ref_schemes: Sequence[Any], progress: bool,
                        hessians: Mapping[str, Any] | None, grouping: Grouping | None):
    """``(L, R)``: each layer's measured delta at each ref scheme, in its own group's metric
    (one set of forwards per (layer, scheme) scores every group's metric at once)."""
    import numpy as np

    from .proxy import measure_deltas, measure_item, progress_bar

    if grouping is None:
        return np.stack([measure_deltas(model, layers, None, reference, r, progress, hessians=hessians)
                         for r in ref_schemes], axis=1)
    own = grouping.group_of()
    out = np.zeros((len(layers), len(ref_schemes)), dtype=np.float64)
    items = [(i, j) for j in range(len(ref_schemes)) for i in range(len(layers))]
    for i, j in progress_bar(items, progress, "measure groups", len(items)):
        layer = layers[i]
        h = hessians.get(layer.fqn) if hessians else None
        out[i, j] = measure_item(model, layer, ref_schemes[j], reference, h)[own[layer.fqn]]
    return out
