"""fake_quantize works on row pieces (bounded temporaries); the result is the whole-tensor one, bit for bit."""

from __future__ import annotations

import pytest
import torch

from bitalloc.kernels import quant


@pytest.mark.parametrize("fmt", ["w2g64z", "w3g128z", "w4g32", "w4g128", "w8g128", "w4", "fp8", "fp4"])
@pytest.mark.parametrize("shape", [(333, 256), (64, 1000), (1, 4096)])
def test_pieces_equal_the_whole(fmt, shape, monkeypatch):
    from bitalloc.kernels.formats import parse_scheme

    f = parse_scheme(fmt).weight
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * torch.rand(shape[1], generator=g)  # uneven columns: clipping matters
    whole = quant.fake_quantize(w, f)
    monkeypatch.setattr(quant, "FAKE_QUANT_PIECE", 3 * shape[1] + 7)  # 3 rows a piece, the last one short
    pieces = quant.fake_quantize(w, f)
    assert pieces.dtype == whole.dtype and torch.equal(pieces, whole)
