"""GPTQ against round-to-nearest on a synthetic layer: output error tr(ΔW H ΔWᵀ) relative to RTN.

Synthetic only (random 64×256 weights, H from correlated random inputs, seed 0): it checks
the quantizer, it says nothing about model quality. Writes experiments/results/gptq_vs_rtn.json.

    python experiments/gptq_vs_rtn.py
"""

import json
from pathlib import Path

import torch

from bitalloc.kernels.formats import parse_format
from bitalloc.kernels.gptq import GPTQ
from bitalloc.kernels.quant import dequantize, fake_quantize

FORMATS = ("w2g32z", "w2g128z", "w3g128z", "w3g64z", "w4g128z", "w4g128", "fp4g32")


def main() -> None:
    torch.manual_seed(0)
    W = torch.randn(64, 256)  # (out, in)
    X = torch.randn(2048, 256) @ (torch.eye(256) + 0.5 * torch.randn(256, 256) / 16)  # correlated inputs
    H = X.T @ X / X.shape[0]  # (in, in)

    def err(Wq: torch.Tensor) -> float:
        d = Wq - W
        return float(((d @ H) * d).sum())

    rows = []
    for name in FORMATS:
        f = parse_format(name)
        rtn = err(fake_quantize(W, f))
        static = err(dequantize(GPTQ(W, H).quantize(f, static_groups=True)))
        dynamic = err(dequantize(GPTQ(W, H).quantize(f, static_groups=False)))
        rows.append({"format": name, "rtn": rtn, "gptq_static_vs_rtn": static / rtn, "gptq_dynamic_vs_rtn": dynamic / rtn})
        print(f"{name:>8}  GPTQ static groups / RTN {static / rtn:.3f}   dynamic groups / RTN {dynamic / rtn:.3f}")
    out = Path(__file__).resolve().parent / "results" / "gptq_vs_rtn.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
