"""The channels each split scheme of a profile keeps high, stored with the profile (no torch).

A split scheme (``w2g64z+h3r0.1``) keeps ``k = Scheme.n_high(in_features)`` input channels
of a layer in its high format, chosen by the layer's saliency. The profile measured every
split scheme with those channels, so it stores them: ``split_channels[fqn][k]`` is the
``(k,)`` int64 ascending channel list (keyed by ``k``, not by scheme: two schemes with the
same ``k`` keep the same channels). A plan copies them, so solving and planning never
choose channels again. A profile saved before the channels were stored (``/2``, ``/1``)
gets them from its stored saliency by the same rule (:mod:`kernels.channels`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bitalloc.kernels.channels import select_high_channels_np
from bitalloc.kernels.formats import parse_scheme

from .errors import ProfileError
from .layer_info import LayerInfo

__all__ = ["SPLIT_PREFIX", "check_split_channels", "split_channels_for", "high_channels", "split_ks",
           "split_to_sidecar", "split_from_sidecar"]

SPLIT_PREFIX = "split/"  # sidecar key: "split/<k>/<fqn>" -> (k,) int64


def split_ks(schemes: Iterable[str], in_features: int) -> list[int]:
    """The distinct high-channel counts ``k > 0`` of the split ``schemes`` on one layer, ascending."""
    return sorted({k for s in schemes if (k := parse_scheme(s).n_high(in_features))})


def split_channels_for(layers: Iterable[LayerInfo], schemes: Iterable[str], saliency: Mapping[str, Any],
                       select) -> dict[str, dict[int, np.ndarray]]:
    """``fqn -> {k: (k,) int64}`` for every layer with saliency and every split among ``schemes``;
    ``select(vector, k)`` is the channel rule (the profiler passes the torch one it measured with)."""
    schemes = list(schemes)
    out = {}
    for layer in layers:
        ks = split_ks(schemes, layer.in_features)
        if ks and layer.fqn in saliency:
            out[layer.fqn] = {k: np.asarray(select(saliency[layer.fqn], k), dtype=np.int64) for k in ks}
    return out


def _channels(v: Any, k: int, n: int, name: str) -> np.ndarray:
    try:
        raw = np.asarray(v)
        a = raw.astype(np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProfileError(f"profile field {name!r} is not an integer array ({e})") from None
    if raw.dtype.kind not in "iu":
        raise ProfileError(f"profile field {name!r} must hold integer channel indices, got {raw.dtype}")
    if a.shape != (k,):
        raise ProfileError(f"profile field {name!r} has shape {a.shape}, expected ({k},)")
    if k and (a[0] < 0 or a[-1] >= n or (np.diff(a) <= 0).any()):
        raise ProfileError(f"profile field {name!r} must be ascending distinct channels in [0, {n})")
    return a


def _k(key: Any, n: int, name: str) -> int:
    k = key if isinstance(key, int) and not isinstance(key, bool) else None
    if isinstance(key, str) and key.isdigit() and key == str(int(key)):
        k = int(key)
    if k is None or not 1 <= k <= n:
        raise ProfileError(f"profile field {name!r}: key {key!r} must be a channel count in [1, {n}]")
    return k


def check_split_channels(d: Any, layers: list[LayerInfo]) -> dict[str, dict[int, np.ndarray]]:
    """``d`` (fqn -> {k or "k": channels}) validated against the layers, as int keys and int64 arrays."""
    if not isinstance(d, Mapping):
        raise ProfileError("profile field 'split_channels' must be an object of layer -> {k: channels}")
    by_fqn = {layer.fqn: layer for layer in layers}
    extra = sorted(set(d) - set(by_fqn))
    if extra:
        raise ProfileError(f"profile split_channels name unknown layer(s): {extra[:3]}")
    out = {}
    for fqn, per_k in d.items():
        n = by_fqn[fqn].in_features
        if not isinstance(per_k, Mapping):
            raise ProfileError(f"profile field 'split_channels.{fqn}' must be an object of k -> channels")
        out[fqn] = {}
        for key, v in per_k.items():
            k = _k(key, n, f"split_channels.{fqn}")
            out[fqn][k] = _channels(v, k, n, f"split_channels.{fqn}.{k}")
    return out


def high_channels(split: Mapping | None, saliency: Mapping | None, layer: LayerInfo,
                  scheme: str) -> tuple[int, ...] | None:
    """The ascending channels ``scheme`` keeps high in ``layer``: the stored ones, else chosen
    from the stored saliency (older profiles); None when no split or no saliency."""
    k = parse_scheme(scheme).n_high(layer.in_features)
    if not k:
        return None
    stored = (split or {}).get(layer.fqn, {}).get(k)
    if stored is None:
        if not saliency or layer.fqn not in saliency:
            return None
        stored = select_high_channels_np(saliency[layer.fqn], k)
    return tuple(int(x) for x in stored.tolist())


def split_to_sidecar(split: Mapping[str, Mapping[Any, Any]]) -> dict[str, np.ndarray]:
    """``split/<k>/<fqn>`` -> (k,) int64, for the safetensors sidecar."""
    return {f"{SPLIT_PREFIX}{int(k)}/{fqn}": np.asarray(v, dtype=np.int64)
            for fqn, per_k in split.items() for k, v in per_k.items()}


def split_from_sidecar(key: str, v: np.ndarray, into: dict, where: str) -> None:
    """Add one sidecar array ``split/<k>/<fqn>`` to ``into`` (fqn -> {k: channels})."""
    k, sep, fqn = key[len(SPLIT_PREFIX):].partition("/")
    if not sep or not fqn or not k.isdigit():
        raise ProfileError(f"{where}: sidecar array {key!r} is not named split/<k>/<layer>")
    if v.dtype != np.int64:
        raise ProfileError(f"{where}: sidecar array {key!r} is {v.dtype}, expected int64")
    into.setdefault(fqn, {})[int(k)] = v
