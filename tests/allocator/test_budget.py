import pytest

from bitalloc.allocator.budget import Budget, BudgetError, parse_budget


@pytest.mark.parametrize(
    "text,kind,value,scope",
    [
        ("3.5bpw", "bpw", 3.5, "layers"),
        ("4BPW", "bpw", 4.0, "layers"),
        ("3.25", "bpw", 3.25, "layers"),
        ("120MB", "bytes", 120e6, "total"),
        ("total:120MB", "bytes", 120e6, "total"),
        ("layers:90MB", "bytes", 90e6, "layers"),
        ("0.12GiB", "bytes", 0.12 * 2**30, "total"),
        ("100MiB", "bytes", 100 * 2**20, "total"),
        ("512kB", "bytes", 512e3, "total"),
        ("1000B", "bytes", 1000, "total"),
    ],
)
def test_parse(text, kind, value, scope):
    b = parse_budget(text)
    assert (b.kind, b.scope) == (kind, scope)
    assert b.value == pytest.approx(value)


def test_mb_is_decimal_and_mib_binary():
    assert parse_budget("1MB").value == 1_000_000
    assert parse_budget("1MiB").value == 1_048_576


@pytest.mark.parametrize("bad", ["", "abc", "3.5bits", "-3bpw", "0bpw", "12XB", "total:3bpw", "MB", "nanbpw"])
def test_malformed(bad):
    with pytest.raises(BudgetError, match="budget"):
        parse_budget(bad)


def test_capacity_bits():
    assert parse_budget("3.5bpw").capacity_bits(1000, 10**9) == 3500
    assert parse_budget("3.3333bpw").capacity_bits(3, 0) == 9  # floor, never above the budget
    assert parse_budget("layers:1kB").capacity_bits(10, 10**6) == 8000
    assert parse_budget("total:1kB").capacity_bits(10, 3000) == 5000


def test_roundtrip_dict():
    b = parse_budget("layers:90MB")
    assert Budget.from_dict(b.to_dict()) == b
