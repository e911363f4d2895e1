"""Fixtures for the peer-allocator tests: a tiny random-weight Llama and its PeerContext."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sensitivity"))
from sens_helpers import VOCAB, make_llama  # noqa: E402

SCHEMES = ("w2g32z", "w3g32z", "w4g32z", "w8")


@pytest.fixture
def tiny_ctx():
    from bitalloc.sensitivity.calibration import as_batches
    from bitalloc.sensitivity.layers import find_layers
    from bitalloc.sensitivity.peer_context import PeerContext

    torch.manual_seed(0)
    model = make_llama(tie=False)
    layers, _ = find_layers(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 32), generator=g)
    return PeerContext(model, layers, list(SCHEMES), as_batches(ids, 2))
