"""From a saved profile and a budget to a Plan: arrays → solver → plan, in that order.

:func:`allocator.arrays.build_arrays` builds everything the solver needs once (objective,
costs, allowed mask, ties, capacity, constraints); the solver sees only those numpy arrays
and returns one scheme index per layer with a status; :func:`plan_from_choice` turns the
indices into a Plan with exact predicted bytes and losses.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bitalloc.solvers.dispatch import SOLVER_METHODS

from .arrays import (ProblemArrays, build_arrays, build_problem, build_qp, capacity_bits, loss_table, n_weights,
                     other_bits, target_ties)
from .budget import Budget, parse_budget
from .errors import AllocationError, InfeasibleBudget
from .plan import LayerPlan, Plan
from .policy import GroupPolicy

# build_problem, build_qp, capacity_bits, loss_table, target_ties: re-exported (they live in allocator.arrays)
__all__ = ["AllocationError", "InfeasibleBudget", "build_problem", "build_qp", "solve", "sweep", "plan_from_choice",
           "METHODS", "QP_METHODS", "LINEAR_METHODS", "capacity_bits", "loss_table", "target_ties"]


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

    One direction: the arguments are checked, :func:`allocator.arrays.build_arrays` turns
    profile + budget + policy into arrays, a solver picks one index per layer, and
    :func:`plan_from_choice` records it.
    """
    budget = parse_budget(budget)
    if method not in METHODS:
        raise AllocationError(f"method must be one of {METHODS}, got {method!r}")
    if policy is None:
        policy = GroupPolicy(weights=group_weights, normalize=group_norm, limits=group_limits, shares=group_shares)
    elif group_weights or group_limits or group_shares or group_norm != "auto":
        raise AllocationError("give either policy= or the group_* options, not both")
    arrays = build_arrays(profile, budget, policy, schemes=schemes, pins=pins, forbid=forbid, target=target,
                          qp_method=method if method in QP_METHODS else None)
    options = {"schemes": list(schemes) if schemes else None, "pins": dict(pins or {}),
               "forbid": {k: list(v) for k, v in (forbid or {}).items()}}
    if method in QP_METHODS:
        info = _solve_qp(arrays, budget, method, backend, time_limit_s, options)
        label = f"bitalloc-{method}@{budget.name}"
    else:
        options["group_weights"] = dict(policy.weights) if policy.weights else None
        info = _solve_linear(arrays, budget, policy, method, backend, time_limit_s, options)
        label = f"bitalloc@{budget.name}"
    if target:
        info["options"]["target"] = target
    choice = info.pop("choice")
    return plan_from_choice(profile, choice, budget=budget, solver=info, label=label, profile_path=profile_path,
                            capacity=arrays.capacity)


def _solve_linear(arrays: ProblemArrays, budget: Budget, policy: GroupPolicy, method: str, backend: str,
                  time_limit_s: float | None, options: dict) -> dict:
    """One ILP / DP / Lagrangian solve (or one per group with shares): the solver's report plus ``choice``."""
    from bitalloc import solvers

    kw = {"backend": backend, "time_limit_s": time_limit_s} if method == "ilp" else {}
    groups = dict(arrays.groups) if arrays.groups is not None else None
    if arrays.parts:
        sol, shares = _solve_shares(arrays, method, kw)
        if groups is not None:
            groups["shares"] = shares
    else:
        try:
            sol = solvers.solve(arrays.problem, arrays.capacity, method=method, extra=arrays.extra, **kw)
        except solvers.InfeasibleError as e:
            if not arrays.extra:
                raise
            raise AllocationError(f"group limits {dict(policy.limits)} cannot be met at budget {budget.name}: {e}") from None
    info = {**_report(sol, arrays.capacity, method, backend if method == "ilp" else None), "options": options}
    if groups is not None:
        info["groups"] = groups
    return info


def _report(sol, capacity: int, method: str, backend: str | None) -> dict:
    """The plan's solver record (and the chosen indices, popped before it is stored)."""
    assert sol.cost <= capacity, f"solver returned {sol.cost} bits over the capacity {capacity}"
    return {"method": method, "backend": backend, "solver": sol.solver, "status": sol.status,
            "objective": sol.objective, "gap": sol.gap, "lower_bound": sol.lower_bound,
            "solve_time_s": sol.solve_time_s, "capacity_bits": capacity, "used_bits": int(sol.cost),
            "choice": sol.choice}


def _solve_qp(arrays: ProblemArrays, budget: Budget, method: str, backend: str,
              time_limit_s: float | None, options: dict) -> dict:
    from bitalloc import solvers

    qp = arrays.qp
    try:
        sol = QP_SOLVERS[method](qp, arrays.capacity, backend, time_limit_s)
    except solvers.InfeasibleError as e:
        raise AllocationError(f"method {method!r} at budget {budget.name}: {e}") from None
    except solvers.SolverError as e:
        raise AllocationError(f"method {method!r} at budget {budget.name}: the solver failed: {e}") from None
    return {**_report(sol, arrays.capacity, method, backend if method != "qp-relax" else "cvxpy"),
            "time_limit_s": time_limit_s,
            "interaction": qp.interaction_of(sol.choice), "diagonal": float(arrays.problem.loss_of(sol.choice)),
            "pairs": arrays.pairs,
            "options": options,
            "info": {k: v for k, v in (sol.info or {}).items() if isinstance(v, (int, float, str, bool, type(None)))}}


class _Combined:
    """The per-group solutions of a shares solve, put together (quacks like a Solution)."""

    def __init__(self, choice, cost, objective, statuses, solvers_used, time_s):
        self.choice, self.cost, self.objective = choice, cost, objective
        self.status = "optimal" if all(s == "optimal" for s in statuses) else "feasible"
        self.solver = "+".join(sorted(set(solvers_used)))
        self.gap, self.lower_bound, self.solve_time_s = None, None, time_s


def _solve_shares(arrays: ProblemArrays, method: str, kw: dict):
    """Each group's part alone, within its own bits (MixDQ-style), put back together."""
    from bitalloc import solvers

    choice = np.zeros(len(arrays.problem.names), dtype=np.int64)
    used, objective, statuses, names, t = 0, 0.0, [], [], 0.0
    report = {}
    for part in arrays.parts:
        try:
            sol = solvers.solve(part.problem, part.capacity, method=method, extra=part.extra, **kw)
        except solvers.InfeasibleError as e:
            limit = part.extra[0].rhs if part.extra else None
            raise AllocationError(f"metric group {part.group!r}: limit {limit:g} cannot be met within its share: {e}") from None
        choice[part.rows] = sol.choice
        used += int(sol.cost)
        objective += float(sol.objective)
        statuses.append(sol.status)
        names.append(sol.solver)
        t += float(sol.solve_time_s or 0.0)
        report[part.group] = {"share": part.share, "capacity_bits": part.capacity, "used_bits": int(sol.cost),
                              "status": sol.status}
    return _Combined(choice, used, objective, statuses, names, t), report


def profile_ref(profile, path: str | Path | None) -> dict:
    ref = {"schema": getattr(profile, "schema_version", None)}
    if path is not None:
        p = Path(path)
        ref["path"] = str(p)
        if p.is_file():
            ref["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return ref


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


def choice_of(profile, plan: Plan) -> np.ndarray:
    """``(L,)`` int64: the profile's scheme index of each of its layers in ``plan`` (the inverse
    of :func:`plan_from_choice`)."""
    return np.array([profile.schemes.index(plan.layers[f].scheme) for f in profile.fqns], dtype=np.int64)


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
    n = n_weights(profile)
    other = other_bits(profile)
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


def sweep(profile, budgets: Sequence[str | float | Budget], **kw) -> list[Plan]:
    """One plan per budget (profile once, solve many)."""
    return [solve(profile, b, **kw) for b in budgets]
