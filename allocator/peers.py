"""The allocators people use instead of bitalloc, run on bitalloc's own candidates (issue 14).

Each peer is a score (how it rates giving a layer, or a group of layers, a scheme) and a
search (how it turns the scores into one scheme per layer under a budget). Both are
faithful to the peer's code (the docstrings of the score functions in
:mod:`bitalloc.sensitivity.peer_grad` / :mod:`bitalloc.sensitivity.peer_measure` and of the
searches in :mod:`bitalloc.solvers.peer_search` name the files they follow and every
deviation); what every peer shares with bitalloc is the candidate schemes, the quantizer
(the profile's: RTN with the clip search, or GPTQ), the calibration tokens and the exact
byte accounting (a peer whose own code counts bits without metadata runs under bitalloc's
exact bits here, so every row of a comparison has the same budget).

=====================  ==========================================  ===========================
name                   score                                       search
=====================  ==========================================  ===========================
``hawq-v3``            Hutchinson Hessian trace × ‖ΔW‖²             ILP
``higgs``              α_l (noise-injection fit) × relative ‖ΔW‖²   knapsack DP
``modelopt-gradient``  Σ (∂L/∂Y)² (ΔY)² (diagonal Fisher)           ILP
``modelopt-kl``        KL of one group quantized alone              min-max threshold bisection
``autoround``          Σ |∂L/∂Ŵ ⊙ ΔW| with all layers at a scheme   exact Pareto DP
``exllamav2``          relative sub-block output error              simulated annealing + fill
``exllamav3``          ΔKL of one group swapped into a base model   greedy ΔKL / Δbits
``evopress``           (none: end-to-end KL of whole plans)          evolutionary search
``llamacpp-rules``     llama.cpp's ``use_more_bits`` rule mix       (rule)
``uniform``            one format everywhere                        (nearest size)
=====================  ==========================================  ===========================

:func:`peer_scores` runs a peer's score on a :class:`~bitalloc.sensitivity.peer_context.PeerContext`
(torch; the expensive part), :func:`peer_plan` runs its search for one budget on those
scores (numpy) and returns a :class:`~bitalloc.allocator.plan.Plan` whose ``solver`` block
records the peer, its settings and its search status.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import BitallocError
from .budget import Budget, parse_budget
from .plan import Plan

__all__ = ["PEERS", "Peer", "PeerError", "peer_scores", "peer_plan", "refine_plan", "group_cost", "expand_choice",
           "SEARCHES", "exllamav3_base"]


class PeerError(BitallocError, ValueError):
    """A peer method cannot run as asked (unknown name, missing scores); one line."""


@dataclass(frozen=True)
class Peer:
    """One peer allocator: where its score function lives and which search it uses."""

    name: str
    score: str | None  # "module:function" under bitalloc.sensitivity, None for end-to-end-only peers
    search: str  # a key of SEARCHES
    source: str  # the peer's code this follows
    options: Mapping[str, Any] = field(default_factory=dict)  # default score options

    def __post_init__(self) -> None:
        assert self.search in SEARCHES, f"{self.name}: unknown search {self.search!r}"


# search name -> "module:function" under bitalloc.solvers (numpy only)
SEARCHES = {
    "ilp": "dispatch:solve",
    "dp": "dispatch:solve",
    "pareto-dp": "peer_search:pareto_dp",
    "minimax": "peer_search:minimax_threshold",
    "anneal": "peer_search:anneal_exllamav2",
    "greedy": "peer_search:greedy_exllamav3",
    "evolve": "evolve:evolve",
    "rule": "",
}

PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("hawq-v3", "peer_grad:score_hawq_v3", "ilp", "Zhen-Dong/HAWQ (ILP on Hessian-trace-weighted perturbation)"),
    Peer("higgs", "peer_measure:score_higgs", "dp", "HIGGS linearity theorem (noise-injection α_l, knapsack DP)"),
    Peer("modelopt-gradient", "peer_grad:score_modelopt_gradient", "ilp",
         "NVIDIA/TensorRT-Model-Optimizer modelopt/torch/quantization/algorithms.py (gradient)"),
    Peer("modelopt-kl", "peer_measure:score_modelopt_kl", "minimax",
         "NVIDIA/TensorRT-Model-Optimizer modelopt/torch/quantization/algorithms.py (kl_div)"),
    Peer("autoround", "peer_grad:score_autoround", "pareto-dp", "intel/auto-round auto_round/auto_scheme/"),
    Peer("exllamav2", "peer_measure:score_exllamav2", "anneal", "turboderp/exllamav2 conversion/measure.py, optimize.py"),
    Peer("exllamav3", "peer_measure:score_exllamav3", "greedy", "turboderp-org/exllamav3 conversion/optimize"),
    Peer("evopress", None, "evolve", "IST-DASLab/EvoPress evo_quant_search.py"),
    Peer("llamacpp-rules", None, "rule", "ggml-org/llama.cpp src/llama-quant.cpp (use_more_bits)"),
    Peer("uniform", None, "rule", "one format everywhere"),
)}


def _resolve(package: str, spec: str) -> Callable:
    module, fn = spec.split(":")
    return getattr(importlib.import_module(f"bitalloc.{package}.{module}"), fn)


def peer(name: str) -> Peer:
    if name not in PEERS:
        raise PeerError(f"unknown peer method {name!r} (one of {', '.join(PEERS)})")
    return PEERS[name]


def peer_scores(name: str, ctx, **options):
    """Run peer ``name``'s score on ``ctx`` (a PeerContext); returns its PeerScores (info has ``seconds``)."""
    p = peer(name)
    if p.score is None:
        raise PeerError(f"{name} has no separable score (its search measures whole plans end to end)")
    fn = _resolve("sensitivity", p.score)
    t0 = time.perf_counter()
    f0 = ctx.forwards
    scores = fn(ctx, **{**p.options, **options})
    scores.info.setdefault("seconds", time.perf_counter() - t0)
    scores.info.setdefault("kl_forwards", ctx.forwards - f0)
    return scores


def group_cost(cost: np.ndarray, groups: Sequence[Sequence[int]] | None) -> np.ndarray:
    """``(G, S)`` exact bits of each group at each scheme (the sum over its layers)."""
    cost = np.asarray(cost, dtype=np.int64)  # (L, S)
    if groups is None:
        return cost
    return np.stack([cost[list(g)].sum(axis=0) for g in groups])


def expand_choice(choice: np.ndarray, groups: Sequence[Sequence[int]] | None, n_layers: int) -> np.ndarray:
    """Per-group scheme choice (G,) -> per-layer choice (L,)."""
    choice = np.asarray(choice, dtype=np.int64)
    if groups is None:
        assert choice.shape == (n_layers,), f"choice has shape {choice.shape}, expected ({n_layers},)"
        return choice
    out = np.full(n_layers, -1, dtype=np.int64)
    for g, members in enumerate(groups):
        out[list(members)] = choice[g]
    assert (out >= 0).all(), "the groups do not cover every layer"
    return out


def _search(p: Peer, scores, cost_g: np.ndarray, capacity: int, options: Mapping[str, Any]):
    """Run the peer's search on its table: (group choice, status dict)."""
    table = scores.table
    if p.search in ("ilp", "dp"):
        from bitalloc.solvers.problem import AllocationProblem

        sol = _resolve("solvers", SEARCHES[p.search])(AllocationProblem(loss=table, cost=cost_g), capacity,
                                                       method=p.search, **options)
        return np.asarray(sol.choice), {"status": sol.status, "solver": sol.solver, "gap": sol.gap}
    fn = _resolve("solvers", SEARCHES[p.search])
    if p.search == "greedy":
        base = scores.info.get("base_index")
        if base is None:
            raise PeerError(f"{p.name}: its scores do not record the base scheme (info['base_index'])")
        return fn(table, cost_g, capacity, np.full(len(table), int(base), dtype=np.int64), **options)
    return fn(table, cost_g, capacity, **options)


def exllamav3_base(profile, budget: str | float | Budget) -> str:
    """exllamav3's base model for ``budget``: the dearest of the profile's schemes whose uniform
    plan (every layer at it) fits the budget's exact bits.

    exllamav3 combines models its user quantized at whole bitrates around the target
    (``optimize_model.py``: the first input is the base, the others its alternatives, and its
    greedy only takes moves that lower KL); the natural base for a target is the largest
    bitrate below it, so every upgrade is measured against a working model. The smallest
    scheme as the base for every budget made upgrades look harmful against a destroyed model
    (experiments/README.md, "Every peer on 32 windows"). Falls back to the cheapest scheme
    when no uniform plan fits (its search then reports the base over budget)."""
    from .arrays import capacity_bits

    budget = parse_budget(budget)
    cap = capacity_bits(profile, budget)
    totals = np.asarray(profile.cost_bits, dtype=np.int64).sum(axis=0)  # (S,) bits of each uniform plan
    fits = np.flatnonzero(totals <= cap)
    j = int(fits[np.argmax(totals[fits])]) if fits.size else int(np.argmin(totals))
    return profile.schemes[j]


def peer_plan(name: str, profile, budget: str | float | Budget, scores=None, *, fitness=None, start=None,
              profile_path=None, **options) -> Plan:
    """Peer ``name``'s plan at ``budget`` on ``profile``'s layers, schemes and exact bits.

    ``scores``: the peer's PeerScores (from :func:`peer_scores`) for scored peers;
    ``fitness`` (and optionally ``start``, a per-layer choice; default EvoPress's own random
    start) for ``evopress``; nothing more for the
    rule-based ``llamacpp-rules`` and ``uniform``."""
    from .baselines import nearest_uniform, rule_mix
    from .arrays import capacity_bits
    from .solve import plan_from_choice

    p = peer(name)
    budget = parse_budget(budget)
    if name == "uniform":
        return nearest_uniform(profile, budget)
    if name == "llamacpp-rules":
        return rule_mix(profile, budget)
    capacity = capacity_bits(profile, budget)
    cost = np.asarray(profile.cost_bits, dtype=np.int64)
    t0 = time.perf_counter()
    if p.search == "evolve":
        if fitness is None:
            raise PeerError(f"{name} needs a fitness (end-to-end KL of whole plans)")
        choice, status = _resolve("solvers", SEARCHES["evolve"])(
            fitness, cost, capacity, None if start is None else np.asarray(start), **options)
        groups, settings = None, {}
    else:
        if scores is None:
            raise PeerError(f"{name} needs its scores (peer_scores) to search")
        if list(scores.table.shape) != [len(scores.groups or profile.layers), len(profile.schemes)]:
            raise PeerError(f"{name}: its score table has shape {scores.table.shape}, the profile has "
                            f"{len(profile.layers)} layers x {len(profile.schemes)} schemes")
        groups = scores.groups
        choice, status = _search(p, scores, group_cost(cost, groups), capacity, options)
        settings = {k: v for k, v in scores.info.items() if isinstance(v, (str, int, float, bool))}
    search_s = time.perf_counter() - t0
    layer_choice = expand_choice(choice, groups, len(profile.layers))
    used = int(cost[np.arange(len(cost)), layer_choice].sum())
    assert used <= capacity, f"{name}: its search used {used} bits of {capacity}"
    solver = {"method": name, "peer": {"source": p.source, "search": p.search, "score_settings": settings},
              "status": str(status.get("status", "feasible")), "search_s": search_s,
              **{k: v for k, v in status.items() if k != "status" and isinstance(v, (str, int, float, bool))}}
    return plan_from_choice(profile, layer_choice, budget=budget, solver=solver, label=f"{name} {budget.name}",
                            profile_path=profile_path, capacity=capacity)


def refine_plan(profile, plan: Plan, budget: str | float | Budget, fitness, *, evaluations: int, seed: int = 0,
                stage: int = 0, profile_path=None, hint=None, allowed=None) -> Plan:
    """bitalloc's plan refined end to end (``--refine N``): local moves that keep the exact
    budget, scored by ``fitness`` (measured KL on calibration tokens), warm-started from
    ``plan`` (the ILP's) and guided by ``hint`` (``(L, S)`` predicted losses; default the
    profile's); at most ``evaluations`` fitness calls (the start counts as one). ``allowed``
    (``(L, S)`` bool): the only cells a move may use. The plan's ``solver`` block keeps the
    ILP's record and adds ``refine`` (evaluations used, fitness before and after)."""
    from .arrays import capacity_bits, loss_table
    from .solve import choice_of, plan_from_choice

    budget = parse_budget(budget)
    capacity = capacity_bits(profile, budget)
    cost = np.asarray(profile.cost_bits, dtype=np.int64)
    if allowed is not None:
        cost = np.where(np.asarray(allowed, dtype=bool), cost, capacity + 1)  # never fits: not a candidate there
    start = choice_of(profile, plan)
    t0 = time.perf_counter()
    refine = _resolve("solvers", "evolve:refine")
    choice, status = refine(fitness, cost, capacity, start, evaluations=evaluations, seed=seed,
                            hint=loss_table(profile) if hint is None else hint, stage=stage)
    record = {k: v for k, v in status.items() if isinstance(v, (str, int, float, bool, list))}
    solver = {**plan.solver, "refine": {**record, "seconds": time.perf_counter() - t0, "max_evaluations": evaluations}}
    return plan_from_choice(profile, choice, budget=budget, solver=solver, label=f"{plan.label} refined",
                            profile_path=profile_path, capacity=capacity)
