"""bitalloc kernels: numeric formats, bit packing, torch reference quantization, QuantLinear.

Importing this package loads torch only (no triton, no transformers); Triton kernels live
in ``kernels.triton_*`` modules imported on demand.
"""

from .formats import (
    ACTIVATIONS,
    FP16,
    GROUP_SIZES,
    INT_BITS,
    Format,
    FormatError,
    Scheme,
    bit_planes,
    index_bits,
    n_high_channels,
    packed_words,
    parse_format,
    parse_scheme,
    plane_words,
)
from .gptq import GPTQ, GPTQError, gptq_fake_quantize_weight, gptq_quantize, gptq_quantize_weight
from .packing import pack_codes, plane_layout, unpack_codes
from .qlinear import QuantLinear
from .quant import (
    QuantizedTensor,
    QuantizedWeight,
    dequantize,
    dequantize_weight,
    fake_quantize,
    fake_quantize_weight,
    quantize,
    quantize_activation,
    quantize_weight,
    select_high_channels,
)

__all__ = [
    "ACTIVATIONS",
    "FP16",
    "GROUP_SIZES",
    "INT_BITS",
    "Format",
    "FormatError",
    "GPTQ",
    "GPTQError",
    "Scheme",
    "bit_planes",
    "index_bits",
    "n_high_channels",
    "packed_words",
    "parse_format",
    "parse_scheme",
    "plane_words",
    "gptq_fake_quantize_weight",
    "gptq_quantize",
    "gptq_quantize_weight",
    "pack_codes",
    "plane_layout",
    "unpack_codes",
    "QuantLinear",
    "QuantizedTensor",
    "QuantizedWeight",
    "dequantize",
    "dequantize_weight",
    "fake_quantize",
    "fake_quantize_weight",
    "quantize",
    "quantize_activation",
    "quantize_weight",
    "select_high_channels",
]
