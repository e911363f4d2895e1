"""One-line errors of the llama.cpp target that need no model run."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from bitalloc.allocator.cli import main  # noqa: E402


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("bitalloc: error:"), err
    return err


def test_profile_refuses_non_ggml_scheme(capsys, tmp_path):
    err = _err(capsys, ["profile", "--target", "llamacpp", "--schemes", "q4_k,w4g128", "--out", str(tmp_path / "p.json")])
    assert "'w4g128' is not a ggml type" in err


def test_profile_refuses_imatrix_only_type_without_imatrix(capsys, tmp_path):
    err = _err(capsys, ["profile", "--target", "llamacpp", "--no-imatrix", "--schemes", "q4_0,iq2_xs",
                        "--out", str(tmp_path / "p.json")])
    assert "iq2_xs needs an importance matrix" in err


def test_profile_refuses_include(capsys, tmp_path):
    err = _err(capsys, ["profile", "--target", "llamacpp", "--include", "*.mlp.*", "--out", str(tmp_path / "p.json")])
    assert "use pins" in err


def test_profile_refuses_unsupported_architecture(capsys, tmp_path):
    p = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(p), arch="gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    err = _err(capsys, ["profile", "--target", "llamacpp", "--model", str(p), "--out", str(tmp_path / "p.json")])
    assert "architecture 'gpt2' is not supported" in err


def test_profile_refuses_a_transformers_directory(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    err = _err(capsys, ["profile", "--target", "llamacpp", "--model", str(tmp_path), "--out", str(tmp_path / "p.json")])
    assert "needs a .gguf model" in err


def test_eval_gguf_missing_file(capsys, tmp_path):
    err = _err(capsys, ["eval", "--gguf", str(tmp_path / "none.gguf"), "--text", __file__, "--windows", "1",
                        "--seq-len", "8"])
    assert "does not exist" in err


def test_export_refuses_missing_plan(capsys, tmp_path):
    err = _err(capsys, ["export", str(tmp_path / "plan.json"), "--to", "gguf", "--out", str(tmp_path / "m.gguf")])
    assert "does not exist" in err
