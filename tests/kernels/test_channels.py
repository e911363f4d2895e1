"""The numpy channel rule (kernels.channels) gives exactly the torch rule's channels, ties included."""
import numpy as np
import pytest
import torch

from bitalloc.kernels.channels import select_high_channels_np, split_channels_np
from bitalloc.kernels.quant import select_high_channels


def _both(s: np.ndarray, k: int):
    a = select_high_channels_np(s, k)
    b = select_high_channels(torch.as_tensor(s, dtype=torch.float64), k).numpy()
    return a, b


@pytest.mark.parametrize("seed", range(20))
def test_random_vectors_match_torch(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    s = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4)
    for k in {0, 1, n // 7, n // 2, n}:
        a, b = _both(s, k)
        assert a.dtype == np.int64 and a.shape == (k,), f"shape {a.shape} dtype {a.dtype} for k={k}"
        assert np.array_equal(a, b), f"n={n} k={k}: numpy {a[:8]} vs torch {b[:8]}"


@pytest.mark.parametrize("seed", range(20))
def test_tied_vectors_match_torch(seed):
    """Few distinct values (many ties), signed zeros, float32-rounded values: the same channels."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 300))
    levels = np.array([0.0, -0.0, 1.0, 2.5, -1.0, 1e-30, 3.0])
    s = rng.choice(levels[: int(rng.integers(1, len(levels) + 1))], size=n)
    for k in range(0, n + 1, max(1, n // 9)):
        a, b = _both(s, k)
        assert np.array_equal(a, b), f"n={n} k={k}: numpy {a} vs torch {b}"
    f32 = rng.standard_normal(n).astype(np.float32).astype(np.float64)  # what a profile stores
    assert np.array_equal(*_both(f32, n // 3))


def test_ties_go_to_the_lower_index():
    assert select_high_channels_np([1.0, 3.0, 3.0, 0.0, 3.0], 2).tolist() == [1, 2]
    assert select_high_channels_np(np.zeros(6), 3).tolist() == [0, 1, 2]
    assert select_high_channels_np([0.0, -0.0, 0.0], 1).tolist() == [0]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="1-D"):
        select_high_channels_np(np.zeros((2, 2)), 1)
    with pytest.raises(ValueError, match="k must be"):
        select_high_channels_np(np.zeros(3), 4)
    with pytest.raises(ValueError, match="NaN or inf"):
        select_high_channels_np([1.0, np.nan], 1)


def test_split_twin_matches_saliency_module():
    from bitalloc.sensitivity.saliency import select_split_channels

    s = np.random.default_rng(7).random(64)
    for scheme in ("w2g32z+h3r0.25", "w2g64z+h3r0.1", "w4g32"):
        a, b = split_channels_np(s, scheme, 64), select_split_channels(s, scheme, 64)
        assert (a is None) == (b is None), scheme
        assert a is None or np.array_equal(a, b.numpy()), scheme
    with pytest.raises(ValueError, match="entries"):
        split_channels_np(s, "w2g32z+h3r0.25", 65)
