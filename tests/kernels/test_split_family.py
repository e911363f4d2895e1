"""The split scheme family helper (issue 5)."""

import pytest

from bitalloc.kernels.formats import FormatError, parse_scheme, split_families, split_family


def test_split_family_names_round_trip():
    fam = split_family("w2g64z")
    assert [s.name for s in fam] == ["w2g64z", "w2g64z+h3r0.02", "w2g64z+h3r0.05", "w2g64z+h3r0.1",
                                     "w2g64z+h3r0.15", "w2g64z+h3r0.2"]
    assert all(parse_scheme(s.name) == s for s in split_families())
    assert split_family("w3g64z", ratios=(0.05,))[0].name == "w3g64z+h4r0.05"
    assert split_family("w2g64", 16, ratios=(0.1,))[0].name == "w2g64+h16r0.1"
    with pytest.raises(FormatError):
        split_family("w3g64z", 2)
    with pytest.raises(FormatError):
        split_family("fp4g32")


def test_split_family_storage_grows_with_ratio():
    fam = split_family("w2g64z")
    bits = [s.storage_bits(576, 576) for s in fam]
    assert bits == sorted(bits) and len(set(bits)) == len(bits)


def test_split_family_with_its_own_high_format():
    """``high`` gives the high part a whole format of its own (per-channel symmetric here):
    no per-group scales and zero-points on a handful of channels, so small ratios get cheaper."""
    own = split_family("w2g64z", ratios=(0, 0.02, 0.05), high="w3")
    assert [s.name for s in own] == ["w2g64z", "w2g64z+h3csr0.02", "w2g64z+h3csr0.05"]
    assert all(parse_scheme(s.name) == s for s in own)
    inherited = split_family("w2g64z", ratios=(0.02, 0.05))
    for a, b in zip(own[1:], inherited):
        assert a.storage_bits(576, 576) < b.storage_bits(576, 576)
    fams = split_families(["w2g64z", "w3g64z"], ratios=(0.05,), highs=["w3", None])
    assert [s.name for s in fams] == ["w2g64z+h3csr0.05", "w3g64z+h4r0.05"]
    with pytest.raises(FormatError, match="must exceed"):
        split_family("w3g64z", ratios=(0.05,), high="w3")
    with pytest.raises(FormatError, match="high formats for"):
        split_families(["w2g64z"], highs=["w3", "w4"])
