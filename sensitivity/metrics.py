"""End metrics: how a perturbed forward is compared with the unperturbed (16-bit) one.

Every metric is a *loss that grows with damage* (0 for an unperturbed model):

=========  ==========================================================================
name       loss (units)
=========  ==========================================================================
``kl``     mean per-token ``KL(p_ref ‖ p_quant)`` of next-token distributions (nats/token)
``nll``    mean per-token NLL increase on the next input token, ``−log q[y] + log p[y]``
           (nats/token; signed: a perturbation may lower the NLL of some tokens)
``sqnr``   mean per-token noise-to-signal power ratio of the final hidden state,
           ``‖h_q − h‖² / ‖h‖²`` (dimensionless; SQNR in dB is ``−10·log10`` of it,
           see :func:`nsr_to_db`). Causal LMs: the last entry of ``hidden_states``
           (after the final norm in transformers' models), requested automatically.
           Blind to the LM head (it comes after that state): put the head in a
           logit-metric group.
``cosine`` mean ``1 − cos`` between pooled sentence embeddings (encoders; per sentence;
           attention-mask mean pooling, as sentence-transformers does for MiniLM)
``top1``   ``1 −`` top-1 agreement of next-token predictions (fraction of tokens)
=========  ==========================================================================

Interface (:class:`Metric`): ``reference(outputs, batch)`` keeps what is needed of the
unperturbed outputs of one batch, ``score(ref, outputs, batch)`` returns ``(sum of
weighted per-item losses, sum of weights)``; the measured value is the total sum over
batches divided by the total weight.

Token weighting (:class:`TokenWeighting`, option ``weighting=`` or the flat options
``exclude_positions=``, ``exclude_token_ids=``, ``token_weights=``): every scored output
position ``p`` (the output computed at input position ``p``; for next-token metrics it
predicts token ``p+1``) gets weight ``mask · w[p]``, 0 when ``p`` is an excluded position
(e.g. ``[0]``: the begin-of-sequence token, which often carries outlier activations;
negative positions count from the end) or when the *input* token at ``p`` is one of the
excluded token ids. Strided scoring (``logits_to_keep`` in the batch, a tensor of kept
positions such as ``stride-1, 2·stride-1, ...`` from :func:`strided_batches`,
or an int ``k`` = the last ``k``) is understood: the weights are taken at the kept
positions. For ``cosine`` the weights enter the mean pooling (excluded positions are not
pooled).

Registry: :func:`get_metric` (``"kl"``, ``"nll"``, ``"sqnr"``, ``"cosine"``, ``"top1"``)
and :func:`as_metric`, which also takes a :class:`Metric` instance or subclass, or a user
function ``fn(ref_outputs, outputs, batch) -> per-token losses`` (``(b, T_out)``, weighted
like the built-ins, or ``(b,)`` per item) wrapped in :class:`FunctionMetric`.

:class:`MetricSet` scores several named metrics from one forward pass; with it,
:func:`sensitivity.proxy.measure_item` returns ``{name: value}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .logits import ChunkedLogits, chunk_rows, logit_rows, logits_memory
from .weighting import TokenWeighting, as_weighting, kept_positions  # noqa: F401 - re-exported

__all__ = [
    "Metric",
    "TokenWeighting",
    "KLMetric",
    "NLLDeltaMetric",
    "SQNRMetric",
    "CosineMetric",
    "Top1Metric",
    "FunctionMetric",
    "MetricSet",
    "METRICS",
    "primary_output",
    "token_mask",
    "strided_batches",
    "get_metric",
    "as_metric",
    "nsr_to_db",
]


# ---------------------------------------------------------------------------------------
# helpers


def primary_output(outputs: Any, key: str) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    v = getattr(outputs, key, None)
    if v is None and isinstance(outputs, dict):
        v = outputs.get(key)
    if v is None:
        v = outputs[0]
    return v


def token_mask(batch: dict, shape: tuple[int, ...], device) -> torch.Tensor | None:
    m = batch.get("attention_mask")
    if m is None or tuple(m.shape) != tuple(shape):
        return None
    return m.to(device=device, dtype=torch.bool).reshape(-1)


def _final_hidden(outputs: Any) -> torch.Tensor:
    """The final hidden state (b, T, d): ``last_hidden_state`` or ``hidden_states[-1]``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    h = getattr(outputs, "last_hidden_state", None)
    if h is None and isinstance(outputs, dict):
        h = outputs.get("last_hidden_state")
    if h is None:
        hs = getattr(outputs, "hidden_states", None)
        if hs is None and isinstance(outputs, dict):
            hs = outputs.get("hidden_states")
        if hs:
            h = hs[-1]
    if h is None:
        raise ValueError("metric needs the final hidden state, but the model's outputs have neither "
                         "last_hidden_state nor hidden_states")
    return h


# ---------------------------------------------------------------------------------------
# the interface


class Metric:
    """How a measurement compares a perturbed forward with the reference one.

    ``reference(outputs, batch)`` returns what to keep of the unperturbed outputs for one
    batch; ``score(ref, outputs, batch)`` returns ``(sum of per-item losses, item count)``
    (weighted: sum of weights); the measured value is the sum over batches divided by the
    count (per token / item). ``output_key`` names the primary output (``"logits"`` or
    ``"last_hidden_state"``); ``needs_hidden_states`` asks the forward for
    ``output_hidden_states=True``.
    """

    name = "metric"
    output_key = "logits"
    needs_hidden_states = False
    weighting: TokenWeighting = TokenWeighting()

    def reference(self, outputs: Any, batch: dict) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def reset_reference(self) -> None:
        """Called before a reference pass (metrics that budget what they keep start over)."""

    def score(self, ref: Any, outputs: Any, batch: dict) -> tuple[float, int]:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        return {"metric": self.name, **self.weighting.describe()}


class _TokenMetric(Metric):
    """A per-token loss from logits or hidden states, weighted by :class:`TokenWeighting`."""

    def __init__(self, weighting: Any = None, **weighting_options) -> None:
        self.weighting = as_weighting(weighting, **weighting_options)

    def _weights(self, batch: dict, n_out: int, device) -> torch.Tensor | None:
        """(b·n_out,) float64 weights, or None for 'attention mask only' (the unweighted path)."""
        if self.weighting.is_default:
            return None
        return self.weighting.at(batch, n_out, device).reshape(-1)

    @staticmethod
    def _reduce(losses: torch.Tensor, w: torch.Tensor | None, mask: torch.Tensor | None) -> tuple[float, float]:
        losses = losses.reshape(-1).to(torch.float64)
        if w is not None:
            return float((losses * w).sum()), float(w.sum())
        if mask is not None:
            return float(losses[mask].sum()), int(mask.sum())
        return float(losses.sum()), int(losses.numel())


class KLMetric(_TokenMetric):
    """Mean per-token ``KL(p_ref ‖ p_quant)`` of next-token distributions (nats/token).

    The reference log-probs of every calibration token are kept in ``ref_dtype``: float32
    by default, ``tokens × vocab × 4`` bytes (400 MB for 8 × 256 tokens of SmolLM2's
    49152-word vocabulary; use fewer ``kl_samples`` to bound it further). float16 halves
    that, but its rounding of log-probs (~|log p|·2⁻¹¹) puts a floor of roughly 1e-7–1e-6
    nats/token under every measurement (renormalised, so it enters at second order): fine
    for 2–4-bit references, too coarse for 8-bit schemes. Once the kept log-probs would
    pass half the logits memory (:mod:`sensitivity.logits`; 1 GiB by default), a batch
    keeps its final hidden states instead (``tokens × d``) and its reference logits are
    recomputed chunk by chunk at every score (the head's matmul again: memory traded for
    compute; needs outputs from :func:`sensitivity.logits.forward_logits` with a Linear head).
    KL is computed elementwise (``Σ p (log p − log q)``, no cancellation) in chunks of at
    most ``chunk_tokens`` tokens and of the logits memory. Padded tokens (attention mask 0)
    are not counted.
    """

    name = "kl"

    def __init__(self, ref_dtype: torch.dtype = torch.float32, chunk_tokens: int = 512, weighting: Any = None,
                 **weighting_options) -> None:
        super().__init__(weighting, **weighting_options)
        if isinstance(ref_dtype, str):
            ref_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(ref_dtype, ref_dtype)
        if not isinstance(ref_dtype, torch.dtype):
            raise ValueError(f"ref_dtype must be float32, float16 or bfloat16, got {ref_dtype!r}")
        self.ref_dtype = ref_dtype
        self.chunk_tokens = int(chunk_tokens)
        self.kept_bytes = 0  # log-probs kept by the reference so far (reset_reference zeroes it)

    def reset_reference(self) -> None:
        self.kept_bytes = 0

    def reference(self, outputs: Any, batch: dict) -> tuple:
        """(log-probs in ``ref_dtype`` (N, V), their float32 log-normaliser (N,)), or
        ("hidden", (N, d) hidden states, (weight, bias) of the unperturbed head)."""
        shape, rows = logit_rows(outputs)
        n, V = math.prod(shape[:-1]), shape[-1]
        size = n * V * torch.finfo(self.ref_dtype).bits // 8
        head = outputs.split.reference_head() if isinstance(outputs, ChunkedLogits) else None
        if head is not None and self.kept_bytes + size > logits_memory() // 2:
            return "hidden", outputs.hidden.reshape(n, -1).detach().clone(), head
        self.kept_bytes += size
        parts, norms = [], []
        step = min(self.chunk_tokens, chunk_rows(V, 2))
        for i in range(0, n, step):
            lp = torch.log_softmax(rows(i, i + step), -1).to(self.ref_dtype)
            parts.append(lp)
            norms.append(torch.logsumexp(lp.float(), -1))  # ~0: renormalises the rounded values
        return torch.cat(parts, 0), torch.cat(norms, 0)

    def _ref_rows(self, ref: tuple, device) -> Callable[[slice], torch.Tensor]:
        """sl -> float32 log p_ref of those rows (a fresh tensor, free to modify in place)."""
        if isinstance(ref[0], str):
            _, hidden, (W, bias) = ref
            return lambda sl: torch.log_softmax(torch.nn.functional.linear(hidden[sl].to(device), W, bias).float(), -1)
        ref_lp, ref_norm = ref

        def rows(sl: slice) -> torch.Tensor:
            lr = ref_lp[sl].to(device=device, dtype=torch.float32, copy=True)
            return lr.sub_(ref_norm[sl].to(device).unsqueeze(-1))  # log p_ref, renormalised

        return rows

    def score(self, ref: tuple, outputs: Any, batch: dict) -> tuple[float, int]:
        shape, rows = logit_rows(outputs)
        n, V = math.prod(shape[:-1]), shape[-1]
        probe = rows(0, 1)
        w = self._weights(batch, shape[1], probe.device) if len(shape) == 3 else None
        mask = token_mask(batch, tuple(shape[:-1]), probe.device) if w is None else None
        ref_rows = self._ref_rows(ref, probe.device)
        total = torch.zeros((), dtype=torch.float64, device=probe.device)
        step = min(self.chunk_tokens, chunk_rows(V, 4))
        for i in range(0, n, step):
            sl = slice(i, i + step)
            lr = ref_rows(sl)
            lq = torch.log_softmax(rows(i, i + step), -1)
            p = lr.exp()
            kl = lr.sub_(lq).mul_(p).sum(-1)  # Σ p (log p − log q), elementwise first: no cancellation
            if w is not None:
                total += (kl.double() * w[sl]).sum()
                continue
            if mask is not None:
                kl = kl[mask[sl]]
            total += kl.sum(dtype=torch.float64)
        if w is not None:
            return float(total), float(w.sum())
        count = int(mask.sum()) if mask is not None else n
        return float(total), count


def _next_token_labels(batch: dict, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (b, n_out), valid (b, n_out)): the input token after each scored position."""
    ids = batch["input_ids"].to(device)
    b, T = ids.shape
    pos = kept_positions(batch, n_out, device)
    nxt = (pos + 1).clamp(max=T - 1)
    labels = ids[:, nxt]
    valid = (pos + 1 < T).unsqueeze(0).expand(b, -1).clone()
    m = batch.get("attention_mask")
    if m is not None and tuple(m.shape) == (b, T):
        m = m.to(device=device, dtype=torch.bool)
        valid &= m[:, pos] & m[:, nxt]
    return labels, valid


class NLLDeltaMetric(_TokenMetric):
    """Mean per-token increase of the NLL of the next input token (nats/token, signed).

    Labels are the input's next tokens (``input_ids[:, p+1]`` for output position ``p``);
    the last position of a row has no label and is not counted.
    """

    name = "nll"

    def _nll(self, outputs: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        shape, rows = logit_rows(outputs)
        first = rows(0, 1)
        labels, valid = _next_token_labels(batch, shape[1], first.device)
        flat = labels.reshape(-1, 1)
        step = chunk_rows(shape[-1], 2)
        nll = torch.cat([-torch.log_softmax(rows(i, i + step), -1).gather(-1, flat[i:i + step]).squeeze(-1).double()
                         for i in range(0, flat.shape[0], step)])
        return nll.reshape(labels.shape), valid

    def reference(self, outputs: Any, batch: dict) -> torch.Tensor:
        return self._nll(outputs, batch)[0]

    def score(self, ref: torch.Tensor, outputs: Any, batch: dict) -> tuple[float, float]:
        nll, valid = self._nll(outputs, batch)
        d = (nll - ref.to(nll.device)).reshape(-1)
        w = self._weights(batch, nll.shape[1], nll.device)
        v = valid.reshape(-1).to(torch.float64)
        w = v if w is None else w * v
        if self.weighting.is_default:
            return float((d * w).sum()), int(w.sum())
        return float((d * w).sum()), float(w.sum())


class Top1Metric(_TokenMetric):
    """``1 −`` top-1 agreement: the fraction of tokens whose argmax prediction changed."""

    name = "top1"

    def reference(self, outputs: Any, batch: dict) -> torch.Tensor:
        shape, rows = logit_rows(outputs)
        step = chunk_rows(shape[-1], 1)
        n = math.prod(shape[:-1])
        return torch.cat([rows(i, i + step).argmax(-1) for i in range(0, n, step)]).reshape(shape[:-1])

    def score(self, ref: torch.Tensor, outputs: Any, batch: dict) -> tuple[float, int]:
        shape, _ = logit_rows(outputs)
        top = self.reference(outputs, batch)
        changed = (top != ref.to(top.device)).to(torch.float64)
        w = self._weights(batch, shape[1], top.device) if len(shape) == 3 else None
        mask = token_mask(batch, tuple(shape[:-1]), top.device) if w is None else None
        return self._reduce(changed, w, mask)


class SQNRMetric(_TokenMetric):
    """Mean per-token noise-to-signal power of the final hidden state, ``‖h_q−h‖²/‖h‖²``.

    A loss (grows with damage, 0 when unperturbed); ``nsr_to_db`` turns a value into SQNR
    dB. Tokens with ``‖h‖ = 0`` are skipped.
    """

    name = "sqnr"
    output_key = "last_hidden_state"
    needs_hidden_states = True

    def reference(self, outputs: Any, batch: dict) -> torch.Tensor:
        return _final_hidden(outputs).detach().float().clone()

    def score(self, ref: torch.Tensor, outputs: Any, batch: dict) -> tuple[float, int]:
        h = _final_hidden(outputs).detach().float()
        r = ref.to(h.device)
        sig = r.double().pow(2).sum(-1)
        noise = (h - r).double().pow(2).sum(-1)
        ok = sig > 0
        ratio = torch.where(ok, noise / sig.clamp(min=1e-300), torch.zeros_like(noise))
        w = self._weights(batch, h.shape[1], h.device)
        if w is None:
            m = token_mask(batch, tuple(h.shape[:2]), h.device)
            keep = ok.reshape(-1) if m is None else (ok.reshape(-1) & m)
            return float(ratio.reshape(-1)[keep].sum()), int(keep.sum())
        w = w * ok.reshape(-1).to(torch.float64)
        return float((ratio.reshape(-1) * w).sum()), float(w.sum())


def nsr_to_db(nsr: float) -> float:
    """SQNR in dB of a noise-to-signal power ratio (``inf`` for 0)."""
    return math.inf if nsr <= 0 else -10.0 * math.log10(nsr)


class CosineMetric(_TokenMetric):
    """Mean ``1 − cos`` between mean-pooled embeddings (encoders; per sentence).

    Pooling is the attention-mask mean over positions (sentence-transformers' mean
    pooling); token weighting multiplies the pooling weights (``exclude_positions=[0]``
    leaves the [CLS] token out).
    """

    name = "cosine"
    output_key = "last_hidden_state"

    def _pooled(self, outputs: Any, batch: dict) -> torch.Tensor:
        h = _final_hidden(outputs).detach().double()  # (b, s, d)
        if not self.weighting.is_default:
            w = self.weighting.at(batch, h.shape[1], h.device).unsqueeze(-1)
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1e-12)
            return torch.nn.functional.normalize(pooled, dim=-1)
        m = batch.get("attention_mask")
        if m is None or tuple(m.shape) != tuple(h.shape[:2]):
            pooled = h.mean(1)
        else:
            m = m.to(device=h.device, dtype=h.dtype).unsqueeze(-1)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def reference(self, outputs: Any, batch: dict) -> torch.Tensor:
        return self._pooled(outputs, batch)

    def score(self, ref: torch.Tensor, outputs: Any, batch: dict) -> tuple[float, int]:
        e = self._pooled(outputs, batch)
        cos = (e * ref.to(e.device)).sum(-1)
        return float((1 - cos).clamp(min=0).sum()), int(e.shape[0])


class FunctionMetric(_TokenMetric):
    """A user metric ``fn(ref_outputs, outputs, batch) -> losses``.

    ``losses``: ``(b, T_out)`` per-token losses (weighted by the token weighting and the
    attention mask like the built-ins), ``(b,)`` per-item losses, or a scalar (one item).
    The reference keeps a detached copy of the whole unperturbed output (``keep``
    restricts it to one output field, e.g. ``"logits"``, to save memory).
    """

    def __init__(self, fn: Callable, name: str | None = None, *, keep: str | None = None,
                 needs_hidden_states: bool = False, weighting: Any = None, **weighting_options) -> None:
        if not callable(fn):
            raise ValueError(f"a metric function must be callable, got {type(fn).__name__}")
        super().__init__(weighting, **weighting_options)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")
        self.keep = keep
        self.needs_hidden_states = bool(needs_hidden_states)

    def reference(self, outputs: Any, batch: dict) -> Any:
        from ._forward import tree_clone

        return tree_clone(primary_output(outputs, self.keep) if self.keep else outputs)

    def score(self, ref: Any, outputs: Any, batch: dict) -> tuple[float, float]:
        out = primary_output(outputs, self.keep) if self.keep else outputs
        losses = self.fn(ref, out, batch)
        losses = torch.as_tensor(losses).detach().to(torch.float64)
        if losses.ndim == 0:
            return float(losses), 1
        if losses.ndim == 1:
            return float(losses.sum()), int(losses.numel())
        if losses.ndim != 2:
            raise ValueError(f"metric {self.name!r} returned losses of shape {tuple(losses.shape)}; expected (b, T), (b,) or ()")
        w = self.weighting.at(batch, losses.shape[1], losses.device).reshape(-1)
        return float((losses.reshape(-1) * w).sum()), float(w.sum())


class MetricSet(Metric):
    """Several named metrics scored from one forward: ``score`` returns ``{name: (sum, count)}``."""

    name = "set"

    def __init__(self, metrics: Mapping[str, Any]) -> None:
        if not metrics:
            raise ValueError("a MetricSet needs at least one metric")
        self.metrics: dict[str, Metric] = {str(k): as_metric(v) for k, v in metrics.items()}
        first = next(iter(self.metrics.values()))
        self.output_key = first.output_key
        self.needs_hidden_states = any(m.needs_hidden_states for m in self.metrics.values())

    def reference(self, outputs: Any, batch: dict) -> dict:
        return {k: m.reference(outputs, batch) for k, m in self.metrics.items()}

    def reset_reference(self) -> None:
        for m in self.metrics.values():
            m.reset_reference()

    def score(self, ref: dict, outputs: Any, batch: dict) -> dict[str, tuple[float, float]]:
        return {k: m.score(ref[k], outputs, batch) for k, m in self.metrics.items()}

    def describe(self) -> dict:
        return {k: m.describe() for k, m in self.metrics.items()}


# ---------------------------------------------------------------------------------------
# registry

METRICS: dict[str, type[Metric]] = {
    "kl": KLMetric,
    "nll": NLLDeltaMetric,
    "sqnr": SQNRMetric,
    "cosine": CosineMetric,
    "top1": Top1Metric,
}


def get_metric(name: str, **options) -> Metric:
    """A built-in metric by name with its options (e.g. ``exclude_positions=[0]``)."""
    if not isinstance(name, str) or name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    try:
        return METRICS[name](**options)
    except TypeError as e:
        raise ValueError(f"metric {name!r}: bad options {sorted(options)} ({e})") from None


def as_metric(spec: Any, **options) -> Metric:
    """A :class:`Metric` from a name, an instance, a subclass or a user function."""
    if isinstance(spec, Metric):
        if options:
            raise ValueError("options can only be given with a metric name, class or function")
        return spec
    if isinstance(spec, str):
        return get_metric(spec, **options)
    if isinstance(spec, type) and issubclass(spec, Metric):
        return spec(**options)
    if callable(spec):
        return FunctionMetric(spec, **options)
    raise ValueError(f"a metric must be a name ({', '.join(METRICS)}), a Metric or a function, got {spec!r}")


from .logits import strided_batches  # noqa: E402 - moved beside the chunked logits; re-exported
