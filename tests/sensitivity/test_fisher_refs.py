"""The output-Fisher reference values (sensitivity.fisher_refs) and the profiles built with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from bitalloc.sensitivity.build import build_profile
from bitalloc.sensitivity.calibration import CalibrationSpec, as_batches
from bitalloc.sensitivity.fisher_refs import fisher_ref_values
from bitalloc.sensitivity.layers import find_layers
from bitalloc.sensitivity.peer_context import PeerContext
from bitalloc.sensitivity.peer_grad import score_modelopt_gradient
from bitalloc.sensitivity.profile import ProfileError, SensitivityProfile
from bitalloc.sensitivity.profile_config import ProfileConfig

SCHEMES = ["w2g32z", "w3g64z", "w4g32", "w8", "fp16"]
REFS = ["w2g32z", "w3g64z", "w4g32"]
CAL = CalibrationSpec(n_samples=4, seq_len=32, seed=1)


@pytest.fixture(scope="module")
def pair():
    """The same calibration profiled with measured and with Fisher references (and the Fisher table)."""
    measured = build_profile("random:llama-tiny", SCHEMES, CAL, ref_schemes=REFS, progress=False, fisher_table=True)
    fisher = build_profile("random:llama-tiny", SCHEMES, CAL, ref_schemes=REFS, progress=False, ref_method="fisher",
                           fisher_table=True)
    return measured, fisher


def test_fisher_estimates_track_the_measured_kl(pair):
    """Same units (KL per token) and the same ranking of layers as the end-to-end measurement."""
    measured, fisher = pair
    K, F = measured.ref_values, fisher.ref_values  # (L, 3) each
    assert K.shape == F.shape == (measured.n_layers, 3)
    for r in range(3):
        rho = spearmanr(K[:, r], F[:, r]).correlation
        assert rho > 0.8, f"{REFS[r]}: rank correlation {rho:.2f} with the measured KL"
    ratio = np.median(F / K)
    assert 0.3 < ratio < 3.0, f"Fisher / measured KL median ratio {ratio:.2f}: not the same units"


def test_fisher_profile_records_its_method(pair):
    measured, fisher = pair
    opts = fisher.metadata["options"]
    assert opts["ref_method"] == "fisher" and opts["fisher"]["labels"] == "sampled"
    assert opts["fisher"]["tokens"] == CAL.n_samples * (CAL.seq_len - 1)
    assert measured.metadata["options"]["ref_method"] == "measured"
    # the references are the Fisher table's reference columns, and the table follows them
    idx = [fisher.scheme_index(r) for r in REFS]
    np.testing.assert_allclose(fisher.ref_values, fisher.fisher[:, idx])
    np.testing.assert_allclose(fisher.table()[:, idx], fisher.ref_values, rtol=1e-9)
    # fewer bits, more estimated loss (median over layers)
    med = [float(np.median(fisher.fisher[:, fisher.scheme_index(s)])) for s in ["fp16", "w8", "w4g32", "w2g32z"]]
    assert med == sorted(med) and med[0] < 1e-3 * med[-1], med


def test_fisher_table_round_trips(pair, tmp_path):
    _, fisher = pair
    path = fisher.save(tmp_path / "p.json")
    back = SensitivityProfile.load(path)
    np.testing.assert_array_equal(back.fisher, fisher.fisher)
    d = fisher.to_dict()
    d["fisher"][0][0] = -1.0
    with pytest.raises(ProfileError, match="fisher"):
        SensitivityProfile.from_dict(d)
    d["fisher"] = [[0.0]]
    with pytest.raises(ProfileError, match="fisher"):
        SensitivityProfile.from_dict(d)


def test_text_labels_are_modelopts_empirical_fisher():
    """labels="text": the same Σ g²ΔY² as the ModelOpt peer score (its loss is the per-row mean,
    so its gradient is 1/(T-1) of the summed loss's), scaled to ½ per token."""
    from bitalloc.sensitivity.models import load_model

    loaded = load_model("random:llama-tiny")
    net = loaded.model
    layers, _ = find_layers(net)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, net.config.vocab_size, (3, 16), generator=g)
    vals, info = fisher_ref_values(net, layers, ids, ["w3g64z", "w4g32"], labels="text", batch_tokens=16)
    ctx = PeerContext(net, layers, ["w3g64z", "w4g32"], as_batches(ids, 1))
    raw = np.array(score_modelopt_gradient(ctx, group=False, monotone=False).info["per_layer_raw"])
    n = info["tokens"]
    assert n == 3 * 15
    np.testing.assert_allclose(vals, 0.5 * raw * 15 ** 2 / n, rtol=2e-4)


def test_model_is_left_as_it_was():
    from bitalloc.sensitivity.models import load_model

    net = load_model("random:llama-tiny").model
    layers, _ = find_layers(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    ids = torch.randint(3, net.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    a, _ = fisher_ref_values(net, layers, ids, ["w3g64z"], seed=5)
    b, _ = fisher_ref_values(net, layers, ids, ["w3g64z"], seed=5)
    c, _ = fisher_ref_values(net, layers, ids, ["w3g64z"], seed=6)
    np.testing.assert_array_equal(a, b)  # seeded label sampling
    assert not np.array_equal(a, c)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in net.named_parameters():
        assert p.grad is None and p.requires_grad == flags[n], n


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ProfileError, match="ref_method"):
        ProfileConfig(ref_method="guess")
    with pytest.raises(ProfileError, match="fisher_labels"):
        ProfileConfig(fisher_labels="gold")
    with pytest.raises(ProfileError, match="measured=True"):
        ProfileConfig(ref_method="fisher", measured=True)
    with pytest.raises(ProfileError, match="fisher_table"):
        ProfileConfig(fisher_table="yes")
    with pytest.raises(ProfileError, match="causal LM"):
        build_profile("random:bert-tiny", ["w4g32", "w8"], CalibrationSpec(n_samples=2, seq_len=8),
                      ref_schemes=["w4g32"], progress=False, ref_method="fisher")
    with pytest.raises(ValueError, match="labels"):
        fisher_ref_values(torch.nn.Linear(2, 2), [], torch.zeros(1, 2, dtype=torch.long), [], labels="gold")


def test_batching_and_stride():
    """Text labels: batches of whole rows give the same sums (rows are independent); a stride
    scores every stride-th position only."""
    from bitalloc.sensitivity.models import load_model

    net = load_model("random:llama-tiny").model
    layers, _ = find_layers(net)
    ids = torch.randint(3, net.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(2))
    one, i1 = fisher_ref_values(net, layers, ids, ["w3g64z"], labels="text", batch_tokens=12)
    all_, i4 = fisher_ref_values(net, layers, ids, ["w3g64z"], labels="text", batch_tokens=4096)
    assert (i1["batches"], i4["batches"]) == (4, 1)
    np.testing.assert_allclose(one, all_, rtol=1e-4)
    s3, i3 = fisher_ref_values(net, layers, ids, ["w3g64z"], labels="text", stride=3)
    assert i3["tokens"] == 4 * len(range(0, 11, 3))
    assert not np.allclose(s3, all_) and np.all(s3 > 0)
    with pytest.raises(ValueError, match="stride"):
        fisher_ref_values(net, layers, ids, ["w3g64z"], stride=0)


def test_hybrid_ref_values_correct_the_fisher_per_kind():
    from bitalloc.sensitivity.fisher_refs import hybrid_ref_values

    kinds = ["q", "k", "q", "k", "q", "k", "v"]
    F = np.array([[1.0, 0.1]] * 7) * np.arange(1, 8)[:, None]
    truth = F * np.array([[2.0, 3.0] if k == "q" else [0.5, 0.25] for k in kinds[:6]] + [[1.0, 1.0]])
    measured = [0, 1]  # one q and one k layer measured; no v layer measured
    out, info = hybrid_ref_values(kinds, measured, truth[measured], F)
    np.testing.assert_allclose(out[:6], truth[:6])  # the per-kind ratio carries over exactly
    overall = np.exp(np.median(np.log(truth[measured] / F[measured]), axis=0))
    np.testing.assert_allclose(out[6], F[6] * overall)  # an unmeasured kind: the overall median ratio
    assert info["measured_layers"] == 2 and info["estimated_layers"] == 5 and set(info["ratio_by_kind"]) == {"q", "k", "v"}


def test_hybrid_profile_measures_a_subset(pair):
    from bitalloc.sensitivity.fisher_refs import measured_subset

    measured, _ = pair
    hyb = build_profile("random:llama-tiny", SCHEMES, CAL, ref_schemes=REFS, progress=False, ref_method="hybrid",
                        measure_every=2)
    sub = measured_subset(hyb.layers, 2)
    assert 0 < len(sub) < hyb.n_layers or {x.block_index for x in hyb.layers} <= {0, 1}
    # the measured layers hold exactly the measured profile's values (same calibration and items)
    np.testing.assert_allclose(hyb.ref_values[sub], measured.ref_values[sub], rtol=1e-6)
    info = hyb.metadata["options"]["fisher"]["hybrid"]
    assert info["measured_layers"] == len(sub) and info["measure_every"] == 2
    with pytest.raises(ProfileError, match="measure_every"):
        ProfileConfig(measure_every=0)


def test_measured_subset_blocks():
    from types import SimpleNamespace

    from bitalloc.sensitivity.fisher_refs import measured_subset

    layers = [SimpleNamespace(block_index=b) for b in range(7) for _ in range(2)] + [SimpleNamespace(block_index=None)]
    got = measured_subset(layers, 3)
    assert sorted({layers[i].block_index for i in got if layers[i].block_index is not None}) == [0, 3, 6]
    assert len(layers) - 1 in got  # a layer outside the blocks is always measured
    assert len(measured_subset(layers, 1)) == len(layers)


def test_fisher_table_made_with_the_proxy_equals_a_separate_pass(pair):
    """The profile's table comes from the proxy's own quantized weights; a separate pass over the
    same calibration, positions and labels gives the same numbers."""
    from bitalloc.sensitivity.calibration import load_calibration
    from bitalloc.sensitivity.models import load_model

    measured, _ = pair
    loaded = load_model("random:llama-tiny")
    data = load_calibration(CAL, loaded.model, loaded.tokenizer)
    opts = measured.metadata["options"]
    assert opts["fisher"]["with_proxy"] and opts["fisher"]["schemes"] == len(SCHEMES)
    sal = {f: torch.as_tensor(v) for f, v in measured.saliency.items()}
    vals, info = fisher_ref_values(loaded.model, measured.layers, data, SCHEMES, saliency=sal,
                                   stride=opts["kl_stride"], seed=opts["fisher"]["seed"])
    assert info["tokens"] == opts["fisher"]["tokens"]
    np.testing.assert_allclose(measured.fisher, vals, rtol=1e-5, atol=1e-12)


def test_head_chunked_by_the_logits_memory_bound(monkeypatch):
    """A logits-memory bound below one batch's logits runs the head and the loss a few
    positions at a time: with text labels the same statistics as one piece (float rounding),
    the tied head's own rows included; sampled labels draw from the same law."""
    from bitalloc.sensitivity import fisher_refs as FR
    from bitalloc.sensitivity import logits as L
    from bitalloc.sensitivity.fisher_refs import FisherStats
    from bitalloc.sensitivity.models import load_model

    calls = []
    real = FR.head_grads
    monkeypatch.setattr(FR, "head_grads", lambda *a, **k: calls.append(a[6]) or real(*a, **k))

    net = load_model("random:llama-tiny").model
    layers, _ = find_layers(net, quantize_tied=True)
    head = [i for i, layer in enumerate(layers) if layer.fqn == "lm_head"]
    assert head, "the tiny model's tied head should be a profiled layer here"
    V = net.config.vocab_size
    T = 96
    ids = torch.randint(3, V, (4, T), generator=torch.Generator().manual_seed(3))
    try:
        one = FisherStats.collect(net, layers, ids, labels="text", stride=2, batch_tokens=4 * T)
        L.set_logits_memory("1MiB")  # the smallest bound: a few chunks of the batch's 4 x 96 positions
        assert L.chunk_rows(V, 4) < 4 * T / 2, (L.chunk_rows(V, 4), V)
        assert not calls  # one piece while the batch's logits fit the bound
        chunked = FisherStats.collect(net, layers, ids, labels="text", stride=2, batch_tokens=4 * T)
        assert calls == [L.chunk_rows(V, 4)], calls
        assert chunked.n == one.n == 4 * len(range(0, T - 1, 2))
        for i in range(len(layers)):
            torch.testing.assert_close(chunked.x[i], one.x[i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(chunked.g2[i], one.g2[i], rtol=1e-4, atol=1e-10)
        assert chunked.g2[head[0]].shape == (one.n, V)
        a, _ = fisher_ref_values(net, layers, ids, ["w3g64z"], batch_tokens=4 * T, seed=4)
        b, _ = fisher_ref_values(net, layers, ids, ["w3g64z"], batch_tokens=4 * T, seed=4)
        np.testing.assert_array_equal(a, b)  # seeded chunk by chunk too
        L.set_logits_memory(None)
        c, _ = fisher_ref_values(net, layers, ids, ["w3g64z"], batch_tokens=4 * T, seed=4)
        assert np.all(a > 0) and np.isfinite(a).all()
        assert spearmanr(a[:, 0], c[:, 0]).correlation > 0.8
    finally:
        L.set_logits_memory(None)


@pytest.mark.parametrize("bound", [None, "1MiB"])
def test_both_labels_equal_each_kind_alone(bound):
    """labels="both": one forward, a backward per kind; the two tables equal a "sampled" run's
    and a "text" run's bit for bit (the sampled labels draw the same stream), in one piece and
    with the head chunked by the logits-memory bound."""
    from bitalloc.sensitivity import logits as L
    from bitalloc.sensitivity.fisher_refs import fisher_ref_tables, label_kinds
    from bitalloc.sensitivity.models import load_model

    net = load_model("random:llama-tiny").model
    layers, _ = find_layers(net, quantize_tied=True)
    ids = torch.randint(3, net.config.vocab_size, (4, 96), generator=torch.Generator().manual_seed(7))
    assert label_kinds("both") == ("sampled", "text") and label_kinds("text") == ("text",)
    try:
        L.set_logits_memory(bound)
        (s,), _ = fisher_ref_tables(net, layers, ids, ["w3g64z", "w4g32"], labels="sampled", stride=2, seed=9)
        (t,), _ = fisher_ref_tables(net, layers, ids, ["w3g64z", "w4g32"], labels="text", stride=2, seed=9)
        (bs, bt), info = fisher_ref_tables(net, layers, ids, ["w3g64z", "w4g32"], labels="both", stride=2, seed=9)
        one, _ = fisher_ref_values(net, layers, ids, ["w3g64z", "w4g32"], labels="both", stride=2, seed=9)
    finally:
        L.set_logits_memory(None)
    np.testing.assert_array_equal(bs, s)
    np.testing.assert_array_equal(bt, t)
    np.testing.assert_array_equal(one, s)  # fisher_ref_values: the first kind's table
    assert info["labels"] == "both" and np.all(s > 0) and not np.allclose(s, t)


def test_both_labels_keep_the_rows_of_one_kind(monkeypatch):
    """The default buffer bound is per label kind: where one kind keeps 2 of 4 rows, both keep 2
    too (not fewer for the second kind's gradients), so each table still equals its kind's run."""
    from bitalloc.sensitivity import fisher_refs as FR
    from bitalloc.sensitivity.models import load_model

    net = load_model("random:llama-tiny").model
    layers, _ = find_layers(net)
    ids = torch.randint(3, net.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(8))
    one = FR.FisherStats.collect(net, layers, ids[:1], labels="text")
    per_row = sum(x.numel() for x in {id(v): v for v in one.x.values()}.values()) + sum(g.numel() for g in one.g2.values())
    monkeypatch.setattr(FR, "FISHER_MEMORY", 4 * per_row * 2 + 1)  # two rows of one kind
    text = FR.FisherStats.collect(net, layers, ids, labels="text")
    both = FR.FisherStats.collect(net, layers, ids, labels="both")
    assert text.info["rows"] == both.info["rows"] == 2, (text.info, both.info)
    for i in text.g2:
        torch.testing.assert_close(both.g2_all[1][i], text.g2[i], rtol=0, atol=0)


def test_profile_with_both_fisher_tables(pair, tmp_path):
    """fisher_labels="both" keeps the sampled table as ``fisher`` (equal to a sampled-label
    profile's) and the text one as ``fisher_text``; both round-trip; "both" needs the table."""
    measured, _ = pair
    both = build_profile("random:llama-tiny", SCHEMES, CAL, ref_schemes=REFS, progress=False, fisher_table=True,
                         fisher_labels="both")
    text = build_profile("random:llama-tiny", SCHEMES, CAL, ref_schemes=REFS, progress=False, fisher_table=True,
                         fisher_labels="text")
    np.testing.assert_allclose(both.fisher, measured.fisher, rtol=1e-12)
    np.testing.assert_allclose(both.fisher_text, text.fisher, rtol=1e-12)
    assert both.metadata["options"]["fisher"]["labels"] == "both"
    np.testing.assert_allclose(both.ref_values, measured.ref_values, rtol=1e-12)  # the references are measured
    both.save(tmp_path / "p.json")
    back = SensitivityProfile.load(tmp_path / "p.json")
    np.testing.assert_array_equal(back.fisher_text, both.fisher_text)
    with pytest.raises(ProfileError, match="fisher_table"):
        ProfileConfig(fisher_labels="both")
    d = both.to_dict()
    d.pop("fisher")
    with pytest.raises(ProfileError, match="fisher_text"):
        SensitivityProfile.from_dict(d)
    d = both.to_dict()
    d["fisher_text"][0][0] = -1.0
    with pytest.raises(ProfileError, match="fisher_text"):
        SensitivityProfile.from_dict(d)
