"""Evaluation: perplexity on text windows and KL divergence against the 16-bit model.

Perplexity: the text is tokenized once and cut into ``n_windows`` consecutive,
non-overlapping windows of ``seq_len`` tokens from the start (no BOS added, every window
scored independently: ``seq_len - 1`` predicted tokens per window). PPL =
exp(mean next-token NLL over all predicted tokens).

KL: mean over predicted tokens of KL(p_ref || p_quant) of the next-token distributions,
in nats, with the reference the unquantized model on the same windows.

Several quantized models are scored in one pass: the reference forward runs once per
batch and every model is compared against it, so a sweep costs one reference pass.
"""

from __future__ import annotations
from .. import BitallocError

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .plan import Plan

__all__ = [
    "EvalError", "EvalResult", "text_windows", "auto_batch_size", "evaluate_models", "evaluate",
    "load_saved_models", "allocation_key", "evaluate_plans",
]


class EvalError(BitallocError, ValueError):
    """Evaluation data is missing or too short; the message says what is needed."""


@dataclass
class EvalResult:
    label: str
    ppl: float
    nll: float  # mean next-token NLL (nats)
    kl: float | None  # mean KL(ref || model) per token (nats); None for the reference itself
    top1_agree: float | None  # fraction of tokens where the argmax matches the reference
    tokens: int  # predicted tokens scored
    windows: int
    seq_len: int
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("label", "ppl", "nll", "kl", "top1_agree", "tokens", "windows", "seq_len", "seconds")} | self.extra


def text_windows(tokenizer, text: str, seq_len: int, n_windows: int) -> torch.Tensor:
    """(n_windows, seq_len) consecutive non-overlapping token windows from the start of ``text``."""
    if seq_len < 2 or n_windows < 1:
        raise EvalError(f"need seq_len >= 2 and n_windows >= 1, got {seq_len} and {n_windows}")
    if not text or not text.strip():
        raise EvalError("evaluation text is empty")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    need = seq_len * n_windows
    if ids.numel() < need:
        raise EvalError(f"evaluation text has {ids.numel()} tokens; {n_windows} windows of {seq_len} need {need}")
    return ids[:need].view(n_windows, seq_len).clone()


def windows_from_file(tokenizer, path: str | Path, seq_len: int, n_windows: int) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"evaluation text file {str(p)!r} does not exist")
    return text_windows(tokenizer, p.read_text(encoding="utf-8", errors="replace"), seq_len, n_windows)


def _outputs(model, ids: torch.Tensor):
    """Outputs of the ``T-1`` predicting positions: chunked logits when the head splits off."""
    from bitalloc.sensitivity.logits import forward_logits, split_head

    T = ids.shape[1]
    if split_head(model, {"input_ids": ids}) is not None:
        return forward_logits(model, {"input_ids": ids, "logits_to_keep": torch.arange(T - 1)})
    out = model(input_ids=ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0])[:, :-1]


class _Totals:
    """Sums of NLL, KL and top-1 agreement per label."""

    def __init__(self, labels) -> None:
        self.nll = {k: 0.0 for k in labels}
        self.kl = {k: 0.0 for k in labels}
        self.agree = {k: 0 for k in labels}

    def score(self, ref_rows, rows: dict, tgt: torch.Tensor, step: int, ref_label: str | None, secs: dict) -> None:
        """Accumulate every model in ``rows`` against the reference, ``step`` positions at a time
        (the reference chunk is computed once per chunk and shared by the models)."""
        for i in range(0, tgt.numel(), step):
            t = tgt[i:i + step, None]
            t0 = time.perf_counter()
            ref_lp = F.log_softmax(ref_rows(i, i + step), -1)
            if ref_label is not None:
                secs[ref_label] += time.perf_counter() - t0
                self.nll[ref_label] += -ref_lp.gather(1, t).sum(dtype=torch.float64).item()
                self.agree[ref_label] += t.numel()
            ref_top = ref_lp.argmax(-1)
            ref_p = ref_lp.exp() if rows else None
            for k, fn in rows.items():
                t0 = time.perf_counter()
                lp = F.log_softmax(fn(i, i + step), -1)
                secs[k] += time.perf_counter() - t0
                self.nll[k] += -lp.gather(1, t).sum(dtype=torch.float64).item()
                self.kl[k] += (ref_p * (ref_lp - lp)).sum(-1).sum(dtype=torch.float64).item()
                self.agree[k] += (lp.argmax(-1) == ref_top).sum().item()
                del lp


AUTO_BATCH_TOKENS = 2048  # tokens per forward when only hidden states are kept (a few MB at SmolLM2's width)


def auto_batch_size(models: Sequence[torch.nn.Module], windows: torch.Tensor) -> int:
    """Windows per forward: up to :data:`AUTO_BATCH_TOKENS` tokens when every model's LM head
    splits off (a forward keeps hidden states, not logits), else 4 (a model's full logits
    exist at once).

    Fewer, larger forwards matter for quantized models: each forward dequantizes every
    packed weight once (a third of a quantized forward on CPU). The scores do not depend on
    the batching: the default run's 16 results were bit-identical at 4 and 8 windows."""
    from bitalloc.sensitivity.logits import split_head

    n, T = windows.shape
    if any(split_head(m, {"input_ids": windows[:1]}) is None for m in models):
        return 4
    return max(1, min(n, AUTO_BATCH_TOKENS // max(T, 1)))


@torch.no_grad()
def evaluate_models(
    ref_model,
    models: Mapping[str, torch.nn.Module],
    windows: torch.Tensor,
    *,
    batch_size: int | None = None,
    progress: bool = True,
    include_reference: bool = True,
) -> dict[str, EvalResult]:
    """Perplexity, KL and top-1 agreement of every model against ``ref_model`` in one pass.

    windows: (n, T) token ids. Returns {label: EvalResult}, the reference under "fp16"
    (the unquantized model) when include_reference. ``batch_size`` windows per forward;
    None: :func:`auto_batch_size`.

    Memory: models whose LM head splits off (:mod:`bitalloc.sensitivity.logits`) keep only
    final hidden states per batch; logits and log-probs exist a chunk of positions at a
    time, bounded by the logits memory (``--logits-memory``), whatever the vocabulary.
    Other models are scored one at a time from their full logits (chunked log-softmax).
    """
    from tqdm.auto import tqdm

    from bitalloc.sensitivity.logits import ChunkedLogits, chunk_rows, logit_rows

    n, T = windows.shape
    batch_size = batch_size or auto_batch_size([ref_model, *models.values()], windows)
    labels = (["fp16"] if include_reference else []) + list(models)
    tot = _Totals(labels)
    secs = {k: 0.0 for k in ["fp16", *models]}
    count = 0
    bar = tqdm(total=n, desc=f"eval {len(models)} model(s)", unit="win", disable=not progress)
    for start in range(0, n, batch_size):
        ids = windows[start:start + batch_size]  # (B, T)
        tgt = ids[:, 1:].reshape(-1)  # (B*(T-1),)
        t0 = time.perf_counter()
        shape, ref_rows = logit_rows(_outputs(ref_model, ids))
        secs["fp16"] += time.perf_counter() - t0
        step = chunk_rows(shape[-1], 7)  # ref logits, log p, p; a model's logits, log q; two temporaries
        chunked: dict = {}
        first = include_reference
        for k, m in models.items():
            t0 = time.perf_counter()
            out = _outputs(m, ids)
            secs[k] += time.perf_counter() - t0
            if isinstance(out, ChunkedLogits):
                chunked[k] = out.rows  # hidden states only: scored together below
            else:
                tot.score(ref_rows, {k: logit_rows(out)[1]}, tgt, chunk_rows(shape[-1], 4), "fp16" if first else None, secs)
                first = False
            del out
        if chunked or first:
            tot.score(ref_rows, chunked, tgt, step, "fp16" if first else None, secs)
        count += tgt.numel()
        bar.update(ids.shape[0])
    bar.close()
    out = {}
    for k in labels:
        is_ref = include_reference and k == "fp16"
        mean_nll = tot.nll[k] / count
        out[k] = EvalResult(
            label=k, ppl=math.exp(mean_nll), nll=mean_nll, kl=None if is_ref else tot.kl[k] / count,
            top1_agree=None if is_ref else tot.agree[k] / count, tokens=count, windows=n, seq_len=T, seconds=secs[k],
        )
    return out


def evaluate(model, windows: torch.Tensor, ref_model=None, **kw) -> EvalResult:
    """Perplexity (and KL against ``ref_model`` when given) of one model."""
    if ref_model is None:
        return evaluate_models(model, {}, windows, **kw)["fp16"]
    return evaluate_models(ref_model, {"model": model}, windows, include_reference=False, **kw)["model"]


# ---------------------------------------------------------------------------------------
# plans: applied (identical allocations once) and scored together


def load_saved_models(loaded, paths: Sequence[str | Path]) -> dict:
    """``{folder name: model}`` of saved quantized models, each checked to be of ``loaded``'s model."""
    from bitalloc.sensitivity.models import fingerprint

    from .quantized_io import load_quantized

    out: dict = {}
    fp = fingerprint(loaded.model) if paths else None
    for p in paths:
        qmodel, plan = load_quantized(p)
        plan.check_model(fp)
        name = Path(p).name or str(p)
        out[name if name not in out else str(p)] = qmodel
    return out


def allocation_key(plan: Plan) -> tuple:
    """What decides the quantized model: each layer's scheme and high channels, and the quantizer."""
    import json

    layers = tuple(sorted((f, lp.scheme, tuple(lp.high_idx or ())) for f, lp in plan.layers.items()))
    return layers, json.dumps(plan.quantization or {}, sort_keys=True, default=str)


def evaluate_plans(loaded, plans: Mapping[str, Plan], windows, *, chunk: int | None = None,
                   models: Mapping | None = None, **kw):
    """Apply every plan to the model (fingerprint checked, computed once) and score them.

    Plans with identical layer choices are applied and scored once (their results are
    shared). ``chunk`` bounds how many quantized copies exist at a time (one pass over the
    windows per chunk); None scores all in one pass. ``models``: ready models (e.g. loaded
    from disk) scored in the first pass too."""
    from bitalloc.sensitivity.models import fingerprint

    from .executor import apply as _apply

    fp = fingerprint(loaded.model)
    first: dict[tuple, str] = {}
    alias = {k: first.setdefault(allocation_key(p), k) for k, p in plans.items()}
    distinct = [k for k, v in alias.items() if k == v]
    step = chunk or max(1, len(distinct))
    res: dict = {}
    cache: dict = {}  # (layer, scheme, channels, quantizer) -> packed layer, shared by the plans
    for i in range(0, len(distinct), step):
        batch = {k: _apply(loaded.model, plans[k], fingerprint=fp, cache=cache) for k in distinct[i:i + step]}
        if i == 0:
            batch.update(models or {})
        res.update(evaluate_models(loaded.model, batch, windows, include_reference=i == 0, **kw))
        del batch
    if not distinct:
        res.update(evaluate_models(loaded.model, dict(models or {}), windows, **kw))
    return {**res, **{k: res[v] for k, v in alias.items()}}
