"""Hessians saved beside a profile, for the GPTQ executor.

GPTQ needs each layer's input Hessian ``H = XᵀX / n`` when a plan is applied. bitalloc
saves the profile's Hessians in one safetensors file (layers sharing an input, such as
q/k/v, store one tensor) with the fqn -> tensor map and the calibration tokens' sha256 in
the file's metadata, and records the file's sha256; loading checks both, so a plan is
never applied with Hessians of other data or a corrupt file. (The alternative, recomputing
them from the recorded calibration, needs the calibration source at apply time; a saved
file does not.) SmolLM2-135M: about 0.4 GB in float32.
"""

from __future__ import annotations
from .. import BitallocError

import json
import os
from pathlib import Path
from typing import Any

import torch

from .artifact import atomic_path, file_sha256  # file_sha256 re-exported
from .hessian import hessian_tensor as _tensor  # one unwrapping of accumulators

__all__ = ["HessianStoreError", "save_hessians", "load_hessians", "recorded_hessians", "file_sha256"]


class HessianStoreError(BitallocError, ValueError):
    """A Hessian file is missing, corrupt, or belongs to other calibration data."""




def save_hessians(path: str | os.PathLike, hessians: dict[str, Any], *, tokens_sha256: str | None = None) -> dict:
    """Write ``fqn -> H`` (tensors or accumulators) to a safetensors file; returns
    ``{"path", "sha256", "layers", "tokens_sha256"}`` to record in a plan or profile."""
    from safetensors.torch import save_file

    tensors, index, seen = {}, {}, {}
    for fqn, h in hessians.items():
        key = seen.get(id(h))
        if key is None:
            key = f"h{len(tensors)}"
            seen[id(h)] = key
            tensors[key] = _tensor(h).detach().to(torch.float32).contiguous().cpu()
        index[fqn] = key
    p = Path(path)
    with atomic_path(p) as tmp:
        save_file(tensors, str(tmp), metadata={"bitalloc": "hessians/1", "index": json.dumps(index),
                                               "tokens_sha256": tokens_sha256 or ""})
    return {"path": str(p), "sha256": file_sha256(p), "layers": len(index), "tokens_sha256": tokens_sha256}


def load_hessians(path: str | os.PathLike, *, sha256: str | None = None,
                  tokens_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_hessians`, checking its sha256 and calibration tokens when given."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise HessianStoreError(f"Hessian file {str(p)!r} does not exist")
    if sha256 is not None and file_sha256(p) != sha256:
        raise HessianStoreError(f"Hessian file {str(p)!r} does not match the recorded sha256 (corrupt or replaced)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("bitalloc") != "hessians/1":
                raise HessianStoreError(f"{str(p)!r} is not a bitalloc Hessian file")
            if tokens_sha256 and meta.get("tokens_sha256") and meta["tokens_sha256"] != tokens_sha256:
                raise HessianStoreError(f"Hessian file {str(p)!r} was computed on other calibration tokens")
            index = json.loads(meta["index"])
            cache = {k: f.get_tensor(k) for k in set(index.values())}
    except HessianStoreError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise HessianStoreError(f"Hessian file {str(p)!r} is unreadable ({type(e).__name__}: {e})") from None
    return {fqn: cache[k] for fqn, k in index.items()}


def recorded_hessians(rec: dict | None, *, beside: str | os.PathLike | None = None,
                      tokens_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The Hessians a profile or plan records (``{"path", "sha256"}``, as :func:`save_hessians`
    returns), looked for at the recorded path, then under its file name in the folder of
    ``beside`` (the profile's file: a run folder moved as a whole), and checked against the
    recorded sha256 and ``tokens_sha256``."""
    if not rec or not rec.get("path"):
        raise HessianStoreError("no Hessian file is recorded")
    tried = [Path(rec["path"])]
    if beside is not None and Path(beside).parent / tried[0].name != tried[0]:
        tried.append(Path(beside).parent / tried[0].name)
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        raise HessianStoreError(f"the recorded Hessian file is missing (looked for {', '.join(map(str, tried))})")
    return load_hessians(found, sha256=rec.get("sha256"), tokens_sha256=tokens_sha256)
