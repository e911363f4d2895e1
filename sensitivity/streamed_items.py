"""The streamed profile's items, in process or on Ray workers (``max_memory``, issue 17).

A :class:`StreamedContext` is the :class:`~sensitivity.worker.WorkerContext` of a model read
one unit at a time (:class:`~sensitivity.streaming.StreamedModel`): with ``max_memory`` set
in the :class:`~sensitivity.worker.WorkerSetup`, each worker holds what its item needs under
that limit, never the whole model. It evaluates three kinds of item:

* ``(unit name, UNIT_ITEM)``: the Hessians of the unit's layers over every calibration row,
  then their proxy rows and saliency vectors, and the Hessians freed. The value is a
  :class:`UnitRows` (proxy cells on the checkpoint line, the vectors in a safetensors
  file). The calibration batches walk the blocks in a resumable
  :class:`~sensitivity.stream_pass.BlockWalk`, so a worker handed units in forward order
  runs each block once, and the Hessians are the single-process ones bit for bit (each
  sees every batch, in order; no reduction across workers).
* ``FISHER_KEY`` (:mod:`~sensitivity.fisher_item`): the output-Fisher pass, forward then
  backward a block at a time (:mod:`~sensitivity.stream_fisher`).
* ``(layer fqn, scheme)``: a measurement (a reference, or a cell of the measured table), the
  measured layer's unit held while the forward reads the others as it runs.

:func:`context_for` gives the runner (in process and on Ray actors) the right context for a setup.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RunnerError
from .worker import WorkerContext, WorkerSetup, worker_info

__all__ = ["UNIT_ITEM", "UNIT_CHECKPOINT_SCHEMA", "UnitRows", "StreamedContext", "context_for", "read_unit_file",
           "split_cells", "unit_header", "plan_memory", "process_rss", "peak_of", "forward_bytes", "scored_positions"]

UNIT_ITEM = "@unit"  # (unit name, UNIT_ITEM): the unit's proxy rows and saliency vectors
UNIT_CHECKPOINT_SCHEMA = "bitalloc.unit-checkpoint/1"
_CELL = "\t"  # a proxy cell's key on the checkpoint line: "<fqn>\t<scheme>"


def context_for(setup: WorkerSetup, *, shared: Any = None, loaded: Any = None, sm: Any = None) -> Any:
    """The context that evaluates ``setup``'s items: streamed when it has ``max_memory``.
    ``loaded`` / ``sm``: a whole or streamed model this process already opened and checked for
    ``setup`` (a kept Ray worker's)."""
    if setup.max_memory is not None:
        return StreamedContext(setup, sm=sm)
    return WorkerContext(setup, shared=shared, loaded=loaded)


@dataclass
class UnitRows:
    """One unit's proxy cells (``{"<fqn>\\t<scheme>": value}``, finite cells only) and its
    layers' saliency vectors (``"sal.<fqn>"``: the split-channel saliency; ``"hsal.<fqn>"``:
    diag(H)·‖W_j‖², what a measurement of a split scheme uses under Hessian saliency)."""

    cells: dict[str, float]
    vectors: dict[str, Any]

    @property
    def values(self) -> dict[str, float]:
        return self.cells

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        from .artifact import atomic_path

        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.vectors.items()}, str(tmp),
                      metadata={"format": "bitalloc.unit-rows/1"})


def read_unit_file(path: str | os.PathLike) -> dict[str, Any]:
    """A :class:`UnitRows` file's vectors."""
    from safetensors.torch import load_file

    return load_file(str(path))


def unit_header(setup: WorkerSetup) -> dict:
    """The unit checkpoint's header: what a unit's proxy rows and vectors depend on."""
    from .checkpoint import checkpoint_header, make_header

    base = checkpoint_header(setup, setup.schemes, quantizer=setup.quantizer)["config"]
    config = {**base, "hessian_dtype": setup.hessian_dtype, "act_formats": list(setup.act_formats),
              "saliency": setup.saliency, "table": "proxy rows and saliency vectors per streamed unit"}
    return make_header(UNIT_CHECKPOINT_SCHEMA, setup, config)


def split_cells(cells: dict[str, float]) -> dict[tuple[str, str], float]:
    """``{"<fqn>\\t<scheme>": v}`` -> ``{(fqn, scheme): v}``."""
    return {tuple(k.split(_CELL, 1)): v for k, v in cells.items()}  # type: ignore[misc]


def process_rss() -> int:
    """This process's resident memory now (bytes; 0 where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@contextlib.contextmanager
def peak_of(out: dict, key: str):
    """``out[key]``: this process's peak resident memory so far (bytes, Linux's ``VmHWM``) when
    the block ends; nothing where /proc is missing. Successive steps' values show which step
    raised the peak, against :func:`plan_memory`'s estimate. (Not reset per step: resetting it
    through ``/proc/self/clear_refs`` would also hide the earlier peak from ``getrusage`` and
    ``/usr/bin/time``.)"""
    yield
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        out[key] = int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        pass


def plan_memory(sm, layers, setup: WorkerSetup, n_tokens: int, n_scored: int) -> dict:
    """The estimated peak of each phase from what the process holds already (the interpreter,
    torch, transformers); a limit below either is refused before any work
    (:class:`~sensitivity.profile.ProfileError` naming the phase and the unit).

    * Hessians and proxy, per unit: its weights, three temporaries the size of its largest
      weight (quantized copy, error, product), its Hessians (one per distinct input,
      :func:`~.fisher_refs.input_role`: q/k/v share one, gate/up one) with two more of the
      widest while a batch is folded in, and the stored activations (two blocks' outputs,
      in memory up to a quarter of the limit, spilled past it), and one batch's forward
      through a block (:func:`forward_bytes`).
    * References: the measured layer's block held (weights, the quantized weight and its
      backup) while the forward reads the largest other unit (its float32 weights and the
      16-bit buffer they are converted from), plus the reference log-probs, one batch's
      forward through a block and its head (the scored positions' logits, four buffers).
    * The Fisher pass, when ``setup.fisher_schemes`` asks for it (:func:`_fisher_need`).

    Also returns ``keep_bytes`` (activations kept in memory) and ``unit_cache_bytes``: half of
    what the limit leaves beside the estimate (which runs low) keeps units between forwards.
    """
    import torch

    from .fisher_refs import input_role
    from .logits import logits_memory
    from .profile import ProfileError

    limit = int(setup.max_memory)
    vocab = int(sm.model.config.vocab_size)
    ref_bytes = n_scored * vocab * 4  # the KL reference's float32 log-probs
    if ref_bytes > logits_memory() // 2:  # else the reference would keep the head's weights, dropped by then
        raise ProfileError(f"max_memory: the KL reference's log-probs ({n_scored} positions x {vocab}) must fit half "
                           f"the logits memory ({logits_memory()} bytes); lower kl_samples or raise the logits memory")
    keep = limit // 4
    activations = min(keep, 2 * n_tokens * int(sm.model.config.hidden_size) * 4)
    forward = forward_bytes(sm.model.config, setup.batch_size, _row_len(setup))  # one batch through a block
    # a reference measurement's batch (of the KL rows): its forward through a block, and its
    # head: the scored positions' logits, float32 copy, log-softmax and KL terms (four buffers;
    # chunked by the logits bound where that is smaller)
    from .logits import chunk_rows

    kl_rows = min(setup.batch_size, setup.kl_samples or len(setup.tokens or [0]))
    kl_forward = forward_bytes(sm.model.config, kl_rows, _row_len(setup))
    scored_batch = kl_rows * len(range(max(setup.kl_stride - 1, 0), _row_len(setup), setup.kl_stride))
    head_bytes = 4 * min(scored_batch, chunk_rows(vocab, 4)) * vocab * 4
    hessian_bytes = getattr(torch, setup.hessian_dtype).itemsize * (1 + 2 * len(setup.act_formats))
    from .stream_pass import layers_by_unit

    by_unit = layers_by_unit(sm, layers)
    base = process_rss()
    # a unit dropped just before the next is read is not always handed back to the system by
    # then (the allocator's slack): one more block's bytes where a forward reads unit after unit
    slack = max((sm.unit_bytes[v] for v in sm.block_units), default=0)
    need = {}
    for u, w in enumerate(sm.unit_bytes):
        mine = by_unit.get(u, [])
        ins = {(input_role(layer.fqn), layer.in_features) for layer in mine}
        largest = max((layer.out_features * layer.in_features * 4 for layer in mine), default=0)
        widest = max((n for _, n in ins), default=0)
        need[("hessians and proxy", u)] = (base + w + 3 * largest + sum(n * n * hessian_bytes for _, n in ins)
                                           + 2 * widest * widest * hessian_bytes + activations + forward)
        if mine:
            other = max((b for v, b in enumerate(sm.unit_bytes) if v != u), default=0)
            # the other unit as it is read: its float32 weights beside the stored 16-bit buffer
            need[("references", u)] = (base + w + 2 * largest + other + other // 2 + slack + ref_bytes + activations
                                       + kl_forward + head_bytes)
    if setup.fisher_schemes:
        need.update(_fisher_need(sm, layers, by_unit, setup, base, keep, slack))
    (phase, u), peak = max(need.items(), key=lambda kv: kv[1])
    if peak > limit:
        raise ProfileError(f"max_memory {limit} bytes is less than the {phase} of unit {sm.units[u][0]!r} need "
                           f"(about {peak} bytes with the {base} this process holds already)")
    return {"largest_phase": phase, "largest_unit": sm.units[u][0], "estimated_peak_bytes": int(peak),
            "process_bytes_at_start": base, "keep_bytes": int(keep),
            "unit_cache_bytes": max(0, (limit - int(peak)) // 2)}


def _row_len(setup: WorkerSetup) -> int:
    """Tokens per calibration row (1 before the driver's tokens are known)."""
    return len(setup.tokens[0]) if setup.tokens else 1


def forward_bytes(config: Any, rows: int, row_len: int, *, graph: bool = False) -> int:
    """What one block's forward over ``rows`` rows of ``row_len`` tokens holds at its peak,
    float32: about ten hidden-wide tensors per token (residual, norms, q/k/v/o) and four
    intermediate-wide ones (gate, up, their product, the activation), plus the attention
    scores and their softmax (two ``heads × row_len`` per token) where the attention is not
    fused (``eager``; SDPA's fused kernels do not materialise them). ``graph``: a forward with
    gradients keeps about as much again for the backward."""
    d = int(config.hidden_size)
    inter = int(getattr(config, "intermediate_size", 4 * d))
    heads = int(getattr(config, "num_attention_heads", 1))
    fused = getattr(config, "_attn_implementation", "eager") != "eager"
    per_token = 10 * d + 4 * inter + (0 if fused else 2 * heads * row_len)
    return int(rows * row_len * per_token * 4 * (2 if graph else 1))


def _fisher_need(sm, layers, by_unit, setup: WorkerSetup, base: int, keep: int, slack: int) -> dict:
    """The streamed Fisher pass's estimated peak (:mod:`~.stream_fisher`) per unit: the unit
    held with the stored block outputs (kept in memory up to ``keep``), the gradients at a
    block boundary (two sets per label kind), one batch's graph through a block, the unit's
    scored inputs and squared output gradients, three temporaries of its largest weight, the
    16-bit buffer a unit is read through and one block of allocator slack; at the head, the
    units outside the blocks held with one batch's logits ``2 + K`` times over (logits,
    softmax, a log-softmax per label kind), in chunks where the logits-memory bound
    chunks the head."""
    from .fisher_refs import fisher_rows, input_role, label_kinds
    from .logits import chunk_rows

    cfg = sm.model.config
    ids_shape = (len(setup.tokens), len(setup.tokens[0])) if setup.tokens else (1, 1)
    rows, T = fisher_rows(layers, ids_shape, setup.kl_stride, setup.fisher_labels), ids_shape[1]
    K = len(label_kinds(setup.fisher_labels))
    d, vocab = int(cfg.hidden_size), int(cfg.vocab_size)
    B = max(1, 512 // max(1, T))  # rows a batch (the pass's batch_tokens)
    tokens = rows * T
    stored = min(keep, len(sm.blocks) * tokens * d * 4)
    grads = 2 * K * tokens * d * 4
    graph = forward_bytes(cfg, B, T, graph=True)
    scored = rows * len(range(0, T - 1, setup.kl_stride))
    step = chunk_rows(vocab, 4)
    logits = (2 + K) * min(B * T, step) * vocab * 4  # logits, softmax, a log-softmax per kind (the gradient reuses one)
    need = {}
    for u, mine in by_unit.items():
        ins = {(input_role(x.fqn), x.in_features) for x in mine}
        xg = scored * (sum(n for _, n in ins) + K * sum(x.out_features for x in mine)) * 4
        largest = max(x.out_features * x.in_features * 4 for x in mine)
        need[("Fisher pass", u)] = (base + sm.unit_bytes[u] * 3 // 2 + stored + grads + graph + xg + 3 * largest
                                    + slack)
    # the head step, profiled or not: the units outside the blocks held (final norm, head; a
    # tied head is the embedding's weight) with one batch's logits, and the head's own rows
    embed = sm.model.get_input_embeddings()
    held = sum(b for v, ((_, m), b) in enumerate(zip(sm.units, sm.unit_bytes))
               if v not in sm.block_units and m is not embed)
    head_u = next((v for v, (_, m) in enumerate(sm.units) if m is sm.model.get_output_embeddings()), None)
    if head_u is not None:
        held = max(held, sm.unit_bytes[head_u])
        rows_head = scored * (d + K * vocab) * 4 if head_u in by_unit else 0
        need[("Fisher pass", head_u)] = max(need.get(("Fisher pass", head_u), 0),
                                            base + held * 3 // 2 + stored + grads + logits + rows_head)
    return need


def scored_positions(ids: Any, kl_samples: int | None, kl_stride: int) -> int:
    rows = ids.shape[0] if kl_samples is None else min(ids.shape[0], kl_samples)
    return rows * math.ceil(ids.shape[1] / kl_stride)


class StreamedContext:
    """The items of a streamed profile (module docstring), built from a :class:`WorkerSetup`
    with ``max_memory`` (what a Ray actor does), or in process from the driver's own
    :class:`~sensitivity.streaming.StreamedModel` and calibration data (``sm``, ``data``)."""

    def __init__(self, setup: WorkerSetup, *, sm: Any = None, data: Any = None) -> None:
        import torch

        from .streaming import StreamedModel

        t0 = time.perf_counter()
        if setup.max_memory is None:
            raise RunnerError("a streamed context needs setup.max_memory")
        self.setup = setup
        self.own = sm is None
        if sm is None:
            sm = StreamedModel(setup.model, round16=setup.weights == "16bit")
        self.sm = sm
        try:
            self._prepare(data)
        except BaseException:
            if self.own:  # nothing of this worker's model is left behind
                sm.close()
            raise
        self._walk = None
        self._reference = None
        self._saliency = ({f: torch.tensor(v, dtype=torch.float64) for f, v in setup.saliency_values.items()}
                          if setup.saliency_values is not None else {})
        self.walk_info: dict = {}
        self.setup_s = time.perf_counter() - t0
        self.n_items = 0

    def _prepare(self, data: Any) -> None:
        """Check the weights and tokens against the driver's, select the layers, check the memory."""
        from .layers import find_layers
        from .stream_pass import layers_by_unit

        setup, sm = self.setup, self.sm
        if self.own and setup.fingerprint_sha256 is not None:
            setup.check_fingerprint(sm.fingerprint()["sha256"])
        self.layers, _ = find_layers(sm.model, setup.include, setup.exclude, quantize_tied=setup.quantize_tied)
        self.by_fqn = {layer.fqn: layer for layer in self.layers}
        self.by_unit = layers_by_unit(sm, self.layers)
        self.unit_index = {name: u for u, (name, _) in enumerate(sm.units)}
        if data is None:
            data = setup.token_data()
            if data is None:
                raise RunnerError("a streamed worker needs the driver's calibration tokens (setup.tokens)")
            setup.check_tokens(data)
        self.data = data
        ids = data["input_ids"] if isinstance(data, dict) else data
        self.memory = plan_memory(sm, self.layers, setup, int(ids.numel()),
                                  scored_positions(ids, setup.kl_samples, setup.kl_stride))
        sm.cache_bytes = self.memory["unit_cache_bytes"]

    # -- unit items: Hessians, proxy rows, saliency ---------------------------------------

    def _unit_rows(self, name: str) -> UnitRows:
        import torch

        from .calibration import as_batches
        from .proxy import as_scheme, hessian_saliency, module_at, proxy_table
        from .saliency import layer_saliencies
        from .stream_pass import BlockWalk, free_accumulators

        setup, sm = self.setup, self.sm
        if name not in self.unit_index:
            raise RunnerError(f"unit {name!r} is not among the streamed model's units")
        u = self.unit_index[name]
        ulayers = self.by_unit.get(u)
        if not ulayers:
            raise RunnerError(f"unit {name!r} holds none of the selected layers")
        if self._walk is None:
            self._walk = BlockWalk(sm, as_batches(self.data, setup.batch_size), keep_bytes=self.memory["keep_bytes"])
        schemes = [as_scheme(s) for s in setup.schemes]
        net = sm.model
        cells: dict[str, float] = {}
        vectors: dict[str, torch.Tensor] = {}
        with sm.hold(u):
            accs = self._walk.statistics(u, ulayers, dtype=getattr(torch, setup.hessian_dtype),
                                         act_formats=setup.act_formats)
            try:
                sal = layer_saliencies(net, ulayers, setup.saliency, hessians=accs)
                table = proxy_table(net, ulayers, accs, schemes, False, act_stats=accs if setup.act_formats else None,
                                    quantizer=setup.quantizer, saliency=sal)
                for i, layer in enumerate(ulayers):
                    cells.update({f"{layer.fqn}{_CELL}{s.name}": float(v)
                                  for s, v in zip(schemes, table[i]) if math.isfinite(v)})
                    w = module_at(net, layer.fqn).weight.detach().to(torch.float32)
                    vectors[f"hsal.{layer.fqn}"] = hessian_saliency(w, accs[layer.fqn].H).cpu()
                    vectors[f"sal.{layer.fqn}"] = sal[layer.fqn].cpu()
            finally:
                free_accumulators(accs)
        self.walk_info = {"blocks_run": self._walk.blocks_run, **self._walk.info()}
        return UnitRows(cells, vectors)

    # -- reference measurements -----------------------------------------------------------

    @property
    def reference(self) -> Any:
        """The 16-bit reference pass over the KL rows, computed on first use (after the walk's
        activations are dropped: the two are never held together)."""
        if self._reference is None:
            from .calibration import as_batches, first_rows
            from .metrics import strided_batches
            from .proxy import compute_reference

            self.close_walk()
            s = self.setup
            batches = strided_batches(self.sm.model, as_batches(first_rows(self.data, s.kl_samples), s.batch_size),
                                      s.kl_stride)
            self._reference = compute_reference(self.sm.model, self.layers, batches, None, False,
                                                batch_size=s.batch_size)
        return self._reference

    @property
    def replay(self) -> bool | None:
        """Whether the reference pass replays block prefixes (None before it is computed)."""
        return bool(self._reference.replay) if self._reference is not None else None

    def use(self, setup: WorkerSetup, saliency: dict[str, Any]) -> None:
        """The next step's setup and split-channel saliency (fqn -> vector), in process: what a
        kept Ray worker's re-configuration gives it from the setup's ``saliency_values``."""
        self.setup, self._saliency = setup, dict(saliency)

    def _measure(self, fqn: str, scheme: str) -> dict[str, float]:
        from .proxy import as_scheme, measure_item

        if fqn not in self.by_fqn:
            raise RunnerError(f"layer {fqn!r} is not among the worker's selected layers")
        s = as_scheme(scheme)
        reference = self.reference
        with self.sm.hold(self.sm.unit_of(fqn)):
            v = measure_item(self.sm.model, self.by_fqn[fqn], s, reference, None, quantizer=self.setup.quantizer,
                             saliency=self._saliency.get(fqn))
        return v if isinstance(v, dict) else {self.setup.metric: float(v)}

    # -- the output-Fisher pass -------------------------------------------------------------

    def _fisher(self) -> dict[str, float]:
        """The Fisher item's cells (:func:`~.fisher_item.encode_tables`) for every layer and
        ``setup.fisher_schemes`` (:func:`~.stream_fisher.streamed_fisher_tables`, the saliency
        the driver set), after the walk's activations are dropped."""
        from .fisher_item import encode_tables
        from .stream_fisher import streamed_fisher_tables

        self.close_walk()
        s = self.setup
        if not s.fisher_schemes:
            raise RunnerError("the Fisher item needs setup.fisher_schemes")
        tables, info = streamed_fisher_tables(self.sm, self.layers, self.data, s.fisher_schemes, saliency=self._saliency,
                                              quantizer=s.quantizer, stride=s.kl_stride, labels=s.fisher_labels,
                                              seed=s.fisher_seed, keep_bytes=self.memory["keep_bytes"])
        return encode_tables(self.layers, s.fisher_schemes, s.fisher_labels, tables, info)

    # -- the runner's interface -------------------------------------------------------------

    def evaluate(self, fqn: str, scheme: str) -> Any:
        from .fisher_item import FISHER_ITEM

        if scheme == FISHER_ITEM:
            out = self._fisher()
        elif scheme == UNIT_ITEM:
            out = self._unit_rows(fqn)
        else:
            out = self._measure(fqn, scheme)
        self.n_items += 1
        return out

    def warmup(self) -> None:
        """Nothing to warm: a streamed worker's first item reads what it needs."""

    def close_walk(self) -> None:
        if self._walk is not None:
            self._walk.close()
            self._walk = None

    def free_reference(self) -> None:
        if self._reference is not None:
            self._reference.free()
            self._reference = None

    def info(self) -> dict:
        return {**worker_info(self.n_items, self.setup_s, self.replay),
                "streaming": {"max_memory": int(self.setup.max_memory), **self.memory, **self.walk_info}}

    def close(self) -> None:
        self.close_walk()
        self.free_reference()
        if self.own:
            self.sm.close()
