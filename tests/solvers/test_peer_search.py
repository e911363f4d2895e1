"""The peers' searches (solvers/peer_search.py, solvers/evolve.py) on small synthetic cases."""

import itertools

import numpy as np
import pytest

from bitalloc.solvers.errors import InfeasibleBudgetError, ProblemError
from bitalloc.solvers.evolve import equal_size_groups, evolve, refine
from bitalloc.solvers.peer_search import anneal_exllamav2, greedy_exllamav3, minimax_threshold, pareto_dp

FAST_ANNEAL = dict(samples=4, iterations=2, cooling_factor=0.9)


def used(cost, choice):
    return int(cost[np.arange(len(cost)), choice].sum())


def instance(seed, G=6, S=4):
    """Random cost (G, S) with decreasing error tables and a capacity between min and max."""
    rng = np.random.default_rng(seed)
    cost = np.sort(rng.integers(100, 1000, (G, S)), axis=1)  # (G, S)
    err = np.sort(rng.random((G, S)), axis=1)[:, ::-1].copy()  # (G, S) dearer = lower error
    lo, hi = cost[:, 0].sum(), cost[:, -1].sum()
    return cost, err, int(rng.integers(lo, hi + 1))


def brute_force(table, cost, capacity):
    best, arg = np.inf, None
    for c in itertools.product(range(cost.shape[1]), repeat=len(cost)):
        c = np.array(c)
        if used(cost, c) <= capacity and table[np.arange(len(c)), c].sum() < best:
            best, arg = table[np.arange(len(c)), c].sum(), c
    return arg, best


@pytest.mark.parametrize("seed", range(8))
def test_never_over_capacity(seed):
    cost, err, cap = instance(seed)
    base = cost.argmin(axis=1)
    rng = np.random.default_rng(seed)
    choices = {
        "minimax": minimax_threshold(err, cost, cap)[0],
        "minimax-literal": minimax_threshold(err, cost, cap, fallback="cheapest")[0],
        "anneal": anneal_exllamav2(err, cost, cap, seed=seed, **FAST_ANNEAL)[0],
        "greedy": greedy_exllamav3(err - err[np.arange(6), base][:, None], cost, cap, base)[0],
        "pareto": pareto_dp(err, cost, cap)[0],
    }
    fit = lambda cs, stage: [float(err[np.arange(6), c].sum() + rng.random() * 0.01) for c in cs]
    choices["evolve-none"] = evolve(fit, cost, cap, base, generations=3, offspring=4, stages=(2, 1),
                                    group_rule="none", seed=seed)[0]
    shared = np.repeat(cost[:3], 2, axis=0)  # rows in pairs of equal size, unequal level steps
    choices["evolve-size"] = evolve(fit, shared, max(cap, int(shared.min(1).sum())), base, generations=5,
                                    offspring=4, stages=(2, 1), seed=seed)[0]
    choices["refine"] = refine(fit, cost, cap, base, evaluations=10, seed=seed)[0]
    for name, c in choices.items():
        assert c.dtype == np.int64 and c.shape == (6,), name
        if name == "evolve-size":
            cap_s = max(cap, int(shared.min(1).sum()))
            assert used(shared, c) <= cap_s, f"{name} used {used(shared, c)} > {cap_s}"
        else:
            assert used(cost, c) <= cap, f"{name} used {used(cost, c)} > {cap}"


def test_infeasible_budget_is_one_line_error():
    cost, err, _ = instance(0)
    cap = int(cost.min(axis=1).sum()) - 1
    for call in (lambda: minimax_threshold(err, cost, cap), lambda: anneal_exllamav2(err, cost, cap),
                 lambda: greedy_exllamav3(err, cost, cap, cost.argmin(1)), lambda: pareto_dp(err, cost, cap),
                 lambda: evolve(lambda c, s: [0.0] * len(c), cost, cap, cost.argmin(1)),
                 lambda: refine(lambda c, s: [0.0] * len(c), cost, cap, cost.argmin(1))):
        with pytest.raises(InfeasibleBudgetError) as e:
            call()
        assert "\n" not in str(e.value) and "below the smallest achievable" in str(e.value)
    with pytest.raises(ProblemError, match="start"):
        refine(lambda c, s: [0.0] * len(c), cost, int(cost.min(1).sum()), cost.argmax(1))


def test_minimax_hand_built_threshold():
    # schemes by cost 1, 2, 3 bits per row; scores drop with bits
    cost = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    table = np.array([[0.9, 0.5, 0.1],  # sensitive row
                      [0.3, 0.2, 0.1],
                      [0.6, 0.4, 0.0]])
    # each row takes its cheapest scheme with score <= t; capacity 6 bits:
    # t in [0.3, 0.4): (2, 0, 2) costs 3+1+3 = 7 > 6; t = 0.4: (2, 0, 1) costs 3+1+2 = 6 fits -> t* = 0.4
    choice, status = minimax_threshold(table, cost, 6)
    assert choice.tolist() == [2, 0, 1], choice
    assert 0.3 < status["threshold"] <= 0.4 + 1e-9, status
    assert status["max_score"] == pytest.approx(0.4)
    # scores are made non-increasing in cost order: a dearer scheme scoring worse counts as the cheaper one's
    bumpy = np.array([[0.5, 0.7, 0.1]])
    assert minimax_threshold(bumpy, np.array([[1, 2, 3]]), 3)[0].tolist() == [2]
    assert minimax_threshold(bumpy, np.array([[1, 2, 3]]), 2)[0].tolist() == [0]


def test_minimax_fallback_literal_takes_cheapest():
    # row 1's best score 0.5 is above the binding threshold 0.2 of row 0: theirs gives it index 0
    cost = np.array([[1, 5], [1, 5]])
    table = np.array([[0.9, 0.2], [0.8, 0.5]])
    assert minimax_threshold(table, cost, 6, fallback="cheapest")[0].tolist() == [1, 0]
    assert minimax_threshold(table, cost, 10)[0].tolist() == [1, 1]


@pytest.mark.parametrize("seed", range(3))
def test_anneal_reaches_brute_force_optimum(seed):
    cost, err, cap = instance(seed + 10, G=5, S=3)
    want, best = brute_force(err, cost, cap)
    choice, status = anneal_exllamav2(err, cost, cap, norm_interval=(1.0, 1.0), norm_2ndstage=0.0,
                                      samples=4, iterations=20, seed=seed)
    got = err[np.arange(5), choice].sum()
    assert got == pytest.approx(best), f"anneal {choice} {got} vs brute force {want} {best}"
    assert status["evaluations"] == 12 and status["bestnorm"] == 1.0


def test_anneal_deterministic_and_fills_leftover():
    cost, err, cap = instance(3)
    a = anneal_exllamav2(err, cost, cap, seed=5, **FAST_ANNEAL)[0]
    b = anneal_exllamav2(err, cost, cap, seed=5, **FAST_ANNEAL)[0]
    assert (a == b).all()
    # after the fill no row can step to its next dearer option
    slack = cap - used(cost, a)
    nxt = [cost[i, a[i] + 1] - cost[i, a[i]] for i in range(6) if a[i] < 3]
    assert all(d > slack for d in nxt), (slack, nxt)


def test_greedy_takes_best_ratio_first():
    cost = np.array([[10, 20, 40], [10, 20, 40]])
    delta = np.array([[0.0, -0.5, -0.6],  # row 0: 0.5 KL off for 10 bits
                      [0.0, -0.1, -2.0]])  # row 1: 2.0 KL off for 30 bits (better per bit after adjust)
    base = np.array([0, 0])
    # adjust(-0.5) = -0.62, /11 = -0.056; row 1 to scheme 2: adjust(-2) = -1.61, /31 = -0.052
    # 10 bits above base: row 0's upgrade has the best ratio (not row 1's bigger gain, which does not fit anyway)
    assert greedy_exllamav3(delta, cost, 30, base)[0].tolist() == [1, 0]
    # 40 bits above base: row 0 first (-0.056/bit beats -0.052), then row 1 to scheme 2 (30 bits) fits
    choice, st = greedy_exllamav3(delta, cost, 60, base)
    assert choice.tolist() == [1, 2] and st["iterations"] == 2, (choice, st)
    # 30 above: after row 0, 20 bits are left: row 1 takes scheme 1 (10 bits); scheme 2 (30) no longer fits
    choice, st = greedy_exllamav3(delta, cost, 50, base)
    assert choice.tolist() == [1, 1] and st["iterations"] == 2, (choice, st)
    # no upgrade that makes KL worse is taken, whatever the budget
    assert greedy_exllamav3(np.array([[0.0, 0.1, 0.2]]), cost[:1], 100, base[:1])[0].tolist() == [0]


def test_pareto_dp_matches_brute_force():
    for seed in range(4):
        cost, err, cap = instance(seed + 20, G=5, S=3)
        got, st = pareto_dp(err, cost, cap)
        _, best = brute_force(err, cost, cap)
        assert err[np.arange(5), got].sum() == pytest.approx(best) and st["status"] == "optimal"


# ----------------------------------------------------------------------------
# whole-plan searches on a non-separable fitness with a known optimum
# ----------------------------------------------------------------------------

G6 = 6
E = np.array([4.0, 1.5, 0.5, 0.1])  # error by level


def quad_fitness(weights, coupling):
    """f(choice) = Σ w_i e(c_i) + Σ_ij C_ij e(c_i) e(c_j): interactions make it non-separable."""
    calls = {"n": 0}

    def fitness(choices, stage):
        calls["n"] += len(choices)
        out = []
        for c in choices:
            e = E[np.asarray(c)]
            out.append(float(weights @ e + e @ coupling @ e))
        return out

    return fitness, calls


def quad_case():
    rng = np.random.default_rng(7)
    weights = rng.uniform(0.2, 3.0, G6)
    coupling = np.triu(rng.uniform(0, 0.4, (G6, G6)), 1)
    coupling[0, 1] = 2.0  # rows 0 and 1 interact strongly
    cost = np.tile(np.array([200, 300, 400, 500]), (G6, 1))  # equal sizes: swaps are exact
    return weights, coupling, cost, 6 * 350  # capacity: 2100 bits, levels sum to 9


def quad_optimum(fitness, cost, capacity):
    best, arg = np.inf, None
    for c in itertools.product(range(4), repeat=G6):
        c = np.array(c)
        if used(cost, c) <= capacity:
            f = fitness([c], 0)[0]
            if f < best:
                best, arg = f, c
    return arg, best


def test_evolve_finds_nonseparable_optimum_and_counts():
    weights, coupling, cost, cap = quad_case()
    fit, calls = quad_fitness(weights, coupling)
    opt, f_opt = quad_optimum(fit, cost, cap)
    assert used(cost, opt) == cap, "the test wants an optimum on the exact budget (swaps keep it)"
    start = np.array([1, 2, 1, 2, 1, 2])  # 2100 bits, feasible
    calls["n"] = 0
    choice, st = evolve(fit, cost, cap, start, generations=60, offspring=8, stages=(3, 1), seed=0,
                        tokens=(100, 1000))
    # offspring exclude the parent, so the last stage scores 3 survivors + the parent
    assert st["evaluations"] == calls["n"] == 60 * (8 + 4), st["evaluations"]
    assert fit([choice], 0)[0] == pytest.approx(f_opt), (choice, opt)
    assert used(cost, choice) == cap
    assert st["tokens_used"] == 60 * (8 * 100 + 4 * 1000)
    again = evolve(fit, cost, cap, start, generations=60, offspring=8, stages=(3, 1), seed=0)[0]
    assert (again == choice).all(), "same seed, same result"
    cached = evolve(fit, cost, cap, start, generations=60, offspring=8, stages=(3, 1), seed=0, cache=True)
    assert cached[1]["evaluations"] < st["evaluations"] and (cached[0] == choice).all()


def test_evolve_size_rule_keeps_total_exact_and_random_start():
    weights, coupling, _, _ = quad_case()
    cost = np.array([[200, 300, 400, 500]] * 3 + [[210, 330, 420, 540]] * 3)
    assert [g.tolist() for g in equal_size_groups(cost)] == [[0, 1, 2], [3, 4, 5]]
    fit, _ = quad_fitness(weights, coupling)
    start = np.array([1, 2, 1, 2, 1, 2])
    choice, st = evolve(fit, cost, used(cost, start) + 500, start, generations=10, offspring=4, stages=(2, 1))
    assert used(cost, choice) == used(cost, start), "size-rule swaps keep the total bits"
    assert [h[0] for h in st["history"]] == sorted(h[0] for h in st["history"])
    choice, st = evolve(fit, cost, 2200, None, generations=5, offspring=4, stages=(2, 1), initially_generated=5)
    assert used(cost, choice) <= 2200 and st["evaluations"] == 5 + 5 * (4 + 3)


def test_refine_finds_optimum_with_fewer_evaluations():
    weights, coupling, cost, cap = quad_case()
    fit, calls = quad_fitness(weights, coupling)
    opt, f_opt = quad_optimum(fit, cost, cap)
    # a good start: the separable optimum (ignoring the interactions), as bitalloc's ILP would give
    sep = np.array([[w * e for e in E] for w in weights])  # (G, S) predicted losses
    good, _ = brute_force(sep, cost, cap)
    for start in (good, np.array([1, 2, 1, 2, 1, 2]), np.array([0, 0, 3, 3, 3, 0])):
        choice, st = refine(fit, cost, cap, start, evaluations=200, hint=sep)
        assert fit([choice], 0)[0] == pytest.approx(f_opt), (start, choice, opt)
        assert st["fitness"] <= st["fitness_start"] and st["history"][0] == [1, st["fitness_start"]]
        assert used(cost, choice) <= cap and st["status"] == "local-optimum"
        # reaching the optimum took fewer evaluations than evolve from the same start
        first_opt = next(n for n, f in st["history"] if f == pytest.approx(f_opt))
        evo = evolve(fit, cost, cap, start, generations=60, offspring=8, stages=(3, 1), seed=0)[1]
        evo_opt = next((n for n, f in evo["history"] if f == pytest.approx(f_opt)), np.inf)
        assert first_opt < evo_opt, (start, first_opt, evo_opt)
    start = good
    # respects the evaluation cap; deterministic with a seed (no hint: random order)
    small = refine(fit, cost, cap, start, evaluations=5, seed=1)
    assert small[1]["evaluations"] <= 5 and small[1]["status"] == "budget"
    assert (refine(fit, cost, cap, start, evaluations=5, seed=1)[0] == small[0]).all()


def test_refine_hint_orders_moves():
    weights, coupling, cost, cap = quad_case()
    fit, _ = quad_fitness(weights, coupling)
    sep = np.array([[w * e for e in E] for w in weights])
    start = np.array([1, 2, 1, 2, 1, 2])
    guided = refine(fit, cost, cap + 100, start, evaluations=2, hint=sep)[1]
    # with 100 spare bits the best predicted move is one row up a level (pure gain): it is tried first
    assert guided["fitness"] < guided["fitness_start"] and guided["moves"] == 1


@pytest.mark.parametrize("seed", range(4))
def test_evolve_size_swaps_with_unequal_level_steps_stay_within_capacity(seed):
    # levels 100, 200, 300, 700 bits (like w2, w3, w4, w8): a one-down/one-up swap can add bits
    cost = np.tile(np.array([100, 200, 300, 700]), (6, 1))
    start = np.array([1, 2, 1, 2, 1, 2])
    cap = used(cost, start)  # tight: no spare bit
    seen = []

    def fit(cs, stage):  # rewards bits: an over-budget offspring would win
        seen.extend(used(cost, c) for c in cs)
        return [-float(used(cost, c)) + 0.01 * float(np.sum(E[np.asarray(c)] * np.arange(1, 7))) for c in cs]

    choice, st = evolve(fit, cost, cap, start, generations=8, offspring=6, stages=(2, 1), seed=seed)
    assert max(seen) <= cap, f"an offspring with {max(seen)} bits > {cap} was scored"
    assert used(cost, choice) <= cap and st["fitness"] <= fit([start], 0)[0]
