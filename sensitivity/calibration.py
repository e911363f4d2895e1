"""Calibration data: token windows cut from a text, or text the model generates itself.

The default calibration needs no data: :func:`generate_calibration` samples sequences from
the model itself (seeded), starting from its BOS token. With a corpus,
:func:`calibration_from_text` / :func:`calibration_from_file` tokenize the text once and cut
``n_samples`` non-overlapping windows of ``seq_len`` tokens at seeded random offsets
(returned in text order). Encoders get sentences (:func:`calibration_from_sentences`).

Calibration data is a ``LongTensor (n_samples, seq_len)`` of token ids (causal LMs) or a
dict with ``input_ids`` and ``attention_mask`` (encoders); :func:`as_batches` splits either
into mini-batches of dicts that the Hessian and measurement passes consume.
"""

from __future__ import annotations

import weakref
from .. import BitallocError

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CalibrationError",
    "CalibrationSpec",
    "calibration_from_text",
    "calibration_from_file",
    "generate_calibration",
    "generate_many",
    "prefetch_generated",
    "calibration_from_sentences",
    "load_calibration",
    "as_batches",
    "first_rows",
    "tokens_sha256",
    "DEFAULT_SENTENCES",
    "SOURCES",
]

SOURCES = ("generated", "file", "sentences")


class CalibrationError(BitallocError, ValueError):
    """Calibration data cannot be built as asked; the message says why."""


@dataclass(frozen=True)
class CalibrationSpec:
    """What calibration data to use (recorded in the profile for provenance).

    * ``generated`` (default): ``n_samples`` sequences of ``seq_len`` tokens sampled from
      the model itself (``seed``, ``temperature``, ``top_k``).
    * ``file``: ``n_samples`` windows of ``seq_len`` tokens from the text file ``path``.
    * ``sentences`` (encoders): one sentence per line of ``path`` (or a small built-in
      set if no path), the first ``n_samples``, truncated to ``seq_len`` tokens.
    """

    source: str = "generated"
    path: str | None = None
    n_samples: int = 8
    seq_len: int = 256
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 50

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise CalibrationError(f"calibration source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "file" and not self.path:
            raise CalibrationError("calibration source 'file' needs a path")
        if not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise CalibrationError(f"calibration n_samples must be a positive integer, got {self.n_samples!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise CalibrationError(f"calibration seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not self.temperature > 0:
            raise CalibrationError(f"calibration temperature must be > 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise CalibrationError(f"calibration top_k must be an integer >= 0 (0: no top-k), got {self.top_k!r}")

    def describe(self) -> dict:
        """A JSON-able description (a file's size and SHA-256 are added when it exists)."""
        d = asdict(self)
        if self.source != "generated":
            d.pop("temperature")
            d.pop("top_k")
        if self.path:
            p = Path(self.path)
            d["path"] = str(p.resolve()) if p.exists() else self.path
            if p.is_file():
                d["file_bytes"] = p.stat().st_size
                d["file_sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
        return d


def tokens_sha256(data: torch.Tensor | dict) -> str:
    """SHA-256 of calibration token ids (int64), for provenance."""
    ids = data["input_ids"] if isinstance(data, dict) else data
    return hashlib.sha256(ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------
# text corpora


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def calibration_from_text(tokenizer: Any, text: str, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` non-overlapping windows of ``seq_len`` tokens from ``text``.

    The text is tokenized once (no special tokens). With ``T`` tokens there are
    ``T - n_samples*seq_len`` spare tokens; the windows are placed at seeded random offsets
    (``torch.Generator`` seeded with ``seed``: sorted random gaps), so they never overlap,
    and are returned in text order. Too short a text raises :class:`CalibrationError`
    stating how many tokens it has and needs.
    """
    CalibrationSpec("generated", None, n_samples, seq_len, seed)  # validates the numbers
    if not isinstance(text, str) or not text.strip():
        raise CalibrationError("calibration text is empty")
    ids = _encode(tokenizer, text)
    need = n_samples * seq_len
    if len(ids) < need:
        raise CalibrationError(
            f"calibration text has {len(ids)} tokens, needs at least {need} "
            f"({n_samples} samples x {seq_len} tokens); use a longer text or fewer/shorter samples"
        )
    tokens = torch.tensor(ids, dtype=torch.long)
    spare = len(ids) - need
    g = torch.Generator().manual_seed(int(seed))
    shifts = torch.randint(0, spare + 1, (n_samples,), generator=g).sort().values  # non-decreasing
    starts = torch.arange(n_samples) * seq_len + shifts
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def calibration_from_file(tokenizer: Any, path: str | Path, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """:func:`calibration_from_text` on a UTF-8 text file (a missing file is a CalibrationError)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        return calibration_from_text(tokenizer, text, n_samples, seq_len, seed)
    except CalibrationError as e:
        raise CalibrationError(f"{p}: {e}") from None


# ---------------------------------------------------------------------------------------
# self-generated


def _start_token(model: Any, tokenizer: Any) -> int:
    for src in (tokenizer, getattr(model, "generation_config", None), getattr(model, "config", None)):
        for attr in ("bos_token_id", "eos_token_id"):
            v = getattr(src, attr, None) if src is not None else None
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if isinstance(v, int) and v >= 0:
                return v
    return 0


class _SampleRows:
    """A transformers logits processor that samples each block of rows with its own generator.

    ``generate(do_sample=False)`` with this processor (it runs after transformers' own
    processors, e.g. the EOS ban of ``min_new_tokens``) yields, row for row, the tokens
    ``generate(do_sample=True, temperature=, top_k=, top_p=1.0)`` samples under
    ``torch.manual_seed(seed)``: the same warpers in transformers' order (temperature, then
    top-k), a softmax, and one ``torch.multinomial`` per block and step from a generator
    seeded as the global one would be. Greedy decoding then picks the sample: its score is
    0 and every other one -inf. Blocks of different seeds share each forward and keep their
    own draws (a test checks both against ``generate(do_sample=True)``).
    """

    def __init__(self, blocks: Sequence[tuple[slice, torch.Generator, float, int]]) -> None:
        self.blocks = list(blocks)  # (rows, generator, temperature, top_k)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, float("-inf"))  # (B, V)
        for rows, gen, temperature, top_k in self.blocks:
            s = scores[rows]  # (b, V) float32 logits of the last position
            if temperature != 1.0:
                s = s / temperature
            if top_k:
                kth = torch.topk(s, min(top_k, s.shape[-1]))[0][..., -1, None]  # (b, 1)
                s = s.masked_fill(s < kth, float("-inf"))
            tok = torch.multinomial(torch.softmax(s, dim=-1), 1, generator=gen)  # (b, 1)
            out[rows] = out[rows].scatter(1, tok, 0.0)
        return out


def generate_calibration(
    model: Any,
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int = 50,
    batch_size: int = 8,
) -> torch.Tensor:
    """Sample ``n_samples`` sequences of exactly ``seq_len`` tokens from the model itself.

    Every row starts with the BOS token (EOS, or 0, if there is none) followed by
    ``seq_len - 1`` sampled tokens (``model.generate`` with KV cache, temperature and top-k
    sampling; EOS is suppressed via ``min_new_tokens`` so every row is full length). Rows are
    generated ``batch_size`` at a time from one generator seeded with ``seed`` (the caller's
    RNG state is untouched): the same arguments give the same tokens, the tokens
    ``generate(do_sample=True)`` gives under ``torch.manual_seed(seed)``.
    """
    spec = CalibrationSpec("generated", None, n_samples, seq_len, seed, temperature, top_k)
    return generate_many(model, tokenizer, [spec], batch_size=batch_size)[0]


@torch.no_grad()
def generate_many(model: Any, tokenizer: Any, specs: Sequence[CalibrationSpec], batch_size: int = 8) -> list[torch.Tensor]:
    """:func:`generate_calibration` for several generated specs at once, one tensor each.

    Batch ``c`` of every spec of the same ``seq_len`` shares each forward: decoding a few
    rows on a CPU reads every weight per token, so 16 rows cost little more than 8 (the
    default run samples its calibration and its evaluation text together, 255 forwards
    instead of 510). Each spec keeps its own generator, so its tokens are those it gets
    alone.
    """
    if not hasattr(model, "generate"):
        raise CalibrationError(f"{type(model).__name__} cannot generate text; use text or sentence calibration")
    for spec in specs:
        if spec.source != "generated":
            raise CalibrationError(f"generate_many takes generated specs, got source {spec.source!r}")
    device = next(model.parameters()).device
    start = _start_token(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = pad if isinstance(pad, int) else (eos if isinstance(eos, int) else start)
    gens = [torch.Generator(device=device).manual_seed(int(spec.seed)) for spec in specs]
    rows: list[list[torch.Tensor]] = [[] for _ in specs]
    for seq_len in dict.fromkeys(spec.seq_len for spec in specs):
        mine = [i for i, spec in enumerate(specs) if spec.seq_len == seq_len]
        for c in range(0, max(specs[i].n_samples for i in mine), batch_size):
            blocks, at = [], 0
            for i in mine:
                b = min(batch_size, specs[i].n_samples - c)
                if b > 0:
                    blocks.append((i, slice(at, at + b)))
                    at += b
            out = _sample(model, device, start, pad, at, seq_len,
                          [(sl, gens[i], float(specs[i].temperature), int(specs[i].top_k)) for i, sl in blocks])
            for i, sl in blocks:
                rows[i].append(out[sl].cpu())
    return [torch.cat(r, 0) for r in rows]


def _sample(model: Any, device: Any, start: int, pad: int, n_rows: int, seq_len: int, blocks: list) -> torch.Tensor:
    """(n_rows, seq_len) tokens: ``start`` and ``seq_len - 1`` sampled ones per row."""
    new = seq_len - 1
    prompt = torch.full((n_rows, 1), start, dtype=torch.long, device=device)
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,  # _SampleRows samples; greedy decoding takes its pick
        logits_processor=[_SampleRows(blocks)],
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=pad,
    )
    if out.shape[1] != seq_len:  # cannot happen with min_new_tokens; guard anyway
        raise CalibrationError(f"generation returned {out.shape[1]} tokens per row, expected {seq_len}")
    return out


def prefetch_generated(model: Any, tokenizer: Any, specs: Sequence[CalibrationSpec]) -> None:
    """Generate the generated ``specs`` not yet kept for ``model`` together (:func:`generate_many`)
    and keep them, so :func:`load_calibration` returns them without sampling again."""
    memo = _memo(model)
    todo = list({_key(s): s for s in specs if s.source == "generated" and _key(s) not in memo}.values())
    if todo:
        for spec, ids in zip(todo, generate_many(model, tokenizer, todo)):
            memo[_key(spec)] = ids


# ---------------------------------------------------------------------------------------
# encoders

DEFAULT_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The committee approved the new budget after a long debate.",
    "How do I reset my password if I forgot my email address?",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The stock market fell sharply on Monday amid fears of a recession.",
    "She baked a chocolate cake for her grandmother's birthday.",
    "Quantum computers use qubits that can exist in superposition.",
    "The train to Berlin was delayed by forty minutes because of snow.",
    "Regular exercise improves both physical and mental health.",
    "The museum's new exhibit features paintings from the Renaissance.",
    "Please submit your report before the end of the week.",
    "Two children are building a sandcastle on the beach.",
    "The software update fixed a bug that caused the app to crash.",
    "Volcanic eruptions can affect the global climate for years.",
    "He ordered a coffee and sat by the window to read the newspaper.",
)


def calibration_from_sentences(tokenizer: Any, sentences: Sequence[str], max_len: int = 128) -> dict[str, torch.Tensor]:
    """Tokenize sentences (padded, truncated to ``max_len``): ``{input_ids, attention_mask}``."""
    sentences = [s for s in sentences if isinstance(s, str) and s.strip()]
    if not sentences:
        raise CalibrationError("no calibration sentences (all empty)")
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=int(max_len), return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ---------------------------------------------------------------------------------------
# from a spec, and batching


def load_calibration(spec: CalibrationSpec, model: Any, tokenizer: Any, kind: str = "causal-lm") -> torch.Tensor | dict:
    """Build the calibration data a :class:`CalibrationSpec` describes for this model."""
    if spec.source == "sentences" or kind == "encoder":
        if spec.path:
            p = Path(spec.path).expanduser()
            if not p.is_file():
                raise CalibrationError(f"calibration file {spec.path!r} does not exist")
            sentences = [s for s in p.read_text(encoding="utf-8", errors="replace").splitlines() if s.strip()]
        else:
            sentences = list(DEFAULT_SENTENCES)
        return calibration_from_sentences(tokenizer, sentences[: spec.n_samples], spec.seq_len)
    if spec.source == "file":
        return calibration_from_file(tokenizer, spec.path, spec.n_samples, spec.seq_len, spec.seed)
    # generated text is kept per model (weakly), so a run that profiles and then selects among
    # plans on the same calibration rows samples them once
    memo = _memo(model)
    if _key(spec) not in memo:
        memo[_key(spec)] = generate_calibration(model, tokenizer, spec.n_samples, spec.seq_len, spec.seed,
                                                spec.temperature, spec.top_k)
    return memo[_key(spec)].clone()


_GENERATED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _key(spec: CalibrationSpec) -> tuple:
    return spec.n_samples, spec.seq_len, spec.seed, spec.temperature, spec.top_k


def _memo(model: Any) -> dict:
    """The generated sets kept for ``model`` (a throwaway dict when it cannot be weakly referenced)."""
    try:
        return _GENERATED.setdefault(model, {})
    except TypeError:
        return {}


def _as_dict(item: Any) -> dict[str, torch.Tensor]:
    if isinstance(item, torch.Tensor):
        ids = item if item.dim() == 2 else item.reshape(1, -1)
        return {"input_ids": ids}
    if isinstance(item, dict) or hasattr(item, "keys"):
        d = {k: item[k] for k in item.keys() if k in ("input_ids", "attention_mask", "token_type_ids", "logits_to_keep")}
        if "input_ids" not in d:
            raise CalibrationError("a calibration batch dict needs 'input_ids'")
        return d
    raise CalibrationError(f"calibration batches must be tensors or dicts, got {type(item).__name__}")


def first_rows(data: torch.Tensor | dict, n: int | None) -> torch.Tensor | dict:
    """The first ``n`` rows of calibration data (an id tensor or a dict of them); all when None:
    the rows the per-layer KL is measured on (``kl_samples``)."""
    if n is None:
        return data
    return {k: v[:n] for k, v in data.items()} if isinstance(data, dict) else data[:n]


def as_batches(data: torch.Tensor | dict | Iterable, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Mini-batches (dicts with ``input_ids`` and maybe ``attention_mask``) of calibration data.

    ``data`` is a (n, seq) id tensor or an ``{input_ids, attention_mask}`` dict (split into
    mini-batches of ``batch_size`` rows), or an iterable of such batches (used as given).
    """
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(data, torch.Tensor) or isinstance(data, dict) or hasattr(data, "keys"):
        full = _as_dict(data)
        n = full["input_ids"].shape[0]
        return [{k: v[i : i + batch_size] for k, v in full.items()} for i in range(0, n, batch_size)]
    batches = [_as_dict(b) for b in data]
    if not batches:
        raise CalibrationError("no calibration batches")
    return batches
