"""The llama.cpp target against llama.cpp itself (SmolLM2's GGUF, llama-cpp-python)."""

import os

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from bitalloc.allocator import llamacpp as lc  # noqa: E402
from bitalloc.kernels.formats import GGML_TYPES, FormatError, parse_scheme  # noqa: E402
from bitalloc.sensitivity import ggml  # noqa: E402


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    try:
        path = ggml.model_gguf_path("smollm2")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no SmolLM2 GGUF: {e}")
    return lc.f32_source(path, tmp_path_factory.mktemp("src") / "src-f32.gguf")


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_storage_is_ggml_row_size():
    for name, (tid, block, nbytes, _) in GGML_TYPES.items():
        n = 256 * 6
        assert parse_scheme(name).storage_bits(3, n) == 3 * ggml.row_size(name, n) * 8
    assert parse_scheme("q4_k").bits_per_weight(8, 1536) == 4.5
    assert parse_scheme("q2_k").bits_per_weight(8, 1536) == 2.625
    assert parse_scheme("iq4_xs").bits_per_weight(8, 1536) == 4.25
    with pytest.raises(FormatError, match="divisible by 256"):
        parse_scheme("q4_k").storage_bits(576, 576)  # SmolLM2's 576-wide rows
    assert parse_scheme("iq4_nl").storage_bits(576, 576) == 576 * 18 * 18 * 8


def test_f32_source_is_lossless(src):
    """The F32 source holds exactly SmolLM2's weights: re-quantizing a Q4_1 tensor to q4_1 gives its bytes back."""
    orig = _tensors(ggml.model_gguf_path("smollm2"))
    t = _tensors(src)["blk.0.attn_q.weight"]
    assert t.tensor_type.name == "F32"
    w = np.array(t.data, dtype=np.float32)
    assert np.array_equal(ggml.quantize(w, "q4_1").reshape(-1), np.array(orig["blk.0.attn_q.weight"].data).reshape(-1))


def test_storage_script_finds_the_shipped_grid(src, monkeypatch):
    """experiments/llamacpp_storage.py on one of SmolLM2's shipped Q4_1 tensors: q4_1 rebuilds it
    exactly; q5_1 does too once ggml's imatrix-aware search runs (any positive importance), and
    not without it, where it is as lossy as q5_0: why llama.cpp's Q5_K presets, which fall back to
    q5_1 on 576-wide rows, look lossless with an imatrix and not without."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "experiments"))
    sys.modules.pop("llamacpp_storage", None)
    import llamacpp_storage

    name = "blk.0.attn_q.weight"
    w = llamacpp_storage.source_weights(str(src), [name])  # {name: (576, 576)}
    im = {name: np.random.default_rng(0).uniform(0.1, 2.0, 576).astype(np.float32)}
    rows = {(r["type"], r["imatrix"]): r for r in llamacpp_storage.measure(w, im, types=("q4_1", "q5_1", "q5_0"))}
    assert len(rows) == 6 and all(r["values"] == 576 * 576 for r in rows.values())
    for use_im in (False, True):
        assert rows[("q4_1", use_im)]["rel_err"] == 0.0 and rows[("q4_1", use_im)]["exact_fraction"] == 1.0
    assert rows[("q5_1", True)]["rel_err"] == 0.0 and rows[("q5_1", True)]["exact_fraction"] == 1.0
    plain = rows[("q5_1", False)]
    assert plain["exact_fraction"] < 0.1 and plain["rel_err"] > 0.5 * rows[("q5_0", False)]["rel_err"] > 0


@pytest.mark.parametrize("with_imatrix", [False, True])
def test_bytes_equal_llama_model_quantize(src, tmp_path, with_imatrix):
    """bitalloc's bytes of a tensor == the bytes llama_model_quantize writes for it (same type, same imatrix)."""
    types = {"blk.0.ffn_down.weight": "q4_k", "blk.0.attn_q.weight": "q5_0", "blk.1.ffn_down.weight": "q2_k",
             "blk.1.attn_v.weight": "iq4_nl", "blk.2.ffn_down.weight": "iq4_xs", "blk.2.attn_k.weight": "q4_1",
             "token_embd.weight": "q5_1"}
    if with_imatrix:
        types["blk.3.ffn_down.weight"] = "iq2_xs"  # imatrix-only
    st = _tensors(src)
    rng = np.random.default_rng(0)
    im = {n: rng.uniform(0.1, 3.0, size=int(st[n].shape[0])).astype(np.float32) for n in types} if with_imatrix else None
    out = lc.quantize_gguf(src, tmp_path / "m.gguf", types, imatrix=im)
    got = _tensors(out)
    for name, t in types.items():
        w = np.array(st[name].data, dtype=np.float32)
        mine = ggml.quantize(w, t, None if im is None else im[name])
        assert got[name].tensor_type.name.lower() == t
        assert np.array_equal(mine, np.array(got[name].data).reshape(-1)), name
    # the file is header + every tensor padded to the alignment
    lay = ggml.gguf_layout(out)
    size = lay["header_bytes"] + sum(-(-int(t.n_bytes) // 32) * 32 for t in got.values())
    assert os.path.getsize(out) == size


def test_imatrix_only_type_needs_an_imatrix(src, tmp_path):
    with pytest.raises(lc.LlamaCppError, match="needs an importance matrix"):
        lc.quantize_gguf(src, tmp_path / "m.gguf", {"blk.0.ffn_down.weight": "iq2_xs"})
    with pytest.raises(ggml.GGMLError, match="needs an importance matrix"):
        ggml.quantize(np.zeros((2, 256), np.float32), "iq2_s")
    assert not (tmp_path / "m.gguf").exists()


def test_imatrix_file_roundtrip(tmp_path):
    im = {"blk.0.attn_q.weight": np.linspace(0.1, 2, 576, dtype=np.float32),
          "token_embd.weight": np.full(576, 0.3, np.float32)}
    p = ggml.write_imatrix(tmp_path / "imatrix.gguf", im, dataset="x")
    back = ggml.read_imatrix(p)
    assert set(back) == set(im) and all(np.array_equal(back[k], im[k]) for k in im)
    r = gguf.GGUFReader(str(p))
    assert {"imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"} <= set(r.fields)


# ---------------------------------------------------------------------------------------
# a llama.cpp-target profile (synthetic tables on SmolLM2's real layers and GGUF), its plan,
# the exported GGUF, and perplexity in llama.cpp vs bitalloc's executor


@pytest.fixture(scope="module")
def smollm2():
    from bitalloc.sensitivity.models import load_model

    try:
        return load_model("smollm2")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no SmolLM2: {e}")


SCHEMES = ["q4_0", "q5_0", "q8_0", "q4_k", "q6_k", "iq4_nl"]


@pytest.fixture(scope="module")
def gguf_profile(smollm2):
    """A profile as build_llamacpp_profile makes it, with a made-up loss table (no calibration run)."""
    from bitalloc.sensitivity.layers import find_layers
    from bitalloc.sensitivity.llamacpp import gguf_budget
    from bitalloc.sensitivity.build import cost_table
    from bitalloc.sensitivity.profile import SensitivityProfile

    layers, skipped = find_layers(smollm2.model, quantize_tied=True)
    costs = cost_table(layers, SCHEMES)
    bpw = np.array([parse_scheme(s).weight.bits for s in SCHEMES], dtype=float)
    table = np.array([[np.nan if c == 0 else 2.0 ** -b for c, b in zip(row, bpw)] for row in costs])
    layout = ggml.gguf_layout(ggml.model_gguf_path("smollm2"))
    names, other_bits, gmeta = gguf_budget(layers, costs, layout)
    from bitalloc.sensitivity.models import fingerprint

    return SensitivityProfile(
        model={"spec": "smollm2", "kind": smollm2.kind, "description": "", "fingerprint": fingerprint(smollm2.model)},
        calibration={}, layers=layers, skipped=skipped, schemes=SCHEMES, cost_bits=costs, tables={"all": table},
        proxy=table, ref_values=table[:, :1], ref_schemes=["q4_0"], scales=np.ones(len(layers)), other_bits=other_bits,
        other_params=0, metadata={"target": "llamacpp", "gguf": gmeta, "quantizer": "ggml"})


def test_unfit_types_are_no_candidates(gguf_profile):
    from bitalloc.allocator.solve import AllocationError, solve

    plan = solve(gguf_profile, "120MB")
    for fqn, lp in plan.layers.items():
        assert lp.shape[1] % 256 == 0 or lp.scheme not in ("q4_k", "q6_k"), fqn
    with pytest.raises(AllocationError, match="q4_k is not a candidate for model.layers.0.self_attn.q_proj"):
        solve(gguf_profile, "120MB", pins={"model.layers.0.self_attn.q_proj": "q4_k"})


@pytest.mark.parametrize("budget", ["80MB", "115MB"])
def test_exported_gguf_has_the_predicted_size(gguf_profile, tmp_path, budget):
    from bitalloc.allocator.solve import solve

    plan = solve(gguf_profile, budget)
    predicted = plan.predicted["gguf"]["file_bytes"]
    assert predicted == plan.predicted["total_bytes"] <= float(budget[:-2]) * 1e6
    r = lc.export_gguf(plan, tmp_path / "m.gguf")
    assert os.path.getsize(tmp_path / "m.gguf") == predicted == r["bytes"]
    types = lc.gguf_tensor_types(tmp_path / "m.gguf")
    names = gguf_profile.metadata["gguf"]["tensor_names"]
    assert all(types[names[f]] == lp.scheme for f, lp in plan.layers.items())
    assert len({lp.scheme for lp in plan.layers.values()}) > 1  # a real mix
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_llamacpp_and_executor_perplexity_agree(gguf_profile, smollm2, tmp_path):
    """llama.cpp's perplexity of the exported GGUF and bitalloc's executor's (the ggml round
    trip in torch) on the same token windows agree within 1 % (llama.cpp also rounds the
    activations to 8 bits in its quantized dot products)."""
    import torch

    from bitalloc.allocator.evaluate import evaluate, windows_from_file
    from bitalloc.allocator.executor import apply
    from bitalloc.allocator.solve import solve

    plan = solve(gguf_profile, "90MB")
    lc.export_gguf(plan, tmp_path / "m.gguf")
    windows = windows_from_file(smollm2.tokenizer, "/work/shared/data/wikitext2-test.txt" if os.path.exists(
        "/work/shared/data/wikitext2-test.txt") else pytest.skip("no wikitext"), 64, 2)
    ours = evaluate(apply(smollm2.model, plan), windows, progress=False)
    theirs = lc.perplexity(tmp_path / "m.gguf", windows)
    assert theirs["tokens"] == ours.tokens
    # the per-window sums (for paired comparisons) add up to the mean
    assert len(theirs["window_nll"]) == 2 and sum(theirs["window_nll"]) / theirs["tokens"] == pytest.approx(theirs["nll"])
    assert abs(theirs["ppl"] / ours.ppl - 1) < 0.01, (theirs["ppl"], ours.ppl)
    # and the executor did change the weights (tied embedding included)
    assert not torch.equal(apply(smollm2.model, plan).model.embed_tokens.weight, smollm2.model.model.embed_tokens.weight)


def test_eval_gguf_compares_files_window_by_window(gguf_profile, tmp_path, capsys):
    """`bitalloc eval --gguf A --gguf B`: both perplexities by llama.cpp and B against A paired
    over the same windows (ratio, bootstrap interval, windows lower)."""
    import re

    from bitalloc.allocator.cli import main
    from bitalloc.allocator.solve import solve

    text = "/work/shared/data/wikitext2-test.txt"
    if not os.path.exists(text):
        pytest.skip("no wikitext")
    small, big = tmp_path / "small.gguf", tmp_path / "big.gguf"
    lc.export_gguf(solve(gguf_profile, "90MB"), small)
    lc.export_gguf(solve(gguf_profile, "120MB"), big)
    rc = main(["eval", "--gguf", str(small), "--gguf", str(big), "--text", text, "--windows", "3", "--seq-len", "32"])
    cap = capsys.readouterr()
    out = cap.out
    assert rc == 0, [l for l in cap.err.splitlines() if "error" in l.lower()][-3:]
    ppl = {m: float(v) for m, v in re.findall(r"^(small|big)\.gguf\s+\d+\s+([\d.]+)", out, re.M)}
    assert set(ppl) == {"small", "big"}, out
    ratio, lo, hi, wins = re.search(r"big\.gguf.*\s([\d.]+) \[([\d.]+), ([\d.]+)\] (\d)/3", out).groups()
    # the paired ratio over equal windows is the ratio of the two perplexities
    assert float(ratio) == pytest.approx(ppl["big"] / ppl["small"], rel=2e-4)
    assert float(lo) <= float(ratio) <= float(hi) and 0 <= int(wins) <= 3


def test_bad_input_one_line_errors(gguf_profile, tmp_path):
    from bitalloc.allocator.cli import main
    from bitalloc.allocator.solve import solve

    plan = solve(gguf_profile, "100MB")
    p = plan.save(tmp_path / "plan.json")
    rc = main(["export", str(p), "--to", "gguf", "--out", str(tmp_path / "no" / "dir" / "m.gguf")])
    assert rc == 2
    rc = main(["export", str(p), "--to", "gguf", "--out", str(tmp_path / "m.gguf"), "--model", "minilm"])
    assert rc == 2 and not (tmp_path / "m.gguf").exists()
    # a plan of the default (bitalloc) target is refused
    from dataclasses import replace

    other = replace(plan, predicted={k: v for k, v in plan.predicted.items() if k != "gguf"})
    with pytest.raises(lc.LlamaCppError, match="not made for the llama.cpp target"):
        lc.export_gguf(other, tmp_path / "m.gguf")
    with pytest.raises(FormatError, match="divisible by 256"):
        from bitalloc.allocator.plan import LayerPlan

        LayerPlan("model.layers.0.self_attn.q_proj", "q4_k", (576, 576), 0)


def test_llama_quantize_export(gguf_profile, tmp_path, capsys):
    from bitalloc.allocator.cli import main
    from bitalloc.allocator.solve import solve

    p = solve(gguf_profile, "100MB").save(tmp_path / "plan.json")
    assert main(["export", str(p), "--to", "llama-quantize", "--out", str(tmp_path / "lq")]) == 0
    lines = (tmp_path / "lq" / "tensor-types.txt").read_text().splitlines()
    assert len(lines) == 211 and lines[0].startswith("^") and "=" in lines[0]
    out = capsys.readouterr().out
    assert "llama-quantize --allow-requantize" in out and "--tensor-type-file" in out
