"""What every peer allocator's scoring pass works on (issue 14).

The peers (HAWQ-V3, HIGGS, ModelOpt, AutoRound, exllamav2/3, EvoPress) score layers in
their own ways, but in a fair head-to-head they score *bitalloc's* candidates: the
profile's layers (rows) and schemes (columns), quantized by bitalloc's quantizer (RTN with
the clip search, or GPTQ on the profile's Hessians), on the same calibration tokens.
:class:`PeerContext` holds exactly that, and gives every peer the same three operations:

* :meth:`PeerContext.weight` / :meth:`PeerContext.quantized`: a layer's 16-bit weight and
  its fake-quantized weight at scheme ``j`` (``(out, in)`` float32, cached within a byte
  limit, so a search that revisits a (layer, scheme) does not quantize it again);
* :meth:`PeerContext.swapped`: put quantized weights into the model for the duration of a
  ``with`` block (any number of layers at once) and restore them bit for bit afterwards;
* :meth:`PeerContext.kl`: end-to-end KL (nats/token) of the model as it is now against a
  :class:`~bitalloc.sensitivity.proxy.Reference` of the 16-bit model.

Forward passes are counted (``ctx.forwards``), so a benchmark can report how many
end-to-end evaluations each search spent.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .hessian import hessian_tensor
from .layers import LayerInfo, get_weight
from .proxy import Reference, compute_reference, module_at, quantize_layer_weight, score_batches

__all__ = ["PeerContext", "PeerScores", "WeightCache", "SUB_BLOCKS", "sub_blocks"]

# exllamav2's / ModelOpt's units: a transformer block's attention and MLP sub-blocks.
SUB_BLOCKS = {"attn": ("self_attn.", "attn.", "attention."), "mlp": ("mlp.", "feed_forward.")}


@dataclass(frozen=True)
class PeerScores:
    """A peer's score table over bitalloc's candidates (lower is better).

    ``table[g, j]`` scores giving row ``g`` scheme ``j``. Rows are layers (``groups`` None)
    or groups of layers that take one scheme together (``groups[g]`` = the layer indices),
    as peers that allocate per sub-block or per fused projection do. ``info`` records the
    method's settings, the forward/backward passes spent and the seconds taken.
    """

    method: str
    table: np.ndarray  # (G, S) float64
    groups: tuple[tuple[int, ...], ...] | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = np.asarray(self.table, dtype=np.float64)
        assert t.ndim == 2, f"{self.method}: score table must be 2-D (rows, schemes), got shape {t.shape}"
        if self.groups is not None:
            assert len(self.groups) == t.shape[0], f"{self.method}: {len(self.groups)} groups for {t.shape[0]} rows"
            flat = sorted(i for g in self.groups for i in g)
            assert flat == list(range(len(flat))), f"{self.method}: groups must partition the layers 0..L-1"
        object.__setattr__(self, "table", t)


def _digest(saliency: Mapping[str, Any] | None) -> str | None:
    """A content digest of a saliency map (contexts share a WeightCache only on the same channels)."""
    if not saliency:
        return None
    h = hashlib.sha1()
    for fqn in sorted(saliency):
        h.update(fqn.encode())
        h.update(np.ascontiguousarray(np.asarray(saliency[fqn], dtype=np.float64)).tobytes())
    return h.hexdigest()


def sub_blocks(layers: Sequence[LayerInfo]) -> tuple[tuple[int, ...], ...]:
    """Layer indices grouped by (block, sub-block): attention and MLP of each block; others alone."""
    keyed: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        rest = layer.fqn[len(layer.block) + 1:] if layer.block else layer.fqn
        kind = next((k for k, prefixes in SUB_BLOCKS.items() if rest.startswith(prefixes)), None)
        key = (layer.block, kind) if (layer.block and kind) else ("", layer.fqn)
        keyed.setdefault(key, []).append(i)
    return tuple(tuple(v) for v in sorted(keyed.values()))


class WeightCache:
    """Fake-quantized weights keyed ``(layer index, scheme index)``, the least recently used
    dropped past ``max_bytes``. A context makes its own; a benchmark that scores several peers
    on the same layers, schemes, quantizer and Hessians passes one to all their contexts, so no
    (layer, scheme) is quantized twice (GPTQ on SmolLM2: about 10 min per full table on a
    2-core CPU). The first context binds it to its signature; another signature is refused."""

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.signature: tuple | None = None
        self._items: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def bind(self, signature: tuple) -> None:
        if self.signature is None:
            self.signature = signature
        elif signature != self.signature:
            raise ValueError("this WeightCache holds weights of other layers, schemes, quantizer or Hessians")

    def get(self, key: tuple[int, int]) -> torch.Tensor | None:
        t = self._items.get(key)
        if t is not None:
            self._items.move_to_end(key)
        return t

    def put(self, key: tuple[int, int], t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes or key in self._items:
            return
        while self._items and self.nbytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()
        self._items[key] = t
        self.nbytes += size


@dataclass
class PeerContext:
    """The model, its planned layers and candidate schemes, calibration batches and quantizer."""

    model: torch.nn.Module
    layers: Sequence[LayerInfo]
    schemes: Sequence[str]
    batches: list[dict]  # calibration mini-batches, each {"input_ids": LongTensor (B, T)}
    hessians: Mapping[str, Any] | None = None  # layer fqn -> Hessian (needed by the gptq quantizer)
    quantizer: str = "rtn"
    seed: int = 0
    cache_bytes: int = 4 << 30  # quantized weights kept for reuse (LRU); a given cache's own bound instead
    forwards: int = 0  # end-to-end (or from-a-block) forward passes over one batch, counted by kl()
    weights: WeightCache | None = None  # shared by contexts over the same layers, schemes and quantizer
    # layer fqn -> (in,) input-channel saliency: the channels a split scheme keeps high, the
    # profile's (so a peer scores the very weights bitalloc's plan would run); None: Hessian rule
    saliency: Mapping[str, Any] | None = None
    _original: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        assert len(self.layers) > 0, "a PeerContext needs at least one layer"
        assert len(self.schemes) > 0, "a PeerContext needs at least one scheme"
        assert self.batches, "a PeerContext needs calibration batches"
        if self.quantizer == "gptq" and not self.hessians:
            raise ValueError("the gptq quantizer needs the layers' Hessians (PeerContext.hessians)")
        if self.weights is None:
            self.weights = WeightCache(self.cache_bytes)
        self.cache_bytes = self.weights.max_bytes
        self.weights.bind((tuple(layer.fqn for layer in self.layers), tuple(self.schemes), self.quantizer,
                           id(self.hessians) if self.hessians else None, _digest(self.saliency)))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_schemes(self) -> int:
        return len(self.schemes)

    @property
    def n_tokens(self) -> int:
        return sum(int(b["input_ids"].numel()) for b in self.batches)

    def module(self, i: int) -> torch.nn.Module:
        return module_at(self.model, self.layers[i].fqn)

    def weight(self, i: int) -> torch.Tensor:
        """Layer ``i``'s unquantized weight, ``(out, in)`` float32 (a copy taken on first use)."""
        if i not in self._original:
            layer = self.layers[i]
            self._original[i] = get_weight(self.module(i), layer.module_type).detach().to(torch.float32).clone()
        return self._original[i]

    def hessian(self, i: int) -> torch.Tensor | None:
        h = self.hessians.get(self.layers[i].fqn) if self.hessians else None
        return hessian_tensor(h) if h is not None else None

    def quantized(self, i: int, j: int) -> torch.Tensor:
        """Layer ``i`` fake-quantized at scheme ``j`` by the context's quantizer, ``(out, in)`` float32."""
        wq = self.weights.get((i, j))
        if wq is None:
            sal = self.saliency.get(self.layers[i].fqn) if self.saliency else None  # any array; converted there
            wq = quantize_layer_weight(self.weight(i), self.schemes[j], self.hessian(i), quantizer=self.quantizer,
                                       saliency=sal)
            wq = wq.to(torch.float32)
            self.weights.put((i, j), wq)
        return wq

    def _set(self, i: int, w: torch.Tensor) -> None:
        param = self.module(i).weight
        with torch.no_grad():
            param.copy_((w.t() if self.layers[i].module_type == "Conv1D" else w).to(param.dtype))

    @contextlib.contextmanager
    def swapped(self, assignment: Mapping[int, int | None] | Sequence[int | None]) -> Iterator[None]:
        """Layers ``i`` hold their scheme-``assignment[i]`` weights inside the block (None: unquantized).

        A sequence is one entry per layer; a mapping names only the layers to change. The
        16-bit weights come back bit for bit when the block ends, whatever happens in it.
        """
        items = assignment.items() if isinstance(assignment, Mapping) else enumerate(assignment)
        changed = []
        try:
            for i, j in items:
                if j is None:
                    continue
                self.weight(i)  # keep the original before the first change
                self._set(i, self.quantized(i, int(j)))
                changed.append(i)
            yield
        finally:
            for i in changed:
                self._set(i, self._original[i])

    def reference(self, batches: list[dict] | None = None, *, replay: bool = True, metric=None) -> Reference:
        """The 16-bit model's reference over ``batches`` (default: the context's) for ``metric``
        (default: KL to the 16-bit model)."""
        return compute_reference(self.model, self.layers, batches if batches is not None else self.batches,
                                 metric=metric, progress=False, replay=replay)

    @torch.no_grad()
    def kl(self, reference: Reference, first_block: int | None = None) -> float:
        """Mean per-token KL(16-bit ‖ model as it is now) over the reference's batches.

        ``first_block``: only blocks from this one on can differ from the 16-bit model, so
        the ones before are replayed from the reference's cache (single-layer items)."""
        self.forwards += len(reference.batches)
        return float(score_batches(self.model, reference, first_block))

    def fitness(self, stage_batches: Sequence[list[dict]], metric=None):
        """An end-to-end fitness for whole-plan searches (EvoPress, bitalloc's refinement).

        ``stage_batches[k]``: the calibration batches stage ``k`` scores on (EvoPress
        scores offspring on few tokens, survivors on more). Returns
        ``fitness(choices, stage) -> [KL per choice]``, each choice a per-layer scheme
        index array; the references are computed once per stage, on first use. ``metric``:
        another per-token metric than KL (e.g. ``NLLDeltaMetric``, the text's own loss)."""
        refs: dict[int, Reference] = {}

        def fitness(choices: Sequence[np.ndarray], stage: int = 0) -> list[float]:
            assert 0 <= stage < len(stage_batches), f"stage {stage} of {len(stage_batches)}"
            if stage not in refs:
                refs[stage] = self.reference(list(stage_batches[stage]), replay=False, metric=metric)
            out = []
            for c in choices:
                assert len(c) == self.n_layers, f"a choice has {len(c)} entries for {self.n_layers} layers"
                with self.swapped([int(j) for j in c]):
                    out.append(self.kl(refs[stage]))
            return out

        return fitness

