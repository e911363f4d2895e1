"""Property-based fuzzing (hypothesis) of the profile and plan loaders: structured mutations
of valid files (a value anywhere replaced by a hostile one, a key removed or added, a
container emptied or wrapped, the text cut short) either load or raise a one-line
``BitallocError``; never any other exception."""

from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitalloc import BitallocError

HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["w4g32", "fp16", "re:(", "*", "", "bitalloc.plan/1", "bitalloc.profile/2", "../x.safetensors"]),
    st.just([]), st.just({}), st.just([[1, 2], [3]]), st.just({"a": {"b": [None]}}),
    st.just(json.loads("[" * 70 + "]" * 70)),
)

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _paths(obj, prefix=()):
    yield prefix
    if len(prefix) >= 6:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):  # the first few items of long arrays are enough
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, base: dict):
    d = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(d) if p]
        path = draw(st.sampled_from(paths))
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "wrap", "empty"]))
        if op == "replace":
            parent[key] = copy.deepcopy(draw(HOSTILE))
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = copy.deepcopy(draw(HOSTILE))
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif op == "empty" and isinstance(parent[key], (list, dict)):
            parent[key] = type(parent[key])()
    text = json.dumps(d, allow_nan=True)
    if draw(st.integers(0, 9)) == 0:  # cut short
        text = text[: draw(st.integers(0, len(text)))]
    return text


def _check_loads_or_one_line(load, path, text):
    path.write_text(text)
    try:
        load(path)
    except BitallocError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        assert not isinstance(e, (RecursionError, TypeError, KeyError, AttributeError, IndexError))


@pytest.fixture(scope="module")
def profile_json(golden):
    return json.loads((golden / "profile.json").read_text())


@pytest.fixture(scope="module")
def plan_json(golden):
    return json.loads((golden / "plan.json").read_text())


def test_fuzz_profile_loader(profile_json, golden, tmp_path):
    import shutil

    from bitalloc.sensitivity.profile import SensitivityProfile

    shutil.copy(golden / "profile.arrays.safetensors", tmp_path / "profile.arrays.safetensors")
    target = tmp_path / "profile.json"

    @SETTINGS
    @given(mutated(profile_json))
    def run(text):
        _check_loads_or_one_line(SensitivityProfile.load, target, text)

    run()


def test_fuzz_plan_loader(plan_json, tmp_path):
    from bitalloc.allocator.plan import Plan

    target = tmp_path / "plan.json"

    @SETTINGS
    @given(mutated(plan_json))
    def run(text):
        _check_loads_or_one_line(Plan.load, target, text)

    run()


def test_fuzz_solve_from_mutated_profile(profile_json, golden, tmp_path):
    """A mutated profile that still loads is solved or refused with one line (the solver
    trusts what the loader let through)."""
    import shutil

    from bitalloc.allocator import api
    from bitalloc.sensitivity.profile import SensitivityProfile

    shutil.copy(golden / "profile.arrays.safetensors", tmp_path / "profile.arrays.safetensors")
    target = tmp_path / "profile.json"

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(mutated(profile_json))
    def run(text):
        target.write_text(text)
        try:
            prof = SensitivityProfile.load(target)
            api.solve(prof, "4bpw")
        except BitallocError as e:
            assert "\n" not in str(e)

    run()
