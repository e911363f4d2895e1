"""QuantLinear: reference forward, exact bytes, state_dict layout, safetensors round trip, Conv1D."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitalloc.kernels.formats import parse_scheme
from bitalloc.kernels.qlinear import QuantLinear
from bitalloc.kernels.quant import fake_quantize_weight, quantize_activation, quantize_weight

SCHEMES = [
    "w4g128",
    "w3g64z",
    "w2g32z+h8r0.05",
    "w4g128+h16r0.1",
    "w8a8",
    "w4g128af8",
    "fp8g128",
    "fp4g32a8",
    "w6g64za8+h8r0.02",
    "fp16",
]


def _linear(in_f=300, out_f=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SCHEMES)
def test_forward_matches_fake_quant_reference(name):
    lin = _linear()
    q = QuantLinear.from_linear(lin, name)
    s = parse_scheme(name)
    x = _x(2, 5, 300)  # (batch, seq, in)
    w_hat = fake_quantize_weight(lin.weight.detach(), s, q.high_idx)
    y = q(x)
    assert y.shape == (2, 5, 40) and y.dtype == torch.float32
    assert torch.equal(y, F.linear(quantize_activation(x, s.act), w_hat, lin.bias.detach()))
    assert torch.allclose(y, quantize_activation(x, s.act) @ w_hat.T + lin.bias.detach(), atol=1e-5)
    assert q.weight_nbytes() == s.storage_bits(40, 300) // 8
    # close to the float layer (loosely: 2-bit is coarse)
    with torch.no_grad():
        ref = lin(x)
    assert (y - ref).norm() / ref.norm() < 0.6


def test_state_dict_holds_exactly_the_packed_tensors():
    keys = lambda name, bias=True: list(QuantLinear.from_linear(_linear(bias=bias), name).state_dict())
    assert keys("w4g128") == ["qweight", "scales", "bias"]
    assert keys("w4g128", bias=False) == ["qweight", "scales"]
    assert keys("w3g64z") == ["qweight", "scales", "qzeros", "bias"]
    assert keys("w3g64z+h8r0.05") == [
        "qweight", "scales", "qzeros", "high_qweight", "high_scales", "high_qzeros", "high_idx", "bias",
    ]
    assert keys("w4g128+h16r0.05") == ["qweight", "scales", "high_qweight", "high_scales", "high_idx", "bias"]
    q = QuantLinear.from_linear(_linear(), "w3g64z+h8r0.05")
    assert q.qweight.dtype == torch.int32 and q.scales.dtype == torch.float16
    assert q.high_idx.dtype == torch.int16 and q.high_idx.shape == (15,)
    assert list(q.parameters()) == []


@pytest.mark.parametrize("name", ["w3g64z+h8r0.05", "fp8g128af8", "fp16", "w4g128+h16r0.1"])
def test_safetensors_round_trip(tmp_path, name):
    from safetensors.torch import load_file, save_file

    q = QuantLinear.from_linear(_linear(), name)
    path = tmp_path / "layer.safetensors"
    save_file(q.state_dict(), str(path))
    assert path.stat().st_size >= q.weight_nbytes()
    fresh = QuantLinear.empty(300, 40, name, bias=True, n_high=parse_scheme(name).n_high(300))
    fresh.load_state_dict(load_file(str(path)), strict=True)
    x = _x(7, 300)
    assert torch.equal(fresh(x), q(x))
    assert fresh.weight_nbytes() == q.weight_nbytes()


def test_empty_validates_n_high():
    with pytest.raises(ValueError, match="keeps 15 high channels"):
        QuantLinear.empty(300, 40, "w4g128+h8r0.05", n_high=3)
    with pytest.raises(ValueError, match="positive"):
        QuantLinear.empty(0, 40, "w4g128")
    m = QuantLinear.empty(300, 40, parse_scheme("w4g128"))
    assert m.bias is None and m.weight_nbytes() == parse_scheme("w4g128").storage_bits(40, 300) // 8


def test_from_quantized_and_given_high_idx():
    lin = _linear(bias=False)
    s = parse_scheme("w4g32+h8r0.01")  # k = 3
    qw = quantize_weight(lin.weight.detach(), s, high_idx=[5, 250, 9])
    q = QuantLinear.from_quantized(qw)
    assert q.high_idx.tolist() == [5, 9, 250] and q.bias is None
    assert torch.equal(q.dequantized_weight(), fake_quantize_weight(lin.weight.detach(), s, [5, 9, 250]))
    assert q.quantized_weight().nbytes() == q.weight_nbytes()


def test_dtype_moves_keep_packed_dtypes():
    q = QuantLinear.from_linear(_linear(), "w3g64z+h16r0.05")
    x = _x(3, 300)
    y = q(x)
    q.to(torch.bfloat16)
    assert q.scales.dtype == torch.float16 and q.high_qweight.dtype == torch.float16
    assert q.qweight.dtype == torch.int32 and q.bias.dtype == torch.bfloat16
    q.float()
    assert q.scales.dtype == torch.float16 and q.bias.dtype == torch.float32
    assert torch.allclose(q(x), y, atol=0.05)  # only the bias went through bfloat16
    yh = q.half()(x.half())
    assert yh.dtype == torch.float16


def test_conv1d_path():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=48, nx=96)  # weight (in=96, out=48)
    nn.init.normal_(conv.bias)
    s = parse_scheme("w4g32z+h8r0.05")
    q = QuantLinear.from_module(conv, s)
    assert (q.in_features, q.out_features) == (96, 48)
    x = _x(2, 4, 96)
    w_hat = fake_quantize_weight(conv.weight.detach().t(), s, q.high_idx)
    assert torch.equal(q(x), F.linear(x, w_hat, conv.bias.detach()))
    with torch.no_grad():
        ref = conv(x)
    assert (q(x) - ref).norm() / ref.norm() < 0.15
    assert q.weight_nbytes() == s.storage_bits(48, 96) // 8
    # nn.Linear through the same front door
    lin = _linear()
    assert torch.equal(QuantLinear.from_module(lin, "w4g128")(_x(2, 300)), QuantLinear.from_linear(lin, "w4g128")(_x(2, 300)))
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        QuantLinear.from_module(nn.Conv2d(3, 3, 1), "w4g128")


def test_forward_checks_input_width():
    q = QuantLinear.from_linear(_linear(), "w4g128")
    with pytest.raises(ValueError, match="300"):
        q(_x(2, 299))
