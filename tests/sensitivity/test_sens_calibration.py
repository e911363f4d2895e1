from __future__ import annotations

import pytest
import torch

from bitalloc.sensitivity.calibration import (
    CalibrationError,
    CalibrationSpec,
    as_batches,
    calibration_from_file,
    calibration_from_sentences,
    calibration_from_text,
    generate_calibration,
    load_calibration,
)
from bitalloc.sensitivity.models import ByteTokenizer

TOK = ByteTokenizer(256 + 3)
TEXT = "".join(chr(ord("a") + int(v)) for v in torch.randint(0, 26, (1000,), generator=torch.Generator().manual_seed(0)))  # 1000 tokens


def test_windows_shape_order_and_no_overlap():
    x = calibration_from_text(TOK, TEXT, n_samples=5, seq_len=64, seed=3)
    assert x.shape == (5, 64) and x.dtype == torch.long
    full = torch.tensor(TOK.encode(TEXT))
    starts = []
    for row in x:  # each row is a contiguous window of the text
        s = next(i for i in range(len(full) - 63) if torch.equal(full[i : i + 64], row))
        starts.append(s)
    assert starts == sorted(starts)
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))


def test_windows_are_seeded():
    a = calibration_from_text(TOK, TEXT, 4, 32, seed=0)
    assert torch.equal(a, calibration_from_text(TOK, TEXT, 4, 32, seed=0))
    assert not torch.equal(a, calibration_from_text(TOK, TEXT, 4, 32, seed=1))


def test_exact_fit_uses_every_token():
    x = calibration_from_text(TOK, TEXT[:256], 4, 64)
    assert torch.equal(x.reshape(-1), torch.tensor(TOK.encode(TEXT[:256])))


def test_too_short_and_empty_text():
    with pytest.raises(CalibrationError, match=r"has 100 tokens, needs at least 128 \(2 samples x 64 tokens\)"):
        calibration_from_text(TOK, TEXT[:100], 2, 64)
    with pytest.raises(CalibrationError, match="empty"):
        calibration_from_text(TOK, "  \n", 2, 64)


def test_file(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(TEXT, encoding="utf-8")
    assert torch.equal(calibration_from_file(TOK, p, 3, 50, seed=2), calibration_from_text(TOK, TEXT, 3, 50, seed=2))
    with pytest.raises(CalibrationError, match="does not exist"):
        calibration_from_file(TOK, tmp_path / "missing.txt", 3, 50)
    with pytest.raises(CalibrationError, match="c.txt: calibration text has 1000 tokens"):
        calibration_from_file(TOK, p, 30, 50)


def test_spec_validation_and_describe(tmp_path):
    with pytest.raises(CalibrationError, match="source must be one of"):
        CalibrationSpec(source="web")
    with pytest.raises(CalibrationError, match="needs a path"):
        CalibrationSpec(source="file")
    with pytest.raises(CalibrationError, match="n_samples"):
        CalibrationSpec(n_samples=0)
    p = tmp_path / "c.txt"
    p.write_text("hello")
    d = CalibrationSpec("file", str(p), 2, 8).describe()
    assert d["source"] == "file" and d["file_bytes"] == 5 and len(d["file_sha256"]) == 64
    assert CalibrationSpec().describe()["top_k"] == 50


def test_generated_is_seeded_and_full_length(llama):
    tok = ByteTokenizer(256)
    a = generate_calibration(llama, tok, n_samples=3, seq_len=12, seed=5, batch_size=2)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert (a[:, 0] == tok.bos_token_id).all()
    b = generate_calibration(llama, tok, n_samples=3, seq_len=12, seed=5, batch_size=2)
    assert torch.equal(a, b)
    c = generate_calibration(llama, tok, n_samples=3, seq_len=12, seed=6, batch_size=2)
    assert not torch.equal(a, c)


def test_generated_keeps_caller_rng(llama):
    torch.manual_seed(9)
    expected = torch.rand(2)
    torch.manual_seed(9)
    generate_calibration(llama, ByteTokenizer(256), 2, 6, seed=0)
    assert torch.equal(torch.rand(2), expected)


def test_sentences_and_batches(bert):
    tok = ByteTokenizer(256)
    d = calibration_from_sentences(tok, ["a cat", "the dog sat", ""], max_len=8)
    assert d["input_ids"].shape == (2, 8) and d["attention_mask"].sum().item() == 5 + 8
    d2 = load_calibration(CalibrationSpec(source="sentences", n_samples=4, seq_len=16), bert, tok, "encoder")
    assert d2["input_ids"].shape[0] == 4
    bs = as_batches(d2, 3)
    assert [b["input_ids"].shape[0] for b in bs] == [3, 1] and "attention_mask" in bs[0]
    ids = torch.zeros(10, 4, dtype=torch.long)
    assert [b["input_ids"].shape[0] for b in as_batches(ids, 4)] == [4, 4, 2]
    assert len(as_batches([ids[:2], {"input_ids": ids[:3]}])) == 2
    with pytest.raises(CalibrationError):
        as_batches([], 2)
