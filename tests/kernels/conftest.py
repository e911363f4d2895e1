"""Kernel tests: without a GPU, Triton kernels run on the CPU through the interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` kernel is decorated, i.e. before
``kernels.triton_*`` is imported, so it is set here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class KernelRef:
    """Helpers shared by the Triton kernel tests (the ``kref`` fixture)."""

    @staticmethod
    def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
        """max |y - ref| / ||ref||_inf."""
        return float((y.double() - ref.double()).abs().max() / ref.double().abs().max())

    @staticmethod
    def ref_matmul(x: torch.Tensor, *parts) -> torch.Tensor:
        """float64 x @ W_hat^T over consecutive K segments (QuantizedTensors), W_hat rounded to x.dtype."""
        from bitalloc.kernels.quant import dequantize

        out, k0 = 0, 0
        for qt in parts:
            k = qt.shape[1]
            out = out + x[:, k0 : k0 + k].double() @ dequantize(qt).to(x.dtype).double().T
            k0 += k
        return out

    @staticmethod
    def packed(fmt, n: int, k: int, seed: int = 0):
        """A random (n, k) weight quantized in ``fmt``."""
        from bitalloc.kernels.quant import quantize

        return quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), fmt)


@pytest.fixture
def kref() -> type[KernelRef]:
    return KernelRef
