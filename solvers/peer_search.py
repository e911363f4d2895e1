"""The peers' separable searches on bitalloc's exact bits (issue 14), numpy only.

Every search takes a ``(G, S)`` table (lower is better), ``cost`` ``(G, S)`` int64 exact
bits per row and scheme (a row may be a group of layers: its cost is the sum of its
layers' costs) and ``capacity`` (int bits), and returns ``(choice, status)``: ``choice``
``(G,)`` int64 scheme indices with ``sum(cost[g, choice[g]]) <= capacity`` exactly, and a
small dict (``status``, ``iterations``, ``evaluations`` plus method details). When even
the cheapest choice does not fit, :class:`InfeasibleBudgetError` (one line) is raised.

* :func:`minimax_threshold`  NVIDIA ModelOpt ``auto_quantize`` (kl_div searcher)
* :func:`anneal_exllamav2`   exllamav2 ``conversion/optimize.py`` + ``ext_quant.cpp::sim_anneal``
* :func:`greedy_exllamav3`   exllamav3 ``conversion/optimize_model.py::optimize``
* :func:`pareto_dp`          AutoRound AutoScheme ``choose_bits_per_layer_with_path`` (HIGGS knapsack)

The whole-plan searches (EvoPress, bitalloc's refinement) are in :mod:`.evolve`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .errors import InfeasibleBudgetError, ProblemError

__all__ = ["minimax_threshold", "anneal_exllamav2", "greedy_exllamav3", "pareto_dp", "check_instance",
           "cost_order", "total_cost"]


# ----------------------------------------------------------------------------
# Shared checks
# ----------------------------------------------------------------------------


def check_instance(cost, capacity, table=None, name: str = "table") -> tuple[np.ndarray, int, np.ndarray | None]:
    """Validated ``(cost (G,S) int64, capacity int, table (G,S) float64 | None)``.

    Raises :class:`ProblemError` on malformed input and :class:`InfeasibleBudgetError`
    when the cheapest choice of every row does not fit ``capacity``."""
    cost = np.asarray(cost)
    if cost.ndim != 2 or cost.shape[0] < 1 or cost.shape[1] < 1:
        raise ProblemError(f"cost: expected a non-empty (G, S) array, got shape {cost.shape}")
    if not np.issubdtype(cost.dtype, np.integer):
        raise ProblemError(f"cost: expected integer bits, got dtype {cost.dtype}")
    cost = cost.astype(np.int64)
    if (cost < 0).any():
        raise ProblemError("cost: bit costs must be non-negative")
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
        raise ProblemError(f"capacity: expected an integer number of bits, got {capacity!r}")
    capacity = int(capacity)
    lo, hi = int(cost.min(axis=1).sum()), int(cost.max(axis=1).sum())
    if capacity < lo:
        raise InfeasibleBudgetError(capacity, lo, hi)
    if table is not None:
        table = np.asarray(table, dtype=np.float64)
        if table.shape != cost.shape:
            raise ProblemError(f"{name}: shape {table.shape} differs from cost's {cost.shape}")
        if not np.isfinite(table).all():
            raise ProblemError(f"{name}: must be finite")
    return cost, capacity, table


def cost_order(cost: np.ndarray) -> np.ndarray:
    """``(G, S)``: each row's scheme indices from cheapest to dearest (ties by index)."""
    return np.argsort(cost, axis=1, kind="stable")


def total_cost(cost: np.ndarray, choice: np.ndarray) -> int:
    return int(cost[np.arange(len(cost)), choice].sum())


# ----------------------------------------------------------------------------
# ModelOpt auto_quantize, kl_div searcher
# ----------------------------------------------------------------------------


def minimax_threshold(table, cost, capacity, *, max_iterations: int = 100, fallback: str = "best"):
    """ModelOpt's threshold search: minimise the largest per-row score under the budget.

    Follows ``AutoQuantizeKLDivSearcher.run_search_with_stats`` (and
    ``initialize_candidate_stats``) in NVIDIA/TensorRT-Model-Optimizer
    ``modelopt/torch/quantization/algorithms.py``: each row's formats are sorted by
    compression (cheapest first, here: by exact bits, ties by scheme index) and its
    scores made non-increasing along that order (``score = min(score, prev_score)``); a
    threshold is bisected for ``max_iterations`` (theirs: 100) steps between the smallest
    and largest score; at a threshold each row takes the first (cheapest) format whose
    score is <= the threshold; a fitting selection moves the upper bound down, a
    non-fitting one moves the lower bound up.

    Deviations: (1) we return the selection at the final *upper* bound (the smallest
    threshold seen that fits), theirs returns the last iteration's selection and an
    ``is_satisfied`` flag, which can be over budget; (2) ``fallback``: when no format of a
    row meets the threshold, their code takes index 0 (the cheapest). That never happens
    there, because ModelOpt always adds the unquantized recipe (score 0, the dearest) to
    every row; bitalloc's schemes have no unquantized option, so by default
    (``"best"``) the row takes its lowest-score (dearest) scheme, the analogue of their
    16-bit recipe; ``fallback="cheapest"`` is their literal code. (3) costs are bitalloc's
    exact bits (metadata included) rather than weight numel x compression.
    """
    cost, capacity, table = check_instance(cost, capacity, table)
    if fallback not in ("best", "cheapest"):
        raise ProblemError(f"fallback: 'best' or 'cheapest', got {fallback!r}")
    order = cost_order(cost)  # (G, S)
    rows = np.arange(len(cost))[:, None]
    scores = np.minimum.accumulate(table[rows, order], axis=1)  # (G, S) non-increasing, cost order
    ocost = cost[rows, order]  # (G, S)

    def select(threshold: float) -> np.ndarray:  # (G,) position in cost order
        ok = scores <= threshold
        first = ok.argmax(axis=1)
        none = scores.shape[1] - 1 if fallback == "best" else 0
        return np.where(ok.any(axis=1), first, none)

    lower, upper = float(scores.min()), float(scores.max())
    best = select(upper)  # at the largest score every row takes its cheapest format
    best_t = upper
    threshold = (lower + upper) / 2.0
    for _ in range(max_iterations):
        pos = select(threshold)
        if int(ocost[rows[:, 0], pos].sum()) <= capacity:
            upper, best, best_t = threshold, pos, threshold
        else:
            lower = threshold
        threshold = (lower + upper) / 2.0
    if int(ocost[rows[:, 0], best].sum()) > capacity:  # only with fallback="cheapest" and a tiny budget
        best = np.zeros(len(cost), dtype=np.int64)
        best_t = math.nan
    choice = order[rows[:, 0], best].astype(np.int64)
    return choice, {"status": "feasible", "iterations": max_iterations, "evaluations": max_iterations + 1,
                    "threshold": best_t, "max_score": float(table[rows[:, 0], choice].max())}


# ----------------------------------------------------------------------------
# exllamav2: simulated annealing over an error norm, then a greedy fill
# ----------------------------------------------------------------------------


def anneal_exllamav2(err, cost, capacity, *, norm_interval: tuple[float, float] = (1.5, 3.5),
                     norm_2ndstage: float = 0.15, samples: int = 16, anneal_stages: int = 3,
                     temp_max: float = 2.0, temp_min: float = 1e-4, cooling_factor: float = 0.995,
                     iterations: int = 20, seed: int = 0):
    """exllamav2's optimiser: simulated annealing on ``Σ err^norm`` with the norm swept.

    Follows ``optimize`` in turboderp/exllamav2 ``exllamav2/conversion/optimize.py`` and
    ``sim_anneal`` in ``exllamav2/exllamav2_ext/ext_quant.cpp``:

    * one annealing run starts every row at its first option (here: its cheapest scheme),
      and for ``log(temp_min/temp_max)/log(cooling_factor)`` temperatures (1976) makes
      ``iterations`` moves per temperature: a uniformly random row takes a uniformly
      random option (the current one included) if the new total fits the budget and
      ``Δ < 0`` or ``U(0,1) < exp(-Δ/temp)``, with ``Δ`` the change of ``Σ err^norm``;
      the temperature is multiplied by ``cooling_factor`` after each batch of moves;
    * stage 1 runs ``samples`` norms spaced over ``norm_interval``; stage 2 ``samples``
      norms around the best one (± ``norm_2ndstage``/2, with their ``t = i/(samples-1) - 1``
      spacing); both pick ``bestnorm`` by the smallest **max err** of a run; stage 3
      runs ``samples`` times at ``bestnorm`` and keeps the run with the smallest
      ``Σ err^bestnorm``;
    * then the leftover bits are filled greedily: sweep the rows in order, moving a row
      to its next dearer option while it fits, until a sweep changes nothing.

    Deviations: the runs of one stage are simulated together as vectorised chains (same
    moves and acceptance rule, numpy's seeded generator instead of an unseeded
    ``mt19937``); reduced CPU defaults: ``samples=16`` (theirs 80) and
    ``iterations=20`` moves per temperature (theirs 1000); ``Σ err^norm`` of a run is
    recomputed exactly at the end (theirs is a float32 running sum); their budget is
    ``numel x bpw``, here bitalloc's exact bits; options are ordered by exact bits.
    """
    cost, capacity, err = check_instance(cost, capacity, err, "err")
    if samples < 2 or anneal_stages < 1 or iterations < 1:
        raise ProblemError("samples must be >= 2, anneal_stages and iterations >= 1")
    if not (0 < temp_min < temp_max and 0 < cooling_factor < 1):
        raise ProblemError("need 0 < temp_min < temp_max and 0 < cooling_factor < 1")
    rng = np.random.default_rng(seed)
    n_temps = int(math.log(temp_min / temp_max) / math.log(cooling_factor))
    G = len(cost)
    rows = np.arange(G)
    best_m, bestnorm, by_m = math.inf, None, None  # stages 1-2: smallest max err picks the norm
    best_p, by_p = math.inf, None  # stage 3+: smallest Σ err^bestnorm picks the run
    for stage in range(anneal_stages):
        if stage == 0:
            t = np.arange(samples) / (samples - 1)
            norms = (1 - t) * norm_interval[0] + t * norm_interval[1]
        elif stage == 1:
            norm_a, norm_b = bestnorm - norm_2ndstage / 2, bestnorm + norm_2ndstage / 2
            t = np.arange(samples, 2 * samples) / (samples - 1) - 1  # their spacing, as written
            norms = (1 - t) * norm_a + t * norm_b
        else:
            norms = np.full(samples, bestnorm)
        idx = _anneal_chains(err, cost, capacity, norms, temp_max, cooling_factor, n_temps, iterations, rng)
        for c, norm in enumerate(norms):
            e = err[rows, idx[c]]
            if stage < 2:
                if float(e.max()) < best_m:
                    best_m, bestnorm, by_m = float(e.max()), float(norm), idx[c].copy()
            elif math.fsum(e ** norm) < best_p:
                best_p, by_p = math.fsum(e ** norm), idx[c].copy()
    best = by_p if by_p is not None else by_m
    choice, fills = _fill(best, cost, capacity)
    return choice, {"status": "feasible", "iterations": anneal_stages * samples * n_temps * iterations,
                    "evaluations": anneal_stages * samples, "bestnorm": bestnorm, "max_err": best_m,
                    "fill_steps": fills}


def _anneal_chains(err, cost, capacity, norms, temp, cooling, n_temps, iterations, rng) -> np.ndarray:
    """``(C, G)`` final option of each row in ``C = len(norms)`` independent annealing chains."""
    G, S = cost.shape
    C = len(norms)
    powered = err[None, :, :] ** np.asarray(norms)[:, None, None]  # (C, G, S)
    idx = np.broadcast_to(cost.argmin(axis=1), (C, G)).copy()  # (C, G) start: cheapest options
    cur = cost[np.arange(G), idx[0]].sum() * np.ones(C, dtype=np.int64)  # (C,)
    chains = np.arange(C)
    for _ in range(n_temps):
        for _ in range(iterations):
            i = rng.integers(0, G, C)  # (C,) target row
            n = rng.integers(0, S, C)  # (C,) target option
            u = rng.random(C)
            old = idx[chains, i]
            d_cost = cost[i, n] - cost[i, old]
            d_e = powered[chains, i, n] - powered[chains, i, old]
            with np.errstate(over="ignore"):
                ok = (cur + d_cost <= capacity) & ((d_e < 0) | (u < np.exp(-d_e / temp)))
            idx[chains[ok], i[ok]] = n[ok]
            cur += np.where(ok, d_cost, 0)
        temp *= cooling
    return idx


def _fill(choice: np.ndarray, cost: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """exllamav2's leftover fill: sweep rows, step each to its next dearer option while it fits."""
    order = cost_order(cost)
    rank = np.argsort(order, axis=1)  # (G, S) position of each scheme in its row's order
    pos = rank[np.arange(len(cost)), choice].copy()
    used = total_cost(cost, choice)
    steps = 0
    while True:
        repeat = False
        for i in range(len(cost)):
            if pos[i] < cost.shape[1] - 1:
                d = int(cost[i, order[i, pos[i] + 1]] - cost[i, order[i, pos[i]]])
                if used + d <= capacity:
                    used += d
                    pos[i] += 1
                    steps += 1
                    repeat = True
        if not repeat:
            break
    return order[np.arange(len(cost)), pos].astype(np.int64), steps


# ----------------------------------------------------------------------------
# exllamav3: greedy upgrades by ΔKL per added bit
# ----------------------------------------------------------------------------


def _adjust(d: np.ndarray) -> np.ndarray:
    """exllamav3's ``adjust``: positive ΔKL as is, improvements damped to ``-(|Δ|^0.69)``."""
    return np.where(d > 0, d, -np.abs(d) ** 0.69)


def greedy_exllamav3(delta, cost, capacity, base):
    """exllamav3's optimiser: from the base, repeatedly take the best ΔKL per added bit.

    Follows ``optimize`` in turboderp-org/exllamav3 ``exllamav3/conversion/optimize_model.py``:
    every row (their "group") starts at the base model; its candidates are the dearer
    alternatives in order; a row at candidate ``s`` (0 = base) may jump to any later
    candidate ``j``; the move's ratio is ``1e10 * dk / (db + 1)`` with
    ``dk = adjust(dkld_j) - adjust(dkld_current)`` and ``db`` the added bits; each step takes
    the most negative ratio (only negative ones: ``best_r`` starts at 0) among moves whose
    ``db`` fits the remaining budget, until none is left.

    Here ``delta`` ``(G, S)`` is each row's measured ΔKL at each scheme relative to
    ``base`` (the row's entry at its base is subtracted, so a non-zero base entry is
    harmless); a row's candidates are the schemes dearer than its base scheme, ordered by
    exact bits (ties by index). Deviations: the remaining budget is inclusive (a move fits
    when ``db <= capacity - used``; theirs is strict, ``budget > db``); their ``num_q``
    limit is all candidates; costs are bitalloc's exact bits.
    """
    cost, capacity, delta = check_instance(cost, capacity, delta, "delta")
    G, S = cost.shape
    rows = np.arange(G)
    base = np.asarray(base, dtype=np.int64)
    if base.shape != (G,) or (base < 0).any() or (base >= S).any():
        raise ProblemError(f"base: expected {G} scheme indices in [0, {S}), got shape {base.shape}")
    used = total_cost(cost, base)
    if used > capacity:
        raise ProblemError(f"base: its {used} bits exceed the capacity of {capacity} bits")
    rel = _adjust(delta - delta[rows, base][:, None])  # (G, S) adjusted ΔKL vs base
    dbits = cost - cost[rows, base][:, None]  # (G, S) added bits vs base
    order = cost_order(cost)
    cands = [[int(j) for j in order[g] if cost[g, j] > cost[g, base[g]]] for g in rows]  # dearer than base
    pos = np.zeros(G, dtype=np.int64)  # 0 = base, s = candidate s-1
    choice = base.copy()
    steps = evaluations = 0
    while True:
        best, best_r = None, 0.0
        for g in rows:
            cur = choice[g]
            for j in cands[g][pos[g]:]:
                dk = rel[g, j] - rel[g, cur]
                db = int(dbits[g, j] - dbits[g, cur])
                r = 1e10 * dk / (db + 1)
                evaluations += 1
                if r < best_r and db <= capacity - used:
                    best, best_r = (g, j, db), r
        if best is None:
            break
        g, j, db = best
        pos[g] = cands[g].index(j) + 1
        choice[g] = j
        used += db
        steps += 1
    return choice, {"status": "feasible", "iterations": steps, "evaluations": evaluations}


# ----------------------------------------------------------------------------
# AutoRound AutoScheme / HIGGS: exact knapsack over the Pareto front
# ----------------------------------------------------------------------------


def pareto_dp(table, cost, capacity, *, ties: Sequence[Sequence[int]] = ()):
    """Exact minimum of ``Σ table[g, choice[g]]`` under the budget: bitalloc's DP, reused.

    AutoRound's AutoScheme (intel/auto-round ``auto_round/auto_scheme/delta_loss.py``,
    ``choose_bits_per_layer_with_path``) runs a dynamic programme over layers keeping,
    per reachable total of bits, the smallest summed loss, pruned to the Pareto front of
    (bits, loss) states after each layer, and returns the least-loss state under the
    budget; its optional ``max_states`` beam (default None = exact) subsamples the front.
    HIGGS solves the same separable knapsack. bitalloc's :func:`bitalloc.solvers.solve_dp`
    is the same exact Pareto-front DP (with Lagrangian bounds pruning it), so this is a
    thin wrapper: same optimum (ties may pick a different, equally good choice), no beam.
    """
    from .dp import solve_dp
    from .problem import AllocationProblem

    cost, capacity, table = check_instance(cost, capacity, table)
    sol = solve_dp(AllocationProblem(loss=table, cost=cost, ties=tuple(tuple(t) for t in ties)), capacity)
    return np.asarray(sol.choice, dtype=np.int64), {"status": sol.status, "iterations": 1, "evaluations": 0,
                                                    "objective": sol.objective, "solver": sol.solver}
