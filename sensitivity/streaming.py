"""Block streaming: profile a causal LM larger than the memory it is given (issue 17).

:class:`StreamedModel` builds the transformers model from its config (``config.json``, or a
GGUF file's metadata: :class:`GGUFTensors`) with every
parameter a *placeholder*: one element expanded to the parameter's shape (right shape and
dtype, a few bytes of memory). The weights stay in the directory's safetensors files. A
*unit* (one block, or a module outside the blocks that owns parameters: the token
embedding, the final norm, the LM head) is read into its parameters when it runs and
dropped when it is done, or held while a layer of it is measured in place
(:meth:`StreamedModel.hold`). Reads are plain file reads at the header's offsets, not a
memory map, so the page cache is never part of the process's resident memory.

:func:`streamed_statistics` runs the Hessian pass block-major: block ``b`` is read once,
every calibration batch goes through it from the stored outputs of block ``b-1`` (kept in
memory up to ``keep_bytes``, written to a scratch folder past that), and its layers'
accumulators go to a callback (the proxy rows) and are freed before block ``b+1``. The
peak is one block, its Hessians and the stored activations, never the whole model.

Results equal the in-memory pass bit for bit. Every block runs inside the model's own
forward, earlier blocks replayed from the stored outputs (as reference measurements replay
them), so masks, rotary tables and per-layer arguments are the model's own. Each layer's
accumulator sees the batches in the same order.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .. import BitallocError
from ._forward import forward, replay_blocks, tree_clone
from .hessian import HessianAccumulator, InputHooks
from .layers import LayerInfo
from .tensor_files import GGUFTensors, SafetensorsFiles, StreamingError, gguf_path_of

__all__ = ["StreamingError", "SafetensorsFiles", "StreamedModel", "streamed_statistics", "trim_heap"]


# ---------------------------------------------------------------------------------------
# a model whose parameters are read one unit at a time


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``; a no-op elsewhere):
    a dropped unit's smaller tensors otherwise stay in the process's resident memory."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _placeholder(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((), dtype=dtype).expand(*shape)


@contextlib.contextmanager
def _params_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init)."""
    register = torch.nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and not param.is_meta:  # a tied parameter is registered again as itself
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of blocks: the one holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise StreamingError(f"{type(model).__name__} has no list of blocks to stream")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


class StreamedModel:
    """A transformers causal LM whose weights stay in its safetensors files (module docstring).

    ``model``: the model, every parameter a placeholder until its unit runs or is held.
    ``round16``: weights rounded to float16 values as they are read (what
    :func:`bitalloc.load` does to a model loaded whole: the API's "16-bit model").
    ``units``: ``[(name, module)]`` in forward order, the blocks among them; ``unit_bytes`` of
    each at ``dtype``. Forward hooks read a unit before it runs and drop it after, unless held.
    """

    def __init__(self, directory: str | Path, dtype: torch.dtype = torch.float32, *, round16: bool = False) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        directory = Path(directory)
        gguf = gguf_path_of(directory)
        try:
            if gguf is not None:
                from .models import check_gguf_header

                check_gguf_header(gguf)
                config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            else:
                config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        except BitallocError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad model directory
            raise StreamingError(f"cannot read the model config in {str(directory)!r} ({type(e).__name__}: {e})") from None
        archs = list(getattr(config, "architectures", None) or [])
        if gguf is None and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            raise StreamingError(f"block streaming profiles causal LMs; {str(directory)!r} holds {archs or config.model_type}")
        self.files = SafetensorsFiles(directory) if gguf is None else None
        self.dtype = dtype
        self.round16 = round16  # every weight rounded to float16 values, as bitalloc.load's round_to_16bit
        with _params_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        self._placeholders(model)
        self.model = model
        if gguf is not None:
            self.files = GGUFTensors(gguf, model)
        self.blocks = _blocks(model)
        self.file_name: dict[int, str] = {}  # id(param) -> its tensor's name in the files
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        for pid, names in aliases.items():
            found = [n for n in names if n in self.files]
            if not found:
                raise StreamingError(f"the safetensors files hold no tensor for parameter {names[0]!r}")
            self.file_name[pid] = found[0]
        in_blocks = {id(m) for m in self.blocks.modules()}
        self.units: list[tuple[str, torch.nn.Module]] = []
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.ModuleList) and m is self.blocks:
                self.units += [(f"{name}.{i}", blk) for i, blk in enumerate(m)]
            elif id(m) not in in_blocks and any(True for _ in m.parameters(recurse=False)):
                self.units.append((name, m))
        self.block_units = [i for i, (_, m) in enumerate(self.units) if any(m is b for b in self.blocks)]
        self._params = [list(m.parameters()) for _, m in self.units]
        self.unit_bytes = [sum(p.numel() * p.element_size() for p in ps) for ps in self._params]
        self._users: dict[int, int] = {}  # id(param) -> resident units using it
        self.resident: set[int] = set()
        self._auto: set[int] = set()
        # units a forward read are kept, least recently used first out, while their bytes fit
        # cache_bytes (what the limit leaves beside the estimated peak): repeated forwards
        # (the reference measurements) then read fewer units again
        self.cache_bytes = 0
        self._lru: dict[int, None] = {}
        self._held: dict[int, int] = {}
        self._handles = []
        for u, (_, m) in enumerate(self.units):
            self._handles.append(m.register_forward_pre_hook(self._before(u)))
            self._handles.append(m.register_forward_hook(self._after(u)))

    @staticmethod
    def _placeholders(model: torch.nn.Module) -> None:
        made: dict[int, torch.nn.Parameter] = {}  # a tied meta parameter stays one placeholder
        for m in model.modules():
            for k, p in list(m._parameters.items()):
                if p is None:
                    continue
                if id(p) not in made:
                    made[id(p)] = torch.nn.Parameter(_placeholder(p.shape, p.dtype), requires_grad=False)
                m._parameters[k] = made[id(p)]

    # -- reading and dropping units ---------------------------------------------------

    def unit_of(self, fqn: str) -> int:
        """Index of the unit holding module ``fqn`` (the longest unit name that prefixes it)."""
        best = None
        for u, (name, _) in enumerate(self.units):
            if fqn == name or fqn.startswith(name + "."):
                if best is None or len(name) > len(self.units[best][0]):
                    best = u
        if best is None:
            raise StreamingError(f"layer {fqn!r} is in no streamed unit")
        return best

    def read(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """Parameter ``name``'s weights from the files at this model's dtype (for fingerprints)."""
        t = self.files.read(self.file_name[id(p)])
        if tuple(t.shape) != tuple(p.shape):
            raise StreamingError(f"tensor {self.file_name[id(p)]!r} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
        if not t.is_floating_point():
            return t
        rounded = t.dtype == torch.float16
        if t.dtype == torch.bfloat16 and self.round16:  # bf16 -> fp16 rounds as via float32 (exact there)
            t, rounded = t.to(torch.float16), True
        out = torch.empty(t.shape, dtype=self.dtype)
        out.copy_(t)  # one buffer at the model's dtype, the stored bytes freed after
        del t
        if self.round16 and not rounded and self.dtype != torch.float16:  # a slab at a time: bounded temporaries
            flat = out.view(-1)
            for i in range(0, flat.numel(), 1 << 22):
                piece = flat[i:i + (1 << 22)]
                piece.copy_(piece.to(torch.float16))
        return out

    def load(self, u: int) -> None:
        if u in self.resident:
            return
        for p in self._params[u]:
            if self._users.get(id(p), 0) == 0:
                with torch.no_grad():
                    p.data = self.read(self.file_name[id(p)], p)
            self._users[id(p)] = self._users.get(id(p), 0) + 1
        self.resident.add(u)
        trim_heap()  # the read buffers

    def release(self, u: int) -> None:
        if u not in self.resident:
            return
        for p in self._params[u]:
            self._users[id(p)] -= 1
            if self._users[id(p)] == 0:
                with torch.no_grad():
                    p.data = _placeholder(p.shape, p.dtype)
        self.resident.discard(u)
        self._auto.discard(u)
        self._lru.pop(u, None)
        trim_heap()

    def release_all(self) -> None:
        for u in list(self.resident):
            if not self._held.get(u):
                self.release(u)

    @contextlib.contextmanager
    def hold(self, u: int):
        """Keep unit ``u`` read in while inside (its weights may be changed in place and restored)."""
        self._held[u] = self._held.get(u, 0) + 1
        try:
            self.load(u)
            yield self.units[u][1]
        finally:
            self._held[u] -= 1
            if not self._held[u]:
                self.release(u)

    def _before(self, u: int):
        embed = self.model.get_input_embeddings()

        def hook(module, args):
            if u in self._lru:  # kept from an earlier forward: now the most recently used
                self._lru[u] = self._lru.pop(u)
            if u in self.resident or "forward" in module.__dict__:  # a replayed block returns its cached output
                return
            if module is embed and "forward" in self.blocks[0].__dict__:
                return  # block 0 is replayed: nothing reads the embedding (placeholder weights give zeros)
            self.load(u)
            self._auto.add(u)

        return hook

    def _after(self, u: int):
        def hook(module, args, output):
            if u not in self._auto or self._held.get(u):
                return
            if self.unit_bytes[u] > self.cache_bytes:
                self.release(u)
                return
            self._lru[u] = None
            while sum(self.unit_bytes[v] for v in self._lru) > self.cache_bytes:
                self.release(next(iter(self._lru)))

        return hook

    def fingerprint(self) -> dict:
        """:func:`sensitivity.models.fingerprint` of the model, read a tensor at a time."""
        from .models import fingerprint

        try:
            return fingerprint(self.model, read=self.read)
        finally:
            trim_heap()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._held.clear()
        self.release_all()


# ---------------------------------------------------------------------------------------
# activations between blocks


class _Spilled(NamedTuple):
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


class _Outputs:
    """One block's outputs per batch: in memory up to ``keep_bytes``, files in ``folder`` past it."""

    def __init__(self, keep_bytes: int, folder: Path, tag: str) -> None:
        self.keep, self.folder, self.tag = keep_bytes, folder, tag
        self.items: dict[int, Any] = {}
        self.kept = 0
        self.spilled = 0

    def put(self, k: int, x: Any) -> None:
        if isinstance(x, torch.Tensor) and self.kept + x.nbytes > self.keep:
            path = self.folder / f"{self.tag}-{k}.bin"
            x.detach().contiguous().view(torch.uint8).numpy().tofile(path)
            self.items[k] = _Spilled(path, x.dtype, tuple(x.shape))
            self.spilled += x.nbytes
            return
        self.items[k] = tree_clone(x)
        self.kept += x.nbytes if isinstance(x, torch.Tensor) else 0

    def get(self, k: int) -> Any:
        x = self.items[k]
        if isinstance(x, _Spilled):
            return torch.from_numpy(np.fromfile(x.path, dtype=np.uint8)).view(x.dtype).reshape(x.shape)
        return x

    def clear(self) -> None:
        for x in self.items.values():
            if isinstance(x, _Spilled):
                x.path.unlink(missing_ok=True)
        self.items.clear()


class _Stop(BaseException):  # control flow, not an error: no ``except Exception`` on the way may swallow it
    def __init__(self, output: Any) -> None:
        self.output = output


def _replayed(sm: StreamedModel, before: int, outputs: _Outputs | None, k: int):
    """Blocks ``0..before-1`` return block ``before-1``'s stored output for batch ``k`` (the
    embedding is then not read either: :meth:`StreamedModel._before`)."""
    return replay_blocks(sm.blocks, before, outputs.get(k)) if before else contextlib.nullcontext()


@torch.no_grad()
def streamed_statistics(
    sm: StreamedModel,
    layers: Sequence[LayerInfo],
    batches: list[dict],
    on_unit: Callable[[int, list[LayerInfo], dict[str, HessianAccumulator]], None],
    *,
    dtype: torch.dtype = torch.float32,
    act_formats: Sequence[str] = (),
    keep_bytes: int = 256 << 20,
    scratch: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Block-major Hessian pass (module docstring); returns what it did (for the profile's metadata).

    ``on_unit(u, layers_of_u, accumulators)`` is called once per unit holding layers, with the
    unit read in (:meth:`StreamedModel.hold`); the accumulators are freed after it returns.
    Layers must sit in the blocks or in the LM head (the module after the final norm).
    """
    by_unit: dict[int, list[LayerInfo]] = {}
    for layer in layers:
        by_unit.setdefault(sm.unit_of(layer.fqn), []).append(layer)
    head = sm.model.get_output_embeddings()
    head_u = next((u for u, (_, m) in enumerate(sm.units) if m is head), None)
    for u in by_unit:
        if u not in sm.block_units and u != head_u:
            raise StreamingError(f"layer {by_unit[u][0].fqn!r} sits outside the blocks and the LM head; "
                                 "block streaming cannot replay up to it")
    from tqdm.auto import tqdm

    from .hessian import hook_only

    folder = Path(tempfile.mkdtemp(prefix="bitalloc-stream-", dir=scratch))
    base = getattr(sm.model, getattr(sm.model, "base_model_prefix", ""), None)
    if not isinstance(base, torch.nn.Module):
        raise StreamingError(f"{type(sm.model).__name__} has no base model to run the blocks in")
    prev: _Outputs | None = None
    spilled = kept = 0
    bar = tqdm(total=len(sm.blocks) + (head_u in by_unit), desc="stream blocks", unit="unit", disable=not progress)
    try:
        for b, blk in enumerate(sm.blocks):
            u = sm.block_units[b]
            outs = _Outputs(keep_bytes, folder, f"b{b}")
            hooks = InputHooks(sm.model, by_unit.get(u, []), dtype=dtype, act_formats=act_formats)

            def stop(module, args, output):
                raise _Stop(output)

            handle = blk.register_forward_hook(stop)
            try:
                with sm.hold(u):
                    for k, batch in enumerate(batches):
                        with hooks.batch(batch.get("attention_mask")), _replayed(sm, b, prev, k):
                            try:
                                forward(base, batch)
                                raise StreamingError(f"block {b} never ran in the model's forward")
                            except _Stop as s:
                                outs.put(k, s.output)
                    if u in by_unit:
                        _hand_over(on_unit, u, by_unit[u], hooks)
            finally:
                handle.remove()
                hooks.remove()
                sm.release_all()
            if prev is not None:
                prev.clear()
            prev = outs
            spilled, kept = max(spilled, outs.spilled), max(kept, outs.kept)
            bar.update(1)
        if head_u in by_unit:  # the head's input: the final norm of the last block's output
            hooks = InputHooks(sm.model, by_unit[head_u], dtype=dtype, act_formats=act_formats)
            try:
                with sm.hold(head_u):
                    for k, batch in enumerate(batches):
                        with hooks.batch(batch.get("attention_mask")), _replayed(sm, len(sm.blocks), prev, k):
                            out = forward(base, batch)
                            hook_only(sm.units[head_u][1], out.last_hidden_state)
                    _hand_over(on_unit, head_u, by_unit[head_u], hooks)
            finally:
                hooks.remove()
                sm.release_all()
            bar.update(1)
    finally:
        bar.close()
        if prev is not None:
            prev.clear()
        shutil.rmtree(folder, ignore_errors=True)
    return {"units": len(sm.units), "blocks": len(sm.blocks), "activations_kept_bytes": int(kept),
            "activations_spilled_bytes": int(spilled)}


def _hand_over(on_unit, u: int, layers: list[LayerInfo], hooks: InputHooks) -> None:
    accs = hooks.results()
    try:
        on_unit(u, layers, accs)
    finally:
        for acc in {id(a): a for a in accs.values()}.values():
            acc.free()
