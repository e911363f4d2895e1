"""Profile → problem arrays: the one step between a saved profile and a solver.

:func:`build_arrays` reads the profile's tables once and returns everything the solver
needs as numpy arrays: the objective (the metric groups combined by the
:class:`~allocator.policy.GroupPolicy`), the exact cost of every (layer, scheme), the
allowed mask (schemes / pins / forbid / non-candidates), the tie groups (shared weights
and the fusions of a serving target), the budget's capacity in bits, the group-limit
constraints, the per-group sub-problems of a shares solve and the pair terms of a QP.
What comes after (``allocator.solve``) only calls solvers on these arrays and turns the
chosen indices into a plan; it never reads the tables again, and nothing here needs torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from bitalloc.kernels.formats import FormatError, parse_scheme
from bitalloc.sensitivity.patterns import match_pattern

from .budget import Budget
from .errors import AllocationError, InfeasibleBudget
from .policy import GroupPolicy, group_rows, group_scales, limit_constraints, objective_table, raw_loss

__all__ = ["ProblemArrays", "SharePart", "build_arrays", "build_problem", "build_qp", "loss_table", "capacity_bits",
           "n_weights", "other_bits", "target_ties", "TARGETS"]

TARGETS = ("vllm",)


@dataclass(frozen=True)
class SharePart:
    """One metric group of a shares solve: its layers, its bits and its own sub-problem."""

    group: str
    share: float
    rows: np.ndarray  # the group's layer indices into the whole problem
    capacity: int  # floor(share · capacity)
    problem: Any  # solvers.AllocationProblem over ``rows``
    extra: tuple = ()  # the group's limit constraint, if any


@dataclass(frozen=True)
class ProblemArrays:
    """What a solver gets for one (profile, budget, policy): nothing here refers to the profile."""

    problem: Any  # solvers.AllocationProblem: loss, cost, allowed, ties, names
    capacity: int  # the budget in bits over the quantizable layers
    extra: tuple = ()  # group-limit constraints over the whole problem (not with shares)
    parts: tuple[SharePart, ...] = ()  # non-empty: a shares solve, one independent part per group
    qp: Any = None  # solvers.QuadraticProblem when pair terms were asked for
    groups: dict | None = field(default=None)  # the report: policy, normalisation, scales (None: nothing to say)
    pairs: dict | None = None  # with ``qp``: the pair model for the report (model, n_pairs, items)


def build_arrays(
    profile,
    budget: Budget,
    policy: GroupPolicy,
    *,
    schemes: Sequence[str] | None = None,
    pins: Mapping[str, str] | None = None,
    forbid: Mapping[str, Sequence[str]] | None = None,
    target: str | None = None,
    qp_method: str | None = None,
) -> ProblemArrays:
    """Validate the policy against the profile, then build the objective, costs, allowed mask,
    ties, capacity and constraints, each once. ``qp_method``: the pair-term method the arrays
    are for (adds the QP; named in its errors)."""
    policy.check(profile)
    mode = policy.mode(profile)
    tie_names = target_ties(profile, target)
    if target is not None:  # only what the target's checkpoint format can hold (vllm: no splits)
        from .vllm import target_schemes

        kept = target_schemes(schemes if schemes is not None else profile.schemes, target)
        if not kept:
            raise AllocationError(f"none of the candidate schemes can be exported for target {target!r} "
                                  "(compressed-tensors holds integer formats without high-impact splits)")
        schemes = kept
    # group rows are needed only to normalise or to split the budget; an ungrouped
    # multi-table profile must not fail when neither is asked for
    rows = group_rows(profile) if mode != "none" or policy.shares else None
    scales = group_scales(profile, mode, rows)
    loss = objective_table(profile, policy, mode, scales)
    problem = _problem(profile, loss, schemes, pins, forbid, tie_names)
    capacity = capacity_bits(profile, budget)
    _check_reachable(profile, budget, capacity, problem)
    groups = None
    if len(profile.tables) > 1 or not policy.is_default:
        groups = {"policy": policy.to_dict(), "normalize": mode, "scales": scales}
    if qp_method is not None:
        if policy.shares or policy.limits:
            raise AllocationError(f"method {qp_method!r} does not support group_shares / group_limits")
        qp = build_qp(profile, problem)
        pairs = {"model": profile.pairs.get("model"), "n_pairs": len(qp.pairs), "items": profile.pairs.get("items")}
        return ProblemArrays(problem, capacity, qp=qp, groups=groups, pairs=pairs)
    if policy.shares:
        return ProblemArrays(problem, capacity, parts=_share_parts(profile, problem, budget, capacity, policy, rows),
                             groups=groups)
    return ProblemArrays(problem, capacity, extra=tuple(limit_constraints(profile, policy)), groups=groups)


def _check_reachable(profile, budget: Budget, capacity: int, problem) -> None:
    from bitalloc import solvers

    lo, hi = solvers.achievable_range(problem)
    if capacity < lo:
        raise _infeasible(profile, budget, lo, hi)


def _share_parts(profile, problem, budget: Budget, capacity: int, policy: GroupPolicy, rows: dict) -> tuple[SharePart, ...]:
    """MixDQ-style: each group gets ``floor(share · capacity)`` bits and its own sub-problem."""
    from bitalloc import solvers

    where = {int(i): g for g, idx in rows.items() for i in idx}
    for tie in problem.ties:
        gs = {where[i] for i in tie}
        if len(gs) > 1:
            raise AllocationError(f"tied layers {[profile.layers[i].fqn for i in tie]} are in different metric groups "
                                  f"({', '.join(sorted(gs))}); group_shares cannot split them")
    parts = []
    for g, idx in rows.items():
        cap_g = int(math.floor(policy.shares[g] * capacity))
        pos = {int(i): k for k, i in enumerate(idx)}
        ties = tuple(tuple(pos[i] for i in tie) for tie in problem.ties if int(tie[0]) in pos)
        sub = solvers.AllocationProblem(loss=problem.loss[idx], cost=problem.cost[idx], allowed=problem.allowed[idx],
                                        ties=ties, names=tuple(problem.names[i] for i in idx))
        lo, _ = solvers.achievable_range(sub)
        if cap_g < lo:
            raise AllocationError(f"metric group {g!r}: its share {policy.shares[g]:g} of budget {budget.name} is "
                                  f"{cap_g} bits, below its smallest achievable {lo} bits (share >= {lo / capacity:.4f})")
        extra = tuple(limit_constraints(profile, policy, idx, only=g))
        parts.append(SharePart(g, policy.shares[g], idx, cap_g, sub, extra))
    return tuple(parts)


def loss_table(profile, group_weights: Mapping[str, float] | None = None, normalize: str = "none") -> np.ndarray:
    """Expected loss (L, S): the weighted sum of the profile's metric-group tables, each
    divided by its normaliser (``normalize``: see :mod:`allocator.policy`; "none": raw)."""
    if normalize == "none":
        unknown = set(group_weights or ()) - set(profile.tables)
        if unknown:
            raise AllocationError(f"unknown metric group(s) {sorted(unknown)}; profile has {sorted(profile.tables)}")
        return raw_loss(profile, group_weights)
    policy = GroupPolicy(weights=group_weights, normalize=normalize)
    policy.check(profile)
    mode = policy.mode(profile)
    rows = group_rows(profile) if mode != "none" else None
    return objective_table(profile, policy, mode, group_scales(profile, mode, rows))


def build_problem(
    profile,
    *,
    schemes: Sequence[str] | None = None,
    pins: Mapping[str, str] | None = None,
    forbid: Mapping[str, Sequence[str]] | None = None,
    group_weights: Mapping[str, float] | None = None,
    normalize: str = "none",
    tie_names: Sequence[Sequence[str]] = (),
):
    """The solver's :class:`solvers.AllocationProblem` for a profile, without a budget.

    schemes: restrict the candidates to these (default: all profiled schemes).
    pins: {pattern: scheme} forces matching layers to a scheme. forbid: {pattern: [schemes]}.
    tie_names: extra groups of layer names that must take one scheme (each still pays its own
    bits), e.g. the modules a serving engine fuses (``target="vllm"``); merged with the
    profile's tie groups (shared weights).
    """
    return _problem(profile, loss_table(profile, group_weights, normalize), schemes, pins, forbid, tie_names)


def _problem(profile, loss: np.ndarray, schemes, pins, forbid, tie_names):
    from bitalloc.solvers import AllocationProblem

    cost = np.asarray(profile.cost_bits, dtype=np.int64)  # (L, S)
    allowed = _allowed(profile, loss, schemes, pins, forbid)
    ties = _merge_ties(_profile_ties(profile) + _name_ties(profile, tie_names))
    for g in ties:  # tied layers must share one allowed set
        common = np.logical_and.reduce(allowed[list(g)], axis=0)
        if not common.any():
            raise AllocationError(f"no scheme left for layer {profile.layers[g[0]].fqn}: its tie group shares no "
                                  "allowed scheme (check pins/forbid/schemes)")
        allowed[list(g)] = common
    names = tuple(l.fqn for l in profile.layers)
    return AllocationProblem(loss=loss, cost=cost, allowed=allowed, ties=ties, names=names)


def _allowed(profile, loss: np.ndarray, schemes, pins, forbid) -> np.ndarray:
    """(L, S) mask: the candidate schemes, minus forbidden ones and non-candidates, pins forced."""
    L, S = loss.shape
    allowed = np.ones((L, S), dtype=bool)
    if schemes is not None:
        keep = np.zeros(S, dtype=bool)
        for s in schemes:
            keep[_scheme_index(profile, s)] = True
        allowed &= keep[None, :]
    for pat, sch in (forbid or {}).items():
        rows = _layers_matching(profile, pat)
        for s in sch:
            allowed[rows, _scheme_index(profile, s)] = False
    fits = np.isfinite(loss)  # NaN: not a candidate there (a ggml type whose block does not divide the rows)
    allowed &= fits
    for pat, sch in (pins or {}).items():
        rows = _layers_matching(profile, pat)
        k = _scheme_index(profile, sch)
        bad = [profile.layers[i].fqn for i in rows if not fits[i, k]]
        if bad:
            raise AllocationError(f"pin {pat}={sch}: {sch} is not a candidate for {bad[0]} "
                                  f"(shape {profile.layers[profile.fqns.index(bad[0])].shape})")
        allowed[rows, :] = False
        allowed[rows, k] = True
    empty = [profile.layers[i].fqn for i in np.flatnonzero(~allowed.any(axis=1))]
    if empty:
        raise AllocationError(f"no scheme left for layer {empty[0]}" + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
                              + ": the pins/forbid/schemes constraints exclude every profiled scheme")
    return allowed


def _scheme_index(profile, name: str) -> int:
    try:
        canon = parse_scheme(name).name
    except FormatError as e:
        raise AllocationError(str(e)) from None
    if canon not in profile.schemes:
        raise AllocationError(f"scheme {name!r} is not in the profile (profiled: {', '.join(profile.schemes)})")
    return profile.schemes.index(canon)


def _layers_matching(profile, pattern: str) -> list[int]:
    idx = [i for i, l in enumerate(profile.layers) if match_pattern(pattern, l.fqn)]
    if not idx:
        raise AllocationError(f"pattern {pattern!r} matches no layer of the profile")
    return idx


def _profile_ties(profile) -> list[list[int]]:
    """The profile's tie groups (layers sharing one weight), as layer indices."""
    groups: dict[str, list[int]] = {}
    for i, l in enumerate(profile.layers):
        if getattr(l, "tie_group", None):
            groups.setdefault(l.tie_group, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _name_ties(profile, tie_names) -> list[list[int]]:
    index = {l.fqn: i for i, l in enumerate(profile.layers)}
    out = []
    for names in tie_names or ():
        missing = [n for n in names if n not in index]
        if missing:
            raise AllocationError(f"tied layer {missing[0]!r} is not in the profile")
        out.append([index[n] for n in names])
    return out


def _merge_ties(groups: list) -> tuple[tuple[int, ...], ...]:
    """Union of overlapping tie groups (a layer may be in only one), each sorted, ordered by first layer."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        while parent.setdefault(i, i) != i:
            i = parent[i]
        return i

    for g in groups:
        for i in g[1:]:
            parent[find(int(i))] = find(int(g[0]))
    merged: dict[int, list[int]] = {}
    for i in sorted(parent):
        merged.setdefault(find(i), []).append(i)
    return tuple(sorted((tuple(g) for g in merged.values() if len(g) > 1), key=lambda g: g[0]))


def target_ties(profile, target: str | None) -> list[tuple[str, ...]]:
    """Layer-name groups a serving target needs to share one scheme (``vllm``: its fused modules)."""
    if target is None:
        return []
    if target not in TARGETS:
        raise AllocationError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    from .vllm import fused_groups

    return fused_groups(l.fqn for l in profile.layers)


def n_weights(profile) -> int:
    """Weights over the profile's quantizable layers (the denominator of bits per weight)."""
    return int(sum(l.out_features * l.in_features for l in profile.layers))


def other_bits(profile) -> int:
    """Bits of everything not quantized, stored in 16-bit (how a quantized model is saved);
    for the llama.cpp target the exact rest of the GGUF file (header, metadata, tokenizer,
    padding, norms: ``profile.other_bits``)."""
    if (getattr(profile, "metadata", {}) or {}).get("target") == "llamacpp":
        return int(profile.other_bits)
    return int(profile.other_params) * 16


def capacity_bits(profile, budget: Budget) -> int:
    """The budget in bits over the profile's quantizable layers (what the solver must fit)."""
    return budget.capacity_bits(n_weights(profile), other_bits(profile))


def _infeasible(profile, budget: Budget, lo: int, hi: int) -> InfeasibleBudget:
    n = n_weights(profile)
    other = other_bits(profile)

    def as_budget(bits: int) -> str:
        if budget.kind == "bpw":
            return f"{bits / n:.4f}bpw"
        b = bits + (other if budget.scope == "total" else 0)
        return f"{b / 8 / 1e6:.3f}MB ({budget.scope})"

    msg = (f"budget {budget.name} is below the smallest achievable {as_budget(lo)} "
           f"(largest useful: {as_budget(hi)})")
    return InfeasibleBudget(msg, lo / n, hi / n)


def build_qp(profile, problem):
    """A :class:`solvers.QuadraticProblem`: ``problem`` (the diagonal) plus the profile's pair terms."""
    from bitalloc.sensitivity.pairs import pair_matrices
    from bitalloc.solvers import QuadraticProblem

    if not getattr(profile, "pairs", None):
        raise AllocationError("method 'qp' needs pair terms in the profile (profile with pairs='full' or 'reduced'); "
                              "use method 'ilp' for a profile without them")
    return QuadraticProblem(problem, pair_matrices(profile, problem.loss))
