"""Default candidate and reference schemes (no torch: the CLI and config read them too)."""

from __future__ import annotations

# 2..8-bit integer formats (per-channel, symmetric g128, integer zero-points), 16-bit, and
# high-impact splits: a few input channels (by saliency, stored with the plan) in a second,
# per-channel symmetric format (`+h8csr0.02`: 2 % of the channels at 8 bits). One split at
# each of two price points above the 2-, 3- and 4-bit zero-point formats; on SmolLM2 they halve
# the KL of the default plans at 2.5-4.5 bpw (experiments/README.md, session 37).
# No float-minimum format (it would reproduce SmolLM2's GGUF Q4_1 storage exactly).
DEFAULT_SCHEMES = (
    "w2g64z", "w2g32z", "w3", "w3g128", "w3g128z", "w3g64z", "w3g32z", "w4", "w4g128", "w4g128z",
    "w4g64z", "w4g32z", "w5g128z", "w6g128z", "w8", "fp16", "w5", "w5g128",
    "w2g64z+h3csr0.05", "w2g64z+h8csr0.02", "w3g128z+h4csr0.05", "w3g128z+h8csr0.02",
    "w4g128z+h5csr0.05", "w4g128z+h8csr0.02",
)  # fmt: skip
# Each layer measured end to end at a 2-, 3- and 4-bit reference to calibrate the proxy.
DEFAULT_REF_SCHEMES = ("w2g64z", "w3g128z", "w4g128z")

# The names of the registries that live beside torch code (sensitivity.saliency.SALIENCY,
# sensitivity.proxy.QUANTIZER_FNS, sensitivity.pairs.PAIR_MODELS), for the CLI and the config
# without importing torch; tests/test_registries.py checks that they are those registries' keys.
SALIENCY_METHODS = ("hessian", "obq", "fisher")
QUANTIZERS = ("rtn", "gptq", "ggml", "ggml-imatrix")  # ggml*: llama.cpp's own quantizer, for ggml types (the llama.cpp target)
PAIR_MODELS = ("full", "reduced")
