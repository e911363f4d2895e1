"""Pairwise interaction terms between layers of one block: the off-diagonal of ``δᵀ M δ``.

For layers ``a``, ``b`` of the same block and schemes ``s``, ``t``::

    I_ab(s, t) = Δ(a@s and b@t together) − Δ(a@s) − Δ(b@t)

with ``Δ`` the measured metric change (KL against the 16-bit model) and zero across blocks.
Two models of it:

* ``"full"``: every pair is measured at every combination of the K pair schemes —
  ``n_pairs · K²`` joint items (SmolLM2, 30 blocks × 21 same-block pairs = 630 pairs:
  630 × 6² = 22 680 for one 6-ratio family; 630 × 13² = 106 470 for the benchmark's 13
  options), on top of the ``L · K`` single items (210 × 13 = 2 730).
* ``"reduced"``: every pair is measured once, at the reference combination
  ``(ref_a, ref_b)``; the interaction at other combinations is scaled by the diagonal::

      M_ab(s, t) = ρ_ab · sqrt(Δ_a(s) · Δ_b(t)),   ρ_ab = I_ab(ref) / sqrt(Δ_a(ref_a) · Δ_b(ref_b))

  — ``n_pairs`` joint items (SmolLM2: 630), a correlation-like coefficient per pair that
  is exact at the reference and scales with the two layers' own damage elsewhere.

Joint items run through :mod:`sensitivity.runner` like single ones, keyed
``("a|b", "s|t")`` (same checkpoint, same resume, same Ray path). The result is stored
in the profile's optional ``pairs`` field (:func:`check_pairs` validates it) and turned
into solver matrices by :func:`pair_matrices`.
"""

from __future__ import annotations
from .. import BitallocError

import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np

from .defaults import PAIR_MODELS
from .errors import ProfileError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["PAIR_MODELS", "PairError", "block_pairs", "pair_items", "pair_item_count", "pairs_from_values",
           "check_pairs", "diag_roots", "pair_matrices", "measure_joint"]

SEP = "|"


class PairError(BitallocError, ValueError):
    """Pair terms are malformed or asked for in a way that cannot work."""


def block_pairs(layers: Sequence[Any]) -> list[tuple[str, str]]:
    """(fqn_a, fqn_b) for every two layers of one block (layer order kept); tied layers skipped."""
    by_block: dict[str, list[Any]] = {}
    for layer in layers:
        if layer.block:
            by_block.setdefault(layer.block, []).append(layer)
    out = []
    for members in by_block.values():
        for a, b in combinations(members, 2):
            if a.tie_group is not None and a.tie_group == b.tie_group:
                continue
            out.append((a.fqn, b.fqn))
    return out


def pair_items(pairs: Sequence[tuple[str, str]], schemes: Sequence[str], model: str = "reduced",
               ref: tuple[str, str] | str | None = None) -> list[tuple[str, str]]:
    """The runner's joint items: ``("a|b", "s|t")`` for the pair model (see module docstring)."""
    if model not in PAIR_MODELS:
        raise PairError(f"pair model must be one of {PAIR_MODELS}, got {model!r}")
    schemes = list(schemes)
    if model == "full":
        combos = [(s, t) for s in schemes for t in schemes]
    else:
        r = _ref(ref, schemes)
        combos = [r]
    return [(f"{a}{SEP}{b}", f"{s}{SEP}{t}") for a, b in pairs for s, t in combos]


def pair_item_count(n_pairs: int, n_schemes: int, model: str) -> int:
    return n_pairs * (n_schemes * n_schemes if model == "full" else 1)


def _ref(ref, schemes: Sequence[str]) -> tuple[str, str]:
    if ref is None and schemes:
        ref = schemes[0]
    r = (ref, ref) if isinstance(ref, str) else tuple(ref) if isinstance(ref, (list, tuple)) else ()
    if len(r) != 2 or any(x not in schemes for x in r):
        raise PairError(f"pair reference {ref!r} must be one or two of the pair schemes {list(schemes)}")
    return r  # type: ignore[return-value]


def pairs_from_values(pairs: Sequence[tuple[str, str]], schemes: Sequence[str], single: Mapping[tuple[str, str], float],
                      joint: Mapping[tuple[str, str], float], model: str = "reduced", ref=None,
                      metric: str = "kl") -> dict:
    """The profile's ``pairs`` field from measured single items ``(fqn, scheme) -> Δ`` and joint
    items ``("a|b", "s|t") -> Δ``."""
    schemes = list(schemes)
    out: dict[str, Any] = {"model": model, "schemes": schemes, "metric": metric, "pairs": [list(p) for p in pairs]}
    if model == "full":
        terms = {}
        for a, b in pairs:
            M = np.zeros((len(schemes), len(schemes)))
            for i, s in enumerate(schemes):
                for j, t in enumerate(schemes):
                    M[i, j] = joint[f"{a}{SEP}{b}", f"{s}{SEP}{t}"] - single[a, s] - single[b, t]
            terms[f"{a}{SEP}{b}"] = M.tolist()
        out["terms"] = terms
        out["items"] = len(pairs) * len(schemes) ** 2
    else:
        ra, rb = _ref(ref, schemes)
        rho, inter = {}, {}
        for a, b in pairs:
            da, db = single[a, ra], single[b, rb]
            I = joint[f"{a}{SEP}{b}", f"{ra}{SEP}{rb}"] - da - db
            den = math.sqrt(max(da, 0.0) * max(db, 0.0))
            rho[f"{a}{SEP}{b}"] = float(I / den) if den > 0 else 0.0
            inter[f"{a}{SEP}{b}"] = float(I)
        out.update(ref=[ra, rb], rho=rho, interaction_at_ref=inter, items=len(pairs))
    return out


def check_pairs(d: Any, fqns: Sequence[str], schemes: Sequence[str]) -> dict:
    """Validate a profile's ``pairs`` field (returns it); a :class:`ProfileError` names the problem."""
    if not isinstance(d, dict) or d.get("model") not in PAIR_MODELS:
        raise ProfileError(f"profile field 'pairs' must be an object with model in {PAIR_MODELS}")
    names = set(fqns)
    sch = d.get("schemes")
    if not isinstance(sch, list) or any(s not in schemes for s in sch):
        raise ProfileError("profile field 'pairs.schemes' must list schemes of the profile")
    key = "terms" if d["model"] == "full" else "rho"
    table = d.get(key)
    if not isinstance(table, dict):
        raise ProfileError(f"profile field 'pairs.{key}' must be an object of 'a|b' -> value")
    for k, v in table.items():
        parts = k.split(SEP)
        if len(parts) != 2 or any(p not in names for p in parts):
            raise ProfileError(f"profile field 'pairs.{key}': key {k!r} is not 'layer_a|layer_b' of profile layers")
        try:
            arr = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise ProfileError(f"profile field 'pairs.{key}[{k!r}]' is not a numeric array") from None
        if d["model"] == "full" and arr.shape != (len(sch), len(sch)):
            raise ProfileError(f"profile field 'pairs.terms[{k!r}]' must be {len(sch)}x{len(sch)}")
        if not np.isfinite(arr).all():
            raise ProfileError(f"profile field 'pairs.{key}[{k!r}]' has NaN or inf entries")
    if d["model"] == "reduced":
        _ref(d.get("ref"), sch)
    return d


def diag_roots(profile: Any, diag: np.ndarray | None = None) -> np.ndarray:
    """``(L, S)`` ``sqrt(D)`` that scales a correlation-like ρ into pair terms: ``D`` = ``diag``
    (default the profile's table), negative and NaN entries counted as 0."""
    D = np.asarray(diag if diag is not None else profile.table(next(iter(profile.tables))), dtype=np.float64)
    return np.sqrt(np.clip(np.nan_to_num(D, nan=0.0), 0.0, None))


def pair_matrices(profile: Any, diag: np.ndarray | None = None) -> dict[tuple[str, str], np.ndarray]:
    """``{(fqn_a, fqn_b): (S, S)}`` over all profile schemes, from ``profile.pairs``.

    ``full``: the measured terms at the pair schemes, zero at other schemes. ``reduced``:
    ``ρ_ab · sqrt(D_a(s) D_b(t))`` for every profile scheme, ``D`` = ``diag`` (default the
    profile's table; negative entries count as 0). Pairs are oriented by profile layer order.
    """
    pr = getattr(profile, "pairs", None)
    if not pr:
        return {}
    S = len(profile.schemes)
    order = {f: i for i, f in enumerate(profile.fqns)}
    out = {}
    if pr["model"] == "full":
        idx = [profile.schemes.index(s) for s in pr["schemes"]]
        for k, v in pr["terms"].items():
            a, b = k.split(SEP)
            M = np.zeros((S, S))
            M[np.ix_(idx, idx)] = np.asarray(v, dtype=np.float64)
            out[a, b] = M
    else:
        root = diag_roots(profile, diag)
        for k, r in pr["rho"].items():
            a, b = k.split(SEP)
            out[a, b] = float(r) * np.outer(root[order[a]], root[order[b]])
    fixed = {}
    for (a, b), M in out.items():  # solvers want i < j
        fixed[(a, b) if order[a] < order[b] else (b, a)] = M if order[a] < order[b] else M.T
    return fixed


def measure_joint(model: torch.nn.Module, parts: Sequence[tuple[Any, Any, Any, Any]], reference: Any, *,
                  quantizer: str = "rtn") -> float | dict[str, float]:
    """Metric delta of quantizing several layers together: ``parts`` = [(layer, scheme, hessian, saliency)].

    A part may carry a fifth element, the ready fake-quantized (out, in) weight (a cache of
    the caller's: the same layer and scheme recur in many pairs).

    The joint counterpart of :func:`sensitivity.proxy.measure_item` (same weights for the
    same layer and scheme, prefix replay from the first changed block, weights restored
    bit for bit). Activation-quantized schemes are not supported here.
    """
    import torch  # here, not at the top: reading and solving pair terms needs no torch

    with torch.no_grad():
        return _joint_delta(model, parts, reference, quantizer)


def _joint_delta(model, parts, reference, quantizer: str):
    import torch

    from .layers import get_weight
    from .proxy import as_scheme, hessian_tensor, module_at, quantize_layer_weight, score_batches

    backups = []
    try:
        for layer, scheme, hessian, sal, *ready in parts:
            scheme = as_scheme(scheme)
            if scheme.act != "a16":
                raise PairError(f"joint items do not support activation-quantized schemes ({scheme.name})")
            module = module_at(model, layer.fqn)
            param = module.weight
            w = get_weight(module, layer.module_type).detach()
            H = hessian_tensor(hessian) if hessian is not None else None
            if ready and ready[0] is not None:
                wq = ready[0].to(param.dtype)
            else:
                wq = quantize_layer_weight(w.to(torch.float32), scheme, H, quantizer=quantizer, saliency=sal).to(param.dtype)
            backups.append((param, param.detach().clone()))
            param.copy_(wq.t() if layer.module_type == "Conv1D" else wq)
        blocks = [layer.block_index for layer, *_ in parts]
        first = None if any(b is None for b in blocks) else min(blocks)
        return score_batches(model, reference, first)
    finally:
        for param, b in reversed(backups):
            param.copy_(b)
