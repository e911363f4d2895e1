"""Proxy error tables, measured metric deltas, and the global calibration of the proxy.

* :func:`proxy_table` — for every (layer, scheme) the layer-output error
  ``tr(ΔW H ΔWᵀ) = E_x ‖x ΔWᵀ‖²`` of the RTN-quantized weight (one Hessian per layer,
  no forward passes). It ranks schemes within a layer, but rows are not comparable.
* :func:`measure_item` / :func:`measure_deltas` / :func:`measure_table` — quantize one
  layer with one scheme (everything else unchanged), run the calibration batches and
  measure the end metric against the unquantized model (default: mean per-token
  KL(p_ref ‖ p_quant) of next-token distributions, in nats/token).
* :func:`calibrate_proxy` — scale each proxy row by the measured metric at one or more
  reference schemes, giving the expected-loss table in metric units.

Measurement never leaves a trace: the weight is changed in place (so a tied weight changes
as one unit) and restored bit for bit in a ``finally`` block.

Speed: a layer in block ``b`` only changes what happens from block ``b`` on, so the
reference pass caches each needed block's output and a measurement forward replays blocks
``0..b-1`` from that cache (about 40% less compute on average for a 30-block model). The
replay is checked once against the reference output and switched off if it does not
reproduce it exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._forward import replay_blocks, tree_clone
from .logits import forward_logits, logit_rows, protect_head
from .calibrate import calibrate_proxy  # re-exported: the proxy's calibration lives in .calibrate
from .calibration import as_batches
from .hessian import hessian_tensor
from .layers import LayerInfo, get_weight

__all__ = [
    "as_scheme",
    "hessian_saliency",
    "quantize_layer_weight",
    "proxy_table",
    "Metric",
    "KLMetric",
    "CosineMetric",
    "MetricSet",
    "Reference",
    "compute_reference",
    "measure_item",
    "measure_deltas",
    "measure_kl_deltas",
    "measure_table",
    "calibrate_proxy",
]

log = logging.getLogger("bitalloc.sensitivity")


# ---------------------------------------------------------------------------------------
# schemes and quantized weights


def as_scheme(s: Any):
    """A :class:`kernels.formats.Scheme` from a Scheme or a scheme name."""
    from bitalloc.kernels.formats import Scheme, parse_scheme

    if isinstance(s, Scheme):
        return s
    return parse_scheme(s)


def _fake_quantize_weight():
    from bitalloc.kernels.quant import fake_quantize_weight

    return fake_quantize_weight


def hessian_saliency(w: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
    """Per input channel saliency ``diag(H)_j · ‖W[:, j]‖²`` (column energy if no H)."""
    energy = w.detach().to(torch.float32).pow(2).sum(0)
    if H is None:
        return energy
    return torch.diagonal(H).to(torch.float32).to(energy.device) * energy


def _rtn_quantize(w: torch.Tensor, scheme, H: torch.Tensor | None, idx) -> torch.Tensor:
    return _fake_quantize_weight()(w, scheme, idx)


def _gptq_quantize(w: torch.Tensor, scheme, H: torch.Tensor | None, idx) -> torch.Tensor:
    if not scheme.is_quantized:
        return _rtn_quantize(w, scheme, H, idx)
    if H is None:
        raise ValueError("quantizer 'gptq' needs the layer's Hessian")
    from bitalloc.kernels.gptq import gptq_fake_quantize_weight

    return gptq_fake_quantize_weight(w, scheme, H.to(device=w.device, dtype=torch.float32), idx)


# name -> fake-quantizer (w (out, in), scheme, H (in, in) or None, split channels or None) -> (out, in)
def _ggml_weight(w: torch.Tensor, scheme, H: torch.Tensor | None, quantizer: str) -> torch.Tensor:
    from .ggml import ggml_fake_quantize_weight

    return ggml_fake_quantize_weight(w, scheme, H, quantizer)


GGML_QUANTIZERS = ("ggml", "ggml-imatrix")  # llama.cpp's C quantizer (sensitivity.ggml), without / with diag(H)
QUANTIZER_FNS = {"rtn": _rtn_quantize, "gptq": _gptq_quantize,
                 "ggml": lambda w, s, H, idx: _ggml_weight(w, s, H, "ggml"),
                 "ggml-imatrix": lambda w, s, H, idx: _ggml_weight(w, s, H, "ggml-imatrix")}
QUANTIZERS = tuple(QUANTIZER_FNS)


def quantize_layer_weight(w: torch.Tensor, scheme: Any, H: torch.Tensor | None = None, *, quantizer: str = "rtn",
                          saliency: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantized ``w (out, in)`` for a scheme, same dtype as w.

    ``quantizer`` (a name of :data:`QUANTIZER_FNS`): ``"rtn"`` (round-to-nearest,
    kernels.quant) or ``"gptq"`` (kernels.gptq, needs ``H``). A split keeps the ``k``
    channels of highest ``saliency`` (an (in,) vector, see :mod:`sensitivity.saliency`;
    default :func:`hessian_saliency`) high.
    """
    from bitalloc.kernels.quant import select_high_channels

    if quantizer not in QUANTIZER_FNS:
        raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    scheme = as_scheme(scheme)
    if quantizer in GGML_QUANTIZERS:
        return _ggml_weight(w, scheme, H, quantizer)
    k = scheme.n_high(w.shape[1])
    idx = None
    if k:
        sal = saliency if saliency is not None else hessian_saliency(w, H)
        idx = select_high_channels(torch.as_tensor(sal).to(torch.float64).cpu(), k)
    return QUANTIZER_FNS[quantizer](w, scheme, H, idx)


def module_at(model: torch.nn.Module, fqn: str) -> torch.nn.Module:
    """The submodule called ``fqn``; a ValueError naming it when there is none."""
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        raise ValueError(f"layer {fqn!r} is not a module of {type(model).__name__}") from None


def progress_bar(it, progress: bool, desc: str, total: int | None = None):
    """``it`` wrapped in a tqdm bar when ``progress``, else unchanged."""
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


# the old private spellings, for code on other branches
_hessian_tensor, _module, _progress = hessian_tensor, module_at, progress_bar


# ---------------------------------------------------------------------------------------
# proxy


@torch.no_grad()
def proxy_table(
    model: torch.nn.Module,
    layers: Sequence[LayerInfo],
    hessians: dict[str, Any],
    schemes: Sequence[Any],
    progress: bool = True,
    *,
    act_stats: dict[str, Any] | None = None,
    quantizer: str = "rtn",
    saliency: dict[str, Any] | None = None,
    fisher: Any = None,
    fisher_out: Sequence[np.ndarray] = (),
    fisher_cols: Sequence[int] | None = None,
) -> np.ndarray:
    """``(L, S)`` float64 table of output errors ``tr(ΔW H ΔWᵀ)``, ``ΔW = Q_s(W) − W``.

    ``fisher`` (a :class:`~.fisher_refs.FisherStats`): also writes each (layer, scheme)'s
    output-Fisher KL estimate into ``fisher_out``, one (L, S) table per label kind the
    statistics hold (two for ``labels="both"``), from the same quantized weight, for the
    schemes ``fisher_cols`` (default all), so no weight is quantized twice.

    ``W`` is the layer's (out, in) weight (Conv1D transposed), ``H`` its input Hessian
    (``hessians[fqn]``: a tensor or a :class:`HessianAccumulator`). Splits keep the most
    salient channels by ``diag(H)·‖W[:,j]‖²``. ``fp16`` is the error of casting to float16.

    Activation-quantized schemes (``a8``, ``af8``) add the activation error exactly,
    ``2·tr(ΔW E[xᵀe] Wqᵀ) + tr(Wq E[eᵀe] Wqᵀ)``, when ``act_stats[fqn]`` holds an
    accumulator with those statistics (``collect_input_statistics(act_formats=...)``);
    without them the entry is the weight error only (a warning says so).
    """
    schemes = [as_scheme(s) for s in schemes]
    fq = _fake_quantize_weight()
    from bitalloc.kernels.quant import select_high_channels

    out = np.zeros((len(layers), len(schemes)), dtype=np.float64)
    warned = False
    for i, layer in enumerate(progress_bar(layers, progress, "proxy", len(layers))):
        if layer.fqn not in hessians:
            raise ValueError(f"no Hessian for layer {layer.fqn!r}")
        H = hessian_tensor(hessians[layer.fqn])
        w = get_weight(module_at(model, layer.fqn), layer.module_type).detach().to(torch.float32)
        H = H.to(device=w.device, dtype=torch.float32)
        sal = saliency.get(layer.fqn) if saliency else None
        for j, s in enumerate(schemes):
            k = s.n_high(w.shape[1])
            idx = None
            if k:
                if sal is None:
                    sal = hessian_saliency(w, H)
                idx = select_high_channels(torch.as_tensor(sal).to(torch.float64).cpu(), k)
            if quantizer in GGML_QUANTIZERS:
                from .ggml import scheme_fits as ggml_scheme_fits

                if not ggml_scheme_fits(s, w.shape[1]):
                    out[i, j] = np.nan  # llama.cpp cannot store this type in this shape: not a candidate here
                    continue
                wq = _ggml_weight(w, s, H, quantizer)
            elif not s.is_quantized:
                wq = w.to(torch.float16).to(torch.float32)
            elif quantizer == "gptq":
                from bitalloc.kernels.gptq import gptq_fake_quantize_weight

                wq = gptq_fake_quantize_weight(w, s, H, idx)
            else:
                wq = fq(w, s, idx)
            d = wq - w
            if fisher is not None and (fisher_cols is None or j in fisher_cols):
                for table, v in zip(fisher_out, fisher.values(i, w, wq, s.act)):
                    table[i, j] = v
            err = trace_form(d, H, d)
            if s.act != "a16":
                acc = (act_stats or {}).get(layer.fqn)
                if acc is not None and s.act in getattr(acc, "cross", {}):
                    xe = acc.cross[s.act].to(device=w.device, dtype=torch.float32)
                    ee = acc.noise[s.act].to(device=w.device, dtype=torch.float32)
                    err = err + 2 * trace_form(d, xe, wq) + trace_form(wq, ee, wq)
                elif not warned:
                    log.warning("no activation statistics for %s: proxy of activation-quantized schemes is weight error only", layer.fqn)
                    warned = True
            out[i, j] = float(err)
            wq = d = None  # before the next scheme's quantization, not after it
    return out


TRACE_ROWS_ELEMENTS = 1 << 20  # elements of one row slab's product in trace_form


def trace_form(a: torch.Tensor, m: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ (a m) ⊙ b = tr(a m bᵀ)`` for ``(out, in)`` ``a``, ``b`` and ``(in, in)`` ``m``, in
    float64, a slab of rows at a time: the whole product and its float64 copy for the sum were
    three to four times the weight beside it (234 MiB for a 44 MiB weight, by an RSS probe)."""
    rows = max(1, TRACE_ROWS_ELEMENTS // max(1, m.shape[1]))
    total = torch.zeros((), dtype=torch.float64)
    for r in range(0, a.shape[0], rows):
        total += (a[r:r + rows] @ m).mul_(b[r:r + rows]).sum(dtype=torch.float64)
    return total


# ---------------------------------------------------------------------------------------
# metrics: in sensitivity.metrics (re-exported here so existing imports keep working)

from .metrics import CosineMetric, KLMetric, Metric, MetricSet, primary_output, token_mask  # noqa: E402,F401


# ---------------------------------------------------------------------------------------
# reference pass (with the cache of block outputs for prefix replay)


@dataclass
class Reference:
    """The unperturbed model's metric state per batch, and cached block outputs."""

    metric: Metric
    batches: list[dict]
    states: list[Any]
    blocks: Any = None  # the ModuleList of blocks, when prefix replay is possible
    block_outputs: dict[int, list[Any]] = field(default_factory=dict)  # block index -> per batch
    replay: bool = False

    def free(self) -> None:
        self.states.clear()
        self.block_outputs.clear()


def _blocks_of(model: torch.nn.Module, layers: Sequence[LayerInfo]):
    """The ModuleList holding the layers' blocks, if they all sit in one."""
    parents = {layer.block.rsplit(".", 1)[0] for layer in layers if layer.block and "." in layer.block}
    if len(parents) != 1:
        return None
    try:
        parent = model.get_submodule(parents.pop())
    except AttributeError:
        return None
    return parent if isinstance(parent, torch.nn.ModuleList) else None


@contextlib.contextmanager
def _replay_prefix(reference: Reference, block_index: int | None, batch_i: int):
    """Blocks ``0..b-1`` return the cached output of block ``b-1`` instead of computing."""
    if not reference.replay or not block_index or (block_index - 1) not in reference.block_outputs:
        yield
        return
    with replay_blocks(reference.blocks, block_index, reference.block_outputs[block_index - 1][batch_i]):
        yield


def _digest(outputs: Any, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    if key == "logits":  # the first positions' logits only (never the whole (b, T, V) tensor)
        shape, rows = logit_rows(outputs)
        t = rows(0, min(16, math.prod(shape[:-1])))
    else:
        t = primary_output(outputs, key).detach().float()
    return t[..., :16].clone(), t.sum(-1)


def _default_key(metric: Metric) -> str:
    return getattr(metric, "output_key", None) or ("logits" if isinstance(metric, KLMetric) else "last_hidden_state")


@torch.no_grad()
def compute_reference(
    model: torch.nn.Module,
    layers: Sequence[LayerInfo],
    batches: Iterable | torch.Tensor | dict,
    metric: Metric | None = None,
    progress: bool = True,
    *,
    batch_size: int = 4,
    replay: bool = True,
) -> Reference:
    """Run the unperturbed model once over the batches and keep what measurements need.

    ``metric`` defaults to :class:`KLMetric` for models with logits, else
    :class:`CosineMetric`; a :class:`MetricSet` keeps the state of each of its metrics (one
    forward for all). With ``replay`` the outputs of the blocks just before the
    layers' blocks are cached (tokens × hidden × 4 bytes each) and replay is verified.
    """
    batches = as_batches(batches, batch_size)
    if metric is not None and getattr(metric, "needs_hidden_states", False):
        batches = [{**b, "output_hidden_states": True} for b in batches]  # the final hidden state of a causal LM
    blocks = _blocks_of(model, layers) if replay else None
    needed = sorted({layer.block_index - 1 for layer in layers if layer.block_index})
    if blocks is not None:
        needed = [b for b in needed if 0 <= b < len(blocks)]
    cache: dict[int, list[Any]] = {b: [] for b in needed} if blocks is not None else {}
    calls: dict[int, int] = {}
    handles = []
    if blocks is not None:
        for b in range(len(blocks)):

            def hook(module, args, output, _b=b):
                calls[_b] = calls.get(_b, 0) + 1
                if _b in cache:
                    cache[_b].append(tree_clone(output))

            handles.append(blocks[b].register_forward_hook(hook))
    states: list[Any] = []
    digest0 = None
    if metric is not None:
        metric.reset_reference()
    protect_head(model, [getattr(module_at(model, layer.fqn), "weight", None) for layer in layers])
    try:
        for i, batch in enumerate(progress_bar(batches, progress, "reference", len(batches))):
            out = forward_logits(model, batch)
            if metric is None:
                has_logits = getattr(out, "logits", None) is not None
                metric = KLMetric() if has_logits else CosineMetric()
            states.append(metric.reference(out, batch))
            if i == 0:
                digest0 = _digest(out, _default_key(metric))
            del out
    finally:
        for h in handles:
            h.remove()
    ref = Reference(metric, batches, states, blocks, cache, replay=False)
    if blocks is not None and needed and all(calls.get(b) == len(batches) for b in range(len(blocks))):
        ref.replay = True
        b = needed[-1] + 1
        with _replay_prefix(ref, b, 0):
            check = _digest(forward_logits(model, batches[0]), _default_key(metric))
        ok = torch.allclose(check[0], digest0[0], rtol=1e-4, atol=1e-5) and torch.allclose(
            check[1], digest0[1], rtol=1e-4, atol=1e-4 * float(digest0[1].abs().max().clamp(min=1))
        )
        if not ok:
            log.info("block replay does not reproduce the reference output; measuring with full forwards")
            ref.replay = False
            ref.block_outputs.clear()
    else:
        ref.block_outputs.clear()
    return ref


# ---------------------------------------------------------------------------------------
# measurement


@torch.no_grad()
def measure_item(
    model: torch.nn.Module,
    layer: LayerInfo,
    scheme: Any,
    reference: Reference,
    hessian: Any = None,
    *,
    quantizer: str = "rtn",
    saliency: Any = None,
) -> float | dict[str, float]:
    """Metric delta (reference metric units) of quantizing ``layer`` alone with ``scheme``.

    With a :class:`MetricSet` reference the result is ``{metric name: delta}``, every
    metric scored from the same forward passes; with a single metric, a float.

    Idempotent and self-contained (one work item of a distributed runner, keyed by
    ``(layer.fqn, scheme name)``): the weight is fake-quantized in place (split channels by
    Hessian saliency when ``hessian`` is given, else column energy), activation
    quantization is applied to the layer's input for ``a8``/``af8`` schemes, the reference
    batches are run, and the weight is restored bit for bit in a ``finally`` block. A scheme
    that reproduces the weight exactly (and keeps 16-bit activations) returns 0.0 without
    running the model.
    """
    scheme = as_scheme(scheme)
    module = module_at(model, layer.fqn)
    param = module.weight
    w = get_weight(module, layer.module_type).detach()
    H = hessian_tensor(hessian) if hessian is not None else None
    wq = quantize_layer_weight(w.to(torch.float32), scheme, H, quantizer=quantizer, saliency=saliency).to(param.dtype)
    multi = isinstance(reference.metric, MetricSet)
    if scheme.act == "a16" and torch.equal(wq, w):
        return {k: 0.0 for k in reference.metric.metrics} if multi else 0.0
    backup = param.detach().clone()
    handle = None
    try:
        param.copy_(wq.t() if layer.module_type == "Conv1D" else wq)
        if scheme.act != "a16":
            from bitalloc.kernels.quant import quantize_activation

            def act_hook(mod, args, kwargs, _a=scheme.act):
                if args and isinstance(args[0], torch.Tensor):
                    return (quantize_activation(args[0], _a), *args[1:]), kwargs
                return None

            handle = module.register_forward_pre_hook(act_hook, with_kwargs=True)
        return score_batches(model, reference, layer.block_index)
    finally:
        param.copy_(backup)
        if handle is not None:
            handle.remove()


def score_batches(model: torch.nn.Module, reference: Reference, first_block: int | None) -> float | dict[str, float]:
    """Run the reference batches on the (perturbed) model and score them against the reference.

    Blocks before ``first_block`` are replayed from the cache. Returns the metric per
    token / item, or ``{name: value}`` for a :class:`MetricSet`. Shared by single-layer and
    joint (pair) measurements."""
    multi = isinstance(reference.metric, MetricSet)
    totals: dict[str, list[float]] = {}
    for i, batch in enumerate(reference.batches):
        with _replay_prefix(reference, first_block, i):
            out = forward_logits(model, batch)
        scored = reference.metric.score(reference.states[i], out, batch)
        del out
        for k, (s, c) in (scored.items() if multi else (("", scored),)):
            acc = totals.setdefault(k, [0.0, 0.0])
            acc[0] += s
            acc[1] += c
    values = {k: (s / c if c > 0 else 0.0) for k, (s, c) in totals.items()}
    return values if multi else values[""]


def _schemes_for(scheme_per_layer: Any, n: int) -> list:
    if isinstance(scheme_per_layer, (str,)) or not isinstance(scheme_per_layer, Sequence):
        return [as_scheme(scheme_per_layer)] * n
    if len(scheme_per_layer) != n:
        raise ValueError(f"scheme_per_layer has {len(scheme_per_layer)} entries for {n} layers")
    return [as_scheme(s) for s in scheme_per_layer]


def measure_deltas(
    model: torch.nn.Module,
    layers: Sequence[LayerInfo],
    batches: Iterable | torch.Tensor | dict | None,
    reference: Reference | None,
    scheme_per_layer: Any,
    progress: bool = True,
    *,
    metric: Metric | None = None,
    hessians: dict[str, Any] | None = None,
    batch_size: int = 4,
) -> np.ndarray:
    """``(L,)`` measured metric delta of each layer quantized alone with its scheme.

    ``scheme_per_layer`` is one scheme (name or Scheme) for all layers or one per layer.
    ``reference`` (from :func:`compute_reference`) is computed from ``batches`` when None;
    ``metric`` (default KL, see :class:`KLMetric`) is a hook point for other metrics such
    as :class:`CosineMetric` for encoders.
    """
    schemes = _schemes_for(scheme_per_layer, len(layers))
    if reference is None:
        if batches is None:
            raise ValueError("measure_deltas needs batches or a reference")
        reference = compute_reference(model, layers, batches, metric, progress, batch_size=batch_size)
    out = np.zeros(len(layers), dtype=np.float64)
    for i, layer in enumerate(progress_bar(layers, progress, f"measure {reference.metric.name}", len(layers))):
        h = hessians.get(layer.fqn) if hessians else None
        out[i] = measure_item(model, layer, schemes[i], reference, h)
    return out


measure_kl_deltas = measure_deltas  # the old name: the deltas are of any metric, not only KL


def measure_table(
    model: torch.nn.Module,
    layers: Sequence[LayerInfo],
    batches: Iterable | torch.Tensor | dict | None,
    schemes: Sequence[Any],
    reference: Reference | None = None,
    progress: bool = True,
    *,
    metric: Metric | None = None,
    hessians: dict[str, Any] | None = None,
    batch_size: int = 4,
    on_item: Callable[[str, str, float], None] | None = None,
) -> np.ndarray:
    """``(L, S)`` measured table: one forward pass set per (layer, scheme) (the expensive mode)."""
    schemes = [as_scheme(s) for s in schemes]
    if reference is None:
        reference = compute_reference(model, layers, batches, metric, progress, batch_size=batch_size)
    out = np.zeros((len(layers), len(schemes)), dtype=np.float64)
    items = [(i, j) for i in range(len(layers)) for j in range(len(schemes))]
    for i, j in progress_bar(items, progress, f"measure {reference.metric.name}", len(items)):
        h = hessians.get(layers[i].fqn) if hessians else None
        out[i, j] = measure_item(model, layers[i], schemes[j], reference, h)
        if on_item is not None:
            on_item(layers[i].fqn, schemes[j].name, out[i, j])
    return out


# ---------------------------------------------------------------------------------------
# global calibration


