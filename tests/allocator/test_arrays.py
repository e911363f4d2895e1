"""allocator.arrays: profile → problem arrays in one step, each policy piece built once."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

from test_group_policy import _profile  # tests/allocator is on sys.path (rootdir-relative import mode)

from bitalloc.allocator import arrays as A
from bitalloc.allocator.budget import parse_budget
from bitalloc.allocator.policy import GroupPolicy

S = importlib.import_module("bitalloc.allocator.solve")  # the module (allocator.solve is the API function)


def _counting(monkeypatch, names):
    """Wrap ``allocator.arrays.<name>`` so each call is counted."""
    calls = {n: 0 for n in names}
    for n in names:
        real = getattr(A, n)

        def wrapped(*a, _real=real, _n=n, **kw):
            calls[_n] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(A, n, wrapped)
    return calls


@pytest.mark.parametrize("kw, limits", [({}, 1), ({"group_limits": {"a": 0.5}}, 1),
                                        ({"group_shares": {"a": 0.6, "b": 0.4}}, 2)])
def test_solve_builds_each_policy_piece_once(monkeypatch, kw, limits):
    calls = _counting(monkeypatch, ["group_rows", "group_scales", "objective_table", "limit_constraints", "capacity_bits"])
    plan = S.solve(_profile(), "4bpw", **kw)
    assert plan.predicted["bpw"] <= 4.0
    # limit_constraints once for the whole problem, or once per group's part with shares
    assert calls == {"group_rows": 1, "group_scales": 1, "objective_table": 1, "limit_constraints": limits,
                     "capacity_bits": 1}, calls


def test_share_parts_cover_every_layer_with_their_bits():
    p = _profile()
    arr = A.build_arrays(p, parse_budget("4bpw"), GroupPolicy(shares={"a": 0.6, "b": 0.4}))
    assert [part.group for part in arr.parts] == ["a", "b"] and arr.extra == ()
    rows = np.sort(np.concatenate([part.rows for part in arr.parts]))
    assert rows.tolist() == list(range(len(p.layers))), "the parts must cover each layer exactly once"
    for part in arr.parts:
        assert part.capacity == math.floor(part.share * arr.capacity)
        assert np.array_equal(part.problem.loss, arr.problem.loss[part.rows])
    assert arr.groups["normalize"] == "ref" and set(arr.groups["scales"]) == {"a", "b"}


def test_arrays_hold_the_limits_and_no_report_for_a_plain_profile():
    p = _profile()
    arr = A.build_arrays(p, parse_budget("3.5bpw"), GroupPolicy(limits={"a": 0.5}))
    assert [c.name for c in arr.extra] == ["group_a_loss"] and arr.parts == () and arr.qp is None
    assert arr.capacity == A.capacity_bits(p, parse_budget("3.5bpw"))
    one = type(p).from_dict({**p.to_dict(), "tables": {"all": p.tables["a"] + p.tables["b"]}, "metadata": {}})
    plain = A.build_arrays(one, parse_budget("3.5bpw"), GroupPolicy())
    assert plain.groups is None and plain.extra == ()
    assert plain.problem.loss.tolist() == one.tables["all"].tolist()


def test_unknown_method_is_refused_before_any_work(monkeypatch):
    calls = _counting(monkeypatch, ["capacity_bits"])
    with pytest.raises(S.AllocationError, match="method must be one of"):
        S.solve(_profile(), "1bpw", method="magic")  # also an infeasible budget: the method is checked first
    assert calls["capacity_bits"] == 0
