"""bitalloc.sensitivity: which layers to quantize, and how much each scheme would cost in quality.

Pipeline (:func:`build_profile` runs it): load a model from a spec (:func:`load_model`),
find the quantizable layers (:func:`find_layers`), build calibration data (self-generated
by default), collect input Hessians (:func:`collect_hessians`), compute the proxy error
table (:func:`proxy_table`), measure the end metric for reference schemes
(:func:`measure_deltas`), calibrate the proxy into metric units
(:func:`calibrate_proxy`), and save a :class:`SensitivityProfile`.

Importing this package is light: submodules (torch, transformers) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    # models
    "ModelSpecError": "models",
    "LoadedModel": "models",
    "ByteTokenizer": "models",
    "load_model": "models",
    "fingerprint": "models",
    "DEFAULT_MODEL": "models",
    "VALID_SPECS": "models",
    # layers
    "LayerInfo": "layers",
    "Skipped": "layers",
    "LayerSelectionError": "layers",
    "find_layers": "layers",
    "get_weight": "layers",
    # calibration
    "CalibrationError": "calibration",
    "CalibrationSpec": "calibration",
    "calibration_from_text": "calibration",
    "calibration_from_file": "calibration",
    "generate_calibration": "calibration",
    "calibration_from_sentences": "calibration",
    "load_calibration": "calibration",
    "as_batches": "calibration",
    # hessian
    "HessianAccumulator": "hessian",
    "collect_hessians": "hessian",
    "collect_input_statistics": "hessian",
    # proxy / measurement
    "proxy_table": "proxy",
    "quantize_layer_weight": "proxy",
    "hessian_saliency": "proxy",
    "Metric": "proxy",
    "KLMetric": "proxy",
    "CosineMetric": "proxy",
    "Reference": "proxy",
    "compute_reference": "proxy",
    "measure_item": "proxy",
    "measure_deltas": "proxy",
    "measure_kl_deltas": "proxy",
    "measure_table": "proxy",
    "calibrate_proxy": "proxy",
    # profile
    "PROFILE_SCHEMA": "profile",
    "ProfileError": "profile",
    "SensitivityProfile": "profile",
    "build_profile": "build",
    "ProfileConfig": "profile_config",
    "cost_table": "build",
    "other_parameter_bits": "build",
    "DEFAULT_SCHEMES": "profile",
    "DEFAULT_REF_SCHEMES": "profile",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'sensitivity' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .calibration import (  # noqa: F401
        CalibrationError,
        CalibrationSpec,
        as_batches,
        calibration_from_file,
        calibration_from_sentences,
        calibration_from_text,
        generate_calibration,
        load_calibration,
    )
    from .hessian import HessianAccumulator, collect_hessians, collect_input_statistics  # noqa: F401
    from .layers import LayerInfo, LayerSelectionError, Skipped, find_layers, get_weight  # noqa: F401
    from .models import DEFAULT_MODEL, VALID_SPECS, ByteTokenizer, LoadedModel, ModelSpecError, fingerprint, load_model  # noqa: F401
    from .profile import (  # noqa: F401
        DEFAULT_REF_SCHEMES,
        DEFAULT_SCHEMES,
        PROFILE_SCHEMA,
        ProfileError,
        SensitivityProfile,
        build_profile,
        cost_table,
        other_parameter_bits,
    )
    from .proxy import (  # noqa: F401
        CosineMetric,
        KLMetric,
        Metric,
        Reference,
        calibrate_proxy,
        compute_reference,
        measure_item,
        measure_deltas,
        measure_kl_deltas,
        measure_table,
        proxy_table,
    )
