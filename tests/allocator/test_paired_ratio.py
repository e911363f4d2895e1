"""``paired_ratio``: two models on the same windows, compared window by window."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bitalloc.allocator.report import paired_ratio


def test_ratio_is_the_perplexity_ratio_and_the_interval_holds_it():
    rng = np.random.default_rng(1)
    b = rng.uniform(200.0, 400.0, size=40)  # (40,) summed NLL per window of 100 tokens
    a = b - rng.normal(1.0, 3.0, size=40)  # A about 1 nat per window better, with noise
    r = paired_ratio(a, b, 100)
    assert r["ratio"] == pytest.approx(math.exp(a.sum() / 4000) / math.exp(b.sum() / 4000))
    assert r["lo"] <= r["ratio"] <= r["hi"] and r["windows"] == 40
    assert r["a_wins"] == int((a < b).sum())
    assert r == paired_ratio(a, b, 100)  # a fixed seed: the same interval every time


def test_a_consistent_difference_is_resolved_and_noise_is_not():
    rng = np.random.default_rng(2)
    b = rng.uniform(200.0, 400.0, size=32)
    clear = paired_ratio(b - 2.0, b, 100)  # every window 2 nats lower
    assert clear["hi"] < 1 and clear["a_wins"] == 32 and clear["lo"] == pytest.approx(clear["ratio"])
    noise = paired_ratio(b + rng.choice([-3.0, 3.0], size=32), b, 100)  # as often worse as better
    assert noise["lo"] < 1 < noise["hi"]


def test_mismatched_windows_are_refused():
    with pytest.raises(ValueError, match="same windows"):
        paired_ratio([1.0, 2.0], [1.0], 10)
    with pytest.raises(ValueError, match="same windows"):
        paired_ratio([], [], 10)
