"""Reference values from one backward pass: the output-Fisher estimate of each layer's KL.

The profile's proxy ``tr(ΔW H ΔWᵀ)`` ranks schemes within a layer; reference values at a
few schemes turn each row into expected KL per token (:func:`calibrate.calibrate_proxy`).
Measuring them end to end costs one forward from the layer's block to the logits per
(layer, reference scheme): 630 forwards for SmolLM2, most of the main job's time.

For a small perturbation ΔY_l of layer l's output, the KL of the model's next-token
distribution is quadratic in it, with the Fisher information as its Hessian:

    KL(p ‖ p_q) ≈ ½ ΔYᵀ F ΔY,   F = E_{y ~ p}[∇_Y log p(y) ∇_Y log p(y)ᵀ].

Kept to its diagonal (the score of NVIDIA ModelOpt's ``auto_quantize`` gradient method),
with ΔY_l = X_l (Q(W_l) − W_l)ᵀ from the layer's own calibration inputs, this gives every
(layer, scheme) from one forward and one backward per calibration batch:

    KL_l(s) ≈ ½ · (1/N) · Σ_{t,o} g_{t,o}² · ΔY_{t,o}²,   g = ∂(Σ_t −log p(y_t)) / ∂Y_l,

with labels y_t drawn from the model's own next-token distribution at every position
(``labels="sampled"``, seeded), so ``g²`` is an unbiased one-sample estimate of the
Fisher diagonal whatever the calibration text, or the text's own next tokens
(``labels="text"``: ModelOpt's empirical Fisher), or both from the same forward pass
(``labels="both"``: two backward passes, two tables; the sampled one equals a
``"sampled"`` run's, the text one a ``"text"`` run's). Cross terms between positions vanish in
expectation because the sampled labels are independent; cross terms between output
channels are dropped (the diagonal approximation).

What it does not see: the growth of KL beyond quadratic at 2-3 bits, which the measured
references capture (``ref_method="measured"``); see experiments/README.md for what each
costs the plans.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .profile_config import FISHER_LABELS

__all__ = ["FISHER_LABELS", "FisherStats", "label_kinds", "fisher_rows", "sample_labels", "head_grads", "LayerTaps",
           "append_scored", "scored_mask", "label_loss", "join_parts", "score_into", "fisher_ref_values", "fisher_ref_tables",
           "measured_layers", "reference_values", "hybrid_ref_values", "measured_subset", "layer_kind", "input_role"]

FISHER_MEMORY = 1 << 30  # the kept inputs and squared gradients, per label kind (FisherStats.collect)


def label_kinds(labels: str) -> tuple[str, ...]:
    """The label kinds one collection with ``labels`` scores, in table order (the first is the
    profile's ``fisher``, a second its ``fisher_text``)."""
    return ("sampled", "text") if labels == "both" else (labels,)


def fisher_rows(layers: Sequence[Any], shape: tuple[int, int], stride: int, labels: str, memory: int | None = None) -> int:
    """How many calibration rows (of ``shape = (n, T)``) a collection keeps: whole rows while each
    layer's scored inputs and squared gradients (per label kind) fit ``memory`` (default
    :data:`FISHER_MEMORY` per label kind), at least one. The streamed pass
    (:mod:`sensitivity.stream_fisher`) takes the same rows."""
    kinds = label_kinds(labels)
    per_row = len(range(0, int(shape[1]) - 1, stride))  # scored positions of one row
    inputs = {}
    for layer in layers:  # layers reading one input share it (q/k/v, gate/up): count it once
        inputs.setdefault((layer.block_index, layer.in_features, input_role(layer.fqn)), layer.in_features)
    per_token = 4 * (sum(inputs.values()) + len(kinds) * sum(layer.out_features for layer in layers))
    memory = FISHER_MEMORY * len(kinds) if memory is None else int(memory)
    return max(1, min(int(shape[0]), memory // max(1, per_token * per_row)))


def sample_labels(logits: torch.Tensor, ids: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """``(B, T-1)`` targets for positions 0..T-2: sampled from the model, or the text's next tokens."""
    if mode == "text":
        return ids[:, 1:]
    probs = torch.softmax(logits[:, :-1].detach().to(torch.float32), dim=-1)  # (B, T-1, V)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:2])


class FisherStats:
    """Each layer's scored inputs ``X`` (N, in) and squared output gradients ``G²`` (N, out).

    GPTQ's shape: :meth:`collect` runs the forward and backward passes and keeps, per layer,
    what the estimate needs; :meth:`value` scores any weight error from them with one
    ``(N, in) × (in, out)`` product, so a caller that already quantizes each (layer, scheme)
    (the proxy table) adds the Fisher estimate for the cost of that product;
    :meth:`free` drops the buffers. Layers reading one input share its ``X``.
    """

    def __init__(self, x: dict, g2_all: tuple, n: int, info: dict):
        # layer index -> (N, in) float32; one {layer index -> (N, out) float32 G²} per label kind
        # (label_kinds(info["labels"]))
        self.x, self.g2_all, self.n, self.info = x, tuple(g2_all), n, info

    @property
    def g2(self) -> dict:
        """The first label kind's G² (the only one unless ``labels="both"``)."""
        return self.g2_all[0] if self.g2_all else {}

    @classmethod
    def collect(cls, model: torch.nn.Module, layers: Sequence[Any], data: Any, *, stride: int = 1,
                labels: str = "sampled", seed: int = 0, memory: int | None = None, batch_tokens: int = 512,
                progress: bool = False) -> "FisherStats":
        """Forward + backward over whole rows of ``data`` (causal-LM ids ``(n, T)``), scoring every
        ``stride``-th position; rows are taken in order while the kept buffers fit ``memory``
        bytes (at least one row; default 1 GiB per label kind, so ``labels="both"`` keeps at
        least the rows each kind alone would). Batches of whole rows up to ``batch_tokens`` tokens: the
        batch's graph and full-vocabulary logits are the transient peak (SmolLM2, 8 × 256 rows:
        +4.2 GB at 2,048 tokens a batch, +2.2 GB at 512), and rows are independent, so the
        batching changes nothing but that peak. Where one batch's logits would pass the
        logits-memory bound (:func:`bitalloc.sensitivity.logits.logits_memory`, a 256k
        vocabulary), the head and the loss run a chunk of positions at a time. Info: ``{"labels", "seed", "tokens", "stride", "rows", "batches"}``."""
        from .calibration import as_batches
        from .proxy import module_at, progress_bar

        if labels not in FISHER_LABELS:
            raise ValueError(f"labels must be one of {FISHER_LABELS}, got {labels!r}")
        kinds = label_kinds(labels)
        if isinstance(data, dict) or not isinstance(data, torch.Tensor) or data.dim() != 2:
            raise ValueError("Fisher estimates need a causal LM's token ids (n, seq), not an encoder batch")
        if not (isinstance(stride, int) and stride >= 1):
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        T = int(data.shape[1])
        rows = fisher_rows(layers, tuple(data.shape), stride, labels, memory)
        data = data[:rows]
        mods = [module_at(model, layer.fqn) for layer in layers]
        xs: dict[int, list] = {i: [] for i in range(len(layers))}
        gs = [{i: [] for i in range(len(layers))} for _ in kinds]  # per label kind
        gen = torch.Generator().manual_seed(seed)
        flags = {p: p.requires_grad for p in model.parameters()}
        training = model.training
        batches = as_batches(data, max(1, int(batch_tokens) // max(1, T)))
        n = 0
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            for batch in progress_bar(batches, progress, "fisher"):
                n += _collect_batch(model, layers, mods, batch, kinds, gen, stride, xs, gs)
        finally:
            for p, f in flags.items():
                p.requires_grad_(f)
            model.train(training)
        joined: dict[tuple, torch.Tensor] = {}  # layers that shared an input share the joined tensor too
        x = {i: join_parts(v, joined) for i, v in xs.items() if v}
        g2 = [{i: torch.cat(v) for i, v in g.items() if v} for g in gs]
        info = {"labels": labels, "seed": seed, "tokens": n, "stride": stride, "rows": rows, "batches": len(batches)}
        return cls(x, g2, n, info)

    def value(self, i: int, w: torch.Tensor, wq: torch.Tensor, act: str = "a16") -> float:
        """½ · (1/N) Σ G² ⊙ (X (Wq − W)ᵀ)²: layer ``i``'s estimated KL per token with weight ``wq``
        (``(out, in)``, as ``w``); an activation format quantizes ``X`` too. 0.0 for a layer the
        loss does not reach. With two label kinds: the first kind's (see :meth:`values`)."""
        return self.values(i, w, wq, act)[0]

    def values(self, i: int, w: torch.Tensor, wq: torch.Tensor, act: str = "a16") -> tuple[float, ...]:
        """:meth:`value` for every label kind collected, one ``ΔY`` product shared by all."""
        if i not in self.x or i not in self.g2:
            return (0.0,) * len(self.g2_all)
        x = self.x[i]  # (N, in)
        if act != "a16":
            from bitalloc.kernels.quant import quantize_activation

            dy = quantize_activation(x, act) @ wq.t().to(torch.float32) - x @ w.t().to(torch.float32)  # (N, out)
        else:
            dy = x @ (wq.to(torch.float32) - w.to(torch.float32)).t()  # (N, out) = Y_q − Y (bias not quantized)
        dy2 = dy.square_()  # (N, out)
        return tuple(0.5 * float((dy2 * g2[i]).sum(dtype=torch.float64)) / max(self.n, 1) for g2 in self.g2_all)

    def free(self) -> None:
        self.x, self.g2_all = {}, ()


def input_role(fqn: str) -> str:
    """Which input a layer reads, by role: q/k/v read one, gate/up one (the rest their own)."""
    kind = fqn.rsplit(".", 1)[-1]
    return {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(kind, kind)


def join_parts(parts: list, joined: dict) -> torch.Tensor:
    """One tensor per layer; layers that read the same input tensors share the result."""
    key = tuple(id(p) for p in parts)
    if key not in joined:
        joined[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return joined[key]


def fisher_ref_values(model: torch.nn.Module, layers: Sequence[Any], data: Any, schemes: Sequence[Any],
                      hessians: Mapping[str, Any] | None = None, **kw) -> tuple[np.ndarray, dict]:
    """``(L, R)`` estimated KL per token of quantizing each layer alone at each scheme, and info:
    :func:`fisher_ref_tables`' first table (with ``labels="both"``, the sampled one)."""
    tables, info = fisher_ref_tables(model, layers, data, schemes, hessians, **kw)
    return tables[0], info


def fisher_ref_tables(
    model: torch.nn.Module,
    layers: Sequence[Any],
    data: Any,
    schemes: Sequence[Any],
    hessians: Mapping[str, Any] | None = None,
    *,
    quantizer: str = "rtn",
    saliency: Mapping[str, Any] | None = None,
    batch_tokens: int = 512,
    stride: int = 1,
    labels: str = "sampled",
    seed: int = 0,
    memory: int | None = None,
    progress: bool = False,
) -> tuple[tuple[np.ndarray, ...], dict]:
    """One ``(L, R)`` table per label kind (:func:`label_kinds`: two for ``labels="both"``) of the
    estimated KL per token of quantizing each layer alone at each scheme, and info.

    :meth:`FisherStats.collect` (``data``: causal-LM ids ``(n, seq)``; rows within ``memory``;
    every ``stride``-th position scored), then each (layer, scheme) quantized exactly as the
    measured references quantize it (:func:`proxy.quantize_layer_weight` with the layer's
    Hessian, ``quantizer`` and split ``saliency``) and scored by :meth:`FisherStats.value`.
    Info: the collection's, plus ``"seconds"``.
    """
    from .proxy import as_scheme

    schemes = [as_scheme(s) for s in schemes]
    t0 = time.perf_counter()
    stats = FisherStats.collect(model, layers, data, stride=stride, labels=labels, seed=seed, memory=memory,
                                batch_tokens=batch_tokens, progress=progress)
    out = np.zeros((len(stats.g2_all), len(layers), len(schemes)), dtype=np.float64)  # (K, L, R)
    score_into(out, stats, model, layers, range(len(layers)), schemes, hessians=hessians, quantizer=quantizer,
               saliency=saliency)
    stats.free()
    return tuple(out), {**stats.info, "seconds": round(time.perf_counter() - t0, 3)}


@torch.no_grad()
def score_into(out: np.ndarray, stats: FisherStats, model: torch.nn.Module, layers: Sequence[Any],
               idxs: Sequence[int], schemes: Sequence[Any], *, hessians: Mapping[str, Any] | None = None,
               quantizer: str = "rtn", saliency: Mapping[str, Any] | None = None) -> None:
    """``out[:, i, j]`` (``(K, L, R)``): layer ``i``'s estimate at scheme ``j`` for every label kind
    of ``stats``, for the layers ``idxs``, each quantized as the measured references quantize it
    (:func:`proxy.quantize_layer_weight` with its Hessian, ``quantizer`` and split ``saliency``)."""
    from .hessian import hessian_tensor
    from .layers import get_weight
    from .proxy import module_at, quantize_layer_weight

    for i in idxs:
        layer = layers[i]
        w = get_weight(module_at(model, layer.fqn), layer.module_type).detach().to(torch.float32)  # (out, in)
        H = hessian_tensor(hessians[layer.fqn]) if hessians and layer.fqn in hessians else None
        sal = saliency.get(layer.fqn) if saliency else None
        for j, s in enumerate(schemes):
            wq = quantize_layer_weight(w, s, H, quantizer=quantizer, saliency=sal)
            out[:, i, j] = stats.values(i, w, wq, s.act)


class LayerTaps:
    """Forward hooks on ``mods`` (those at indices ``only``, default all, but not ``skip``)
    keeping each layer's input (detached) and making its output a gradient target, keyed by
    the index in ``mods``; :meth:`remove` takes them off."""

    def __init__(self, mods: Sequence[torch.nn.Module], skip: Sequence[int] = (),
                 only: Sequence[int] | None = None) -> None:
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        idx = range(len(mods)) if only is None else only
        self.handles = [mods[i].register_forward_hook(self._hook(i)) for i in idx if i not in skip]

    def _hook(self, i: int):
        def fn(module, args, output):
            self.inputs[i] = args[0].detach()
            self.outputs[i] = output.requires_grad_(True) if not output.requires_grad else output
            return self.outputs[i]
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def scored_mask(ids: torch.Tensor, mask: torch.Tensor | None, stride: int) -> torch.Tensor:
    """``(B, T)`` bool: the positions whose output error is scored (every ``stride``-th but the
    last, not padding)."""
    B, T = ids.shape
    keep = torch.zeros(T, dtype=torch.bool)
    keep[: T - 1: stride] = True
    keep_bt = keep.expand(B, -1)  # (B, T)
    return keep_bt & (mask != 0) if mask is not None else keep_bt


def label_loss(logits: torch.Tensor, pred: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, kind: str,
               gen: torch.Generator) -> torch.Tensor:
    """``Σ_t −log p(y_t)`` of ``pred = logits[:, :-1]`` (float32) with labels of ``kind``."""
    y = sample_labels(logits, ids, kind, gen)  # (B, T-1)
    if mask is not None:
        y = y.masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), y.reshape(-1), ignore_index=-100,
                                             reduction="sum")


def append_scored(layers: Sequence[Any], idx: Sequence[int], inputs: dict, grads_per_kind: Sequence[Sequence],
                  keep_bt: torch.Tensor, xs: dict, gs: Sequence[dict]) -> None:
    """Append layer ``idx[n]``'s scored inputs to ``xs`` and the squares of its output gradients
    (``grads_per_kind[k][n]``) to ``gs[k]``; layers reading one input tensor share one copy."""
    shared: dict[int, torch.Tensor] = {}  # one scored copy per distinct input tensor
    with torch.no_grad():
        for n, i in enumerate(idx):
            if grads_per_kind[0][n] is None:  # a layer that does not reach the logits
                continue
            layer = layers[i]
            x = inputs[i]
            assert x.shape[:2] == keep_bt.shape, f"{layer.fqn}: input {tuple(x.shape)} is not (batch, seq, features)"
            key = id(x.untyped_storage()) if hasattr(x, "untyped_storage") else id(x)
            if key not in shared:
                shared[key] = x[keep_bt].reshape(-1, layer.in_features).to(torch.float32)  # (N, in)
            xs[i].append(shared[key])
            for k, grads in enumerate(grads_per_kind):
                g = grads[n]
                gs[k][i].append(g[keep_bt].reshape(-1, g.shape[-1]).to(torch.float32).pow_(2))  # (N, out)


def _collect_batch(model, layers, mods, batch, kinds, gen, stride, xs, gs) -> int:
    """One forward and, per label kind in ``kinds``, one backward over ``batch``; appends each
    layer's scored inputs to ``xs`` and its squared output gradients (``g = ∂ Σ_t −log p(y_t) / ∂Y``)
    to ``gs[k]`` for kind ``k``; returns the scored count.

    When the batch's full-vocabulary logits would pass the logits-memory bound
    (:mod:`bitalloc.sensitivity.logits`) and the head splits off, the head and the loss run a
    chunk of positions at a time (:func:`head_grads`); otherwise in one piece, as before."""
    from .logits import chunk_rows, split_head

    ids = batch["input_ids"]  # (B, T)
    B, T = ids.shape
    split = split_head(model, batch)
    vocab = int(getattr(split.head, "out_features", 0) or 0) if split is not None else 0
    step = chunk_rows(vocab, 4) if vocab else 0
    chunked = split is not None and vocab > 0 and step < B * T
    head_idx = [i for i, m in enumerate(mods) if chunked and m is split.head]
    taps = LayerTaps(mods, skip=head_idx)
    kw = {k: v for k, v in batch.items() if k != "logits_to_keep"}
    try:
        out = (split.body if chunked else model)(**kw, use_cache=False)
    finally:
        taps.remove()
    mask = batch.get("attention_mask")
    keep_bt = scored_mask(ids, mask, stride)
    outputs = taps.outputs
    idx = sorted(outputs)
    grads_per_kind = []  # per kind: one gradient (or None) per layer of idx
    last = len(kinds) - 1
    if chunked:
        hidden = out.last_hidden_state  # (B, T, d)
        del out
        for k, kind in enumerate(kinds):
            g_hidden, head_rows = head_grads(split.head, hidden.detach(), ids, mask, kind, gen, step,
                                             keep_bt, bool(head_idx))
            grads_per_kind.append(torch.autograd.grad(hidden, [outputs[i] for i in idx], grad_outputs=g_hidden,
                                                      allow_unused=True, retain_graph=k < last))
            for i in head_idx:  # the head's own rows, gathered chunk by chunk
                if k == 0:
                    xs[i].append(head_rows[0])
                gs[k][i].append(head_rows[1])
    else:
        logits = out.logits  # (B, T, V)
        assert logits.shape[:2] == ids.shape, f"logits {tuple(logits.shape)} do not match ids {tuple(ids.shape)}"
        pred = logits[:, :-1].to(torch.float32)
        for k, kind in enumerate(kinds):
            loss = label_loss(logits, pred, ids, mask, kind, gen)
            grads_per_kind.append(torch.autograd.grad(loss, [outputs[i] for i in idx], allow_unused=True,
                                                      retain_graph=k < last))
            del loss
        del pred, logits, out
    taps.outputs = {}
    append_scored(layers, idx, taps.inputs, grads_per_kind, keep_bt, xs, gs)
    return int(keep_bt.sum())


def head_grads(head, hidden, ids, mask, labels, gen, step, keep_bt, want_head):
    """``(∂loss/∂hidden (B, T, d), head rows)`` with the head's logits, the labels and the loss
    computed ``step`` flattened positions at a time: at most a few ``(step, V)`` float32
    buffers live at once instead of the batch's ``(B·T, V)``. Head rows (when ``want_head``,
    the head being a profiled layer): its scored inputs ``(N, d)`` and squared output gradients
    ``(N, V)`` in the order of :func:`_collect_batch`'s scored positions, else None.
    Sampled labels draw from each chunk's own distribution (the same law as one piece, a
    different random stream)."""
    B, T, d = hidden.shape
    y = torch.full((B, T), -100, dtype=torch.long)  # (B, T): the target of position t, -100 where none
    if labels == "text":
        y[:, :-1] = ids[:, 1:]
    if mask is not None:
        y[:, :-1] = y[:, :-1].masked_fill(mask[:, 1:] == 0, -100)
    valid = torch.zeros((B, T), dtype=torch.bool)
    valid[:, :-1] = True if mask is None else mask[:, 1:] != 0
    flat_h = hidden.reshape(-1, d)  # (B·T, d)
    flat_y, flat_ok, flat_keep = y.reshape(-1), valid.reshape(-1), keep_bt.reshape(-1)
    g_hidden = torch.zeros_like(flat_h)
    hx, hg = [], []
    for i in range(0, B * T, step):
        j = min(i + step, B * T)
        hc = flat_h[i:j].clone().requires_grad_(True)  # (n, d)
        logits = head(hc).to(torch.float32)  # (n, V)
        yc = flat_y[i:j]
        if labels != "text":
            with torch.no_grad():
                yc = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1, generator=gen)[:, 0]
            yc = yc.masked_fill(~flat_ok[i:j], -100)
        loss = torch.nn.functional.cross_entropy(logits, yc, ignore_index=-100, reduction="sum")
        g_h, g_logits = torch.autograd.grad(loss, [hc, logits])
        g_hidden[i:j] = g_h
        if want_head:
            k = flat_keep[i:j]
            hx.append(flat_h[i:j][k].to(torch.float32))
            hg.append(g_logits[k].pow_(2))
        del logits, loss, g_logits
    head_rows = (torch.cat(hx), torch.cat(hg)) if want_head else None
    return g_hidden.reshape(B, T, d), head_rows


def layer_kind(fqn: str) -> str:
    """The layer's role for the hybrid correction: its name's last part (``q_proj``, ``down_proj``...)."""
    return fqn.rsplit(".", 1)[-1]


def measured_subset(layers: Sequence[Any], every: int) -> list[int]:
    """Indices of the layers the hybrid references measure end to end: those of every
    ``every``-th block (0, every, 2·every, ...), the last block, and layers outside blocks."""
    blocks = sorted({layer.block_index for layer in layers if layer.block_index is not None})
    keep = set(blocks[::every]) | ({blocks[-1]} if blocks else set())
    return [i for i, layer in enumerate(layers) if layer.block_index is None or layer.block_index in keep]


def measured_layers(ref_method: str, layers: Sequence[Any], every: int) -> list[int]:
    """Indices of the layers whose references a profile measures end to end: all of them
    (``measured``), :func:`measured_subset` (``hybrid``) or none (``fisher``)."""
    if ref_method == "fisher":
        return []
    return measured_subset(layers, every) if ref_method == "hybrid" else list(range(len(layers)))


def reference_values(ref_method: str, layers: Sequence[Any], measured_idx: Sequence[int], measured: np.ndarray,
                     fisher: np.ndarray | None, every: int, say=None) -> tuple[np.ndarray, dict | None]:
    """The ``(L, R)`` references of ``ref_method`` from the measured rows (``measured``, one per
    :func:`measured_layers` index) and the Fisher estimates at the reference schemes
    (``fisher``, ``(L, R)``): the measured ones, the Fisher ones, or :func:`hybrid_ref_values`
    (then also its info, with ``measure_every``; else None)."""
    if ref_method == "fisher":
        return fisher, None
    if ref_method != "hybrid":
        return measured, None
    values, info = hybrid_ref_values([layer_kind(x.fqn) for x in layers], measured_idx, measured, fisher)
    if say is not None:
        say(f"hybrid references: {info['measured_layers']} layers measured, {info['estimated_layers']} from the "
            "Fisher corrected per layer kind")
    return values, {**info, "measure_every": every}


def hybrid_ref_values(kinds: Sequence[str], measured_idx: Sequence[int], measured: np.ndarray,
                      fisher: np.ndarray) -> tuple[np.ndarray, dict]:
    """``(L, R)`` references: measured where measured, elsewhere the Fisher estimate times the
    median measured/Fisher ratio of the measured layers of the same kind (per reference).

    The output-Fisher's diagonal errs by layer role (for SmolLM2 it over-states k_proj and
    under-states v_proj by up to 4x against the measured KL; the role explains about half of
    the log-ratio's variance), which a few measured blocks correct. A kind with no measured
    layer takes the median ratio over all measured layers. ``measured`` is ``(len(measured_idx),
    R)``, ``fisher`` ``(L, R)``. Info: the ratio per kind."""
    F = np.asarray(fisher, dtype=np.float64)
    M = np.asarray(measured, dtype=np.float64)
    L, R = F.shape
    assert M.shape == (len(measured_idx), R), f"measured {M.shape} for {len(measured_idx)} layers x {R}"
    out = F.copy()
    idx = np.asarray(measured_idx, dtype=np.int64)
    out[idx] = M
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.log(M / F[idx])  # (m, R)
    ok = np.isfinite(lr)

    def median_ratio(rows: np.ndarray) -> np.ndarray:
        return np.array([float(np.exp(np.median(lr[rows, r][ok[rows, r]]))) if ok[rows, r].any() else np.nan
                         for r in range(R)])

    overall = median_ratio(np.ones(len(idx), dtype=bool))
    overall = np.where(np.isfinite(overall), overall, 1.0)
    factors = {}
    mkinds = np.array([kinds[i] for i in idx])
    rest = np.setdiff1d(np.arange(L), idx)
    for kind in sorted({kinds[i] for i in rest}):
        f = median_ratio(mkinds == kind) if len(idx) else np.full(R, np.nan)
        f = np.where(np.isfinite(f), f, overall)
        factors[kind] = f.tolist()
        rows = [i for i in rest if kinds[i] == kind]
        out[rows] = F[rows] * f
    return out, {"measured_layers": len(idx), "estimated_layers": int(len(rest)), "ratio_by_kind": factors}
