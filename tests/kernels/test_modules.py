"""kernels.modules: Linear / GPT-2 Conv1D recognised without importing transformers."""

import torch

from bitalloc.kernels.modules import get_weight, is_conv1d, module_type, weight_shape


def test_transformers_conv1d_is_recognised_by_shape():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=6, nx=4)  # weight (in 4, out 6)
    assert is_conv1d(conv) and module_type(conv) == "Conv1D"
    assert weight_shape(conv) == (6, 4)
    assert torch.equal(get_weight(conv), conv.weight.t())
    x = torch.randn(3, 4)
    assert torch.allclose(conv(x), x @ get_weight(conv).t() + conv.bias)  # (out, in) view computes the layer


def test_linear_and_lookalikes():
    lin = torch.nn.Linear(4, 6)
    assert module_type(lin) == "Linear" and weight_shape(lin) == (6, 4) and get_weight(lin) is lin.weight

    class Conv1D(torch.nn.Module):  # the name alone is not enough: no nf / nx matching the weight
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 6))

    assert not is_conv1d(Conv1D()) and module_type(Conv1D()) is None
    assert module_type(torch.nn.Conv2d(1, 1, 1)) is None and weight_shape(torch.nn.ReLU()) is None
