"""Bit-plane packing: exact round trips, the documented layout, and input validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.kernels.formats import INT_BITS, bit_planes, packed_words, plane_words
from bitalloc.kernels.packing import pack_codes, plane_layout, unpack_codes


def _pack_slow(codes: list[list[int]], bits: int) -> list[list[int]]:
    """Scalar reference of the documented layout (independent of the vectorised code)."""
    planes = bit_planes(bits)
    out = []
    for row in codes:
        words = []
        for p, w in enumerate(planes):
            shift, per = sum(planes[p + 1 :]), 32 // w
            plane = [0] * plane_words(len(row), w)
            for j, c in enumerate(row):
                plane[j // per] |= ((c >> shift) & ((1 << w) - 1)) << ((j % per) * w)
            words += [x - (1 << 32) if x >= 1 << 31 else x for x in plane]  # int32 wrap
        out.append(words)
    return out


def _random_codes(rows: int, n: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 2**bits, (rows, n), generator=g)
    if n:
        c[:, -1] = 2**bits - 1  # top bits set somewhere in every row
    return c


@pytest.mark.parametrize("bits", sorted(set(INT_BITS) | {1, 7}))
@pytest.mark.parametrize("n", [1, 7, 31, 33, 576, 577])
@pytest.mark.parametrize("rows", [1, 3])
def test_round_trip(bits, n, rows):
    codes = _random_codes(rows, n, bits, seed=bits * 1000 + n)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (rows, packed_words(n, bits))
    back = unpack_codes(words, bits, n)
    assert back.dtype == torch.uint8 and back.shape == (rows, n)
    assert torch.equal(back.to(torch.int64), codes)


@pytest.mark.parametrize("bits", sorted(set(INT_BITS) | {1, 7}))
def test_matches_scalar_reference_layout(bits):
    codes = _random_codes(3, 45, bits, seed=bits)
    assert pack_codes(codes, bits).tolist() == _pack_slow(codes.tolist(), bits)


def test_three_bit_example_by_hand():
    # 3-bit = 2-bit plane (code >> 1) then 1-bit plane (code & 1), little-endian fields
    codes = torch.tensor([[5, 2, 7]])
    hi = 2 | (1 << 2) | (3 << 4)  # 5>>1=2, 2>>1=1, 7>>1=3
    lo = 1 | (0 << 1) | (1 << 2)  # 5&1, 2&1, 7&1
    assert pack_codes(codes, 3).tolist() == [[hi, lo]]


def test_sign_bit_of_int32_words():
    assert pack_codes(torch.ones(1, 32, dtype=torch.int64), 1).tolist() == [[-1]]
    assert pack_codes(torch.full((1, 8), 15), 4).tolist() == [[-1]]
    top = torch.zeros(1, 8, dtype=torch.int64)
    top[0, 7] = 8  # 8 << 28 == 2**31: only the sign bit
    words = pack_codes(top, 4)
    assert words.tolist() == [[-(2**31)]]
    assert unpack_codes(words, 4, 8).tolist() == top.tolist()
    # 8-bit: code 255 in the top byte
    w8 = pack_codes(torch.tensor([[0, 0, 0, 255]]), 8)
    assert w8.tolist() == [[-(2**24)]] and unpack_codes(w8, 8, 4).tolist() == [[0, 0, 0, 255]]


def test_padding_is_zero_codes():
    words = pack_codes(torch.full((2, 5), 3), 2)  # 5 of 16 fields used
    assert words.tolist() == [[int("1111111111", 2)]] * 2


def test_plane_layout():
    assert plane_layout(576, 3) == ((2, 1, 0, 36), (1, 0, 36, 18))
    assert plane_layout(577, 6) == ((4, 2, 0, 73), (2, 0, 73, 37))
    assert plane_layout(10, 8) == ((8, 0, 0, 3),)
    for bits in range(1, 9):
        layout = plane_layout(100, bits)
        assert sum(w for w, *_ in layout) == bits
        assert layout[-1][2] + layout[-1][3] == packed_words(100, bits)


def test_empty_shapes():
    assert pack_codes(torch.zeros(0, 5, dtype=torch.int64), 3).shape == (0, packed_words(5, 3))
    assert pack_codes(torch.zeros(2, 0, dtype=torch.int64), 3).shape == (2, 0)
    assert unpack_codes(torch.zeros(2, 0, dtype=torch.int32), 3, 0).shape == (2, 0)


def test_accepts_any_integer_dtype():
    codes = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        assert torch.equal(pack_codes(codes.to(dtype), 2), pack_codes(codes, 2))


@pytest.mark.parametrize(
    "codes, bits, match",
    [
        (torch.tensor([[4]]), 2, r"codes must be in \[0, 4\)"),
        (torch.tensor([[-1]]), 4, r"codes must be in \[0, 16\)"),
        (torch.tensor([[1.0]]), 4, "integer dtype"),
        (torch.tensor([1, 2]), 4, "2-D"),
        (torch.tensor([[1]]), 0, r"bits must be an int in \[1, 8\]"),
        (torch.tensor([[1]]), 9, r"bits must be an int in \[1, 8\]"),
    ],
)
def test_pack_rejects_bad_input(codes, bits, match):
    with pytest.raises(ValueError, match=match):
        pack_codes(codes, bits)


def test_unpack_rejects_bad_input():
    words = pack_codes(torch.zeros(2, 10, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="words per row"):
        unpack_codes(words, 3, 100)
    with pytest.raises(ValueError, match="int32"):
        unpack_codes(words.to(torch.int64), 3, 10)
    with pytest.raises(ValueError, match="non-negative"):
        unpack_codes(words, 3, -1)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(0, 3), n=st.integers(0, 70), seed=st.integers(0, 2**16))
def test_round_trip_property(bits, rows, n, seed):
    codes = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, n).to(torch.int64), codes)
