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
