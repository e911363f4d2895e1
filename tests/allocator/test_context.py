"""A stored profile back on its model (allocator.context): the calibration rebuilt and checked,
other rows of the same text, and the peer context built from both."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import bitalloc
from bitalloc.allocator.context import peer_context, profile_calibration, profile_quantizer
from bitalloc.sensitivity.calibration import tokens_sha256


@pytest.fixture(scope="module")
def text_profile(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctx")
    text = d / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and more{i % 13}." for i in range(3000)))
    prof = bitalloc.profile("random:llama-tiny", calibration=str(text), n_samples=4, seq_len=32, kl_samples=1,
                            schemes=["w3g128z", "w4g128z"], out=d / "profile.json", progress=False, log=None)
    return prof, d / "profile.json", text


def test_the_profile_calibration_is_rebuilt_and_checked(text_profile, tmp_path):
    prof, _path, text = text_profile
    loaded = bitalloc.load("random:llama-tiny", log=None)
    ids = profile_calibration(loaded, prof)
    assert ids.shape == (4, 32) and tokens_sha256(ids) == prof.calibration["tokens_sha256"]
    moved = tmp_path / "moved.txt"
    moved.write_text(text.read_text())
    assert torch.equal(profile_calibration(loaded, prof, source=str(moved)), ids)  # the same text elsewhere
    moved.write_text(text.read_text().replace(" and ", " or "))  # another text at the same place
    with pytest.raises(ValueError, match="cannot be reproduced"):
        profile_calibration(loaded, prof, source=str(moved))
    more = profile_calibration(loaded, prof, n_samples=6, seq_len=16, seed=3)  # other rows: no hash to check
    assert more.shape == (6, 16)
    bad = dataclasses.replace(prof, calibration={**prof.calibration, "source": "inline"})
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        profile_calibration(loaded, bad)


def test_peer_context_takes_the_profile_rows_quantizer_and_layers(text_profile):
    prof, path, _text = text_profile
    ctx, data = peer_context("random:llama-tiny", path, rows=3, seq_len=20, seed=5)
    assert ctx.seed == 5
    assert data.shape == (4, 32)  # every calibration row comes back, for the caller's own stages
    assert len(ctx.batches) == 3 and all(b["input_ids"].shape == (1, 20) for b in ctx.batches)
    assert torch.equal(torch.cat([b["input_ids"] for b in ctx.batches]), data[:3, :20])
    assert ctx.quantizer == "rtn" and ctx.hessians is None
    assert ctx.n_layers == len(prof.layers) and list(ctx.schemes) == list(prof.schemes)
    ctx, _ = peer_context("random:llama-tiny", prof, data=data[2:], rows=99)  # rows are clipped to the data
    assert len(ctx.batches) == 2


def test_profile_quantizer_refuses_what_it_cannot_quantize(text_profile):
    prof, _path, _text = text_profile
    other = dataclasses.replace(prof, metadata={**prof.metadata, "quantizer": "awq"})
    with pytest.raises(ValueError, match="a peer method supports the rtn and gptq quantizers' profiles.*'awq'"):
        profile_quantizer("random:llama-tiny", other, "a peer method")
    with pytest.raises(ValueError, match="needs a causal LM"):
        profile_quantizer("random:bert-tiny", prof, "a Fisher table")


def test_peer_context_quantizes_split_schemes_on_the_profile_channels(text_profile, tmp_path):
    """A peer scores the weights bitalloc's plan would run: a split scheme keeps the channels
    the profile stored (chosen from its saliency), not channels chosen again without it."""
    from bitalloc.sensitivity.proxy import QUANTIZER_FNS, as_scheme, quantize_layer_weight

    split = "w3g128z+h4csr0.25"
    prof = bitalloc.profile("random:llama-tiny", calibration=str(text_profile[2]), n_samples=2, seq_len=16, kl_samples=1,
                            schemes=["w3g128z", split], out=tmp_path / "p.json", progress=False, log=None)
    ctx, _ = peer_context("random:llama-tiny", prof)
    assert ctx.saliency is not None and set(ctx.saliency) == {layer.fqn for layer in prof.layers}
    j = list(ctx.schemes).index(split)
    moved = 0
    for i, layer in enumerate(prof.layers):
        idx = prof.high_channels(i, split)
        assert idx, f"{layer.fqn}: the profile stored no high channels for {split}"
        want = QUANTIZER_FNS["rtn"](ctx.weight(i), as_scheme(split), None, torch.tensor(idx))
        assert torch.equal(ctx.quantized(i, j), want.to(torch.float32)), layer.fqn
        plain = quantize_layer_weight(ctx.weight(i), split)  # channels chosen again, without the profile
        moved += not torch.equal(plain.to(torch.float32), want.to(torch.float32))
    assert moved > 0, "the profile's channels never differed from the saliency-free choice: the test shows nothing"
