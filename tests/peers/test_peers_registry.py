"""allocator.peers: the registry turns a peer's scores into an exact-budget plan."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    import bitalloc

    path = tmp_path_factory.mktemp("peers") / "profile.json"
    prof = bitalloc.profile("random:llama-tiny", n_samples=4, seq_len=32, kl_samples=1, out=path,
                            schemes=["w2g32z", "w3g32z", "w4g32z", "w8"], progress=False, log=None)
    return prof


def test_registry_names_every_peer_of_the_issue():
    from bitalloc.allocator.peers import PEERS

    assert set(PEERS) == {"hawq-v3", "higgs", "modelopt-gradient", "modelopt-kl", "autoround", "exllamav2",
                          "exllamav3", "evopress", "llamacpp-rules", "uniform"}


def test_unknown_peer_is_one_line_error(tiny_profile):
    from bitalloc.allocator.peers import PeerError, peer_plan

    with pytest.raises(PeerError, match="unknown peer method 'hawq'"):
        peer_plan("hawq", tiny_profile, "4bpw")
    with pytest.raises(PeerError, match="needs its scores"):
        peer_plan("hawq-v3", tiny_profile, "4bpw")


def test_group_cost_and_expand():
    from bitalloc.allocator.peers import expand_choice, group_cost

    cost = np.array([[1, 2], [10, 20], [100, 200]])
    groups = ((0, 2), (1,))
    assert group_cost(cost, groups).tolist() == [[101, 202], [10, 20]]
    assert expand_choice(np.array([1, 0]), groups, 3).tolist() == [1, 0, 1]


def test_ilp_peer_gives_bits_where_its_score_is_high(tiny_profile):
    from bitalloc.allocator.peers import peer_plan
    from bitalloc.sensitivity.peer_context import PeerScores

    prof = tiny_profile
    L, S = len(prof.layers), len(prof.schemes)
    table = np.tile(np.array([8.0, 4.0, 2.0, 1.0]) * 1e-3, (L, 1))  # (L, S): every layer alike ...
    table[3] *= 1000  # ... except layer 3, which the peer says is very sensitive
    plan = peer_plan("hawq-v3", prof, "4.5bpw", PeerScores("hawq-v3", table, info={"probes": 2}))
    chosen = [plan.layers[l.fqn].scheme for l in prof.layers]
    assert chosen[3] == "w8", chosen
    assert plan.predicted["bpw"] <= 4.5 + 1e-9
    assert chosen.count("w8") == 1, "the other layers are alike and cheaper below 8 bits"
    assert plan.solver["method"] == "hawq-v3" and plan.solver["peer"]["score_settings"] == {"probes": 2}


def test_grouped_scores_give_one_scheme_per_group(tiny_profile):
    from bitalloc.allocator.peers import peer_plan
    from bitalloc.sensitivity.peer_context import PeerScores, sub_blocks

    prof = tiny_profile
    groups = sub_blocks(prof.layers)
    table = np.tile(np.array([8.0, 4.0, 2.0, 1.0]), (len(groups), 1)) * np.arange(1, len(groups) + 1)[:, None]
    plan = peer_plan("modelopt-gradient", prof, "4bpw", PeerScores("modelopt-gradient", table, groups))
    for g in groups:
        assert len({plan.layers[prof.layers[i].fqn].scheme for i in g}) == 1, "a group shares one scheme"


def test_rule_peers_are_the_baselines(tiny_profile):
    from bitalloc.allocator.baselines import nearest_uniform
    from bitalloc.allocator.peers import peer_plan

    a = peer_plan("uniform", tiny_profile, "4bpw")
    b = nearest_uniform(tiny_profile, "4bpw")
    assert {k: v.scheme for k, v in a.layers.items()} == {k: v.scheme for k, v in b.layers.items()}
