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

The Hessian pass over such a model runs block-major (:mod:`sensitivity.stream_pass`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import BitallocError
from .tensor_files import GGUFTensors, SafetensorsFiles, StreamingError, gguf_path_of

__all__ = ["StreamingError", "SafetensorsFiles", "StreamedModel", "trim_heap"]


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
        """Keep unit ``u`` read in while inside (its weights may be changed in place and restored).

        A held unit leaves the cache: a forward's cache eviction would otherwise drop it and the
        next forward read it again from the files, undoing an in-place change mid-measurement."""
        self._held[u] = self._held.get(u, 0) + 1
        self._lru.pop(u, None)
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
