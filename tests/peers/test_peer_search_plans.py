"""The peers' searches (solvers/peer_search.py, solvers/evolve.py) through the registry and on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    import bitalloc

    path = tmp_path_factory.mktemp("peer-search") / "profile.json"
    return bitalloc.profile("random:llama-tiny", n_samples=4, seq_len=32, kl_samples=1, out=path,
                            schemes=["w2g32z", "w3g32z", "w4g32z", "w8"], progress=False, log=None)


@pytest.mark.parametrize("name", ["modelopt-kl", "exllamav2", "exllamav3", "autoround"])
def test_table_peers_give_exact_budget_plans(tiny_profile, name):
    from bitalloc.allocator.peers import peer_plan
    from bitalloc.allocator.solve import capacity_bits
    from bitalloc.allocator.api import parse_budget
    from bitalloc.sensitivity.peer_context import PeerScores

    prof = tiny_profile
    L = len(prof.layers)
    table = np.tile(np.array([8.0, 4.0, 2.0, 1.0]) * 1e-2, (L, 1))  # (L, S) lower is better
    table[3] *= 50  # layer 3 is the sensitive one
    info = {}
    if name == "exllamav3":  # ΔKL relative to the base (w2), with its index
        table, info = table - table[:, :1], {"base_index": 0}
    options = {"samples": 3, "iterations": 2} if name == "exllamav2" else {}
    plan = peer_plan(name, prof, "4.5bpw", PeerScores(name, table, info=info), **options)
    chosen = [plan.layers[l.fqn].scheme for l in prof.layers]
    cost = np.asarray(prof.cost_bits)
    used = sum(int(cost[i, prof.schemes.index(s)]) for i, s in enumerate(chosen))
    assert used <= capacity_bits(prof, parse_budget("4.5bpw")), name
    if name != "exllamav2":  # the annealer at 2 moves per temperature is not asked to be good
        assert chosen[3] == "w8", (name, chosen)


def test_evolve_and_refine_on_tiny_model(tiny_ctx):
    from bitalloc.solvers.evolve import evolve, refine

    ctx = tiny_ctx
    fitness = ctx.fitness([ctx.batches[:1], ctx.batches])  # stage 0: one batch, stage 1: both
    numel = np.array([ctx.weight(i).numel() for i in range(ctx.n_layers)])
    cost = numel[:, None] * np.array([2, 3, 4, 8])[None, :]  # (L, S) bits, schemes w2g32z..w8 (no metadata)
    capacity = int(cost[:, 1].sum() + cost[:, 2].sum()) // 2  # between 3 and 4 bits per weight
    start = np.ones(ctx.n_layers, dtype=np.int64)  # all w3, leftover bits to spend
    choice, st = evolve(fitness, cost, capacity, start, generations=2, offspring=3, stages=(2, 1), seed=0,
                        group_rule="none", tokens=(64, 128))
    assert int(cost[np.arange(len(cost)), choice].sum()) <= capacity
    assert st["evaluations"] == 2 * (3 + 3) and st["tokens_used"] == 2 * (3 * 64 + 3 * 128)
    f0 = ctx.forwards
    hint = np.tile([8.0, 4.0, 2.0, 1.0], (len(cost), 1))  # (L, S) predicted losses
    choice, st = refine(fitness, cost, capacity, start, evaluations=4, hint=hint)
    assert int(cost[np.arange(len(cost)), choice].sum()) <= capacity
    assert st["evaluations"] <= 4 and ctx.forwards - f0 == st["evaluations"]  # stage 0: one batch each
    assert st["fitness"] < st["fitness_start"], "an upgrade with leftover bits lowers the KL"


def test_exllamav3_base_is_the_dearest_uniform_plan_within_the_budget(tiny_profile):
    """exllamav3 combines models quantized at bitrates around its target, the first below it the
    base: per budget, the dearest scheme whose uniform plan fits, and its plan upgrades from it."""
    from bitalloc.allocator.arrays import capacity_bits, n_weights
    from bitalloc.allocator.api import parse_budget
    from bitalloc.allocator.peers import exllamav3_base, peer_plan
    from bitalloc.sensitivity.peer_context import PeerScores

    prof = tiny_profile
    totals = np.asarray(prof.cost_bits).sum(axis=0)  # (S,) bits of each uniform plan
    n = n_weights(prof)
    bpw = {s: totals[j] / n for j, s in enumerate(prof.schemes)}  # w2g32z < w3g32z < w4g32z < w8
    assert sorted(bpw, key=bpw.get) == ["w2g32z", "w3g32z", "w4g32z", "w8"]
    between = (bpw["w3g32z"] + bpw["w4g32z"]) / 2
    assert exllamav3_base(prof, f"{between}bpw") == "w3g32z"
    assert exllamav3_base(prof, f"{bpw['w4g32z']}bpw") == "w4g32z", "a uniform plan exactly at the budget fits"
    assert exllamav3_base(prof, "16bpw") == "w8"
    assert exllamav3_base(prof, "1bpw") == "w2g32z", "nothing fits: the cheapest"
    # its greedy then spends the rest on the layer whose upgrade lowers ΔKL most per bit
    L, b = len(prof.layers), prof.schemes.index("w3g32z")
    table = np.zeros((L, len(prof.schemes)))  # ΔKL vs all at w3g32z: upgrades help a little ...
    table[:, prof.schemes.index("w4g32z")] = -1e-3
    table[:, prof.schemes.index("w2g32z")] = 1e-2
    table[2, prof.schemes.index("w4g32z")] = -1.0  # ... except layer 2's, which helps a lot
    plan = peer_plan("exllamav3", prof, f"{between}bpw", PeerScores("exllamav3", table, info={"base_index": b}))
    chosen = [plan.layers[l.fqn].scheme for l in prof.layers]
    assert chosen[2] == "w4g32z" and "w2g32z" not in chosen, chosen
    cost = np.asarray(prof.cost_bits)
    assert sum(int(cost[i, prof.schemes.index(s)]) for i, s in enumerate(chosen)) <= capacity_bits(
        prof, parse_budget(f"{between}bpw"))
