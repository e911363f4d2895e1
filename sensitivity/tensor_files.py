"""Where a streamed model's tensors come from, one at a time (:mod:`sensitivity.streaming`).

* :class:`SafetensorsFiles`: every tensor of a directory's ``*.safetensors`` files, read with
  plain file reads at the header's offsets (no memory map: the page cache never becomes the
  process's resident memory).
* :class:`GGUFTensors`: every tensor of a GGUF file under the transformers model's parameter
  names, dequantized a slab of rows at a time as transformers' GGUF loader does.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .. import BitallocError

__all__ = ["StreamingError", "SafetensorsFiles", "GGUFTensors", "gguf_path_of"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAX_HEADER = 100 << 20


class StreamingError(BitallocError, ValueError):
    """A model or setting block streaming cannot work with (the message says which)."""


# ---------------------------------------------------------------------------------------
# reading tensors from safetensors files


class SafetensorsFiles:
    """Every tensor of a directory's ``*.safetensors`` files: name -> where its bytes are."""

    def __init__(self, directory: str | Path) -> None:
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise StreamingError(f"{str(directory)!r} has no .safetensors files: block streaming reads the weights from them")
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for f in files:
            with open(f, "rb") as fh:
                raw = fh.read(8)
                n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
                if not 0 < n <= _MAX_HEADER:
                    raise StreamingError(f"{f.name} is not a safetensors file (header length {n})")
                try:
                    header = json.loads(fh.read(n))
                except ValueError as e:
                    raise StreamingError(f"{f.name}: unreadable safetensors header ({e})") from None
            size = f.stat().st_size
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                dtype = _DTYPES.get(e.get("dtype"))
                a, b = e.get("data_offsets", (0, -1))
                if dtype is None or not 0 <= a <= b or 8 + n + b > size:
                    raise StreamingError(f"{f.name}: tensor {name!r} has an unsupported dtype or bad offsets")
                self.entries[name] = (f, dtype, tuple(int(d) for d in e["shape"]), 8 + n + a, 8 + n + b)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def nbytes(self, name: str) -> int:
        _, _, _, a, b = self.entries[name]
        return b - a

    def read(self, name: str) -> torch.Tensor:
        """The tensor, in its stored dtype (one read of its bytes)."""
        f, dtype, shape, a, b = self.entries[name]
        buf = torch.empty(b - a, dtype=torch.uint8)
        with open(f, "rb") as fh:
            fh.seek(a)
            got = fh.readinto(buf.numpy()) if b > a else 0
        if got != b - a:
            raise StreamingError(f"{f.name}: tensor {name!r} is truncated ({got} of {b - a} bytes)")
        return buf.view(dtype).reshape(shape)


class GGUFTensors:
    """Every tensor of a GGUF file under the transformers model's parameter names, dequantized
    one at a time as transformers' GGUF loader does (gguf-py's ``dequantize``, then the
    architecture's tensor processor: llama's q/k rows un-permuted). The file is memory-mapped
    by gguf-py: the pages of a tensor being read count in the resident memory while it is."""

    def __init__(self, path: str | Path, model: torch.nn.Module) -> None:
        """``model``: built from this file's config (its processor reads the head counts there,
        not from a second parse of the file's metadata)."""
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                                get_gguf_hf_weights_map, read_field)

        self.path = Path(path)
        self.reader = GGUFReader(str(path), "r")
        architecture = read_field(self.reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
        to_hf = get_gguf_hf_weights_map(model, self.processor)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.entries = {hf: g for g, hf in to_hf.items() if g in self.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str) -> torch.Tensor:
        """The float32 tensor (dequantized, processed), dequantized a slab of rows at a time into
        one buffer (gguf-py's block temporaries are several times what they decode)."""
        import numpy as np
        from gguf import dequantize

        t = self.tensors[self.entries[name]]
        data = t.data  # (rows, bytes per row) for block types, (rows, cols) otherwise
        first = dequantize(data[:1], t.tensor_type)  # row 0: the shape of a row
        out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
        out[:1] = first
        step = max(1, (1 << 20) // max(1, first.size))
        for i in range(1, data.shape[0], step):
            out[i:i + step] = dequantize(data[i:i + step], t.tensor_type)
        w = self.processor.process(weights=out, name=t.name).weights
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))


def gguf_path_of(source: Path) -> Path | None:
    """The GGUF file a spec points at: the file, or a directory's only .gguf without config.json."""
    if source.is_file() and source.suffix.lower() == ".gguf":
        return source
    if source.is_dir() and not (source / "config.json").is_file():
        found = sorted(source.glob("*.gguf"))
        return found[0] if len(found) == 1 else None
    return None
