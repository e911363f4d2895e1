"""From a saved profile and a budget to a Plan: build the arrays, call a solver, record it all.

The solver sees only numpy arrays (loss and exact bit cost per (layer, scheme), allowed
mask, tie groups); everything about names, patterns and units lives here.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bitalloc.kernels.formats import FormatError, parse_scheme
from bitalloc.solvers.dispatch import SOLVER_METHODS
from bitalloc.sensitivity.patterns import match_pattern

from .budget import Budget, parse_budget
from .errors import AllocationError, InfeasibleBudget
from .plan import LayerPlan, Plan
from .policy import GroupPolicy, combined_loss, group_rows, group_scales, limit_constraints

__all__ = ["AllocationError", "InfeasibleBudget", "build_problem", "build_qp", "solve", "sweep", "plan_from_choice",
           "METHODS", "QP_METHODS", "LINEAR_METHODS", "capacity_bits"]



def _qp_milp(qp, capacity, backend, time_limit_s):
    from bitalloc.solvers import solve_qp_milp

    return solve_qp_milp(qp, capacity, backend=backend, time_limit_s=time_limit_s)


def _qp_relax(qp, capacity, backend, time_limit_s):
    from bitalloc.solvers import solve_qp_relaxation

    return solve_qp_relaxation(qp, capacity, time_limit_s=time_limit_s)


def _separable(qp, capacity, backend, time_limit_s):
    from bitalloc.solvers import solve_separable

    return solve_separable(qp, capacity, backend=backend, time_limit_s=time_limit_s)


# methods that use the profile's pair terms, name -> solver(qp, capacity, backend, time_limit_s):
# "qp": exact linearised MILP; "qp-relax": cvxpy relaxation + repair; "separable": the ILP
# ignoring the pairs, scored with them (the baseline the pairs must beat)
QP_SOLVERS = {"qp": _qp_milp, "qp-relax": _qp_relax, "separable": _separable}
QP_METHODS = tuple(QP_SOLVERS)
LINEAR_METHODS = tuple(SOLVER_METHODS)  # solvers.dispatch: "ilp", "dp", "lagrangian"
METHODS = LINEAR_METHODS + QP_METHODS


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


def loss_table(profile, group_weights: Mapping[str, float] | None = None, normalize: str = "none") -> np.ndarray:
    """Expected loss (L, S): the weighted sum of the profile's metric-group tables, each
    divided by its normaliser (``normalize``: see :mod:`allocator.policy`; "none": raw)."""
    if normalize != "none":
        return combined_loss(profile, GroupPolicy(weights=group_weights, normalize=normalize))[0]
    tables = profile.tables
    weights = dict(group_weights or {g: 1.0 for g in tables})
    unknown = set(weights) - set(tables)
    if unknown:
        raise AllocationError(f"unknown metric group(s) {sorted(unknown)}; profile has {sorted(tables)}")
    total = np.zeros_like(np.asarray(next(iter(tables.values())), dtype=np.float64))
    for g, w in weights.items():
        total += w * np.asarray(tables[g], dtype=np.float64)
    return total


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
    """The solver's arrays for a profile.

    schemes: restrict the candidates to these (default: all profiled schemes).
    pins: {pattern: scheme} forces matching layers to a scheme. forbid: {pattern: [schemes]}.
    tie_names: extra groups of layer names that must take one scheme (each still pays its own
    bits), e.g. the modules a serving engine fuses (``target="vllm"``); merged with the
    profile's tie groups (shared weights).
    """
    from bitalloc.solvers import AllocationProblem

    loss = loss_table(profile, group_weights, normalize)  # (L, S)
    cost = np.asarray(profile.cost_bits, dtype=np.int64)  # (L, S)
    L, S = cost.shape
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
    groups: dict[str, list[int]] = {}
    for i, l in enumerate(profile.layers):
        if getattr(l, "tie_group", None):
            groups.setdefault(l.tie_group, []).append(i)
    ties = _merge_ties([g for g in groups.values() if len(g) > 1] + _name_ties(profile, tie_names))
    for g in ties:  # tied layers must share one allowed set
        common = np.logical_and.reduce(allowed[list(g)], axis=0)
        if not common.any():
            raise AllocationError(f"no scheme left for layer {profile.layers[g[0]].fqn}: its tie group shares no "
                                  "allowed scheme (check pins/forbid/schemes)")
        allowed[list(g)] = common
    names = tuple(l.fqn for l in profile.layers)
    return AllocationProblem(loss=loss, cost=cost, allowed=allowed, ties=ties, names=names)


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


TARGETS = ("vllm",)


def target_ties(profile, target: str | None) -> list[tuple[str, ...]]:
    """Layer-name groups a serving target needs to share one scheme (``vllm``: its fused modules)."""
    if target is None:
        return []
    if target not in TARGETS:
        raise AllocationError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    from .vllm import fused_groups

    return fused_groups(l.fqn for l in profile.layers)


def _n_weights(profile) -> int:
    return int(sum(l.out_features * l.in_features for l in profile.layers))


def _other_bits(profile) -> int:
    """Bits of everything not quantized, stored in 16-bit (how a quantized model is saved);
    for the llama.cpp target the exact rest of the GGUF file (header, metadata, tokenizer,
    padding, norms: ``profile.other_bits``)."""
    if (getattr(profile, "metadata", {}) or {}).get("target") == "llamacpp":
        return int(profile.other_bits)
    return int(profile.other_params) * 16


def capacity_bits(profile, budget: Budget) -> int:
    """The budget in bits over the profile's quantizable layers (what the solver must fit)."""
    return budget.capacity_bits(_n_weights(profile), _other_bits(profile))


def _infeasible(profile, budget: Budget, capacity: int, lo: int, hi: int) -> InfeasibleBudget:
    n = _n_weights(profile)
    other = _other_bits(profile)

    def as_budget(bits: int) -> str:
        if budget.kind == "bpw":
            return f"{bits / n:.4f}bpw"
        b = bits + (other if budget.scope == "total" else 0)
        return f"{b / 8 / 1e6:.3f}MB ({budget.scope})"

    msg = (f"budget {budget.name} is below the smallest achievable {as_budget(lo)} "
           f"(largest useful: {as_budget(hi)})")
    return InfeasibleBudget(msg, lo / n, hi / n)


def profile_ref(profile, path: str | Path | None) -> dict:
    ref = {"schema": getattr(profile, "schema_version", None)}
    if path is not None:
        p = Path(path)
        ref["path"] = str(p)
        if p.is_file():
            ref["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return ref


def build_qp(profile, problem):
    """A :class:`solvers.QuadraticProblem`: ``problem`` (the diagonal) plus the profile's pair terms."""
    from bitalloc.sensitivity.pairs import pair_matrices
    from bitalloc.solvers import QuadraticProblem

    if not getattr(profile, "pairs", None):
        raise AllocationError("method 'qp' needs pair terms in the profile (profile with pairs='full' or 'reduced'); "
                              "use method 'ilp' for a profile without them")
    return QuadraticProblem(problem, pair_matrices(profile, problem.loss))


def _high_idx(profile, i: int, scheme_name: str):
    """The split channels of layer i in a scheme, the ones the profile measured (stored, or
    chosen from its stored saliency for an older profile); None: no split or no saliency."""
    from bitalloc.sensitivity.split_channels import high_channels

    return high_channels(getattr(profile, "split_channels", None), getattr(profile, "saliency", None),
                         profile.layers[i], scheme_name)


def quantization_of(profile) -> dict:
    """What the plan's executor must reproduce: the profile's quantizer and split-channel saliency."""
    md = getattr(profile, "metadata", {}) or {}
    out = {"quantizer": md.get("quantizer", "rtn"), "saliency": md.get("saliency", "hessian"),
           "calibration_tokens_sha256": (getattr(profile, "calibration", {}) or {}).get("tokens_sha256")}
    if md.get("hessians"):
        out["hessians"] = {k: md["hessians"].get(k) for k in ("path", "sha256")}
    if md.get("imatrix"):
        out["imatrix"] = {k: md["imatrix"].get(k) for k in ("path", "sha256")}
    return out


def plan_from_choice(profile, choice: Sequence[int], *, budget: Budget | None = None, solver: dict | None = None,
                     label: str = "", profile_path=None, capacity: int | None = None) -> Plan:
    """A Plan from one chosen scheme index per profile layer, with exact predicted bytes and losses.

    Split layers get the high-impact channels the profile stored for them (the channels it
    measured), so the executor quantizes exactly what was profiled.
    """
    choice = np.asarray(choice, dtype=np.int64)
    cost = np.asarray(profile.cost_bits, dtype=np.int64)
    layers = {}
    per_group = {g: 0.0 for g in profile.tables}
    for i, l in enumerate(profile.layers):
        k = int(choice[i])
        loss = {g: float(np.asarray(t)[i, k]) for g, t in profile.tables.items()}
        for g, v in loss.items():
            per_group[g] += v
        layers[l.fqn] = LayerPlan(l.fqn, profile.schemes[k], (l.out_features, l.in_features), int(cost[i, k]), loss,
                                  _high_idx(profile, i, profile.schemes[k]))
    qbits = int(sum(lp.bits for lp in layers.values()))
    n = _n_weights(profile)
    other = _other_bits(profile)
    predicted = {
        "quantized_bytes": qbits // 8,
        "quantized_bits": qbits,
        "other_bytes": other // 8,
        "total_bytes": (qbits + other) // 8,
        "bpw": qbits / n,
        "n_weights": n,
        "loss": per_group,
        "loss_total": float(sum(per_group.values())),
        "loss_unit": getattr(profile, "loss_unit", "KL nats/token"),
    }
    if capacity is not None:
        predicted["capacity_bits"] = int(capacity)
    md = getattr(profile, "metadata", {}) or {}
    if md.get("target") == "llamacpp":  # the GGUF llama_model_quantize will write, byte for byte
        g = md.get("gguf") or {}
        predicted["gguf"] = {"file_bytes": (qbits + other) // 8, "source_sha256": g.get("tensors_sha256"),
                             "imatrix": bool(md.get("imatrix"))}
    return Plan(
        model=dict(profile.model), layers=layers, budget=budget.to_dict() if budget else {},
        predicted=predicted, solver=solver or {}, profile=profile_ref(profile, profile_path), label=label,
        quantization=quantization_of(profile),
    )


def solve(
    profile,
    budget: str | float | Budget,
    *,
    method: str = "ilp",
    backend: str = "highs",
    time_limit_s: float | None = None,
    schemes: Sequence[str] | None = None,
    pins: Mapping[str, str] | None = None,
    forbid: Mapping[str, Sequence[str]] | None = None,
    group_weights: Mapping[str, float] | None = None,
    group_limits: Mapping[str, float] | None = None,
    group_shares: Mapping[str, float] | None = None,
    group_norm: str = "auto",
    policy=None,
    profile_path: str | Path | None = None,
    target: str | None = None,
) -> Plan:
    """Solve for the assignment with the least expected loss whose exact size fits the budget.

    Metric groups (:mod:`allocator.policy`): ``group_weights`` and ``group_norm`` shape the
    one objective over all groups, ``group_limits`` add "group loss <= eps" constraints,
    ``group_shares`` split the bit budget between groups solved independently; or pass a
    ready ``policy`` (:class:`allocator.policy.GroupPolicy`). ``target="vllm"`` ties the layers
    vLLM fuses (q/k/v, gate/up) so each fused module gets one scheme.
    """
    from bitalloc import solvers


    budget = parse_budget(budget)
    if policy is None:
        policy = GroupPolicy(weights=group_weights, normalize=group_norm, limits=group_limits, shares=group_shares)
    elif group_weights or group_limits or group_shares or group_norm != "auto":
        raise AllocationError("give either policy= or the group_* options, not both")
    policy.check(profile)
    mode = policy.mode(profile)
    problem = build_problem(profile, schemes=schemes, pins=pins, forbid=forbid, group_weights=policy.weights,
                            normalize=mode, tie_names=target_ties(profile, target))
    capacity = capacity_bits(profile, budget)
    lo, hi = solvers.achievable_range(problem)
    if capacity < lo:
        raise _infeasible(profile, budget, capacity, lo, hi)
    if method not in METHODS:
        raise AllocationError(f"method must be one of {METHODS}, got {method!r}")
    if method in QP_METHODS:
        if policy.shares or policy.limits:
            raise AllocationError(f"method {method!r} does not support group_shares / group_limits")
        plan = _solve_qp(profile, problem, budget, capacity, method, backend, time_limit_s, schemes, pins, forbid,
                         profile_path)
        if target:
            plan.solver["options"]["target"] = target
        return plan
    kw = {"backend": backend, "time_limit_s": time_limit_s} if method == "ilp" else {}
    group_info = {"policy": policy.to_dict(), "normalize": mode, "scales": group_scales(profile, mode)}
    if policy.shares:
        sol, group_info["shares"] = _solve_shares(profile, problem, capacity, policy, method, kw, budget)
    else:
        extra = limit_constraints(profile, policy)
        try:
            sol = solvers.solve(problem, capacity, method=method, extra=extra, **kw)
        except solvers.InfeasibleError as e:
            if not extra:
                raise
            raise AllocationError(f"group limits {dict(policy.limits)} cannot be met at budget {budget.name}: {e}") from None
    assert sol.cost <= capacity, f"solver returned {sol.cost} bits over the capacity {capacity}"
    info = {
        "method": method, "backend": backend if method == "ilp" else None, "solver": sol.solver,
        "status": sol.status, "objective": sol.objective, "gap": sol.gap, "lower_bound": sol.lower_bound,
        "solve_time_s": sol.solve_time_s, "capacity_bits": capacity, "used_bits": int(sol.cost),
        "options": {"schemes": list(schemes) if schemes else None, "pins": dict(pins or {}),
                    "forbid": {k: list(v) for k, v in (forbid or {}).items()},
                    "group_weights": dict(policy.weights) if policy.weights else None,
                    **({"target": target} if target else {})},
    }
    if len(profile.tables) > 1 or not policy.is_default:
        info["groups"] = group_info
    return plan_from_choice(profile, sol.choice, budget=budget, solver=info, label=f"bitalloc@{budget.name}",
                            profile_path=profile_path, capacity=capacity)


def _solve_qp(profile, problem, budget, capacity, method, backend, time_limit_s, schemes, pins, forbid, profile_path):
    from bitalloc import solvers

    qp = build_qp(profile, problem)
    try:
        sol = QP_SOLVERS[method](qp, capacity, backend, time_limit_s)
    except solvers.InfeasibleError as e:
        raise AllocationError(f"method {method!r} at budget {budget.name}: {e}") from None
    except solvers.SolverError as e:
        raise AllocationError(f"method {method!r} at budget {budget.name}: the solver failed: {e}") from None
    assert sol.cost <= capacity, f"solver returned {sol.cost} bits over the capacity {capacity}"
    pr = profile.pairs
    info = {
        "method": method, "backend": backend if method != "qp-relax" else "cvxpy", "solver": sol.solver,
        "status": sol.status, "objective": sol.objective, "gap": sol.gap, "lower_bound": sol.lower_bound,
        "solve_time_s": sol.solve_time_s, "capacity_bits": capacity, "used_bits": int(sol.cost),
        "time_limit_s": time_limit_s,
        "interaction": qp.interaction_of(sol.choice), "diagonal": float(problem.loss_of(sol.choice)),
        "pairs": {"model": pr.get("model"), "n_pairs": len(qp.pairs), "items": pr.get("items")},
        "options": {"schemes": list(schemes) if schemes else None, "pins": dict(pins or {}),
                    "forbid": {k: list(v) for k, v in (forbid or {}).items()}},
        "info": {k: v for k, v in (sol.info or {}).items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    return plan_from_choice(profile, sol.choice, budget=budget, solver=info, label=f"bitalloc-{method}@{budget.name}",
                            profile_path=profile_path, capacity=capacity)


class _Combined:
    """The per-group solutions of a shares solve, put together (quacks like a Solution)."""

    def __init__(self, choice, cost, objective, statuses, solvers_used, time_s):
        self.choice, self.cost, self.objective = choice, cost, objective
        self.status = "optimal" if all(s == "optimal" for s in statuses) else "feasible"
        self.solver = "+".join(sorted(set(solvers_used)))
        self.gap, self.lower_bound, self.solve_time_s = None, None, time_s


def _solve_shares(profile, problem, capacity: int, policy, method: str, kw: dict, budget: Budget):
    """MixDQ-style: each group gets ``floor(share · capacity)`` bits and is solved alone."""
    from bitalloc import solvers
    from bitalloc.solvers import AllocationProblem


    rows = group_rows(profile)
    where = {int(i): g for g, idx in rows.items() for i in idx}
    for tie in problem.ties:
        gs = {where[i] for i in tie}
        if len(gs) > 1:
            raise AllocationError(f"tied layers {[profile.layers[i].fqn for i in tie]} are in different metric groups "
                                  f"({', '.join(sorted(gs))}); group_shares cannot split them")
    choice = np.zeros(len(profile.layers), dtype=np.int64)
    used, objective, statuses, names, t = 0, 0.0, [], [], 0.0
    report = {}
    for g, idx in rows.items():
        cap_g = int(math.floor(policy.shares[g] * capacity))
        pos = {int(i): k for k, i in enumerate(idx)}
        ties = tuple(tuple(pos[i] for i in tie) for tie in problem.ties if int(tie[0]) in pos)
        sub = AllocationProblem(loss=problem.loss[idx], cost=problem.cost[idx], allowed=problem.allowed[idx],
                                ties=ties, names=tuple(problem.names[i] for i in idx))
        lo, hi = solvers.achievable_range(sub)
        if cap_g < lo:
            raise AllocationError(f"metric group {g!r}: its share {policy.shares[g]:g} of budget {budget.name} is "
                                  f"{cap_g} bits, below its smallest achievable {lo} bits (share >= {lo / capacity:.4f})")
        extra = limit_constraints(profile, policy, idx, only=g)
        try:
            sol = solvers.solve(sub, cap_g, method=method, extra=extra, **kw)
        except solvers.InfeasibleError as e:
            raise AllocationError(f"metric group {g!r}: limit {policy.limits[g]:g} cannot be met within its share: {e}") from None
        choice[idx] = sol.choice
        used += int(sol.cost)
        objective += float(sol.objective)
        statuses.append(sol.status)
        names.append(sol.solver)
        t += float(sol.solve_time_s or 0.0)
        report[g] = {"share": policy.shares[g], "capacity_bits": cap_g, "used_bits": int(sol.cost), "status": sol.status}
    return _Combined(choice, used, objective, statuses, names, t), report


def sweep(profile, budgets: Sequence[str | float | Budget], **kw) -> list[Plan]:
    """One plan per budget (profile once, solve many)."""
    return [solve(profile, b, **kw) for b in budgets]
