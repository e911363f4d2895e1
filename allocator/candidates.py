"""Candidate calibrations of one profile, and the plan chosen among them end to end.

A profile holds two independent estimates of what quantizing each (layer, scheme) alone
costs in KL per token: the proxy calibrated by reference values (measured end to end, or
estimated by the output Fisher), and, when it was built with ``fisher_table``, the
output-Fisher estimate of every cell (:mod:`bitalloc.sensitivity.fisher_refs`). Neither sees
how layers interact, and each errs differently: measured references follow KL's growth past
quadratic at 2-3 bits but come from two rows, the Fisher sees every calibration token but
only the quadratic term. Solving the same budget on several calibrations gives a handful of
different plans; one end-to-end measurement of each on calibration tokens (the metric the
tables predict, now with every layer quantized at once) picks the plan to ship.

    tables = candidate_tables(profile)        # name -> (L, S) expected KL; numpy only
    plan = select_plan(profile, "3bpw", fitness)  # fitness(choices) -> [measured KL]

``select_plan`` records every candidate's measured value in ``plan.solver["select"]``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["CANDIDATES", "candidate_tables", "candidate_plans", "with_table", "tagged", "select_plan",
           "StagedFitness"]

# in the order they are tried (a tie keeps the earlier one); the "-text" ones solve on the
# text-label Fisher table of a profile made with fisher_labels="both" (profile.fisher_text)
_BASE = ("fisher-refs", "fisher", "mix", "mix-refs")
CANDIDATES = ("profile", *_BASE, *(n + "-text" for n in _BASE))


def _geomean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise geometric mean; a zero in either stays zero (a lossless cell), NaN stays NaN."""
    return np.sqrt(np.clip(a, 0.0, None) * np.clip(b, 0.0, None))


def candidate_tables(profile, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{name: (L, S) table}``: the profile's own table and, when it has a Fisher table, the
    other calibrations (pure numpy; see the module docstring):

    - ``profile``: the profile's table (its proxy through its reference values);
    - ``fisher-refs``: the proxy through the Fisher estimates at the same reference schemes
      (the same as ``profile`` when the references were Fisher estimates: left out);
    - ``fisher``: the Fisher estimate of every cell;
    - ``mix``: the geometric mean of ``profile`` and ``fisher`` (the Fisher scaled to the
      references by one global factor, the median ratio), when the references were measured;
    - ``mix-refs``: the proxy through the geometric mean of the measured and Fisher
      references (same scaling);
    - the same four with ``-text`` on the text-label Fisher table, when the profile has one
      beside its sampled-label one (``fisher_labels="both"``): each label kind wins at some
      budgets (experiments/README.md), and the end-to-end selection sees which.
    """
    base = np.asarray(profile.table(), dtype=np.float64)
    out = {"profile": base}
    for suffix, F in (("", profile.fisher), ("-text", profile.fisher_text)):
        if F is not None:
            out.update({name + suffix: t for name, t in _fisher_tables(profile, base, F).items()})
    if names is not None:
        unknown = [n for n in names if n not in CANDIDATES]
        if unknown:
            raise ValueError(f"unknown candidate calibration(s) {unknown}; known: {', '.join(CANDIDATES)}")
        out = {n: t for n, t in out.items() if n in names}
    return out


def _fisher_tables(profile, base: np.ndarray, F: np.ndarray) -> dict[str, np.ndarray]:
    """The four calibrations with one Fisher table ``F`` (L, S) (see :func:`candidate_tables`)."""
    from bitalloc.sensitivity.calibrate import calibrate_proxy

    out = {}
    ri = [profile.scheme_index(r) for r in profile.ref_schemes]
    P, K, Fr = np.asarray(profile.proxy), np.asarray(profile.ref_values), F[:, ri]
    fisher_refs = profile.metadata.get("options", {}).get("ref_method") == "fisher"
    if not fisher_refs:
        out["fisher-refs"] = calibrate_proxy(P, Fr, ri)[0]
    out["fisher"] = F.copy()
    ok = np.isfinite(K) & (K > 0) & (Fr > 0)
    if not fisher_refs and ok.any():
        c = float(np.exp(np.median(np.log(K[ok] / Fr[ok]))))  # one global unit change, Fisher -> measured
        out["mix"] = _geomean(base, c * F)
        out["mix-refs"] = calibrate_proxy(P, np.where(ok, _geomean(K, c * Fr), K), ri)[0]
    return out


def with_table(profile, name: str | None):
    """The profile solving on its candidate calibration ``name`` (None or "profile": itself);
    a ValueError naming what is available when the profile lacks it."""
    if name in (None, "profile"):
        return profile
    tabs = candidate_tables(profile)
    if name not in tabs:
        raise ValueError(f"table {name!r} is not available for this profile (available: {', '.join(tabs)}; "
                         "the Fisher calibrations need a profile made with fisher_table (--fisher-table), the "
                         "-text ones with fisher_labels 'both' (--fisher-labels both))")
    return _on(profile, tabs[name])


def tagged(plan, name: str | None):
    """``plan`` recording, in ``solver["table"]``, the candidate calibration it was solved on."""
    return plan if name in (None, "profile") else dataclasses.replace(plan, solver={**plan.solver, "table": name})


def _on(profile, table: np.ndarray):
    return dataclasses.replace(profile, tables={**profile.tables, "all": table})


def candidate_plans(profile, budget, *, names: Sequence[str] | None = None, ties: bool = True, profile_path=None,
                    **solve_kw) -> tuple[dict, dict[str, np.ndarray], dict[bytes, list[str]]]:
    """``(plans, tables, unique)``: each candidate calibration's plan of ``budget`` by name (and,
    with ``ties``, its ``<name>+tied`` plan; see :func:`select_plan`), the table each was solved
    on, and the distinct plans, ``choice.tobytes()`` (int64 scheme indices) -> the names giving it."""
    from .arrays import target_ties
    from .solve import choice_of, solve

    tables = candidate_tables(profile, names)
    tie = ties and not solve_kw.get("target") and bool(target_ties(profile, "vllm"))
    plans, used = {}, {}
    for name, table in tables.items():
        plans[name], used[name] = solve(_on(profile, table), budget, profile_path=profile_path, **solve_kw), table
        if tie:
            p = solve(_on(profile, table), budget, profile_path=profile_path, **solve_kw, target="vllm")
            opts = {k: v for k, v in p.solver.get("options", {}).items() if k != "target"}  # a choice, not a target
            plans[name + "+tied"] = dataclasses.replace(p, solver={**p.solver, "options": opts, "ties": "fused inputs"})
            used[name + "+tied"] = table
    unique: dict[bytes, list[str]] = {}  # identical plans are measured once
    for name, plan in plans.items():
        unique.setdefault(choice_of(profile, plan).tobytes(), []).append(name)
    return plans, used, unique


def select_plan(profile, budget, fitness: Callable[[Sequence[np.ndarray]], list[float]], *,
                names: Sequence[str] | None = None, ties: bool = True, refine: int = 0, seed: int = 0,
                screen: Callable[[Sequence[np.ndarray]], list[float]] | None = None, keep: int = 3,
                profile_path=None, **solve_kw):
    """The plan of ``budget`` with the lowest ``fitness`` among the candidate calibrations' plans,
    optionally refined end to end.

    ``fitness(choices) -> [value per choice]`` (each choice a per-layer scheme index array;
    lower is better), e.g. :meth:`bitalloc.sensitivity.peer_context.PeerContext.fitness` on
    calibration rows: KL to the 16-bit model with every layer quantized at once. Identical
    plans are measured once. ``solve_kw`` go to :func:`bitalloc.allocator.solve.solve`.

    ``ties``: each table is also solved with the layers that read one input (q/k/v, gate/up)
    tied to one scheme (``<name>+tied``; not when ``solve_kw`` already names a target). A
    separable table's errors add up inside one attention or MLP input, and tying those layers
    (ModelOpt's grouping) is what wins at 3 bpw on SmolLM2 (experiments/README.md).
    ``screen``: a cheaper fitness (fewer calibration tokens, e.g. one of ``fitness``'s rows)
    that measures every distinct plan first; only the ``keep`` best go on to ``fitness``.
    That saves measurements where candidates differ far more than one row's noise (3.4
    against 4.3 nats at 2.5 bpw on SmolLM2); where the best few are close, one row can drop
    the plan more rows prefer (SmolLM2 at 3.0 and 4.5 bpw, experiments/README.md), so the
    run does not screen by default.
    ``refine``: at most that many further fitness calls of a local search within the exact
    budget, warm-started from the chosen plan (:func:`bitalloc.solvers.evolve.refine`, moves
    ordered by the chosen table).

    The returned plan's ``solver["select"]`` holds each candidate's value, the choice, the
    refinement's record and the seconds spent measuring.
    """
    plans, used, unique = candidate_plans(profile, budget, names=names, ties=ties, profile_path=profile_path,
                                          **solve_kw)
    t0 = time.perf_counter()
    keys, screened, keep = list(unique), {}, max(1, int(keep))
    if screen is not None and len(keys) > keep:
        sv = screen([np.frombuffer(k, dtype=np.int64) for k in keys])
        screened = {n: float(v) for k, v in zip(keys, sv) for n in unique[k]}
        order = sorted(range(len(keys)), key=lambda i: (_key(sv[i]), i))
        keys = [keys[i] for i in sorted(order[:keep])]  # the finalists, in the candidates' order
    t1 = time.perf_counter()
    values = fitness([np.frombuffer(k, dtype=np.int64) for k in keys]) if len(keys) > 1 or refine else [float("nan")]
    seconds = time.perf_counter() - t0
    measured = {n: float(v) for k, v in zip(keys, values) for n in unique[k]}
    best = min(range(len(keys)), key=lambda i: (_key(values[i]), i))
    chosen = unique[keys[best]][0]
    plan = plans[chosen]
    record = {"chosen": chosen, "candidates": list(plans), "fitness": measured, "distinct_plans": len(unique),
              "seconds": round(seconds, 3)}
    if screened:
        record.update(screen=screened, finalists=len(keys), screen_seconds=round(t1 - t0, 3))
    if refine > 0:
        plan, record["refine"] = _refine(profile, plan, budget, fitness, used[chosen], {keys[best]: float(values[best])},
                                         int(refine), seed, profile_path, solve_kw)
    return dataclasses.replace(plan, solver={**plan.solver, "select": record})


class StagedFitness:
    """A two-stage ``fitness(choices, stage)`` as :func:`select_plan` takes it: calling it
    measures stage 0 (the selection rows); ``screen`` measures stage 1 (fewer rows), None
    when there is only one stage."""

    def __init__(self, fit: Callable, stages: int):
        self._fit = fit
        self.screen = (lambda choices: fit(choices, 1)) if stages > 1 else None

    def __call__(self, choices):
        return self._fit(choices, 0)


def _key(v) -> float:
    """A fitness value as a sort key: NaN (not measured, or failed) last."""
    return float(v) if np.isfinite(v) else np.inf


def _refine(profile, plan, budget, fitness, table, seen: dict, evaluations: int, seed: int, profile_path, solve_kw):
    """``(plan, record)``: :func:`bitalloc.allocator.peers.refine_plan` from ``plan`` within its
    exact budget and allowed schemes (``solve_kw``'s schemes, pins, forbid), ``evaluations``
    new fitness calls at most (the start was measured by the selection: ``seen``). Skipped
    (recorded why) where single-layer moves could break a constraint it cannot see: tied
    layers (a target's fusions, shared weights), a group policy or the QP's pair terms."""
    from .arrays import build_problem, target_ties
    from .peers import refine_plan

    policy = solve_kw.get("policy")
    problem = build_problem(profile, schemes=solve_kw.get("schemes"), pins=solve_kw.get("pins"),
                            forbid=solve_kw.get("forbid"), tie_names=target_ties(profile, solve_kw.get("target")))
    if problem.ties or (policy is not None and not policy.is_default) or solve_kw.get("method", "ilp") in ("qp", "qp-relax"):
        return plan, {"skipped": "tied layers, a group policy or pair terms: single-layer moves could break them"}

    def fit(chs, stage):
        todo = [c for c in chs if c.tobytes() not in seen]
        for c, v in zip(todo, fitness(todo) if todo else []):
            seen[c.tobytes()] = float(v)
        return [seen[c.tobytes()] for c in chs]

    refined = refine_plan(profile, plan, budget, fit, evaluations=evaluations + 1, seed=seed, profile_path=profile_path,
                          hint=np.where(np.isfinite(table), table, np.inf), allowed=problem.allowed)
    r = refined.solver["refine"]
    record = {"evaluations": int(r["evaluations"]) - 1, "moves": int(r["moves"]), "fitness_start": float(r["fitness_start"]),
              "fitness": float(r["fitness"]), "status": r["status"], "seconds": round(r["seconds"], 3)}
    if not r["moves"]:
        return plan, record
    return dataclasses.replace(refined, label=plan.label, solver=plan.solver), record
