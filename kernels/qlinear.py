"""QuantLinear: a linear layer holding a packed quantized weight.

The packed tensors are registered buffers, so ``state_dict()`` holds exactly them:
``qweight``, ``scales``, ``qzeros`` (asymmetric formats only), for split schemes
``high_qweight``, ``high_scales``, ``high_qzeros``, ``high_idx``, and ``bias`` if any. The
scheme is not in the state dict (the plan carries it): rebuild with
``QuantLinear.empty(in, out, scheme, bias, n_high)`` and ``load_state_dict``.

``forward`` runs the torch reference path (``_forward_reference``): fake-quantize the
activation per token (A8 schemes), dequantize the weight to float32, matmul in x's dtype.
The Triton path hooks into ``forward`` on CUDA.

Moving the module (``.to(dtype)``, ``.half()``, ``.float()``) changes the device of the
packed buffers but never their dtype (float16 scales stay float16); the bias follows the
dtype like any float buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import is_conv1d
from .formats import Scheme, parse_scheme
from .quant import (
    QuantizedTensor,
    QuantizedWeight,
    dequantize_weight,
    expected_shapes,
    quantize_activation,
    quantize_weight,
    index_dtype,
)

__all__ = ["QuantLinear"]

LOW_NAMES = ("qweight", "scales", "qzeros")
HIGH_NAMES = ("high_qweight", "high_scales", "high_qzeros", "high_idx")
PACKED_NAMES = LOW_NAMES + HIGH_NAMES


def as_scheme(scheme: Scheme | str) -> Scheme:
    if isinstance(scheme, str):
        return parse_scheme(scheme)
    if not isinstance(scheme, Scheme):
        raise TypeError(f"scheme must be a Scheme or a scheme name, got {type(scheme).__name__}")
    return scheme


class QuantLinear(nn.Module):
    """y = quantize_activation(x) @ W_hat.T + b, with W_hat stored packed in ``scheme``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: Scheme | str,
        bias: bool = False,
        n_high: int | None = None,
        device=None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        scheme = as_scheme(scheme)
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got ({in_features}, {out_features})")
        k = scheme.n_high(in_features)
        if n_high is not None and n_high != k:
            raise ValueError(f"scheme {scheme.name} on in_features={in_features} keeps {k} high channels, got n_high={n_high}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme

        def zeros(shape, dtype):
            return None if shape is None else torch.zeros(shape, dtype=dtype, device=device)

        for name, (shape, dtype) in expected_shapes(scheme.weight, out_features, in_features - k).items():
            self.register_buffer(name, zeros(shape, dtype))
        high = expected_shapes(scheme.high, out_features, k) if k else {}
        for name in LOW_NAMES:
            shape, dtype = high.get(name, (None, None))
            self.register_buffer(f"high_{name}", zeros(shape, dtype))
        self.register_buffer("high_idx", zeros((k,) if k else None, index_dtype(in_features)))
        self.register_buffer("bias", zeros((out_features,), bias_dtype) if bias else None)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def empty(
        cls, in_features: int, out_features: int, scheme: Scheme | str, bias: bool = False, n_high: int | None = None, device=None
    ) -> QuantLinear:
        """Correctly shaped (zero) buffers to ``load_state_dict`` a saved quantized layer into."""
        return cls(in_features, out_features, scheme, bias=bias, n_high=n_high, device=device)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        out_f, in_f = qw.shape
        device = qw.low.qweight.device
        b_dtype = bias.dtype if bias is not None else torch.float32
        m = cls(in_f, out_f, qw.scheme, bias=bias is not None, device=device, bias_dtype=b_dtype)
        for name, t in qw.tensors().items():
            assert m._buffers[name] is not None and m._buffers[name].shape == t.shape, name
            m._buffers[name] = t.detach().clone()
        if bias is not None:
            assert bias.shape == (out_f,), f"bias must be ({out_f},), got {tuple(bias.shape)}"
            m.bias = bias.detach().clone()
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme | str, high_idx=None) -> QuantLinear:
        """Quantize an nn.Linear (weight (out, in)); a split picks high channels by column energy unless given."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        with torch.no_grad():  # the parameter itself: its clip search is remembered by object (kernels.param_memo)
            qw = quantize_weight(linear.weight, as_scheme(scheme), high_idx)
        return cls.from_quantized(qw, linear.bias)

    @classmethod
    def from_module(cls, module: nn.Module, scheme: Scheme | str, high_idx=None) -> QuantLinear:
        """Quantize an nn.Linear or a transformers GPT-2 ``Conv1D`` (weight stored (in, out))."""
        if isinstance(module, nn.Linear):
            return cls.from_linear(module, scheme, high_idx)
        if is_conv1d(module):  # by duck type: kernels/ never imports transformers
            w = module.weight.detach().t()  # (in, out) -> (out, in)
            qw = quantize_weight(w, as_scheme(scheme), high_idx)
            return cls.from_quantized(qw, module.bias)
        raise TypeError(f"can quantize nn.Linear or transformers Conv1D, got {type(module).__name__}")

    # -- views -------------------------------------------------------------------------
    def quantized_weight(self) -> QuantizedWeight:
        """The packed buffers as a QuantizedWeight (no copies)."""
        k = int(self.high_idx.numel()) if self.high_idx is not None else 0
        low = QuantizedTensor(self.scheme.weight, (self.out_features, self.in_features - k), self.qweight, self.scales, self.qzeros)
        if k == 0:
            return QuantizedWeight(self.scheme, (self.out_features, self.in_features), low)
        high = QuantizedTensor(self.scheme.high, (self.out_features, k), self.high_qweight, self.high_scales, self.high_qzeros)
        return QuantizedWeight(self.scheme, (self.out_features, self.in_features), low, high, self.high_idx)

    def dequantized_weight(self) -> torch.Tensor:
        """Float32 (out, in) weight exactly as the kernels see it."""
        return dequantize_weight(self.quantized_weight())

    def weight_nbytes(self) -> int:
        """Bytes of the packed weight buffers (bias excluded); equals scheme.storage_bits // 8."""
        return sum(b.numel() * b.element_size() for n, b in self._buffers.items() if n in PACKED_NAMES and b is not None)

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Triton kernels on CUDA (GEMV / GEMM / dequant+matmul by batch size, A8 paths), the
        torch reference on CPU; one custom op (``bitalloc::quant_matmul``) so torch.compile traces it."""
        from . import ops

        return ops.quant_linear(x, self.quantized_weight(), self.bias)

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype: per-token activation fake-quant, dequantized weight."""
        assert x.shape[-1] == self.in_features, f"expected last dim {self.in_features}, got {tuple(x.shape)}"
        xq = quantize_activation(x, self.scheme.act)  # (..., in)
        w = self.dequantized_weight().to(x.dtype)  # (out, in)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(xq, w, b)  # (..., out)

    # -- module plumbing ---------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Move packed buffers by device only: .half()/.float()/.to(dtype) must not recast scales."""
        held = {n: b for n, b in self._buffers.items() if n in PACKED_NAMES and b is not None}
        for n in held:
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for n, b in held.items():
                # fn leaves an int tensor's dtype alone, so it tells us only the target device
                device = fn(torch.empty(0, dtype=torch.int32, device=b.device)).device
                self._buffers[n] = b.to(device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.scheme.name}, bias={self.bias is not None}"
        )
