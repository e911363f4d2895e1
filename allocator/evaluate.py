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
from typing import Mapping

import torch
import torch.nn.functional as F

__all__ = ["EvalError", "EvalResult", "text_windows", "evaluate_models", "evaluate"]


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


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def evaluate_models(
    ref_model,
    models: Mapping[str, torch.nn.Module],
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: bool = True,
    include_reference: bool = True,
) -> dict[str, EvalResult]:
    """Perplexity, KL and top-1 agreement of every model against ``ref_model`` in one pass.

    windows: (n, T) token ids. Returns {label: EvalResult}, the reference under "fp16"
    (the unquantized model) when include_reference.
    """
    from tqdm.auto import tqdm

    n, T = windows.shape
    labels = (["fp16"] if include_reference else []) + list(models)
    nll = {k: 0.0 for k in labels}
    kl = {k: 0.0 for k in labels}
    agree = {k: 0 for k in labels}
    secs = {k: 0.0 for k in ["fp16", *models]}
    count = 0
    bar = tqdm(total=n, desc=f"eval {len(models)} model(s)", unit="win", disable=not progress)
    for start in range(0, n, batch_size):
        ids = windows[start:start + batch_size]  # (B, T)
        tgt = ids[:, 1:].reshape(-1)  # (B*(T-1),)
        t0 = time.perf_counter()
        ref_lp = F.log_softmax(_logits(ref_model, ids)[:, :-1].float(), -1).flatten(0, 1)  # (N, V)
        secs["fp16"] += time.perf_counter() - t0
        ref_top = ref_lp.argmax(-1)
        ref_p = ref_lp.exp() if models else None  # once per batch, shared by every model
        if include_reference:
            nll["fp16"] += -ref_lp.gather(1, tgt[:, None]).sum().item()
            agree["fp16"] += tgt.numel()
        for k, m in models.items():
            t0 = time.perf_counter()
            lp = F.log_softmax(_logits(m, ids)[:, :-1].float(), -1).flatten(0, 1)  # (N, V)
            secs[k] += time.perf_counter() - t0
            nll[k] += -lp.gather(1, tgt[:, None]).sum().item()
            kl[k] += (ref_p * (ref_lp - lp)).sum().item()
            agree[k] += (lp.argmax(-1) == ref_top).sum().item()
            del lp
        count += tgt.numel()
        bar.update(ids.shape[0])
    bar.close()
    out = {}
    for k in labels:
        is_ref = include_reference and k == "fp16"
        mean_nll = nll[k] / count
        out[k] = EvalResult(
            label=k, ppl=math.exp(mean_nll), nll=mean_nll, kl=None if is_ref else kl[k] / count,
            top1_agree=None if is_ref else agree[k] / count, tokens=count, windows=n, seq_len=T, seconds=secs[k],
        )
    return out


def evaluate(model, windows: torch.Tensor, ref_model=None, **kw) -> EvalResult:
    """Perplexity (and KL against ``ref_model`` when given) of one model."""
    if ref_model is None:
        return evaluate_models(model, {}, windows, **kw)["fp16"]
    return evaluate_models(ref_model, {"model": model}, windows, include_reference=False, **kw)["model"]
