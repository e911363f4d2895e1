"""Built-in metrics, token weighting, MetricSet, user metrics and metric groups (tiny random models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitalloc.sensitivity.calibration import as_batches
from bitalloc.sensitivity.groups import GroupError, MetricGroup, assign_groups, parse_groups
from bitalloc.sensitivity.layers import find_layers
from bitalloc.sensitivity.metrics import (
    METRICS, CosineMetric, KLMetric, MetricSet, NLLDeltaMetric, SQNRMetric, Top1Metric, TokenWeighting,
    as_metric, get_metric, kept_positions, nsr_to_db,
)
from bitalloc.sensitivity.metrics import strided_batches as _strided
from bitalloc.sensitivity.proxy import compute_reference, measure_item


def _logits_out(x):
    return type("Out", (), {"logits": x})()


def test_registry_and_errors():
    assert set(METRICS) == {"kl", "nll", "sqnr", "cosine", "top1"}
    assert isinstance(get_metric("nll"), NLLDeltaMetric)
    with pytest.raises(ValueError, match="unknown metric 'klx'; known: kl, nll, sqnr, cosine, top1"):
        get_metric("klx")
    with pytest.raises(ValueError, match="bad options"):
        get_metric("top1", bogus=1)
    assert as_metric(Top1Metric).name == "top1"
    assert as_metric(lambda r, o, b: torch.zeros(2)).name == "<lambda>"
    assert nsr_to_db(0.01) == pytest.approx(20.0)


def test_metric_values_on_hand_made_outputs():
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (2, 5))
    batch = {"input_ids": ids}
    p = torch.randn(2, 5, 10)
    q = p + 0.3 * torch.randn(2, 5, 10)
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    m = KLMetric()
    s, c = m.score(m.reference(_logits_out(p), batch), _logits_out(q), batch)
    assert s / c == pytest.approx(float(kl.mean()), rel=1e-5)
    # weighting: position 0 excluded, token id ids[0,3] excluded, weights 2 on position 4
    w = torch.ones(2, 5)
    w[:, 4] = 2
    tw = TokenWeighting(w, exclude_positions=(0,), exclude_token_ids=(int(ids[0, 3]),))
    mw = KLMetric(weighting=tw)
    full = tw.full(batch)
    assert (full[:, 0] == 0).all() and full[0, 3] == 0 and full[1, 4] == 2
    s, c = mw.score(mw.reference(_logits_out(p), batch), _logits_out(q), batch)
    assert s / c == pytest.approx(float((kl.double() * full).sum() / full.sum()), rel=1e-5)
    # NLL delta of the next tokens; the last position has no label
    n = NLLDeltaMetric()
    s, c = n.score(n.reference(_logits_out(p), batch), _logits_out(q), batch)
    y = ids[:, 1:]
    d = -lq[:, :-1].gather(-1, y[..., None]) + lp[:, :-1].gather(-1, y[..., None])
    assert c == 8 and s / c == pytest.approx(float(d.mean()), rel=1e-5)
    # top-1
    t = Top1Metric()
    s, c = t.score(t.reference(_logits_out(p), batch), _logits_out(q), batch)
    assert s / c == pytest.approx(float((p.argmax(-1) != q.argmax(-1)).double().mean()))
    # sqnr: noise/signal power of the final hidden state
    h = torch.randn(2, 5, 8)
    hq = h + 0.1 * torch.randn(2, 5, 8)
    out = type("O", (), {"last_hidden_state": h})()
    outq = type("O", (), {"last_hidden_state": hq})()
    sq = SQNRMetric()
    s, c = sq.score(sq.reference(out, batch), outq, batch)
    assert s / c == pytest.approx(float(((hq - h).pow(2).sum(-1) / h.pow(2).sum(-1)).mean()), rel=1e-5)


def test_strided_positions_and_weighting():
    ids = torch.arange(16).reshape(1, 16)
    b = {"input_ids": ids, "logits_to_keep": torch.arange(3, 16, 4)}
    assert kept_positions(b, 4).tolist() == [3, 7, 11, 15]
    assert kept_positions(b, 16).tolist() == list(range(16))
    assert kept_positions({"input_ids": ids, "logits_to_keep": 2}, 2).tolist() == [14, 15]
    tw = TokenWeighting(exclude_positions=(3, -1))
    assert tw.at(b, 4).tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_metric_set_one_forward_matches_single_metrics(llama, ids):
    layers, _ = find_layers(llama)
    batches = _strided(llama, as_batches(ids[:4], 2), 4)
    ms = MetricSet({"kl": "kl", "nll": "nll", "sqnr": "sqnr", "top1": "top1",
                    "kl0": KLMetric(exclude_positions=[3]),
                    "fn": lambda r, o, b: (o.logits - r.logits).pow(2).mean(-1)})
    ref = compute_reference(llama, layers, batches, ms, progress=False)
    layer = layers[2]
    v = measure_item(llama, layer, "w2g64z", ref)
    assert set(v) == {"kl", "nll", "sqnr", "top1", "kl0", "fn"}
    assert v["kl"] > 0 and v["sqnr"] > 0 and v["fn"] > 0 and 0 <= v["top1"] <= 1
    assert v["kl0"] != v["kl"]  # position 3 is one of the kept ones (stride 4) and is left out
    single = compute_reference(llama, layers, batches, KLMetric(), progress=False)
    k = measure_item(llama, layer, "w2g64z", single)
    assert isinstance(k, float) and k == pytest.approx(v["kl"], rel=1e-9)
    zero = measure_item(llama, layer, "fp16", ref)
    assert isinstance(zero, dict) and set(zero) == set(v)


def test_cosine_pooling_weights(bert):
    g = torch.Generator().manual_seed(0)
    data = {"input_ids": torch.randint(3, 256, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    layers, _ = find_layers(bert)
    ms = MetricSet({"cos": CosineMetric(), "cos_nocls": CosineMetric(exclude_positions=[0])})
    ref = compute_reference(bert, layers, data, ms, progress=False)
    v = measure_item(bert, layers[0], "w2g64z", ref)
    assert v["cos"] > 0 and v["cos_nocls"] > 0 and v["cos"] != v["cos_nocls"]
    # both equal mean(1 - cos) of the mean-pooled embeddings, computed here by hand
    from bitalloc.kernels.quant import fake_quantize_weight
    from bitalloc.sensitivity.layers import get_weight

    with torch.no_grad():
        h_ref = bert(**data).last_hidden_state.double()  # (4, 12, d)
        module = bert.get_submodule(layers[0].fqn)
        w = get_weight(module).detach().clone()
        module.weight.copy_(fake_quantize_weight(w.float(), "w2g64z").to(w.dtype))
        try:
            h_q = bert(**data).last_hidden_state.double()
        finally:
            module.weight.copy_(w)

    def one_minus_cos(first: int) -> float:
        a, b = h_ref[:, first:].mean(1), h_q[:, first:].mean(1)  # (4, d) mean pooling (mask all ones)
        return float((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean())

    assert v["cos"] == pytest.approx(one_minus_cos(0), rel=1e-3)
    assert v["cos_nocls"] == pytest.approx(one_minus_cos(1), rel=1e-3)


def test_groups_partition_and_errors():
    fqns = ["m.0.attn.q", "m.0.attn.k", "m.0.mlp.up", "m.0.mlp.down", "head"]
    groups = parse_groups([{"name": "attn", "match": ["*.attn.*"], "metric": "kl", "exclude_positions": [0]},
                           {"name": "rest", "match": ["*.mlp.*", "head"], "metric": "sqnr"}])
    a = assign_groups(groups, fqns)
    assert a == {"attn": ["m.0.attn.q", "m.0.attn.k"], "rest": ["m.0.mlp.up", "m.0.mlp.down", "head"]}
    assert groups[0].build_metric().weighting.exclude_positions == (0,)
    with pytest.raises(GroupError, match=r"1 layer\(s\) are in no metric group: head"):
        assign_groups(parse_groups([{"name": "a", "match": ["m.*"]}]), fqns)
    with pytest.raises(GroupError, match=r"several metric groups: m.0.attn.q \(a/b\)"):
        assign_groups([MetricGroup("a", ["*"]), MetricGroup("b", ["*.attn.q"])], fqns)
    with pytest.raises(GroupError, match="group 'x': pattern '\\*.conv.\\*' matches no profiled layer"):
        assign_groups([MetricGroup("x", ["*.conv.*"]), MetricGroup("all", ["*"])], fqns)
    with pytest.raises(GroupError, match="unknown metric 'kll'"):
        parse_groups([{"name": "a", "match": ["*"], "metric": "kll"}])
    with pytest.raises(GroupError, match="unique"):
        parse_groups([{"name": "a", "match": ["*"]}, {"name": "a", "match": ["x"]}])
    callable_group = MetricGroup("f", lambda f: f.startswith("m."), "top1")
    assert assign_groups([callable_group, MetricGroup("h", ["head"])], fqns)["h"] == ["head"]


def test_build_profile_with_groups(llama, ids, tmp_path):
    from bitalloc.sensitivity.models import LoadedModel
    from bitalloc.sensitivity.profile import SensitivityProfile
    from bitalloc.sensitivity.build import build_profile

    lm = LoadedModel(llama, None, "random:llama-tiny", "causal-lm", "tiny")
    groups = [{"name": "attn", "match": ["*.self_attn.*", "lm_head"], "metric": "kl", "exclude_positions": [0]},
              {"name": "mlp", "match": ["*.mlp.*"], "metric": "sqnr"}]  # (sqnr cannot see the LM head)
    p = build_profile(lm, ["w2g64z", "w3g128z", "w4g128z", "fp16"], ids, ref_schemes=["w3g128z"], progress=False,
                      groups=groups, kl_stride=4)
    assert set(p.tables) == {"attn", "mlp"}
    attn = np.array([".self_attn." in f or f == "lm_head" for f in p.fqns])
    assert (p.tables["attn"][~attn] == 0).all() and (p.tables["mlp"][attn] == 0).all()
    assert (p.tables["attn"][attn, 0] > 0).any() and (p.tables["mlp"][~attn, 0] > 0).all()
    assert p.metadata["groups"]["mlp"]["metric"] == "sqnr" and "lm_head" in p.metadata["groups"]["attn"]["layers"]
    q = SensitivityProfile.load(p.save(tmp_path / "p.json"))
    assert q.metadata["groups"] == p.metadata["groups"]
    import bitalloc

    plan = bitalloc.solve(q, "4bpw")
    assert set(plan.predicted["loss"]) == {"attn", "mlp"} and plan.solver["groups"]["normalize"] == "ref"
    with pytest.raises(GroupError, match="in no metric group: lm_head"):
        build_profile(lm, ["w2g64z", "fp16"], ids, ref_schemes=["w2g64z"], progress=False, groups=[
            {"name": "attn", "match": ["*.self_attn.*"]}, groups[1]])


def test_measured_profile_with_groups(llama, ids, tmp_path):
    """Measured table with groups: each layer's row is its own group's metric, one forward per item,
    and the checkpoint records the groups (a checkpoint of other groups is refused)."""
    from bitalloc.sensitivity.models import LoadedModel
    from bitalloc.sensitivity.build import build_profile
    from bitalloc.sensitivity.runner import CheckpointError

    lm = LoadedModel(llama, None, "random:llama-tiny", "causal-lm", "tiny")
    groups = [{"name": "attn", "match": ["*.self_attn.*"], "metric": "kl", "exclude_positions": [0]},
              {"name": "mlp", "match": ["*.mlp.*"], "metric": "top1"}]
    schemes = ["w2g64z", "w4g128z"]
    ck = tmp_path / "m.jsonl"
    p = build_profile(lm, schemes, ids, ref_schemes=["w2g64z"], progress=False, groups=groups, kl_stride=4,
                      measured=True, checkpoint=ck, exclude=["lm_head"])
    assert set(p.tables) == {"attn", "mlp"} and p.metadata["table"] == "measured"
    attn = np.array([".self_attn." in f for f in p.fqns])
    assert (p.tables["attn"][~attn] == 0).all() and (p.tables["mlp"][attn] == 0).all()
    assert (p.tables["attn"][attn, 0] > 1e-6).any()
    # the same numbers as one grouped measurement by hand
    from bitalloc.sensitivity.groups import setup_grouping

    layers = [l for l in p.layers]
    g = setup_grouping(groups, layers)
    batches = _strided(llama, as_batches(ids, 4), 4)
    ref = compute_reference(llama, layers, batches, g.metric_set, False)
    i = int(np.flatnonzero(~attn)[0])
    v = measure_item(llama, layers[i], "w2g64z", ref, None)
    assert set(v) == {"attn", "mlp"} and p.tables["mlp"][i, 0] == pytest.approx(v["mlp"], rel=1e-9, abs=1e-12)
    with pytest.raises(CheckpointError, match="configuration"):
        build_profile(lm, schemes, ids, ref_schemes=["w2g64z"], progress=False, kl_stride=4,
                      groups=[dict(groups[0], metric="nll"), groups[1]], measured=True, checkpoint=ck,
                      exclude=["lm_head"])
