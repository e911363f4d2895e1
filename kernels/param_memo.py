"""The clip search's results, remembered per weight and format.

A default run fake-quantizes every layer in every candidate scheme (the profile), again for
the candidate plans (the selection), then quantizes and packs the chosen ones (the
evaluation): the same weight in the same format three times, and the per-group clip search
(nine candidate ranges) is most of each. :data:`PARAMS` keeps the scales and zero points it
found, so the later passes round with them directly.

* The key is the weight's content: SHA-1 of its bytes, shape and dtype (about 1.7 ms for a
  1536 × 576 float32 weight on 2 CPU cores, against about 5 ms for its clip search). A
  tensor object's digest is kept while the object lives, with its version counter, so
  calling with the same object again hashes nothing, and an in-place change hashes anew.
* Plus the rows searched (fake quantization works on row pieces of large weights), the
  format and whether the search ran.
* Entries are kept compactly and exactly: the scales hold float16 values, and the zero
  points are small integers (stored as uint8). The least recently used go first past
  :data:`PARAM_MEMO_BYTES`.

CPU tensors only (a GPU recomputes faster than it hashes); inference-mode tensors, which
carry no version counter, are not remembered.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Hashable

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["PARAM_MEMO_BYTES", "ParamMemo", "PARAMS", "weight_digest"]

PARAM_MEMO_BYTES = 256 << 20  # about 3 bytes a group: every (layer, scheme) of SmolLM2's 210 × 18 is ~100 MB

_DIGESTS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor object -> (version, digest)
_LOCK = threading.Lock()


def weight_digest(w: torch.Tensor) -> bytes | None:
    """SHA-1 of ``w``'s content (bytes, shape, dtype); None where it is not remembered."""
    if w.device.type != "cpu" or w.is_inference():
        return None
    version = w._version
    with _LOCK:
        hit = _DIGESTS.get(w)
    if hit is not None and hit[0] == version:
        return hit[1]
    t = w.detach().contiguous()
    h = hashlib.sha1(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    digest = h.digest()
    with _LOCK:
        _DIGESTS[w] = (version, digest)
    return digest


class ParamMemo:
    """(scale (out, G, 1) float32 holding float16 values, zero (out, G, 1) int64 or None) by key,
    least recently used out first past ``max_bytes``."""

    def __init__(self, max_bytes: int = PARAM_MEMO_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        with _LOCK:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
        scale, zero = item
        return scale.to(torch.float32), (zero.to(torch.int64) if zero is not None else None)

    def put(self, key: Hashable, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        s16 = scale.to(torch.float16)  # exact: the scales are float16 values
        assert torch.equal(s16.to(torch.float32), scale), "scales must hold float16 values"
        z8 = None
        if zero is not None:
            assert int(zero.min()) >= 0 and int(zero.max()) <= 255, "zero points must fit 8 bits"
            z8 = zero.to(torch.uint8)
        size = s16.numel() * 2 + (z8.numel() if z8 is not None else 0)
        if size > self.max_bytes:
            return
        with _LOCK:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old)
            while self._items and self._bytes + size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= self._size(dropped)
            self._items[key] = (s16, z8)
            self._bytes += size

    @staticmethod
    def _size(item: tuple[torch.Tensor, torch.Tensor | None]) -> int:
        return item[0].numel() * 2 + (item[1].numel() if item[1] is not None else 0)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with _LOCK:
            self._items.clear()
            self._bytes = 0
            self.hits = self.misses = 0


PARAMS = ParamMemo()
