"""The clip search's memo (kernels.param_memo): the same results, searched once per weight and format."""

from __future__ import annotations

import pytest
import torch

from bitalloc.kernels import quant as Q
from bitalloc.kernels.param_memo import PARAMS, ParamMemo, weight_digest


@pytest.fixture(autouse=True)
def _fresh_memo():
    PARAMS.clear()
    yield
    PARAMS.clear()


def _counting(monkeypatch) -> list:
    calls = []
    real = Q.group_params
    monkeypatch.setattr(Q, "group_params", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _uncached(w, fmt, packed=False):
    """The result with the memo bypassed (an empty memo that keeps nothing)."""
    import bitalloc.kernels.quant as quant

    saved = quant.PARAMS
    quant.PARAMS = ParamMemo(0)
    try:
        return Q.dequantize(Q.quantize(w, fmt)) if packed else Q.fake_quantize(w, fmt)
    finally:
        quant.PARAMS = saved


def test_fake_quantize_then_pack_search_once_and_match(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(96, 160) * torch.rand(1, 160) * 3
    calls = _counting(monkeypatch)
    for fmt in ("w3g32z", "w4g64", "fp4g32"):
        first = Q.fake_quantize(w, fmt)
        again = Q.fake_quantize(w.clone(), fmt)  # another tensor, the same content: found by its digest
        packed = Q.dequantize(Q.quantize(w, fmt))  # packing reuses the search too
        assert torch.equal(first, again) and torch.equal(first, packed)
        assert torch.equal(first, _uncached(w, fmt)) and torch.equal(packed, _uncached(w, fmt, packed=True))
    assert len(calls) == 3 + 3 + 3  # one search per format in the memoized calls, one per uncached call
    assert PARAMS.hits == 6


def test_in_place_change_is_searched_again(monkeypatch):
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    before = Q.fake_quantize(w, "w3g32z")
    d = weight_digest(w)
    w.mul_(2.5)  # the version counter moves: the old digest is not trusted
    assert weight_digest(w) != d
    after = Q.fake_quantize(w, "w3g32z")
    assert torch.equal(after, _uncached(w, "w3g32z")) and not torch.equal(after, before)


def test_row_pieces_of_a_large_weight(monkeypatch):
    """Fake quantization of a weight past FAKE_QUANT_PIECE works piece by piece; each piece is
    its own entry and the result equals the unpieced, uncached one."""
    monkeypatch.setattr(Q, "FAKE_QUANT_PIECE", 64 * 40)
    torch.manual_seed(2)
    w = torch.randn(150, 64)
    a = Q.fake_quantize(w, "w4g32z")
    assert len(PARAMS) == 4  # ceil(150 / 40) pieces
    assert torch.equal(a, Q.fake_quantize(w, "w4g32z")) and PARAMS.hits == 4
    assert torch.equal(a, Q.dequantize(Q.quantize(w, "w4g32z")))  # whole-weight key: searched anew, same values


def test_formats_without_a_search_and_the_bound():
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    Q.fake_quantize(w, "w8")
    Q.fake_quantize(w, "fp8")
    assert len(PARAMS) == 0  # no clip search: nothing to keep, nothing hashed
    assert len(ParamMemo(max_bytes=0)) == 0


def test_slabs_and_the_bound(monkeypatch):
    """Entries share slabs; past the bound the oldest slab goes with all its entries; values
    come back exactly, as float32 scales and int64 zero points."""
    from bitalloc.kernels import param_memo

    monkeypatch.setattr(param_memo, "SLAB_BYTES", 200)  # two (16, 2, 1) entries with zeros (96 bytes each) a slab
    small = ParamMemo(max_bytes=400)  # two slabs
    s = torch.full((16, 2, 1), 0.5)
    z = torch.arange(32, dtype=torch.int64).view(16, 2, 1)
    for k in range(5):
        small.put(k, s * (k + 1), z if k % 2 else None)
    assert len(small) == 3 and small.nbytes == 400  # slab {0, 1} dropped, {2, 3} and {4} kept
    assert small.get(0) is None and small.get(1) is None
    for k in (2, 3, 4):
        got_s, got_z = small.get(k)
        assert got_s.dtype == torch.float32 and torch.equal(got_s, s * (k + 1))
        assert (got_z is None) if k % 2 == 0 else (got_z.dtype == torch.int64 and torch.equal(got_z, z))
    with pytest.raises(AssertionError, match="float16"):
        small.put("x", torch.full((2, 1, 1), 0.1), None)
    small.put("big", torch.full((101, 1, 1), 0.5), None)  # larger than a slab: not kept
    assert small.get("big") is None


def test_no_digest_for_inference_tensors():
    with torch.inference_mode():
        w = torch.randn(8, 32)
    assert weight_digest(w) is None
    assert torch.equal(Q.fake_quantize(w, "w3g32z"), _uncached(w, "w3g32z"))
