"""Whole-plan searches scored end to end (issue 14), numpy only.

* :func:`evolve`  EvoPress's evolutionary search (IST-DASLab/EvoPress ``evo_quant_search.py``)
* :func:`refine`  bitalloc's own end-to-end refinement (``--refine N``), warm-started

Both call ``fitness(choices: list[(G,) int64], stage: int) -> list[float]`` (lower is
better; the caller measures KL on calibration tokens, more tokens at later stages) and
keep ``sum(cost[g, choice[g]]) <= capacity`` exactly for every candidate they score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import ProblemError
from .peer_search import check_instance, cost_order, total_cost

__all__ = ["evolve", "refine", "equal_size_groups"]

Fitness = Callable[[list, int], Sequence[float]]


def equal_size_groups(cost: np.ndarray) -> list[np.ndarray]:
    """Rows with identical cost vectors (EvoPress's ``group_rule="size"``): a level swap
    between two of them keeps the total bits exactly."""
    _, inverse = np.unique(cost, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    return [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]


def _check_start(start, cost: np.ndarray, capacity: int) -> np.ndarray:
    G, S = cost.shape
    start = np.asarray(start, dtype=np.int64)
    if start.shape != (G,) or (start < 0).any() or (start >= S).any():
        raise ProblemError(f"start: expected {G} scheme indices in [0, {S}), got shape {start.shape}")
    used = total_cost(cost, start)
    if used > capacity:
        raise ProblemError(f"start: its {used} bits exceed the capacity of {capacity} bits")
    return start.copy()


class _Scorer:
    """Counts fitness evaluations and tokens; optional cache keyed by (choice, stage)."""

    def __init__(self, fitness: Fitness, tokens: Sequence[int] | None, cache: bool):
        self.fitness, self.tokens, self.cache = fitness, tokens, {} if cache else None
        self.evaluations = 0
        self.tokens_used = 0

    def __call__(self, choices: list[np.ndarray], stage: int) -> list[float]:
        keys = [(c.tobytes(), stage) for c in choices]
        todo = [i for i, k in enumerate(keys) if self.cache is None or k not in self.cache]
        got = [float(v) for v in self.fitness([choices[i] for i in todo], stage)] if todo else []
        if len(got) != len(todo):
            raise ProblemError(f"fitness: returned {len(got)} values for {len(todo)} choices")
        self.evaluations += len(todo)
        if self.tokens is not None:
            self.tokens_used += len(todo) * int(self.tokens[stage])
        out = dict(zip(todo, got))
        if self.cache is not None:
            self.cache.update((keys[i], v) for i, v in out.items())
            return [self.cache[k] for k in keys]
        return [out[i] for i in range(len(choices))]


# ----------------------------------------------------------------------------
# EvoPress
# ----------------------------------------------------------------------------


def evolve(fitness: Fitness, cost, capacity, start=None, *, generations: int = 50, offspring: int = 16,
           stages: Sequence[int] = (4, 2, 1), seed: int = 0, group_rule: str = "size",
           tokens: Sequence[int] | None = None, cache: bool = False, initially_generated: int = 16,
           max_attempts: int = 100):
    """EvoPress's (1 + λ) evolutionary search with multi-stage selection.

    Follows ``main`` and ``selection`` in IST-DASLab/EvoPress ``evo_quant_search.py``.
    A row's *levels* are its schemes ordered by exact bits (theirs: bitwidths 2..8 in
    ``step_size`` steps). Each generation:

    * ``offspring`` distinct mutants of the parent (duplicates of each other or of the
      parent are redrawn). A mutant makes ``min(randint(1,3), randint(1,3))`` flips.
      ``group_rule="size"`` (their default): a flip picks a group of rows with identical
      cost vectors, weighted by its size, then a row that can go one level down and one
      that can go one level up (possibly the same row: no change) and swaps a level
      between them. Their levels are equally spaced bitwidths, so the total stays exactly
      the same; bitalloc's schemes are not (w4 -> w8 is 4 bits, w2 -> w3 one), so here a
      swap is applied only if the new total is <= ``capacity`` (else that flip is
      skipped): the total then holds exactly for equally spaced levels and may go down
      (never above the capacity) otherwise. ``group_rule="none"``:
      ``num_flips`` random rows go one level up, then random rows go one level down
      until the total is <= ``capacity`` (exact bits); a mutant with more than 10 level
      changes or ``bits_added / max(1, bits_removed) < 0.8`` is dropped, as theirs;
    * selection in stages: ``stages[k]`` survivors are kept after scoring the
      candidates with ``fitness(candidates, k)`` (the caller's k-th token count; theirs
      draws a fresh random minibatch of ``tokens_per_selection[k]`` tokens at each
      call); the parent joins (elitism) before the last stage, whose single survivor
      becomes the next parent. Their script default is 150 generations, 128 offspring,
      stages 16/4/1 on 2048/16384/131072 tokens.

    ``start``: the initial parent (theirs: every layer at an integer target level). With
    ``start=None`` their non-integer initialisation is used: ``initially_generated``
    candidates start at the cheapest uniform level whose total exceeds the capacity and
    random rows go one level down until they fit; the best at stage 0 is the parent.

    Deviations: reduced CPU defaults (50 generations, 16 offspring, stages 4/2/1); the
    fitness is the caller's callback on fixed token sets per stage (theirs re-samples
    each call), so ``cache=True`` may skip re-scoring a (choice, stage) pair; theirs
    never caches (the default, ``cache=False``, re-scores the parent every generation
    like theirs); a flip with no possible move is skipped instead of asserting, and
    after ``max_attempts * offspring`` draws a generation goes on with the distinct
    offspring it has (counted in ``short_generations``; with ``group_rule="size"`` a row
    whose cost vector no other row shares can never change). ``tokens`` (per stage) only
    counts ``tokens_used``.
    Returns ``(best choice, status)``, status with ``evaluations``, ``tokens_used``,
    ``fitness`` (the final parent's last-stage score) and ``history``
    ``[(evaluations, fitness)]`` per generation.
    """
    cost, capacity, _ = check_instance(cost, capacity)
    stages = [int(s) for s in stages]
    if not stages or stages[-1] != 1 or min(stages) < 1:
        raise ProblemError(f"stages: survivors per stage, the last must be 1, got {stages}")
    if tokens is not None and len(tokens) != len(stages):
        raise ProblemError(f"tokens: one count per stage ({len(stages)}), got {len(tokens)}")
    if group_rule not in ("size", "none"):
        raise ProblemError(f"group_rule: 'size' or 'none', got {group_rule!r}")
    rng = np.random.default_rng(seed)
    order = cost_order(cost)  # (G, S) level -> scheme
    level_cost = np.take_along_axis(cost, order, axis=1)  # (G, S)
    groups = equal_size_groups(cost) if group_rule == "size" else [np.arange(len(cost))]
    score = _Scorer(fitness, tokens, cache)
    if start is None:
        parent, parent_fit = _random_start(rng, level_cost, capacity, initially_generated, order, score)
    else:
        parent = np.argsort(order, axis=1)[np.arange(len(cost)), _check_start(start, cost, capacity)]
        parent_fit = float("inf")  # theirs: the integer start is not scored before generation 1
    history, short = [], 0
    for _ in range(generations):
        kids = _offspring(rng, parent, level_cost, capacity, groups, offspring, group_rule, max_attempts)
        short += len(kids) < offspring
        pool = kids
        for k, survive in enumerate(stages):
            if k == len(stages) - 1 and not any((c == parent).all() for c in pool):
                pool = pool + [parent]  # elitist
            fits = score([order[np.arange(len(cost)), c] for c in pool], k)
            keep = np.argsort(fits, kind="stable")[:survive]
            pool, fits = [pool[i] for i in keep], [fits[i] for i in keep]
        parent, parent_fit = pool[0], fits[0]
        history.append((score.evaluations, parent_fit))
    choice = order[np.arange(len(cost)), parent].astype(np.int64)
    assert total_cost(cost, choice) <= capacity, "evolve: the parent left the budget"
    return choice, {"status": "feasible", "iterations": generations, "evaluations": score.evaluations,
                    "tokens_used": score.tokens_used, "fitness": parent_fit, "history": history,
                           "short_generations": short}


def _random_start(rng, level_cost, capacity, n, order, score):
    """EvoPress's non-integer start: a uniform level just above the budget, random rows down until it fits."""
    G, S = level_cost.shape
    totals = level_cost.sum(axis=0)
    up = int(np.argmax(totals > capacity)) if (totals > capacity).any() else S - 1
    cands = []
    for _ in range(n):
        lv = np.full(G, up, dtype=np.int64)
        used = int(level_cost[np.arange(G), lv].sum())
        while used > capacity:
            i = int(rng.choice(np.flatnonzero(lv > 0)))
            used -= int(level_cost[i, lv[i]] - level_cost[i, lv[i] - 1])
            lv[i] -= 1
        cands.append(lv)
    fits = score([order[np.arange(G), c] for c in cands], 0)
    best = int(np.argmin(fits))
    return cands[best], fits[best]


def _offspring(rng, parent, level_cost, capacity, groups, n, rule, max_attempts) -> list[np.ndarray]:
    G, S = level_cost.shape
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    out: list[np.ndarray] = []
    seen = {parent.tobytes()}
    for _ in range(max_attempts * n):
        if len(out) >= n:
            break
        kid = parent.copy()
        flips = min(rng.integers(1, 4), rng.integers(1, 4))  # bias towards fewer flips
        if rule == "size":
            used = int(level_cost[np.arange(G), kid].sum())
            for _ in range(flips):
                grp = groups[rng.choice(len(groups), p=sizes / sizes.sum())]
                down, up = grp[kid[grp] > 0], grp[kid[grp] < S - 1]
                if len(down) == 0 or len(up) == 0:
                    continue
                d, u = rng.choice(down), rng.choice(up)
                delta = 0 if d == u else int(level_cost[d, kid[d] - 1] - level_cost[d, kid[d]]
                                             + level_cost[u, kid[u] + 1] - level_cost[u, kid[u]])
                if used + delta > capacity:  # unequal level steps: the swap must still fit
                    continue
                kid[d] -= 1
                kid[u] += 1
                used += delta
        elif not _mutate_none(rng, kid, level_cost, capacity, flips):
            continue
        if kid.tobytes() in seen:
            continue
        seen.add(kid.tobytes())
        out.append(kid)
    return out


def _mutate_none(rng, kid, level_cost, capacity, flips) -> bool:
    """EvoPress ``group_rule="none"``: levels up, then down until it fits; False = drop the mutant."""
    G, S = level_cost.shape
    rows = np.arange(G)
    used = int(level_cost[rows, kid].sum())
    added = removed = 0
    for _ in range(flips):
        can = np.flatnonzero(kid < S - 1)
        if len(can) == 0:
            break
        i = int(rng.choice(can))
        d = int(level_cost[i, kid[i] + 1] - level_cost[i, kid[i]])
        kid[i] += 1
        used, added = used + d, added + d
    changes = flips
    while used > capacity:
        changes += 1
        i = int(rng.choice(np.flatnonzero(kid > 0)))  # non-empty: the cheapest levels fit
        d = int(level_cost[i, kid[i]] - level_cost[i, kid[i] - 1])
        kid[i] -= 1
        used, removed = used - d, removed + d
    return changes <= 10 and added / max(1, removed) >= 0.8


# ----------------------------------------------------------------------------
# bitalloc's refinement
# ----------------------------------------------------------------------------


def refine(fitness: Fitness, cost, capacity, start, *, evaluations: int = 64, seed: int = 0,
           hint=None, stage: int = 0, batch: int = 1, min_improvement: float = 0.0, pair_rows: int = 512):
    """bitalloc's end-to-end refinement: first-improvement local search within the budget.

    Warm-started from ``start`` (the ILP's plan). Moves (each keeps the total <= capacity
    exactly): one row to any other scheme that fits (upgrades spend leftover bits), and
    pairs *one row one level up + another one level down* (levels: schemes by exact
    bits), which include the exact swaps between rows of equal size (pairs among the
    ``pair_rows`` rows predicted best to go up and best to go down, all rows up to 512,
    so a 10,000-layer model stays cheap; a local optimum is then local to that shortlist). Candidates are
    ordered by the predicted change of ``hint`` (``(G, S)`` predicted losses, e.g. the
    profile's table: most negative first; random order without a hint), scored in
    batches of ``batch`` by ``fitness(..., stage)``, and the first one that improves the
    measured fitness is taken; then the candidates are rebuilt around the new point.
    A move counts as an improvement when its fitness is below
    ``best - min_improvement * |best|`` (0: any decrease; a positive value guards against
    accepting noise). Choices already scored are never scored again. Stops after ``evaluations`` fitness
    evaluations (the start counts as one) or at a local optimum (every move scored).
    Returns ``(choice, status)``; status has ``evaluations``, ``fitness_start``,
    ``fitness``, ``moves`` (accepted) and ``history`` ``[[evaluations, best fitness]]``.
    """
    cost, capacity, hint = check_instance(cost, capacity, hint, "hint")
    if evaluations < 1 or batch < 1:
        raise ProblemError(f"evaluations and batch must be >= 1, got {evaluations}, {batch}")
    rng = np.random.default_rng(seed)
    choice = _check_start(start, cost, capacity)
    score = _Scorer(fitness, None, cache=False)
    seen = {choice.tobytes()}
    best = score([choice], stage)[0]
    start_fit, history, moves, status = best, [[1, best]], 0, "budget"
    while score.evaluations < evaluations:
        improved = False
        moves_ = _moves(choice, cost, capacity, hint, rng, pair_rows)
        for chunk in _batches(moves_, seen, batch, evaluations - score.evaluations):
            fits = score(chunk, stage)
            j = int(np.argmin(fits))
            if fits[j] < best - min_improvement * abs(best):
                choice, best, improved = chunk[j], fits[j], True
                moves += 1
                history.append([score.evaluations, best])
                break
            if score.evaluations >= evaluations:
                break
        if not improved:
            if score.evaluations < evaluations:
                status = "local-optimum"
            break
    if history[-1][0] != score.evaluations:
        history.append([score.evaluations, best])
    assert total_cost(cost, choice) <= capacity, "refine: left the budget"
    return choice.astype(np.int64), {"status": status, "iterations": moves, "evaluations": score.evaluations,
                                     "fitness_start": start_fit, "fitness": best, "moves": moves,
                                     "history": history}


def _shortlist(pred: np.ndarray, n: int, shuffle: bool, rng) -> np.ndarray:
    """The ``n`` rows with the best (lowest) predicted change (random ones without a hint)."""
    rows = np.flatnonzero(np.isfinite(pred))
    if len(rows) <= n:
        return rows
    return np.sort(rng.choice(rows, n, replace=False) if shuffle else rows[np.argsort(pred[rows], kind="stable")[:n]])


def _moves(choice: np.ndarray, cost: np.ndarray, capacity: int, hint, rng, pair_rows: int = 512):
    """Every single-row change and level pair swap that fits, best predicted first
    (pairs among the ``pair_rows`` best rows to go up and to go down, so large models stay cheap)."""
    G, S = cost.shape
    rows = np.arange(G)
    order = cost_order(cost)
    level = np.argsort(order, axis=1)[rows, choice]  # (G,) current level
    slack = capacity - total_cost(cost, choice)
    cur = cost[rows, choice]  # (G,)
    pred = np.zeros((G, S)) if hint is None else hint - hint[rows, choice][:, None]  # (G, S) predicted change
    out, keys = [], []
    gi, sj = np.nonzero((cost - cur[:, None] <= slack) & (np.arange(S)[None, :] != choice[:, None]))
    for g, s in zip(gi, sj):  # single-row moves
        out.append(((g, s),))
        keys.append(pred[g, s])
    up_s = np.where(level < S - 1, order[rows, np.minimum(level + 1, S - 1)], -1)  # (G,)
    dn_s = np.where(level > 0, order[rows, np.maximum(level - 1, 0)], -1)  # (G,)
    d_up = np.where(up_s >= 0, cost[rows, up_s] - cur, 0)  # (G,)
    d_dn = np.where(dn_s >= 0, cost[rows, dn_s] - cur, 0)  # (G,) <= 0
    p_up = np.where(up_s >= 0, pred[rows, up_s], np.inf)  # (G,)
    p_dn = np.where(dn_s >= 0, pred[rows, dn_s], np.inf)  # (G,)
    ups = _shortlist(p_up, pair_rows, hint is None, rng)  # (U,) rows
    dns = _shortlist(p_dn, pair_rows, hint is None, rng)  # (D,) rows
    ok = (up_s[ups, None] >= 0) & (dn_s[None, dns] >= 0) & (d_up[ups, None] + d_dn[None, dns] <= slack)  # (U, D)
    ok &= ups[:, None] != dns[None, :]
    for a, b in zip(*np.nonzero(ok)):
        u, d = ups[a], dns[b]
        out.append(((u, up_s[u]), (d, dn_s[d])))
        keys.append(pred[u, up_s[u]] + pred[d, dn_s[d]])
    if not out:
        return
    keys = np.asarray(keys)
    idx = np.argsort(keys, kind="stable") if hint is not None else rng.permutation(len(out))
    for m in idx:
        c = choice.copy()
        for g, s in out[m]:
            c[g] = s
        yield c


def _batches(cands, seen: set, batch: int, left: int):
    """Unseen candidates in chunks of ``batch`` (marked seen), at most ``left`` in all."""
    chunk: list[np.ndarray] = []
    for c in cands:
        if left <= 0:
            break
        key = c.tobytes()
        if key in seen:
            continue
        seen.add(key)
        chunk.append(c)
        left -= 1
        if len(chunk) == batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
