"""Chunked logits (sensitivity.logits): results equal the unchunked ones to float rounding.

Tolerance: 1e-6 relative, or 1e-8 nats/token absolute for KLs at the float32 noise floor (float32 head matmul and log-softmax blocked differently; sums in
float64) on random:llama-tiny, for the KL / NLL / top-1 metrics of a measurement, for the
reference kept as hidden states (recomputed per chunk), and for the evaluation.
"""

from __future__ import annotations

import pytest
import torch

from bitalloc.sensitivity import logits as L
from bitalloc.sensitivity.layers import find_layers
from bitalloc.sensitivity.metrics import KLMetric, MetricSet, NLLDeltaMetric, Top1Metric
from bitalloc.sensitivity.models import load_model
from bitalloc.sensitivity.proxy import compute_reference, measure_item

RTOL = 1e-6
ABS = 1e-8  # nats/token: the float32 noise floor of a KL itself (a w4 KL of ~1e-8 can come out negative)


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("random:llama-tiny")
    with torch.no_grad():  # peaked next-token distributions (random init is near uniform): KLs well above float noise
        loaded.model.lm_head.weight.mul_(40)
    return loaded


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 250, (4, 32), generator=g)


@pytest.fixture(autouse=True)
def _reset():
    yield
    L.set_logits_memory(None)


def _measure(model, ids, memory, stride_keep=None):
    L.set_logits_memory(memory)
    layers = find_layers(model, quantize_tied=True)[0]
    batches = [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]
    if stride_keep is not None:
        batches = [{**b, "logits_to_keep": stride_keep} for b in batches]
    metric = MetricSet({"kl": KLMetric(chunk_tokens=7), "nll": NLLDeltaMetric(), "top1": Top1Metric()})
    ref = compute_reference(model, layers, batches, metric, progress=False)
    head = [x for x in layers if x.fqn == "lm_head"]
    picks = [layers[0], layers[-1], *head]
    return ref, {(x.fqn, s): measure_item(model, x, s, ref) for x in picks for s in ("w2g64", "w4g128", "w8a8")}


def _unchunked(model, ids, monkeypatch):
    monkeypatch.setattr(L, "split_head", lambda m, b=None: None)  # the model's own full logits
    return _measure(model, ids, "1GiB")


def test_split_head_verified_and_outputs_are_chunked(tiny, ids):
    split = L.split_head(tiny.model, {"input_ids": ids})
    assert split is not None and split.head is tiny.model.lm_head
    out = L.forward_logits(tiny.model, {"input_ids": ids, "logits_to_keep": torch.tensor([3, 7, 31])})
    assert isinstance(out, L.ChunkedLogits) and out.shape == (4, 3, 264)
    want = tiny.model(input_ids=ids, logits_to_keep=torch.tensor([3, 7, 31])).logits
    torch.testing.assert_close(out.rows(0, 12).reshape(4, 3, -1), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory", ["1GiB", "1MiB"])  # 1MiB: chunks of a few positions, reference as hidden states
def test_measurements_match_unchunked(tiny, ids, memory, monkeypatch):
    _, chunked = _measure(tiny.model, ids, memory)
    with monkeypatch.context() as mp:
        _, plain = _unchunked(tiny.model, ids, mp)
    for key, v in plain.items():
        for name in ("kl", "nll", "top1"):
            assert chunked[key][name] == pytest.approx(v[name], rel=RTOL, abs=ABS), (key, name)
    assert any(v["kl"] > 0 for v in plain.values())


def test_reference_as_hidden_states_matches(tiny, ids, monkeypatch):
    monkeypatch.setattr(L, "logits_memory", lambda: 2 << 20)  # nothing fits: every batch keeps hidden states
    import bitalloc.sensitivity.metrics as M

    monkeypatch.setattr(M, "logits_memory", lambda: 1)
    ref, chunked = _measure(tiny.model, ids, "1GiB")
    assert all(isinstance(st["kl"][0], str) for st in ref.states)  # ("hidden", h, head)
    monkeypatch.undo()
    with monkeypatch.context() as mp:
        _, plain = _unchunked(tiny.model, ids, mp)
    for key, v in plain.items():  # includes lm_head itself: its reference uses a copy of the head's weight
        assert chunked[key]["kl"] == pytest.approx(v["kl"], rel=RTOL, abs=ABS), key


def test_strided_positions(tiny, ids, monkeypatch):
    keep = torch.arange(1, 32, 2)
    _, chunked = _measure(tiny.model, ids, "1MiB", keep)
    with monkeypatch.context() as mp:
        mp.setattr(L, "split_head", lambda m, b=None: None)
        _, plain = _measure(tiny.model, ids, "1GiB", keep)
    for key, v in plain.items():
        assert chunked[key]["kl"] == pytest.approx(v["kl"], rel=RTOL, abs=ABS), key


def test_evaluate_matches_unchunked(tiny, ids, monkeypatch):
    from bitalloc.allocator.evaluate import evaluate_models

    q = load_model("random:llama-tiny").model
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    L.set_logits_memory("1MiB")
    got = evaluate_models(tiny.model, {"q": q}, ids, batch_size=3, progress=False)
    with monkeypatch.context() as mp:
        import sys

        E = sys.modules["bitalloc.allocator.evaluate"]

        mp.setattr(E, "_outputs", lambda m, x: m(input_ids=x, use_cache=False).logits[:, :-1])
        want = evaluate_models(tiny.model, {"q": q}, ids, batch_size=3, progress=False)
    for k in ("fp16", "q"):
        assert got[k].nll == pytest.approx(want[k].nll, rel=RTOL)
        assert got[k].ppl == pytest.approx(want[k].ppl, rel=RTOL)
    assert got["q"].kl == pytest.approx(want["q"].kl, rel=1e-5)
    assert got["q"].top1_agree == want["q"].top1_agree


def test_evaluation_batches_windows_by_tokens_when_heads_split(tiny, ids, monkeypatch):
    """Split heads: up to AUTO_BATCH_TOKENS tokens per forward; a model whose head does not
    split keeps 4 windows; the scores do not depend on the batching."""
    import sys

    from bitalloc.allocator.evaluate import AUTO_BATCH_TOKENS, auto_batch_size, evaluate_models

    q = load_model("random:llama-tiny").model
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    many = ids.repeat(20, 1)  # (80, 32)
    assert auto_batch_size([tiny.model, q], many) == AUTO_BATCH_TOKENS // 32 == 64
    assert auto_batch_size([tiny.model, q], ids) == 4  # never more than the windows
    E = sys.modules["bitalloc.allocator.evaluate"]
    seen = []
    real = E._outputs
    monkeypatch.setattr(E, "_outputs", lambda m, x: seen.append(x.shape[0]) or real(m, x))
    got = evaluate_models(tiny.model, {"q": q}, many, progress=False)
    assert seen == [64, 64, 16, 16]  # (reference, q) per batch
    one = evaluate_models(tiny.model, {"q": q}, many, batch_size=1, progress=False)
    for k in ("fp16", "q"):
        assert got[k].nll == pytest.approx(one[k].nll, rel=RTOL)
    assert got["q"].kl == pytest.approx(one["q"].kl, rel=1e-5)
    assert got["q"].top1_agree == one["q"].top1_agree
    with monkeypatch.context() as mp:
        mp.setattr(L, "split_head", lambda m, b=None: None if m is q else L._candidate(m))
        assert auto_batch_size([tiny.model, q], many) == 4


def test_parse_size_and_setting():
    assert L.parse_size("512MiB") == 512 << 20 and L.parse_size("2GB") == 2 * 10**9
    with pytest.raises(ValueError, match="logits memory"):
        L.parse_size("lots")
    with pytest.raises(ValueError, match="at least 1MiB"):
        L.parse_size(100)
    L.set_logits_memory("64MiB")
    assert L.logits_memory() == 64 << 20
    assert L.chunk_rows(256000, 4) == (32 << 20) // (256000 * 16)
