"""Formats and schemes: exact storage accounting, names, validation, and RTN behaviour."""

import subprocess
import sys

import pytest
import torch

from bitalloc.kernels.formats import (
    FP16,
    GROUP_SIZES,
    INT_BITS,
    Format,
    FormatError,
    Scheme,
    bit_planes,
    index_bits,
    n_high_channels,
    packed_words,
    parse_format,
    parse_scheme,
)
from bitalloc.kernels.quant import fake_quantize, quantize


def _rel_err(w, fmt):
    return float((fake_quantize(w, fmt) - w).pow(2).sum() / w.pow(2).sum())


@pytest.fixture(scope="module")
def gauss():
    return torch.randn(64, 576, generator=torch.Generator().manual_seed(0))


# -- storage accounting ----------------------------------------------------------------


def test_bit_planes_and_words():
    assert [bit_planes(b) for b in INT_BITS] == [(2,), (2, 1), (4,), (4, 1), (4, 2), (8,)]
    assert packed_words(576, 3) == 36 + 18  # 3 bits per code, no waste
    assert packed_words(577, 3) == 37 + 19  # each plane padded to a whole word
    assert packed_words(9, 3) == 2


def test_storage_bits_w4g128_576():
    # codes: 576 rows x 72 words; scales: 5 groups (4x128 + 64) of float16
    assert parse_format("w4g128").storage_bits(576, 576) == 576 * 72 * 32 + 576 * 5 * 16


def test_storage_bits_w3g64z_576():
    codes = 576 * (36 + 18) * 32  # 2-bit plane 36 words + 1-bit plane 18 words per row
    scales = 576 * 9 * 16
    zeros = 576 * packed_words(9, 3) * 32  # 9 zero-points of 3 bits: one word per plane
    assert packed_words(9, 3) == 2
    assert parse_format("w3g64z").storage_bits(576, 576) == codes + scales + zeros


def test_storage_bits_other_formats():
    assert FP16.storage_bits(10, 33) == 10 * 33 * 16
    assert parse_format("w8").storage_bits(10, 33) == 10 * 9 * 32 + 10 * 16  # per channel
    assert parse_format("w8z").storage_bits(10, 33) == 10 * 9 * 32 + 10 * 16 + 10 * 32
    assert parse_format("fp4g32").storage_bits(7, 40) == 7 * 5 * 32 + 7 * 2 * 16
    assert parse_format("fp8g128").storage_bits(3, 129) == 3 * 33 * 32 + 3 * 2 * 16
    assert parse_format("w6g256z").storage_bits(1, 257) == (33 + 17) * 32 + 2 * 16 + 2 * 32  # 4-bit plane 33 words, 2-bit 17
    assert parse_format("w4g128").storage_bits(0, 576) == 0
    assert parse_format("w4g128").storage_bits(576, 0) == 0
    with pytest.raises(FormatError, match="non-negative"):
        parse_format("w4").storage_bits(-1, 4)


def test_storage_bits_split():
    s = parse_scheme("w4g128+h8r0.05")
    k = n_high_channels(576, 0.05)
    assert k == 29  # round(28.8)
    low = 576 * 69 * 32 + 576 * 5 * 16  # 547 columns: 69 words, 5 groups
    high = 576 * 8 * 32 + 576 * 1 * 16  # 29 columns of 8 bits: 8 words, 1 group
    assert s.storage_bits(576, 576) == low + high + 29 * 16
    assert parse_scheme("w4g128+h16r0.05").storage_bits(576, 576) == low + 576 * 29 * 16 + 29 * 16
    assert index_bits(32768) == 16 and index_bits(32769) == 32
    assert n_high_channels(10, 0.01) == 1  # at least one channel when r > 0


def test_activation_does_not_change_storage():
    assert parse_scheme("w8a8").storage_bits(64, 64) == parse_scheme("w8").storage_bits(64, 64)


# -- names -----------------------------------------------------------------------------


def _all_formats():
    fs = [FP16]
    for g in (None, *GROUP_SIZES):
        fs += [Format("int", b, g, sym) for b in INT_BITS for sym in (True, False)]
        fs += [Format("fp8_e4m3", 8, g), Format("fp4_e2m1", 4, g)]
    return fs


def test_format_names_round_trip():
    for f in _all_formats():
        assert parse_format(f.name) == f, f.name


def test_scheme_names_round_trip():
    n = 0
    for f in _all_formats():
        acts = ("a16",) if f.kind == "fp16" else ("a16", "a8", "af8")
        for act in acts:
            s = Scheme(f, act)
            assert parse_scheme(s.name) == s, s.name
            n += 1
            if f.kind != "int":
                continue
            for hb in (8, 16) if f.bits < 8 else (16,):
                highs = [FP16] if hb == 16 else [Format("int", hb, g, sym) for g in (None, *GROUP_SIZES)
                                                 for sym in (True, False)]
                for high in highs:
                    for r in (0.01, 0.05, 0.125, 0.5):
                        s = Scheme(f, act, high, r)
                        assert parse_scheme(s.name) == s, s.name
                        n += 1
    assert n > 500
    assert parse_scheme("w3g64z+h4r0.05").name == "w3g64z+h4r0.05"
    # the high part inherits the low part's grouping and symmetry unless it names its own
    assert parse_scheme("w3g64z+h4r0.05").high == parse_format("w4g64z")
    assert parse_scheme("w2g64z+h3csr0.05").high == parse_format("w3")
    assert parse_scheme("w2g64z+h3g128r0.05").high == parse_format("w3g128z")
    assert parse_scheme("w4g128+h8zr0.05").high == parse_format("w8g128z")
    assert parse_scheme("w2g64z+h3g64zr0.05").name == "w2g64z+h3r0.05"  # canonical: only what differs
    assert parse_scheme(" w8a8 ") == Scheme(parse_format("w8"), "a8")
    assert str(parse_scheme("w4g128af8")) == "w4g128af8"


@pytest.mark.parametrize(
    "name, match",
    [
        ("", "empty name"),
        ("w7g128", "integer bits must be one of"),
        ("w4g100", "group_size must be one of"),
        ("w16", "integer bits must be one of"),
        ("fp16g128", "unknown format"),
        ("fp8z", "unknown format"),
        ("q9_k", "unknown scheme .q9_k.: expected"),
        ("w4g128a4", "unknown"),
        ("fp16a8", "activation quantization needs a quantized weight"),
        ("w4g128+h8r0", "a split needs both"),
        ("w4g128+h8r1", r"split ratio must be in \(0, 1\)"),
        ("w4g128+h8r1.2.3", "bad ratio"),
        ("w4g128+h7r0.1", "high part: integer bits must be one of"),
        ("fp8g128+h8r0.1", "a split needs an integer low part"),
        ("fp16+h16r0.1", "fp16 layers have no high-impact split"),
    ],
)
def test_bad_names_raise_format_error(name, match):
    with pytest.raises(FormatError, match=match):
        parse_scheme(name)


def test_format_validation():
    with pytest.raises(FormatError, match="kind"):
        Format("int8")
    with pytest.raises(FormatError, match="fp8_e4m3 has 8 bits"):
        Format("fp8_e4m3", 4)
    with pytest.raises(FormatError, match="symmetric only"):
        Format("fp4_e2m1", 4, 32, symmetric=False)
    with pytest.raises(FormatError, match="fp16 has no group_size"):
        Format("fp16", 16, 128)
    with pytest.raises(FormatError, match="activation must be one of"):
        Scheme(parse_format("w4"), "a4")
    assert issubclass(FormatError, ValueError)


# -- round-to-nearest behaviour ---------------------------------------------------------


@pytest.mark.parametrize("group", [None, 128, 32])
@pytest.mark.parametrize("sym", [True, False])
def test_error_decreases_with_bits(gauss, group, sym):
    errs = [_rel_err(gauss, Format("int", b, group, sym)) for b in INT_BITS]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-4 and errs[0] > 1e-2
    # fp8 sits near int6-int8, fp4 near int3-int4 on Gaussian weights
    fp8 = _rel_err(gauss, Format("fp8_e4m3", 8, group))
    fp4 = _rel_err(gauss, Format("fp4_e2m1", 4, group))
    assert errs[INT_BITS.index(8)] < fp8 < errs[INT_BITS.index(4)]
    assert errs[INT_BITS.index(5)] < fp4 < errs[INT_BITS.index(2)]


def test_smaller_groups_help(gauss):
    errs = [_rel_err(gauss, parse_format(n)) for n in ("w3", "w3g256", "w3g128", "w3g64", "w3g32")]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_symmetric_grid_is_odd_and_asymmetric_fits_one_sided_data(gauss):
    for name in ("w4g128", "w3", "fp8g64", "fp4g32"):
        f = parse_format(name)
        # min-max: the grid is odd. (The clip search may clip one sign to -2**(b-1) and not the other.)
        assert torch.equal(fake_quantize(-gauss, f, clip_search=False), -fake_quantize(gauss, f, clip_search=False)), name
    pos = gauss.abs()  # one-sided weights: the asymmetric grid spends no codes on negatives
    for b in (2, 3, 4):
        assert _rel_err(pos, Format("int", b, 128, False)) < 0.5 * _rel_err(pos, Format("int", b, 128, True))
    # both represent 0 exactly
    w = gauss.clone()
    w[:, ::7] = 0
    for name in ("w3g64", "w3g64z", "fp4g32", "fp8g32"):
        assert (fake_quantize(w, parse_format(name))[:, ::7] == 0).all(), name


def test_per_channel_one_scale_per_row(gauss):
    qt = quantize(gauss, parse_format("w4"))
    assert qt.scales.shape == (64, 1)
    w = gauss.clone()
    w[3] *= 8  # a power of two: scale and codes follow exactly, other rows unchanged
    a, b = fake_quantize(gauss, parse_format("w4")), fake_quantize(w, parse_format("w4"))
    assert torch.equal(b[3], 8 * a[3]) and torch.equal(b[:3], a[:3])


def test_partial_last_group_has_its_own_scale(gauss):
    w = gauss.clone()
    w[:, 0] = 100.0  # an outlier in the first group must not touch the last (64-wide) group
    f = parse_format("w4g128")
    qt = quantize(w, f, clip_search=False)
    assert qt.scales.shape == (64, 5)
    expect = (w[:, 512:].abs().amax(1) / 7).to(torch.float16)
    assert torch.equal(qt.scales[:, 4], expect)
    # quantizing the tail alone gives the same values: padding does not enter min/max
    for name in ("w4g128", "w4g128z", "fp8g128", "fp4g128"):
        f = parse_format(name)
        assert torch.equal(fake_quantize(w, f)[:, 512:], fake_quantize(w[:, 512:].contiguous(), f)), name


def test_import_kernels_is_light():
    code = "import sys; import bitalloc.kernels.formats, bitalloc.kernels.quant, bitalloc.kernels.qlinear; bad = [m for m in ('triton', 'transformers') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
