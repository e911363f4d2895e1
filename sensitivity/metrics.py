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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

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


def kept_positions(batch: dict, n_out: int, device=None) -> torch.Tensor:
    """Input positions (n_out,) of the ``n_out`` output positions scored for this batch.

    ``n_out == T`` (the input length): every position. Otherwise the batch's
    ``logits_to_keep`` (a tensor of positions, or an int ``k``: the last ``k``).
    """
    T = int(batch["input_ids"].shape[1])
    if n_out == T:
        return torch.arange(T, device=device)
    keep = batch.get("logits_to_keep")
    if isinstance(keep, torch.Tensor) and keep.ndim == 1 and keep.numel() == n_out:
        return keep.to(device=device, dtype=torch.long)
    if isinstance(keep, int) or (isinstance(keep, torch.Tensor) and keep.ndim == 0):
        k = int(keep)
        if k == n_out:
            return torch.arange(T - k, T, device=device)
    raise ValueError(f"cannot tell which input positions the {n_out} scored outputs are (input length {T})")


@dataclass(frozen=True)
class TokenWeighting:
    """Per-token weights inside a metric (see the module docstring).

    ``weights``: a (b, T) tensor aligned with the input positions of every batch (or one
    (T,) row for all), or a callable ``batch -> (b, T)``. ``exclude_positions``: input
    positions with weight 0 (negative: from the end). ``exclude_token_ids``: input token
    ids whose positions get weight 0. Padded positions (attention mask 0) always get 0.
    """

    weights: Any = None
    exclude_positions: tuple[int, ...] = ()
    exclude_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for key in ("exclude_positions", "exclude_token_ids"):
            v = getattr(self, key)
            if isinstance(v, int):
                v = (v,)
            try:
                v = tuple(int(x) for x in v)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a list of integers, got {getattr(self, key)!r}") from None
            object.__setattr__(self, key, v)
        w = self.weights
        if w is not None and not callable(w) and not isinstance(w, torch.Tensor):
            try:
                w = torch.as_tensor(w, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError("token weights must be a tensor, a nested list of numbers or a callable") from None
            object.__setattr__(self, "weights", w)

    @property
    def is_default(self) -> bool:
        return self.weights is None and not self.exclude_positions and not self.exclude_token_ids

    def describe(self) -> dict:
        d: dict = {}
        if self.exclude_positions:
            d["exclude_positions"] = list(self.exclude_positions)
        if self.exclude_token_ids:
            d["exclude_token_ids"] = list(self.exclude_token_ids)
        if self.weights is not None:
            d["token_weights"] = "callable" if callable(self.weights) else f"tensor{list(self.weights.shape)}"
        return d

    def full(self, batch: dict, device=None) -> torch.Tensor:
        """(b, T) float64 weights over the input positions (mask and exclusions applied)."""
        ids = batch["input_ids"]
        b, T = ids.shape
        w = torch.ones((b, T), dtype=torch.float64, device=device)
        m = batch.get("attention_mask")
        if m is not None and tuple(m.shape) == (b, T):
            w = w * m.to(device=device, dtype=torch.float64)
        if self.weights is not None:
            tw = self.weights(batch) if callable(self.weights) else self.weights
            tw = torch.as_tensor(tw).to(device=device, dtype=torch.float64)
            if tw.ndim == 1:
                tw = tw.unsqueeze(0).expand(b, -1)
            if tuple(tw.shape) != (b, T):
                raise ValueError(f"token weights have shape {tuple(tw.shape)}, the batch is {(b, T)}")
            if (tw < 0).any() or not torch.isfinite(tw).all():
                raise ValueError("token weights must be finite and non-negative")
            w = w * tw
        for p in self.exclude_positions:
            if -T <= p < T:
                w[:, p] = 0
        if self.exclude_token_ids:
            bad = torch.isin(ids.to(device), torch.tensor(self.exclude_token_ids, device=device))
            w = w.masked_fill(bad, 0.0)
        return w

    def at(self, batch: dict, n_out: int, device=None) -> torch.Tensor:
        """(b, n_out) weights of the scored output positions."""
        w = self.full(batch, device)
        pos = kept_positions(batch, n_out, device)
        return w[:, pos]


def as_weighting(weighting: Any = None, *, exclude_positions=(), exclude_token_ids=(), token_weights=None) -> TokenWeighting:
    if isinstance(weighting, TokenWeighting):
        if exclude_positions or exclude_token_ids or token_weights is not None:
            raise ValueError("give either weighting= or the exclude_positions/exclude_token_ids/token_weights options, not both")
        return weighting
    if isinstance(weighting, Mapping):
        return TokenWeighting(weighting.get("weights"), weighting.get("exclude_positions", ()), weighting.get("exclude_token_ids", ()))
    if weighting is not None:
        raise ValueError(f"weighting must be a TokenWeighting or a mapping, got {type(weighting).__name__}")
    return TokenWeighting(token_weights, exclude_positions, exclude_token_ids)


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


def _logits(outputs: Any) -> torch.Tensor:
    return primary_output(outputs, "logits").detach()


class KLMetric(_TokenMetric):
    """Mean per-token ``KL(p_ref ‖ p_quant)`` of next-token distributions (nats/token).

    The reference log-probs of every calibration token are kept in ``ref_dtype``: float32
    by default, ``tokens × vocab × 4`` bytes (400 MB for 8 × 256 tokens of SmolLM2's
    49152-word vocabulary; use fewer ``kl_samples`` to bound it further). float16 halves
    that, but its rounding of log-probs (~|log p|·2⁻¹¹) puts a floor of roughly 1e-7–1e-6
    nats/token under every measurement (renormalised, so it enters at second order): fine
    for 2–4-bit references, too coarse for 8-bit schemes. KL is computed elementwise
    (``Σ p (log p − log q)``, no cancellation) in chunks of ``chunk_tokens`` tokens.
    Padded tokens (attention mask 0) are not counted.
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

    def reference(self, outputs: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs in ``ref_dtype`` (N, V), their float32 log-normaliser (N,))."""
        logits = _logits(outputs)
        flat = logits.reshape(-1, logits.shape[-1])
        parts, norms = [], []
        for i in range(0, flat.shape[0], self.chunk_tokens):
            lp = torch.log_softmax(flat[i : i + self.chunk_tokens].float(), -1).to(self.ref_dtype)
            parts.append(lp)
            norms.append(torch.logsumexp(lp.float(), -1))  # ~0: renormalises the rounded values
        return torch.cat(parts, 0), torch.cat(norms, 0)

    def score(self, ref: tuple[torch.Tensor, torch.Tensor], outputs: Any, batch: dict) -> tuple[float, int]:
        ref_lp, ref_norm = ref
        logits = _logits(outputs)
        flat = logits.reshape(-1, logits.shape[-1])
        w = self._weights(batch, logits.shape[1], flat.device) if logits.ndim == 3 else None
        mask = token_mask(batch, tuple(logits.shape[:-1]), flat.device) if w is None else None
        total = torch.zeros((), dtype=torch.float64, device=flat.device)
        for i in range(0, flat.shape[0], self.chunk_tokens):
            sl = slice(i, i + self.chunk_tokens)
            lr = ref_lp[sl].to(device=flat.device, dtype=torch.float32, copy=True)  # modified in place below
            lr.sub_(ref_norm[sl].to(flat.device).unsqueeze(-1))  # log p_ref, renormalised
            lq = torch.log_softmax(flat[sl].float(), -1)
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
        count = int(mask.sum()) if mask is not None else flat.shape[0]
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
        logits = _logits(outputs)
        labels, valid = _next_token_labels(batch, logits.shape[1], logits.device)
        lp = torch.log_softmax(logits.float(), -1)
        nll = -lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).double()
        return nll, valid

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
        return _logits(outputs).argmax(-1)

    def score(self, ref: torch.Tensor, outputs: Any, batch: dict) -> tuple[float, int]:
        logits = _logits(outputs)
        changed = (logits.argmax(-1) != ref.to(logits.device)).to(torch.float64)
        w = self._weights(batch, logits.shape[1], logits.device) if logits.ndim == 3 else None
        mask = token_mask(batch, tuple(logits.shape[:-1]), logits.device) if w is None else None
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


def strided_batches(net, batches: list[dict], stride: int) -> list[dict]:
    """Score the metric at every ``stride``-th position only (positions stride-1, 2·stride-1, ...).

    The forward still runs every token (attention needs them); only the LM head and the
    KL, about half the cost of one measurement on SmolLM2 (49152-word vocabulary), shrink.
    Neighbouring positions are strongly correlated, so little information is lost. Needs
    a model whose forward takes ``logits_to_keep`` (transformers' causal LMs); others
    are scored at every position.
    """
    import inspect

    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"kl_stride must be a positive integer, got {stride!r}")
    if stride == 1 or "logits_to_keep" not in inspect.signature(net.forward).parameters:
        return batches
    out = []
    for b in batches:
        T = b["input_ids"].shape[1]
        out.append({**b, "logits_to_keep": torch.arange(stride - 1, T, stride)})  # (T // stride,) kept positions
    return out
