"""Measurement-based peer scores (issue 14): HIGGS, ModelOpt ``kl_div``, exllamav2, exllamav3.

Every function takes a :class:`~bitalloc.sensitivity.peer_context.PeerContext` and returns a
:class:`~bitalloc.sensitivity.peer_context.PeerScores` over bitalloc's candidates (the
context's layers and schemes, quantized by the context's quantizer; lower is better). The
searches that turn these tables into plans live elsewhere (``bitalloc.solvers.peer_search``
and the separable solvers); these functions only score.

What is shared by all four and differs from the peers' own code:

* the candidates are bitalloc's schemes (not NVFP4/FP8 recipes, EXL2 ``QParams`` mixes or
  EXL3 trellis models) and the weights are quantized by bitalloc's quantizer;
* "the 16-bit model" is the model as loaded into the context (float32 on CPU);
* end-to-end numbers are the mean per-token KL(16-bit ‖ perturbed) from
  :meth:`PeerContext.kl`, on the context's calibration batches; items that perturb only
  blocks ``b..`` replay blocks ``0..b-1`` from the reference's cache (``first_block``).

``info`` of every result records the settings, ``kl_forwards`` (end-to-end or from-a-block
passes over one batch, the change of ``ctx.forwards``) and, where the method runs modules
alone, ``module_forwards``.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ._forward import forward
from .peer_context import SUB_BLOCKS, PeerContext, PeerScores, sub_blocks
from .proxy import as_scheme, module_at

__all__ = ["score_higgs", "score_modelopt_kl", "score_exllamav2", "score_exllamav3",
           "modelopt_groups", "exllamav3_groups", "scheme_bits"]

Groups = tuple[tuple[int, ...], ...]


# ---------------------------------------------------------------------------------------
# shared helpers


def scheme_bits(ctx: PeerContext) -> np.ndarray:
    """``(S,)`` exact bits of the whole planned model at each scheme (orders schemes by size)."""
    schemes = [as_scheme(s) for s in ctx.schemes]
    return np.array([sum(s.storage_bits(la.out_features, la.in_features) for la in ctx.layers) for s in schemes],
                    dtype=np.int64)


def _put(ctx: PeerContext, i: int, w: torch.Tensor) -> None:
    """Write ``(out, in)`` weight ``w`` into layer ``i`` (the context keeps the original)."""
    ctx.weight(i)  # the 16-bit copy exists before the first change
    param = ctx.module(i).weight
    with torch.no_grad():
        param.copy_((w.t() if ctx.layers[i].module_type == "Conv1D" else w).to(param.dtype))


@contextlib.contextmanager
def _weight(ctx: PeerContext, i: int, w: torch.Tensor) -> Iterator[None]:
    """Layer ``i`` holds ``w`` inside the block; its 16-bit weight comes back bit for bit after."""
    try:
        _put(ctx, i, w)
        yield
    finally:
        _put(ctx, i, ctx.weight(i))


def _first_block(ctx: PeerContext, group: Sequence[int]) -> int | None:
    """The first block a group's layers touch (prefix replay), None when one sits outside blocks."""
    idx = [ctx.layers[i].block_index for i in group]
    return None if any(b is None for b in idx) else min(idx)


def _resolve_groups(ctx: PeerContext, groups) -> Groups:
    if groups is None or groups == "layers":
        return tuple((i,) for i in range(ctx.n_layers))
    if groups == "sub_blocks":
        return sub_blocks(ctx.layers)
    if groups == "modelopt":
        return modelopt_groups(ctx.layers)
    out = tuple(tuple(int(i) for i in g) for g in groups)
    flat = sorted(i for g in out for i in g)
    assert flat == list(range(ctx.n_layers)), "groups must partition the layers 0..L-1"
    return out


def _rows(ctx: PeerContext, rows: int | None) -> list[dict]:
    """The context's batches cut to the first ``rows`` sequences (None: all of them)."""
    if rows is None:
        return list(ctx.batches)
    assert rows > 0, f"rows must be positive, got {rows}"
    out, left = [], rows
    for b in ctx.batches:
        if left <= 0:
            break
        n = int(b["input_ids"].shape[0])
        out.append(b if n <= left else {k: v[:left] for k, v in b.items()})
        left -= n
    return out


# ---------------------------------------------------------------------------------------
# HIGGS: the linearity theorem, α_l fitted by noise injection


def score_higgs(ctx: PeerContext, noise_wbits: Sequence[float] = (2.0, 3.0, 4.0, 5.0), draws: int = 1,
                rows: int | None = None) -> PeerScores:
    """HIGGS (Malinovskii et al., "Pushing the Limits of LLM Quantization via the Linearity
    Theorem", NAACL 2025): ΔPPL ≈ Σ_l α_l · t_l², ``t_l² = ‖Q(W_l) − W_l‖²_F / ‖W_l‖²_F``.

    ``table[l, s] = α_l · t_l(s)²`` with ``t_l(s)²`` the relative squared error of bitalloc's
    quantizer at scheme ``s``, so the knapsack DP on this table is HIGGS's dynamic bit-width
    search on bitalloc's candidates.

    α_l follows the authors' noise-injection script (the ``NoisyLinear`` script of their
    AQLM-based code: ``relative_mse = 4 ** -effective_wbits``, one layer at a time,
    ``W + randn_like(W) · ‖W‖_F · sqrt(relative_mse) / sqrt(numel)``, then the perplexity of
    the model with that single noisy layer). Here each layer gets ``draws`` noise draws at
    each level of ``noise_wbits`` (seeded by ``ctx.seed`` and the layer), and α_l is the
    least-squares slope through the origin of the loss change against the *realised*
    ``t²`` (the noise's ‖N‖²/‖W‖², within a few per cent of ``relative_mse``).

    Deviations: the regressed loss change is the mean per-token KL to the 16-bit model
    (:meth:`PeerContext.kl`) on the calibration batches, not the WikiText-2/C4 perplexity
    increase. To first order KL ≈ Δlog PPL = ΔPPL / PPL, a factor common to every layer,
    so the α_l are the paper's up to one constant and the DP's choices are the same. The
    noise levels default to 2-5 effective bits (their sweeps are over ``effective_wbits``;
    the paper fits in the small-error regime). Items replay the 16-bit blocks before the
    layer's block. ``rows`` limits the calibration sequences used for the fit.

    ``info``: ``alpha`` (L,), ``residual_rms`` (L,, RMS of y − α t² per layer), ``r2`` (L,),
    ``t2`` (L, S), the noise levels, draws and forward counts.
    """
    t0, f0 = time.perf_counter(), ctx.forwards
    levels = [4.0 ** (-float(b)) for b in noise_wbits]
    assert levels and draws >= 1, "need at least one noise level and one draw"
    ref = ctx.reference(_rows(ctx, rows))
    L, S = ctx.n_layers, ctx.n_schemes
    alpha, resid, r2 = np.zeros(L), np.zeros(L), np.zeros(L)
    t2 = np.zeros((L, S))
    for i in range(L):
        w = ctx.weight(i)  # (out, in)
        wnorm2 = float(w.pow(2).sum())
        g = torch.Generator().manual_seed(int(ctx.seed) * 100003 + i)
        xs, ys = [], []
        for rel in levels:
            for _ in range(draws):
                scale = w.norm() * rel ** 0.5 / w.numel() ** 0.5  # their NoisyLinear
                noise = torch.randn(w.shape, generator=g, dtype=torch.float32) * scale  # (out, in)
                with _weight(ctx, i, w + noise):
                    ys.append(ctx.kl(ref, first_block=ctx.layers[i].block_index))
                xs.append(float(noise.pow(2).sum()) / max(wnorm2, 1e-30))
        x, y = np.array(xs), np.array(ys)
        alpha[i] = float(x @ y / (x @ x))
        res = y - alpha[i] * x
        resid[i] = float(np.sqrt(np.mean(res ** 2)))
        ss = float(np.sum((y - y.mean()) ** 2))
        r2[i] = 1.0 - float(np.sum(res ** 2)) / ss if ss > 0 else 1.0
        for j in range(S):
            t2[i, j] = float((ctx.quantized(i, j) - w).pow(2).sum()) / max(wnorm2, 1e-30)
    ref.free()
    info = {"noise_wbits": [float(b) for b in noise_wbits], "draws": int(draws), "rows": rows,
            "regressed": "mean per-token KL to the 16-bit model (≈ ΔPPL/PPL)",
            "alpha": alpha.tolist(), "residual_rms": resid.tolist(), "r2": r2.tolist(), "t2": t2.tolist(),
            "kl_forwards": ctx.forwards - f0, "seconds": time.perf_counter() - t0}
    return PeerScores("higgs", alpha[:, None] * t2, None, info)


# ---------------------------------------------------------------------------------------
# ModelOpt auto_quantize, method="kl_div"

# modelopt/torch/quantization/algorithms.py, _AutoQuantizeBaseSearcher.quant_grouping_rules
MODELOPT_GROUPING_RULES = (
    r"^(.*?)\.(q_proj|k_proj|v_proj)$",
    r"^(.*?\.mlp\.experts)\.\d+\.(gate_proj|up_proj|down_proj)$",
    r"^(.*?)\.(gate_proj|up_proj)$",
)


def modelopt_groups(layers) -> Groups:
    """ModelOpt's quant grouping: q/k/v share a format, gate/up share one, others alone."""
    keyed: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        key = layer.fqn
        for n, rule in enumerate(MODELOPT_GROUPING_RULES):
            m = re.match(rule, layer.fqn)
            if m:
                key = f"{m.group(1)}#rule{n}"
                break
        keyed.setdefault(key, []).append(i)
    return tuple(sorted(tuple(v) for v in keyed.values()))


def score_modelopt_kl(ctx: PeerContext, groups="modelopt", rows: int | None = None,
                      monotone: bool = True) -> PeerScores:
    """ModelOpt ``auto_quantize(method="kl_div")`` scores (NVIDIA TensorRT-Model-Optimizer,
    ``modelopt/torch/quantization/algorithms.py``, ``AutoQuantizeKLDivSearcher.estimate_sensitivity_scores``).

    Theirs: for each calibration batch (``num_score_steps``, default 128), with every group
    unquantized, the 16-bit probabilities ``p`` are taken; then each group (a
    ``QuantRecipeHparam``: q/k/v together, gate/up together, others alone, from
    ``quant_grouping_rules``) is set alone to each recipe, and its score accumulates
    ``−Σ p · log q`` over the batch. ``initialize_candidate_stats`` then walks the recipes in
    increasing size and takes ``score = min(score, previous)``, so a larger recipe never
    scores worse. ``table[g, s]`` is that score on bitalloc's schemes.

    Deviations: the candidates are bitalloc's schemes, not NVFP4/FP8 recipes. The score is
    the mean per-token KL(p ‖ q) = CE − H(p): the entropy term is the same for every
    (group, scheme), so the order of scores and the min-max threshold search's choice are
    the same. ``rows`` (default: all calibration sequences of the context) replaces
    ``num_score_steps``; ``groups`` may be ``"modelopt"`` (theirs), ``"sub_blocks"``,
    ``"layers"`` or explicit tuples. Items replay the 16-bit blocks before the group's
    first block (ModelOpt runs the whole model per item). ``monotone=False`` keeps the raw
    scores. ModelOpt's default configs leave ``lm_head`` unquantized; here it is a group
    like any other, so every layer has a row.
    """
    t0, f0 = time.perf_counter(), ctx.forwards
    gs = _resolve_groups(ctx, groups)
    batches = _rows(ctx, rows)
    ref = ctx.reference(batches)
    raw = np.zeros((len(gs), ctx.n_schemes))
    for g, members in enumerate(gs):
        fb = _first_block(ctx, members)
        for j in range(ctx.n_schemes):
            with ctx.swapped({i: j for i in members}):
                raw[g, j] = ctx.kl(ref, first_block=fb)
    ref.free()
    table = raw.copy()
    if monotone:
        order = np.argsort(scheme_bits(ctx), kind="stable")  # smallest first, as ModelOpt sorts recipes
        table[:, order] = np.minimum.accumulate(raw[:, order], axis=1)
    info = {"groups_rule": groups if isinstance(groups, str) else "explicit", "monotone": bool(monotone),
            "rows": int(sum(int(b["input_ids"].shape[0]) for b in batches)),
            "tokens": int(sum(int(b["input_ids"].numel()) for b in batches)),
            "score": "mean per-token KL(16-bit ‖ one group quantized)", "raw": raw.tolist(),
            "kl_forwards": ctx.forwards - f0, "seconds": time.perf_counter() - t0}
    return PeerScores("modelopt-kl", table, gs, info)


# ---------------------------------------------------------------------------------------
# exllamav2: relative Frobenius error of each sub-block's output (with the residual)


def _unit_of(ctx: PeerContext, group: Sequence[int]) -> tuple[str, str | None]:
    """(module fqn that runs the group, its kind "attn" / "mlp" / None for a lone layer)."""
    layer = ctx.layers[group[0]]
    if layer.block:
        rest = layer.fqn[len(layer.block) + 1:]
        for kind, prefixes in SUB_BLOCKS.items():
            if rest.startswith(prefixes):
                return f"{layer.block}.{rest.split('.', 1)[0]}", kind
    assert len(group) == 1, f"group {group} is not a sub-block and has more than one layer"
    return layer.fqn, None


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _capture(ctx: PeerContext, batch: dict, units: dict[str, str | None]) -> dict[str, dict]:
    """One 16-bit forward; for each unit its call (args, kwargs), output and residual input.

    Residuals follow the pre-norm block (Llama, GPT-2): the attention sub-block's output is
    ``X + A`` (X: the block's input), the MLP sub-block's output is the block's output
    ``X + A + M``; a lone layer (lm_head) has no residual."""
    rec: dict[str, dict] = {fqn: {} for fqn in units}
    blocks: dict[str, dict] = {}
    handles = []

    def unit_hook(fqn):
        def hook(module, args, kwargs, output):
            rec[fqn].update(args=args, kwargs=kwargs, out=_first(output).detach().clone())
        return hook

    def block_pre(name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            blocks.setdefault(name, {})["x"] = x.detach().clone()
        return hook

    def block_post(name):
        def hook(module, args, kwargs, output):
            blocks.setdefault(name, {})["y"] = _first(output).detach().clone()
        return hook

    try:
        for fqn, kind in units.items():
            handles.append(module_at(ctx.model, fqn).register_forward_hook(unit_hook(fqn), with_kwargs=True))
            if kind is not None:
                block = fqn.rsplit(".", 1)[0]
                if block not in blocks:
                    blocks[block] = {}
                    bm = module_at(ctx.model, block)
                    handles.append(bm.register_forward_pre_hook(block_pre(block), with_kwargs=True))
                    handles.append(bm.register_forward_hook(block_post(block), with_kwargs=True))
        forward(ctx.model, batch)
    finally:
        for h in handles:
            h.remove()
    for fqn, kind in units.items():
        r = rec[fqn]
        assert "out" in r, f"{fqn} did not run in the model's forward"
        if kind == "attn":
            r["residual"] = blocks[fqn.rsplit(".", 1)[0]]["x"]
        elif kind == "mlp":
            r["residual"] = blocks[fqn.rsplit(".", 1)[0]]["y"] - r["out"]
        else:
            r["residual"] = None
    return rec


def _rfn_rows(y_q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per calibration row ‖Y_q − Y‖_F / ‖Y‖_F; ``(B, T, H)`` -> ``(B,)``."""
    d = (y_q.float() - y.float()).flatten(1).norm(dim=1)
    return d / y.float().flatten(1).norm(dim=1).clamp_min(1e-30)


# exllamav2's qparams_attn / qparams_mlp raise these projections a step above the rest of
# the sub-block (v_proj, v_proj + o_proj; down_proj); mapped onto bitalloc's scheme order.
EXL2_MIXES = {"attn": (("v_proj",), ("v_proj", "o_proj")), "mlp": (("down_proj",),)}


def _exl2_options(ctx: PeerContext, members: Sequence[int], kind: str | None, mixed: bool) -> list[dict[int, int]]:
    """Per-layer assignments to measure for a sub-block: uniform at each scheme, then the mixes."""
    opts = [{i: j for i in members} for j in range(ctx.n_schemes)]
    if not mixed or kind not in EXL2_MIXES:
        return opts
    order = [int(j) for j in np.argsort(scheme_bits(ctx), kind="stable")]  # smallest first
    leaf = {i: ctx.layers[i].fqn.rsplit(".", 1)[-1] for i in members}
    for names in EXL2_MIXES[kind]:
        raised = [i for i in members if leaf[i] in names]
        if not raised or len(raised) == len(members):
            continue
        for lo, hi in zip(order, order[1:]):
            opts.append({i: (hi if i in raised else lo) for i in members})
    return opts


def _one_batch(batches: list[dict]) -> list[dict]:
    """The batches as one (rows stacked) when their tensors have the same shapes, else as they are."""
    keys = set(batches[0])
    same = all(set(b) == keys and all(torch.is_tensor(b[k]) and b[k].shape[1:] == batches[0][k].shape[1:]
                                      for k in keys) for b in batches)
    return [{k: torch.cat([b[k] for b in batches]) for k in keys}] if same and len(batches) > 1 else batches


def score_exllamav2(ctx: PeerContext, rows: int | None = None, mixed: bool = False) -> PeerScores:
    """exllamav2's measurement pass (turboderp/exllamav2, ``exllamav2/conversion/measure.py``:
    ``measure_quant`` → ``measure_attn`` / ``measure_mlp`` → ``test_error``).

    Theirs: for each attention and MLP sub-block (an ``ExLlamaV2Attention`` /
    ``ExLlamaV2MLP`` module, which includes its norm and the residual add), the 16-bit
    inputs of the calibration rows (``hidden_states``, the 16-bit outputs of the previous
    module) are run through the sub-block with each candidate quantization, and
    ``test_error`` averages over rows ``rfn = ‖Y_q − Y‖_F / ‖Y‖_F`` (``accuracy = 1 − mean
    rfn``). ``table[g, s]`` = mean rfn (lower is better; = 1 − their accuracy).

    Deviations: the table's options are bitalloc's schemes applied *uniformly* to the
    sub-block (every layer of the group at scheme ``s``). exllamav2's ``qparams_attn`` /
    ``qparams_mlp`` lists also mix bit widths inside a sub-block (v_proj, or v_proj and
    o_proj, one step above q/k; down_proj one step above gate/up); with ``mixed=True``
    those patterns are measured on bitalloc's schemes (the raised projections at the next
    larger scheme) and returned in ``info["mixed_options"]`` (group, per-layer schemes,
    rfn) for a search that can use them; the table stays uniform. The sub-block is re-run
    alone on the captured 16-bit inputs (hooks on the attention/MLP modules) and the
    residual is added outside it (the block input for attention, the block output minus
    the 16-bit MLP output for the MLP: exact for pre-norm blocks such as Llama and GPT-2).
    exllamav2 does not measure the head (it takes ``head_bits``); layers outside the
    sub-blocks (lm_head) get the rfn of their own output, without residual. ``rows``
    limits the calibration sequences (theirs: ``-mr`` 16 rows of 2048 tokens).
    """
    t0, f0 = time.perf_counter(), ctx.forwards
    gs = sub_blocks(ctx.layers)
    unit_kind = [_unit_of(ctx, g) for g in gs]
    units = dict(unit_kind)
    options = [_exl2_options(ctx, g, kind, mixed) for g, (_, kind) in zip(gs, unit_kind)]
    sums = [np.zeros(len(o)) for o in options]
    n_rows, module_forwards, model_forwards = 0, 0, 0
    for batch in _one_batch(list(_rows(ctx, rows))):  # one capture: each (layer, scheme) quantized once
        rec = _capture(ctx, batch, units)
        model_forwards += 1
        n_rows += int(batch["input_ids"].shape[0])
        for g in range(len(gs)):
            fqn = unit_kind[g][0]
            r, module, res = rec[fqn], module_at(ctx.model, fqn), rec[fqn]["residual"]
            y = r["out"] if res is None else res + r["out"]  # (B, T, H)
            for k, assignment in enumerate(options[g]):
                with ctx.swapped(assignment), torch.no_grad():
                    out_q = _first(module(*r["args"], **r["kwargs"]))
                module_forwards += 1
                y_q = out_q if res is None else res + out_q
                sums[g][k] += float(_rfn_rows(y_q, y).sum())
        del rec
    rfn = [v / max(n_rows, 1) for v in sums]
    table = np.stack([v[:ctx.n_schemes] for v in rfn])
    mixes = [{"group": g, "schemes": [int(a[i]) for i in gs[g]], "rfn": float(rfn[g][k])}
             for g in range(len(gs)) for k, a in enumerate(options[g]) if k >= ctx.n_schemes]
    info = {"rows": n_rows, "mixed": bool(mixed),
            "options": "bitalloc schemes, uniform per sub-block" + (" (+ exllamav2 mixes in mixed_options)"
                                                                   if mixed else ""),
            "score": "mean over rows of ||Y_q - Y||_F / ||Y||_F (sub-block output incl. residual)",
            "mixed_options": mixes, "model_forwards": model_forwards, "module_forwards": module_forwards,
            "kl_forwards": ctx.forwards - f0, "seconds": time.perf_counter() - t0}
    return PeerScores("exllamav2", table, gs, info)


# ---------------------------------------------------------------------------------------
# exllamav3: ΔKL of one group swapped into a model at a base scheme

_EXL3_LEVEL3 = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "o_proj": "o",
                "gate_proj": "gu", "up_proj": "gu", "down_proj": "d"}


def exllamav3_groups(layers, level: int = 2) -> Groups:
    """exllamav3's optimizer targets at ``level`` (``measure_model.py`` flattens
    ``module.optimizer_targets()``: a block is ``[[[q, k+v, o]], [[gate+up, down]]]``).

    Level 1: one group per block; 2 (their default): attention / MLP (``sub_blocks``);
    3: q, k+v, o, gate+up, down. Layers outside blocks stay alone."""
    if level == 2:
        return sub_blocks(layers)
    assert level in (1, 3), f"exllamav3 optimisation level must be 1, 2 or 3, got {level}"
    keyed: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        if not layer.block:
            key = ("", layer.fqn)
        elif level == 1:
            key = (layer.block,)
        else:
            leaf = layer.fqn.rsplit(".", 1)[-1]
            key = (layer.block, _EXL3_LEVEL3.get(leaf, leaf))
        keyed.setdefault(key, []).append(i)
    return tuple(sorted(tuple(v) for v in keyed.values()))


def score_exllamav3(ctx: PeerContext, base: int | str | None = None, level: int = 2, groups=None,
                    rows: int | None = None) -> PeerScores:
    """exllamav3's measurement (turboderp-org/exllamav3, ``exllamav3/conversion/measure_model.py``;
    the greedy that uses it is ``optimize_model.py``'s ``optimize``).

    Theirs: given quantized models in increasing bitrate, the first is the base; a
    streaming pass runs the base model, and for each optimizer target group and each other
    model, the group's tensors are overridden by that model's (``params["ovr"]``) while the
    rest of the network stays at the base; at the logits ``dkld = KL(candidate) −
    KL(base)`` against the unquantized reference. ``table[g, s]`` is that ΔKL with bitalloc's
    scheme ``s`` for group ``g`` and every other layer at ``base``; ``table[g, base] = 0``.
    ``info["base_index"]`` / ``info["base"]`` record the base, ``info["base_kl"]`` its KL.

    Deviations: the candidate "models" are bitalloc's schemes on bitalloc's quantizer;
    ``base`` defaults to the smallest scheme (their first, lowest-bitrate input), and
    schemes below a larger base are measured too (their candidates are all above it).
    Each item is a full forward of the model (every layer is quantized, so no prefix
    replay); their streaming pass computes the same numbers block by block. Their targets
    exclude the head (it keeps the base model's); here layers outside blocks (lm_head) are
    a group of their own so that every layer has a row. ``level`` is their ``-l``
    (default 2: attention / MLP sub-blocks); ``groups`` overrides it; ``rows`` limits the
    calibration sequences (theirs: ``-cr 10`` rows of ``-cc 1024`` tokens).
    """
    t0, f0 = time.perf_counter(), ctx.forwards
    bits = scheme_bits(ctx)
    if base is None:
        b = int(np.argmin(bits))
    elif isinstance(base, str):
        assert base in ctx.schemes, f"base {base!r} is not one of the schemes {list(ctx.schemes)}"
        b = list(ctx.schemes).index(base)
    else:
        b = int(base)
        assert 0 <= b < ctx.n_schemes, f"base index {b} out of range"
    gs = exllamav3_groups(ctx.layers, level) if groups is None else _resolve_groups(ctx, groups)
    ref = ctx.reference(_rows(ctx, rows), replay=False)
    assign = [b] * ctx.n_layers
    with ctx.swapped(assign):
        base_kl = ctx.kl(ref)
    table = np.zeros((len(gs), ctx.n_schemes))
    for g, members in enumerate(gs):
        for j in range(ctx.n_schemes):
            if j == b:
                continue
            a = list(assign)
            for i in members:
                a[i] = j
            with ctx.swapped(a):
                table[g, j] = ctx.kl(ref) - base_kl
    ref.free()
    info = {"base_index": b, "base": ctx.schemes[b], "base_kl": float(base_kl), "level": level,
            "groups_rule": "explicit" if groups is not None else f"exllamav3 level {level}",
            "rows": rows, "score": "KL(group at s, rest at base) - KL(all at base)",
            "kl_forwards": ctx.forwards - f0, "seconds": time.perf_counter() - t0}
    return PeerScores("exllamav3", table, gs, info)
