"""Parts every profile builder shares: exact costs, the bits outside the layers, the split
channels a plan records, the version stamp (the in-memory :mod:`sensitivity.build` and the
streamed :mod:`sensitivity.streamed_profile`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .layers import LayerInfo

__all__ = ["bitalloc_version", "cost_table", "other_parameter_bits", "profile_split_channels", "profile_metadata"]


def bitalloc_version() -> str:
    from .. import __version__

    return __version__


# ---------------------------------------------------------------------------------------
# costs


def cost_table(layers: Sequence[LayerInfo], schemes: Sequence[Any]) -> np.ndarray:
    """``(L, S)`` exact storage bits; a shared weight is counted on its first layer only."""
    from .proxy import as_scheme

    from bitalloc.kernels.formats import ggml_fits, is_ggml

    sch = [as_scheme(s) for s in schemes]
    out = np.zeros((len(layers), len(sch)), dtype=np.int64)
    seen_groups: set[str] = set()
    for i, layer in enumerate(layers):
        if layer.tie_group is not None and layer.tie_group in seen_groups:
            continue
        if layer.tie_group is not None:
            seen_groups.add(layer.tie_group)
        # a ggml type whose block does not divide the rows is no candidate there (cost 0, loss NaN)
        out[i] = [0 if is_ggml(s) and not ggml_fits(s.name, layer.in_features)
                  else s.storage_bits(layer.out_features, layer.in_features) for s in sch]
    return out


def other_parameter_bits(model: torch.nn.Module, layers: Sequence[LayerInfo]) -> tuple[int, int]:
    """(bits, count) of all parameters other than the selected layers' weights, at their
    stored dtype; a tensor shared by several names (tied) is counted once."""
    from .models import storage_key as _storage_key

    modules = dict(model.named_modules(remove_duplicate=False))
    quantized = {_storage_key(modules[layer.fqn].weight) for layer in layers}
    seen: set = set()
    bits = count = 0
    for _, p in model.named_parameters(remove_duplicate=False):
        key = _storage_key(p)
        if key in seen or key in quantized:
            continue
        seen.add(key)
        bits += p.numel() * p.element_size() * 8
        count += p.numel()
    return int(bits), int(count)


def profile_split_channels(layers, names, sal) -> dict | None:
    """``fqn -> {k: (k,) int64}`` of every split among ``names``: the channels the proxy and
    the measurements quantized with (the torch rule they use), stored so plans need no torch."""
    from bitalloc.kernels.quant import select_high_channels

    from .split_channels import split_channels_for

    def select(v, k):
        return select_high_channels(torch.as_tensor(v, dtype=torch.float64).flatten(), k).numpy()

    return split_channels_for(layers, names, sal, select) or None


def profile_metadata(cfg: Any, *, walls: dict, metric: str, replay: bool, table: str, **options: Any) -> dict:
    """The ``metadata`` every profile carries: versions, wall times, the metric and its units,
    the options its values depend on (``options``: more of them) and the table's kind."""
    import datetime as _dt

    return {
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bitalloc_version": bitalloc_version(),
        "torch_version": torch.__version__,
        "wall_s": walls,
        "metric": metric,
        "loss_units": "nats/token (KL vs unquantized)" if metric == "kl" else f"{metric} delta",
        "options": {
            "include": list(cfg.include),
            "exclude": list(cfg.exclude),
            "quantize_tied": cfg.quantize_tied,
            "batch_size": cfg.batch_size,
            "kl_samples": cfg.kl_samples,
            "kl_stride": cfg.kl_stride,
            "hessian_dtype": cfg.hessian_dtype,
            "block_replay": replay,
            # "rtn": round-to-nearest with the per-group clip search (kernels.quant); "gptq": kernels.gptq
            "quantizer": "rtn-clip" if cfg.quantizer == "rtn" else cfg.quantizer,
            "ref_method": cfg.ref_method,
            **options,
        },
        "quantizer": cfg.quantizer,
        "saliency": cfg.saliency,
        "table": table,
    }
