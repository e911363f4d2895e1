from __future__ import annotations

import pytest
import torch

from bitalloc.sensitivity.layers import LayerInfo, LayerSelectionError, find_layers


def test_llama_counts_and_shapes(llama):
    layers, skipped = find_layers(llama)
    assert skipped == []
    assert len(layers) == 2 * 7 + 1  # q k v o gate up down per block, + untied lm_head
    by = {layer.fqn: layer for layer in layers}
    q = by["model.layers.0.self_attn.q_proj"]
    assert (q.module_type, q.out_features, q.in_features, q.n_params) == ("Linear", 64, 64, 64 * 64)
    assert (q.block, q.block_index, q.tie_group) == ("model.layers.0", 0, None)
    k = by["model.layers.1.self_attn.k_proj"]
    assert (k.out_features, k.in_features, k.block_index) == (32, 64, 1)  # 2 kv heads of 16
    down = by["model.layers.1.mlp.down_proj"]
    assert (down.out_features, down.in_features) == (64, 128)
    head = by["lm_head"]
    assert (head.block, head.block_index) == (None, None)
    assert [layer.fqn for layer in layers][:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]


def test_tied_lm_head_skipped_with_reason(llama_tied):
    assert llama_tied.lm_head.weight is llama_tied.model.embed_tokens.weight
    layers, skipped = find_layers(llama_tied)
    assert len(layers) == 14
    assert [s.fqn for s in skipped] == ["lm_head"]
    reason = skipped[0].reason
    assert "tied to model.embed_tokens.weight" in reason and "quantize_tied=True" in reason
    assert str(skipped[0]).startswith("lm_head: weight tied to model.embed_tokens.weight")


def test_quantize_tied_includes_it_as_one_unit(llama_tied):
    layers, skipped = find_layers(llama_tied, quantize_tied=True)
    assert skipped == [] and len(layers) == 15
    assert layers[-1].fqn == "lm_head" and layers[-1].tie_group == "model.embed_tokens.weight"


def test_tie_detected_by_shared_memory_not_just_identity(llama):
    # a different Parameter object viewing the same memory is a tie too
    llama.lm_head.weight = torch.nn.Parameter(llama.model.embed_tokens.weight.data)
    assert llama.lm_head.weight is not llama.model.embed_tokens.weight
    _, skipped = find_layers(llama)
    assert [s.fqn for s in skipped] == ["lm_head"]


def test_two_linears_sharing_a_weight_form_a_tie_group():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    m[2].weight = m[0].weight
    layers, skipped = find_layers(m)
    assert skipped == []
    assert [(x.fqn, x.tie_group) for x in layers] == [("0", "0.weight"), ("2", "0.weight")]


def test_include_exclude_and_regex(llama):
    mlp, _ = find_layers(llama, include=["*.mlp.*"])
    assert [x.fqn.rsplit(".", 1)[1] for x in mlp] == ["gate_proj", "up_proj", "down_proj"] * 2
    no0, _ = find_layers(llama, exclude=["model.layers.0.*", "lm_head"])
    assert len(no0) == 7 and all(x.block_index == 1 for x in no0)
    rx, _ = find_layers(llama, include=["re:self_attn\\.(q|k)_proj$"])
    assert len(rx) == 4
    both, _ = find_layers(llama, include=["*.mlp.*"], exclude=["*.down_proj"])
    assert len(both) == 4


def test_pattern_matching_nothing_is_an_error(llama):
    with pytest.raises(LayerSelectionError, match=r"include pattern '\*\.attention\.\*' matches no layer"):
        find_layers(llama, include=["*.attention.*"])
    with pytest.raises(LayerSelectionError, match="exclude pattern 'nope'"):
        find_layers(llama, exclude=["nope"])
    with pytest.raises(LayerSelectionError, match="not a valid regex"):
        find_layers(llama, include=["re:("])


def test_empty_selection_is_an_error(llama, llama_tied):
    with pytest.raises(LayerSelectionError, match="no quantizable layers selected"):
        find_layers(llama, include=["*.mlp.*"], exclude=["*.mlp.*"])
    with pytest.raises(LayerSelectionError, match="tied"):  # only the tied head was asked for
        find_layers(llama_tied, include=["lm_head"])
    with pytest.raises(LayerSelectionError, match="no Linear or Conv1D"):
        find_layers(torch.nn.Sequential(torch.nn.ReLU()))


def test_gpt2_conv1d_reported_out_in(gpt2):
    layers, skipped = find_layers(gpt2)
    assert [s.fqn for s in skipped] == ["lm_head"]  # GPT-2 ties lm_head to wte
    assert len(layers) == 8 and all(x.module_type == "Conv1D" for x in layers)
    by = {x.fqn: x for x in layers}
    assert by["transformer.h.0.attn.c_attn"].shape == (192, 64)  # weight stored (64, 192)
    assert by["transformer.h.1.mlp.c_fc"].shape == (256, 64)
    assert by["transformer.h.1.mlp.c_proj"].shape == (64, 256)
    assert by["transformer.h.1.mlp.c_proj"].block == "transformer.h.1"


def test_layerinfo_validation_and_dict_round_trip():
    x = LayerInfo("a.0.b", "Linear", 4, 8, 32, "a.0", 0)
    assert LayerInfo.from_dict(x.to_dict()) == x
    with pytest.raises(ValueError, match="module_type"):
        LayerInfo("a", "Conv2d", 4, 8, 32)
    with pytest.raises(ValueError, match="n_params"):
        LayerInfo("a", "Linear", 4, 8, 31)
