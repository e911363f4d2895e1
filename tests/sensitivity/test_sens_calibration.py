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
    generate_many,
    load_calibration,
    prefetch_generated,
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


def _hf_sampled(model, tok, n, seq_len, seed, temperature, top_k, batch_size=8):
    """What transformers' own sampling gives under torch.manual_seed(seed), batch by batch."""
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, n, batch_size):
            prompt = torch.full((min(batch_size, n - i), 1), tok.bos_token_id, dtype=torch.long)
            rows.append(model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                       temperature=temperature, top_k=top_k, top_p=1.0, max_new_tokens=seq_len - 1,
                                       min_new_tokens=seq_len - 1, pad_token_id=tok.pad_token_id))
    return torch.cat(rows)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 50), (0.7, 0), (1.3, 5)])
def test_generated_equals_transformers_sampling(llama, temperature, top_k):
    """generate_calibration samples outside generate (one generator per spec) and gets, token
    for token, what generate(do_sample=True) gives under torch.manual_seed: 10 rows are two
    batches, so the generator carries over between batches as the global one did."""
    tok = ByteTokenizer(256)
    got = generate_calibration(llama, tok, 10, 16, seed=3, temperature=temperature, top_k=top_k)
    assert torch.equal(got, _hf_sampled(llama, tok, 10, 16, 3, temperature, top_k))


def test_generated_together_equals_alone(llama):
    """Specs sampled in one decode pass (rows of both in each forward) get their own tokens;
    prefetch keeps them for load_calibration, which then does not sample again."""
    from bitalloc.sensitivity import calibration as C

    tok = ByteTokenizer(256)
    a = CalibrationSpec("generated", None, 10, 16, seed=0)
    b = CalibrationSpec("generated", None, 3, 16, seed=1234, top_k=7)
    c = CalibrationSpec("generated", None, 2, 9, seed=1)  # another length: its own pass
    alone = [generate_calibration(llama, tok, s.n_samples, s.seq_len, s.seed, s.temperature, s.top_k) for s in (a, b, c)]
    together = generate_many(llama, tok, [a, b, c])
    for x, y in zip(alone, together):
        assert torch.equal(x, y)
    prefetch_generated(llama, tok, [a, b])
    calls = []
    real = C.generate_many
    C.generate_many = lambda *args, **kw: calls.append(1) or real(*args, **kw)
    try:
        assert torch.equal(load_calibration(a, llama, tok), alone[0])
        assert torch.equal(load_calibration(b, llama, tok), alone[1])
        prefetch_generated(llama, tok, [a, b])  # both kept: nothing to sample
    finally:
        C.generate_many = real
    assert calls == []


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
