"""Pair terms from the Fisher information: every (layer, scheme) pair's interaction from one
backward pass per calibration row, with a standard error (issue 14).

The measured pair terms (:mod:`sensitivity.pairs`) are the difference of three end-to-end
measurements on one row each, ``Δ(a and b) − Δ(a) − Δ(b)``, and on SmolLM2 they were noise
(57 % of the 630 ρ negative, the optimiser picking the luckiest). Here the interaction comes
from the second-order model of the KL instead, which has no such difference of noisy numbers.

For a small change ``δ`` of all weights, the KL of the next-token distribution is quadratic
with the Fisher information as its Hessian. With labels ``y_t`` drawn from the 16-bit model at
every position of row ``r`` and ``g_r = Σ_t ∇_W log p(y_t | x_{<t})`` (one backward),
``E_y[(g_r · δ)²] = Σ_t δᵀ F_t δ`` (the cross terms between positions have mean zero), so

    KL(δ) ≈ 1/(2N) · Σ_r (g_r · δ)²,     N = scored positions over all rows.

Quantizing layer ``l`` at scheme ``s`` is ``δ = Q_s(W_l) − W_l``; with the per-row projections
``s_r[l, s] = <∇_{W_l} log p, Q_s(W_l) − W_l>`` (:func:`fisher_projections`) the model of any
plan splits into single-layer terms and pair terms:

    F_l(s)      = 1/(2N) Σ_r s_r[l, s]²                 (the full Fisher of one layer, not its diagonal)
    I_ab(s, t)  = 1/N    Σ_r s_r[a, s] · s_r[b, t]      (the cross term of a and b)

``I_ab`` is a mean over rows, so it has a standard error from the same numbers; a term that
the rows do not resolve is shrunk toward zero, ``I · max(0, 1 − se²/I²)`` (positive-part
James–Stein per term), before it reaches the solver. The terms enter the profile as a
``full`` pair model over all its schemes, in the profile's own units:
``M_ab(s, t) = I_ab(s, t) / sqrt(F_a(s) F_b(t)) · sqrt(D_a(s) D_b(t))`` with ``D`` the
profile's table (so a pair's term is the Fisher's *correlation* of the two layers' damage,
applied to the measured single-layer losses, like the ``reduced`` model's ρ).

What it cannot see: interactions beyond second order (at 2 bits the single-layer KL already
grows faster than quadratic), which the measured pairs would capture if they were not noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FisherProjections", "fisher_projections", "pair_stats", "fisher_pairs_field"]


@dataclass(frozen=True)
class FisherProjections:
    """``s[r, l, j] = <∇_{W_l} Σ_t log p(y_t), Q_j(W_l) − W_l>`` on calibration row ``r`` (labels
    sampled from the 16-bit model), over ``n_tokens`` scored positions in all."""

    s: np.ndarray  # (R, L, S) float64
    n_tokens: int
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = np.asarray(self.s, dtype=np.float64)
        assert s.ndim == 3, f"projections must be (rows, layers, schemes), got shape {s.shape}"
        assert self.n_tokens > 0, "projections need at least one scored position"
        object.__setattr__(self, "s", s)

    @property
    def rows(self) -> int:
        return self.s.shape[0]

    def layer_kl(self) -> np.ndarray:
        """``(L, S)``: each layer's KL alone at each scheme by the Fisher model, ``1/(2N) Σ_r s²``."""
        return (self.s ** 2).sum(axis=0) / (2.0 * self.n_tokens)


def fisher_projections(ctx: Any, *, rows: int | None = None, seed: int = 0, chunk: int = 8,
                       progress: bool = False) -> FisherProjections:
    """Per-row projections of the sampled-label log-likelihood gradient on every (layer, scheme)'s
    weight change, for a :class:`~bitalloc.sensitivity.peer_context.PeerContext` ``ctx``.

    One forward and one backward per calibration row (the context's batches split into rows,
    the first ``rows`` of them; default all). The weight changes ``Q_j(W_l) − W_l`` are made
    once, kept as float16 (``S`` × the planned weights: SmolLM2, 18 schemes, 3.8 GB); the
    gradients of ``chunk`` rows are kept (float32, ``chunk`` × the planned weights) and projected
    together, one matrix product per layer."""
    import torch

    from .fisher_refs import sample_labels
    from .peer_grad import as_out_in, grad_only

    t0 = time.perf_counter()
    ids_rows = [b["input_ids"][k:k + 1] for b in ctx.batches for k in range(b["input_ids"].shape[0])]  # (1, T) each
    ids_rows = ids_rows[:rows] if rows else ids_rows
    assert ids_rows and all(r.shape[1] > 1 for r in ids_rows), "projections need rows of at least two tokens"
    L, S = ctx.n_layers, ctx.n_schemes
    # (S, out, in) per layer: the damage each scheme does to the layer
    deltas = []
    for i in range(L):
        deltas.append(torch.stack([(ctx.quantized(i, j) - ctx.weight(i)).to(torch.float16) for j in range(S)]))
        if progress and (i + 1) % 30 == 0:
            print(f"  fisher pairs: weight changes of {i + 1}/{L} layers ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    t_delta = time.perf_counter() - t0
    params = [ctx.module(i).weight for i in range(L)]
    gen = torch.Generator().manual_seed(int(seed))
    out = np.zeros((len(ids_rows), L, S))
    n_tokens = 0
    with grad_only(params, ctx.model):
        for start in range(0, len(ids_rows), chunk):
            rows_k = ids_rows[start:start + chunk]
            grads = [[] for _ in range(L)]  # per layer: k gradients (out*in,) float32
            for ids in rows_k:
                res = ctx.model(input_ids=ids)
                logits = res.logits if hasattr(res, "logits") else res  # (1, T, V)
                y = sample_labels(logits, ids, "sampled", gen)  # (1, T-1)
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (1, T-1, V)
                ll = logp.gather(-1, y[..., None]).sum()  # Σ_t log p(y_t)
                n_tokens += int(y.numel())
                for i, g in enumerate(torch.autograd.grad(ll, params)):
                    grads[i].append(as_out_in(ctx, i, g.detach().to(torch.float32)).reshape(-1))  # (out*in,)
            for i in range(L):  # one float32 copy of the layer's damages per chunk of rows, not per row
                G = torch.stack(grads[i])  # (k, out*in)
                out[start:start + len(rows_k), i] = (G @ deltas[i].reshape(S, -1).to(torch.float32).T).double().numpy()
                grads[i] = None
            if progress:
                print(f"  fisher pairs: {start + len(rows_k)}/{len(ids_rows)} rows ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    info = {"labels": "sampled", "seed": int(seed), "rows": len(ids_rows), "tokens": n_tokens,
            "forwards": len(ids_rows), "backwards": len(ids_rows), "delta_s": t_delta,
            "seconds": time.perf_counter() - t0}
    return FisherProjections(out, n_tokens, info)


def pair_stats(proj: FisherProjections, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """``(I, se)``, each ``(S, S)``: the Fisher cross term of layers ``a`` and ``b`` at every scheme
    combination, ``1/N Σ_r s_r[a, s] s_r[b, t]``, and its standard error over the rows."""
    R = proj.rows
    p = proj.s[:, a, :, None] * proj.s[:, b, None, :]  # (R, S, S): per-row products
    scale = R / proj.n_tokens  # the sum over rows is R × their mean
    inter = scale * p.mean(axis=0)
    se = scale * p.std(axis=0, ddof=1) / math.sqrt(R) if R > 1 else np.full(inter.shape, np.inf)
    return inter, se


def _shrunk(inter: np.ndarray, se: np.ndarray) -> np.ndarray:
    """Positive-part James–Stein toward zero, per term: ``I · max(0, 1 − se²/I²)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.clip(1.0 - (se / inter) ** 2, 0.0, 1.0)  # se = inf (one row) -> 0
    return np.where(inter != 0, inter * factor, 0.0)


def fisher_pairs_field(profile: Any, proj: FisherProjections, pairs: Sequence[tuple[str, str]], *,
                       shrink: bool = True, diag: np.ndarray | None = None) -> dict:
    """The profile's ``pairs`` field (``full`` model over all its schemes) from Fisher projections
    whose layers and schemes are the profile's (module docstring): ``M_ab(s, t) = ρ_ab(s, t) ·
    sqrt(D_a(s) D_b(t))``, ``ρ = I / sqrt(F_a F_b)`` (``I`` shrunk by its standard error when
    ``shrink``), ``D`` = ``diag`` (default the profile's table; negative entries count as 0).

    Also records how many terms the rows resolve (``|I| > 2 se``) and the distribution of ρ at
    equal schemes, so a reader can see whether the pairs carry signal."""
    from .pairs import SEP, diag_roots

    order = {f: i for i, f in enumerate(profile.fqns)}
    L, S = len(profile.fqns), len(profile.schemes)
    assert proj.s.shape[1:] == (L, S), f"projections are {proj.s.shape[1:]}, the profile is ({L}, {S})"
    root_d = diag_roots(profile, diag)  # (L, S)
    root_f = np.sqrt(proj.layer_kl())  # (L, S)
    terms, resolved, total, rho_diag = {}, 0, 0, []
    for fa, fb in pairs:
        a, b = order[fa], order[fb]
        inter, se = pair_stats(proj, a, b)
        live = (root_f[a][:, None] > 0) & (root_f[b][None, :] > 0)  # fp16 and the like change nothing
        resolved += int((np.abs(inter) > 2 * se)[live].sum())
        total += int(live.sum())
        used = _shrunk(inter, se) if shrink else inter
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = np.where(live, used / np.outer(root_f[a], root_f[b]), 0.0)  # (S, S), in [-2, 2]
        rho_diag.extend(np.diag(rho)[np.diag(live)].tolist())
        terms[f"{fa}{SEP}{fb}"] = (rho * np.outer(root_d[a], root_d[b])).tolist()
    rd = np.asarray(rho_diag) if rho_diag else np.zeros(1)
    return {"model": "full", "source": "fisher", "schemes": list(profile.schemes), "metric": "kl",
            "pairs": [list(p) for p in pairs], "terms": terms, "items": 0,
            "fisher": {**proj.info, "shrink": bool(shrink), "terms": total, "resolved_2se": resolved,
                       "rho_same_scheme": {"mean": float(rd.mean()), "min": float(rd.min()), "max": float(rd.max()),
                                           "negative": float((rd < 0).mean())}}}
