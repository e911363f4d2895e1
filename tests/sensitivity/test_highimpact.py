"""Saliency, split families, pair terms and GPTQ profiles (issue 5), on a tiny random model."""

import numpy as np
import pytest
import torch

from bitalloc.kernels.formats import split_family
from bitalloc.sensitivity.calibration import CalibrationSpec
from bitalloc.sensitivity.pairs import block_pairs, pair_item_count, pair_items, pair_matrices, pairs_from_values
from bitalloc.sensitivity.profile import ProfileError, SensitivityProfile
from bitalloc.sensitivity.build import build_profile
from bitalloc.sensitivity.saliency import SaliencyError, channel_saliency, fisher_diagonals, select_split_channels

CAL = CalibrationSpec(n_samples=2, seq_len=16)
ONE_BLOCK = ["re:layers\\.0\\.(self_attn\\.(q|o)_proj|mlp\\.down_proj)"]


def test_saliency_forms():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    X = torch.randn(64, 16) * torch.linspace(0.1, 3, 16)
    H = X.T @ X / 64
    h = channel_saliency(w, "hessian", H=H)
    assert torch.allclose(h, torch.diagonal(H) * w.pow(2).sum(0))
    o = channel_saliency(w, "obq", H=H, damp=0.0)
    inv = torch.linalg.inv(H.double()).diagonal()
    assert torch.allclose(o.double(), w.double().pow(2).sum(0) / inv, rtol=1e-4)
    F = torch.rand(8, 16)
    assert torch.allclose(channel_saliency(w, "fisher", fisher=F), (F * w * w).sum(0))
    with pytest.raises(SaliencyError):
        channel_saliency(w, "fisher")
    with pytest.raises(SaliencyError):
        channel_saliency(w, "magic", H=H)
    idx = select_split_channels(h, "w2g32z+h3r0.25", 16)
    assert idx.tolist() == sorted(torch.argsort(h, descending=True)[:4].tolist())
    assert select_split_channels(h, "w2g32z", 16) is None


def test_fisher_diagonals_tiny_model():
    from bitalloc.sensitivity.layers import find_layers
    from bitalloc.sensitivity.models import load_model

    lm = load_model("random:llama-tiny")
    layers, _ = find_layers(lm.model, ONE_BLOCK)
    ids = torch.randint(0, 100, (2, 12))
    F = fisher_diagonals(lm.model, layers, ids, batch_size=1)
    for layer in layers:
        w = lm.model.get_submodule(layer.fqn).weight
        assert F[layer.fqn].shape == w.shape and (F[layer.fqn] >= 0).all() and F[layer.fqn].sum() > 0
        assert w.grad is None and not w.requires_grad or w.grad is None


def test_pair_items_and_counts():
    class L:
        def __init__(self, fqn, block):
            self.fqn, self.block, self.tie_group = fqn, block, None

    layers = [L(f"b{b}.l{i}", f"b{b}") for b in range(30) for i in range(7)]
    pairs = block_pairs(layers)
    assert len(pairs) == 30 * 21
    fam = [s.name for s in split_family("w2g64z")]
    assert pair_item_count(len(pairs), 6, "full") == 22680 == len(pair_items(pairs, fam, "full"))
    assert pair_item_count(len(pairs), 6, "reduced") == 630 == len(pair_items(pairs, fam, "reduced"))
    assert pair_items(pairs[:1], fam, "reduced", "w2g64z")[0] == ("b0.l0|b0.l1", "w2g64z|w2g64z")


def test_reduced_pair_model_scaling():
    single = {("a", "s"): 4.0, ("a", "t"): 1.0, ("b", "s"): 9.0, ("b", "t"): 0.0}
    joint = {("a|b", "s|s"): 4.0 + 9.0 + 3.0}
    pr = pairs_from_values([("a", "b")], ["s", "t"], single, joint, "reduced", "s")
    assert pr["rho"]["a|b"] == pytest.approx(3.0 / 6.0)

    class P:
        pairs = pr
        schemes = ["s", "t"]
        fqns = ["a", "b"]

        def table(self, g):
            return np.array([[4.0, 1.0], [9.0, 0.0]])

        tables = {"all": None}

    M = pair_matrices(P())[("a", "b")]
    assert M[0, 0] == pytest.approx(3.0) and M[1, 0] == pytest.approx(0.5 * 1 * 3) and M[0, 1] == 0.0


@pytest.fixture(scope="module")
def pair_profile():
    return build_profile("random:llama-tiny", schemes=["w2g32z", "w2g32z+h3r0.1", "w4g32"], ref_schemes=["w2g32z"],
                         calibration=CAL, include=ONE_BLOCK, progress=False, measured=True, pairs="full",
                         pair_schemes=["w2g32z", "w2g32z+h3r0.1"], saliency="obq", quantizer="gptq")


def test_profile_records_saliency_pairs_quantizer(pair_profile, tmp_path):
    p = pair_profile
    assert p.metadata["saliency"] == "obq" and p.metadata["quantizer"] == "gptq"
    assert set(p.saliency) == set(p.fqns)
    assert p.pairs["model"] == "full" and len(p.pairs["terms"]) == 3 and p.pairs["items"] == 12
    q = SensitivityProfile.load(p.save(tmp_path / "p.json"))
    assert q.pairs == p.pairs and all(np.array_equal(q.saliency[f], p.saliency[f]) for f in p.fqns)
    d = p.to_dict()
    d.pop("saliency"), d.pop("pairs")  # an old profile still loads
    assert SensitivityProfile.from_dict(d).pairs is None
    d["pairs"] = {"model": "full", "schemes": ["w2g32z"], "terms": {"nope|x": [[0.0]]}}
    with pytest.raises(ProfileError):
        SensitivityProfile.from_dict(d)


def test_pairs_need_measured():
    with pytest.raises(ProfileError, match="measured"):
        build_profile("random:llama-tiny", schemes=["w2g32z"], ref_schemes=["w2g32z"], calibration=CAL,
                      include=ONE_BLOCK, progress=False, pairs="reduced")


def test_pair_items_resume_from_checkpoint(tmp_path):
    kw = dict(schemes=["w2g32z", "w4g32"], ref_schemes=["w2g32z"], calibration=CAL, include=ONE_BLOCK,
              progress=False, measured=True, pairs="reduced", checkpoint=tmp_path / "c.jsonl")
    a = build_profile("random:llama-tiny", **kw)
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 3 * 2 + 3  # header, singles, joint items
    b = build_profile("random:llama-tiny", **kw)
    assert b.metadata["measure"]["computed"] == 0 and b.pairs == a.pairs
