"""Gradient-based peer scores (issue 14): HAWQ-V3, ModelOpt auto_quantize (gradient), AutoRound AutoScheme.

Each function takes a :class:`~bitalloc.sensitivity.peer_context.PeerContext` and returns a
:class:`~bitalloc.sensitivity.peer_context.PeerScores` table over bitalloc's layers and
schemes (lower is better). All three use the same loss, the one their codes use with a
Hugging Face causal LM (``model(**batch, labels=input_ids).loss``): mean next-token cross
entropy on the context's calibration batches (labels = inputs shifted by one, padded
positions ignored). Pass counts (forward / backward / Hessian-vector products, each over
one calibration batch) and seconds are reported in ``info``.

Common deviations from the peers (all three): they score bitalloc's candidate schemes with
bitalloc's quantizer (``ctx.quantized``) instead of their own formats and quantizers, on
``ctx.batches`` instead of their own calibration sampling, and the search that consumes the
table runs on bitalloc's exact bits (``profile.cost_bits``), which is not part of this module.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kernels.formats import parse_scheme
from .peer_context import PeerContext, PeerScores

__all__ = ["lm_loss", "grad_only", "as_out_in", "hutchinson_samples", "score_hawq_v3", "score_modelopt_gradient",
           "score_autoround", "modelopt_groups"]


# --------------------------------------------------------------------------- shared pieces

def lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross entropy (HF ``labels=input_ids``): logits[:, t] predicts ids[:, t+1]."""
    ids = batch["input_ids"]  # (B, T)
    out = model(**batch)
    logits = out.logits if hasattr(out, "logits") else out  # (B, T, V)
    labels = ids[:, 1:].clone()  # (B, T-1)
    mask = batch.get("attention_mask")
    if mask is not None:
        labels[mask[:, 1:] == 0] = -100
    pred = logits[:, :-1].float()  # (B, T-1, V)
    return torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _weight_params(ctx: PeerContext) -> list[torch.nn.Parameter]:
    return [ctx.module(i).weight for i in range(ctx.n_layers)]


def as_out_in(ctx: PeerContext, i: int, t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like layer i's stored weight, as ``(out, in)`` (Conv1D stores ``(in, out)``)."""
    return t.t() if ctx.layers[i].module_type == "Conv1D" else t


@contextlib.contextmanager
def grad_only(params: Sequence[torch.nn.Parameter], model: torch.nn.Module) -> Iterator[None]:
    """Only ``params`` require grad inside the block (the model's flags and mode restored after)."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    training = model.training
    want = {id(p) for p in params}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(id(p) in want)
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(training)


def _bits(ctx: PeerContext, j: int) -> float:
    """Mean effective bits per weight of scheme j over the context's layers (ModelOpt's 'compression' order)."""
    s = parse_scheme(ctx.schemes[j])
    n = sum(layer.n_params for layer in ctx.layers)
    return sum(s.bits_per_weight(layer.out_features, layer.in_features) * layer.n_params for layer in ctx.layers) / n


def _sq_err(ctx: PeerContext, i: int, j: int) -> float:
    return float(((ctx.quantized(i, j) - ctx.weight(i)).double() ** 2).sum())


# --------------------------------------------------------------------------- HAWQ-V3

def hutchinson_samples(loss: torch.Tensor, params: Sequence[torch.Tensor], n_probes: int,
                       generator: torch.Generator) -> np.ndarray:
    """``(n_probes, P)`` samples vᵀ(Hv)_p per parameter tensor p, Rademacher v over all of them.

    PyHessian ``hessian.trace`` (``hessian_vector_product`` = double backward of the loss).
    With one joint v, ``v_pᵀ (Hv)_p`` is unbiased for tr(H_pp): the cross terms
    ``v_pᵀ H_pq v_q`` have mean zero (independent signs) but add variance."""
    grads = torch.autograd.grad(loss, list(params), create_graph=True)
    out = np.zeros((n_probes, len(params)))
    for k in range(n_probes):
        vs = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype).mul_(2).sub_(1) for p in params]
        hv = torch.autograd.grad(grads, list(params), grad_outputs=vs, retain_graph=True)
        out[k] = [float((h.double() * v.double()).sum()) for h, v in zip(hv, vs)]
    return out


def _hutchinson_per_layer(ctx: PeerContext, params, batch, n_probes, gen) -> np.ndarray:
    """PyHessian on one layer at a time: v on W_l only, Hv w.r.t. W_l only -> samples of tr(H_ll)."""
    out = np.zeros((n_probes, len(params)))
    for i, p in enumerate(params):
        out[:, i] = hutchinson_samples(lm_loss(ctx.model, batch), [p], n_probes, gen)[:, 0]
    return out


def score_hawq_v3(ctx: PeerContext, n_probes: int = 16, per_layer: bool = False, seed: int | None = None) -> PeerScores:
    """HAWQ-V3: Ω_l(b) = tr(∇²_{W_l} L) / n_l · ‖Q_b(W_l) − W_l‖².

    Follows Zhen-Dong/HAWQ ``ILP.ipynb`` (sensitivity = ``Hutchinson_trace`` (per-parameter
    average trace of the layer's Hessian) × ``delta_weights_square`` = Σ(w_fp − w_q)², then an
    ILP) and amirgholami/PyHessian ``pyhessian/hessian.py`` ``trace`` (Hutchinson with
    Rademacher v, vᵀHv by double backward; ``full_dataset`` mode averages over the batches).
    The loss is the next-token cross entropy (:func:`lm_loss`) of the 16-bit model.

    Deviations: ``n_probes`` Rademacher probes *per calibration batch* (a fresh v each; the
    estimate is the mean over batches × probes, which is unbiased for the batch-mean trace),
    reduced from PyHessian's ``maxIter=100`` with no ``tol=1e-3`` early stop (the probes run
    inside the batch loop, reusing one first-order graph per batch); with ``per_layer=False``
    (default) one joint v over all layers gives every layer's sample per HVP (unbiased, more
    variance: the standard errors in ``info`` include it); ``per_layer=True`` is PyHessian on
    each layer alone (exact block semantics, L times the cost). Their candidate set (4/8-bit)
    is bitalloc's schemes; their per-channel symmetric quantizer is bitalloc's quantizer.
    HAWQ assumes a PSD Hessian (a trained model near a minimum); a negative trace estimate
    (random weights, or noise) is kept as is, giving negative scores (``info['negative_traces']``).
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(ctx.seed if seed is None else seed)
    params = _weight_params(ctx)
    samples = []
    # SDPA's fused CPU/GPU kernels have no double backward: the math kernel (same result) has.
    with grad_only(params, ctx.model), sdpa_kernel([SDPBackend.MATH]):
        for batch in ctx.batches:
            if per_layer:
                samples.append(_hutchinson_per_layer(ctx, params, batch, n_probes, gen))
            else:
                samples.append(hutchinson_samples(lm_loss(ctx.model, batch), params, n_probes, gen))
    s = np.concatenate(samples)  # (n_batches * n_probes, L): samples of tr(H_ll)
    trace = s.mean(axis=0)
    stderr = s.std(axis=0, ddof=1) / math.sqrt(len(s)) if len(s) > 1 else np.full(ctx.n_layers, np.nan)
    n = np.array([layer.n_params for layer in ctx.layers], dtype=np.float64)
    sq = np.array([[_sq_err(ctx, i, j) for j in range(ctx.n_schemes)] for i in range(ctx.n_layers)])  # (L, S)
    table = (trace / n)[:, None] * sq
    nb, passes = len(ctx.batches), (ctx.n_layers if per_layer else 1)
    info = {"n_probes": n_probes, "per_layer": per_layer, "seed": ctx.seed if seed is None else seed,
            "trace": trace.tolist(), "trace_stderr": stderr.tolist(), "trace_per_param": (trace / n).tolist(),
            "delta_w_sq": sq.tolist(), "negative_traces": int((trace < 0).sum()),
            "forwards": nb * passes, "backwards": nb * passes,
            "hvps": nb * passes * n_probes, "seconds": time.perf_counter() - t0}
    return PeerScores("hawq-v3", table, None, info)


# --------------------------------------------------------------------------- ModelOpt auto_quantize (gradient)

# modelopt/torch/quantization/algorithms.py _AutoQuantizeBaseSearcher.quant_grouping_rules (dense models)
MODELOPT_GROUP_RULES = (r"^(.*?)\.(q_proj|k_proj|v_proj)$", r"^(.*?)\.(gate_proj|up_proj)$")


def modelopt_groups(ctx: PeerContext, rules: Sequence[str] = MODELOPT_GROUP_RULES) -> tuple[tuple[int, ...], ...]:
    """Layers that ModelOpt's grouping rules force to one format (q/k/v; gate/up); others alone."""
    keyed: dict[tuple, list[int]] = {}
    for i, layer in enumerate(ctx.layers):
        key: tuple = ("", layer.fqn)
        for r, rule in enumerate(rules):
            m = re.match(rule, layer.fqn)
            if m:
                key = (r, m.group(1))
                break
        keyed.setdefault(key, []).append(i)
    return tuple(sorted(tuple(v) for v in keyed.values()))


def _monotone(table: np.ndarray, bits: Sequence[float]) -> np.ndarray:
    """ModelOpt ``initialize_candidate_stats``: in increasing-bits order, score = min(score, previous)."""
    out = table.copy()
    order = np.argsort(np.asarray(bits), kind="stable")
    for g in range(out.shape[0]):
        prev = math.inf
        for j in order:
            out[g, j] = min(out[g, j], prev)
            prev = out[g, j]
    return out


def _fisher_batch(ctx: PeerContext, batch: dict, acc: np.ndarray, layers: Sequence[int] | None = None) -> None:
    """One forward + one backward: acc[l, j] += Σ (∂L/∂Y_l)² · (X_l (Q_j(W_l) − W_l)ᵀ)² for ``layers`` (all)."""
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    layers = range(ctx.n_layers) if layers is None else layers

    def hook(i):
        def fn(module, args, output):
            inputs[i] = args[0].detach()
            outputs[i] = output
        return fn

    handles = [ctx.module(i).register_forward_hook(hook(i)) for i in layers]
    try:
        loss = lm_loss(ctx.model, batch)
    finally:
        for h in handles:
            h.remove()
    idx = sorted(outputs)
    grads = torch.autograd.grad(loss, [outputs[i] for i in idx], allow_unused=True)
    del outputs, loss
    with torch.no_grad():
        for i, g in zip(idx, grads):
            if g is None:
                continue
            x = inputs.pop(i).reshape(-1, ctx.layers[i].in_features).float()  # (N, in)
            g2 = g.reshape(-1, g.shape[-1]).float() ** 2  # (N, out)
            w = ctx.weight(i)
            for j in range(ctx.n_schemes):
                dy = x @ (ctx.quantized(i, j) - w).t()  # (N, out) = Y^(j) − Y (bias unquantized)
                acc[i, j] += float((g2 * dy * dy).sum())
            del x, g2


def score_modelopt_gradient(ctx: PeerContext, group: bool = True, monotone: bool = True) -> PeerScores:
    """ModelOpt auto_quantize, ``method="gradient"``: S(l, r) = Σ_batches Σ (∂L/∂Y_l)² (Y_l^(r) − Y_l)².

    Follows NVIDIA/TensorRT-Model-Optimizer ``modelopt/torch/quantization/algorithms.py``:
    ``AutoQuantizeGradientSearcher._estimate_auto_quantize_scores`` (the forward runs the
    unquantized model and caches Y^(r) − Y for every recipe; a full backward hook on each
    score module takes grad_output; ``_get_auto_quantize_score`` = Σ grad² · diff², summed over
    ``num_score_steps`` batches), the loss is the user's ``loss_func``, in their LLM examples
    ``output.loss`` (HF next-token cross entropy, :func:`lm_loss`); ``quant_grouping_rules``
    (q/k/v, gate/up take one format: ``groups``; a group's score is the sum of its modules',
    ``QuantRecipeHparam.get_score``); ``initialize_candidate_stats`` makes scores monotone:
    recipes in increasing compression order, ``score = min(score, prev_score)``.

    Implementation: one forward + one backward per batch (hooks keep each layer's input and
    output; ``autograd.grad`` w.r.t. the outputs only), then per (layer, scheme) the output
    difference X·(W_q − W)ᵀ from the kept input, accumulated per batch and freed.
    Deviations: recipes are bitalloc's schemes (weight-only, no 16-bit 'no-quant' recipe;
    order by mean effective bits per weight); quantizer is bitalloc's; ``num_score_steps``
    (128) replaced by ``len(ctx.batches)``; MoE expert grouping/score-module rules unused.
    """
    t0 = time.perf_counter()
    acc = np.zeros((ctx.n_layers, ctx.n_schemes))  # (L, S)
    chunks = _cache_chunks(ctx)
    with grad_only(_weight_params(ctx), ctx.model):
        for layers in chunks:  # every batch per chunk, so each (layer, scheme) is quantized once
            for batch in ctx.batches:
                _fisher_batch(ctx, batch, acc, layers)
    groups = modelopt_groups(ctx) if group else None
    table = np.stack([acc[list(g)].sum(axis=0) for g in groups]) if groups else acc
    bits = [_bits(ctx, j) for j in range(ctx.n_schemes)]
    if monotone:
        table = _monotone(table, bits)
    nb = len(ctx.batches) * len(chunks)
    info = {"group": group, "monotone": monotone, "per_layer_raw": acc.tolist(), "scheme_bits": bits,
            "forwards": nb, "backwards": nb, "layer_chunks": len(chunks), "seconds": time.perf_counter() - t0}
    return PeerScores("modelopt-gradient", table, groups, info)


def _cache_chunks(ctx: PeerContext) -> list[list[int]]:
    """Layers in runs whose quantized weights at every scheme fit the context's cache (with room
    to spare): the forward/backward is repeated per run, but no weight is quantized twice."""
    room = 0.8 * ctx.cache_bytes
    chunks: list[list[int]] = [[]]
    used = 0.0
    for i, layer in enumerate(ctx.layers):
        need = 4.0 * layer.out_features * layer.in_features * ctx.n_schemes
        if chunks[-1] and used + need > room:
            chunks.append([])
            used = 0.0
        chunks[-1].append(i)
        used += need
    return chunks


# --------------------------------------------------------------------------- AutoRound AutoScheme

def _scheme_weight_bits(scheme: str) -> int:
    fmt = parse_scheme(scheme).weight
    return int(getattr(fmt, "bits", 16)) if fmt.is_quantized else 16


def _head_rule(ctx: PeerContext, bits: Sequence[int]) -> dict:
    """AutoRound ``_apply_head_trick`` inputs: which row is lm_head and which schemes it may take."""
    out = ctx.model.get_output_embeddings() if hasattr(ctx.model, "get_output_embeddings") else None
    head = [i for i in range(ctx.n_layers) if out is not None and ctx.module(i) is out]
    head = head or [i for i, layer in enumerate(ctx.layers) if layer.fqn.split(".")[-1] == "lm_head"]
    high = [j for j, b in enumerate(bits) if b >= 6]
    return {"head_layer": head[0] if head else None, "high_bit_schemes": high,
            "rule": "0 schemes >= 6 bits: lowest-loss scheme; 1: that scheme; several: target_bits > 6 -> highest "
                    "bits only, else all >= 6 bits; relaxed (lowest loss first) if the budget is infeasible"}


def score_autoround(ctx: PeerContext) -> PeerScores:
    """AutoRound AutoScheme delta loss: score(l, s) = Σ_batches Σ |∂L/∂Ŵ_l ⊙ (W_l − Q_s(W_l))|, all at s.

    Follows intel/auto-round ``auto_round/auto_scheme/delta_loss.py``: ``get_score_for_scheme``
    wraps every quantizable layer at one scheme (``AutoSchemeWrapperLinear``), runs
    ``model(**data, labels=input_ids).loss.backward()`` per calibration batch; the hook on the
    quant-dequantized weight ``qdq_w`` accumulates ``weight_score += |grad ⊙ (weight − qdq_w)|
    .sum()`` (the gradient w.r.t. the *quantized* weight, the model fully quantized at s);
    ``mix_score = weight_score + act_score`` (act_score is 0 for weight-only schemes); schemes
    with more than 8 bits (bf16) score 0 (``check_bf16_scheme`` / ``bits > 8``); embeddings are
    not scored. Cost: per scheme one forward + backward per batch.

    Deviations (recorded, not expressed in the table): ``_apply_head_trick`` restricts lm_head's
    candidates in the DP (``info['head_rule']``: the lm_head row and the >= 6-bit schemes;
    the search must apply it); ``shared_layers`` grouping (user option, none by default) is not
    used; AutoRound runs the model in ``train()`` mode (for gradient checkpointing), here in
    ``eval()``; ``nsamples=16, seqlen=256`` replaced by ``ctx.batches``. A tied lm_head
    (``quantize_tied`` profiles) gets the gradient of both its uses (head and embedding).
    """
    t0 = time.perf_counter()
    params = _weight_params(ctx)
    bits = [_scheme_weight_bits(s) for s in ctx.schemes]
    table = np.zeros((ctx.n_layers, ctx.n_schemes))  # (L, S)
    n_fwd = 0
    with grad_only(params, ctx.model):
        for j in range(ctx.n_schemes):
            if bits[j] > 8:
                continue
            with ctx.swapped([j] * ctx.n_layers):
                for batch in ctx.batches:
                    grads = torch.autograd.grad(lm_loss(ctx.model, batch), params)
                    n_fwd += 1
                    with torch.no_grad():
                        for i, g in enumerate(grads):
                            diff = ctx.weight(i) - ctx.quantized(i, j)  # (out, in)
                            table[i, j] += float((as_out_in(ctx, i, g).float() * diff).abs().sum())
    info = {"scheme_bits": bits, "head_rule": _head_rule(ctx, bits), "forwards": n_fwd, "backwards": n_fwd,
            "seconds": time.perf_counter() - t0}
    return PeerScores("autoround", table, None, info)
