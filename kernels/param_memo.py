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
* Entries are kept compactly and exactly (the scales hold float16 values, the zero points
  are small integers, stored as uint8) in 8 MiB slabs; past :data:`PARAM_MEMO_BYTES` the
  oldest slab goes first.

CPU tensors only (a GPU recomputes faster than it hashes); inference-mode tensors, which
carry no version counter, are not remembered.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from typing import Hashable

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["PARAM_MEMO_BYTES", "SLAB_BYTES", "ParamMemo", "PARAMS", "weight_digest"]

PARAM_MEMO_BYTES = 256 << 20  # about 3 bytes a group: every (layer, scheme) of SmolLM2's 210 × 18 is ~100 MB
SLAB_BYTES = 8 << 20  # entries are copied into slabs of this size (one allocation per 8 MiB)

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
    """(scale (out, G, 1) float32 holding float16 values, zero (out, G, 1) int64 or None) by key.

    Entries live in a few large slabs (:data:`SLAB_BYTES` each), not one small tensor apiece:
    thousands of small long-lived allocations made between the profile's large temporaries
    pin the allocator's heap, and a run's resident memory grew by gigabytes that way. Past
    ``max_bytes`` the oldest slab goes with every entry in it.
    """

    def __init__(self, max_bytes: int = PARAM_MEMO_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._items: dict[Hashable, tuple[int, int, tuple[int, ...], bool]] = {}  # key -> (slab id, offset, shape, zero?)
        self._slabs: OrderedDict[int, torch.Tensor] = OrderedDict()  # slab id -> (SLAB_BYTES,) uint8, oldest first
        self._keys: dict[int, list] = {}  # slab id -> its keys
        self._next = 0
        self._room = 0  # bytes left in the newest slab (none: the first put opens one)
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        with _LOCK:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            slab_id, off, shape, has_zero = item
            slab = self._slabs[slab_id]
        n = math.prod(shape)
        scale = slab[off:off + 2 * n].view(torch.float16).to(torch.float32).view(shape)
        zero = slab[off + 2 * n:off + 3 * n].to(torch.int64).view(shape) if has_zero else None
        return scale, zero

    def put(self, key: Hashable, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        s16 = scale.to(torch.float16)  # exact: the scales are float16 values
        assert torch.equal(s16.to(torch.float32), scale), "scales must hold float16 values"
        if zero is not None:
            assert zero.shape == scale.shape, "zero points are per group, as the scales"
            assert int(zero.min()) >= 0 and int(zero.max()) <= 255, "zero points must fit 8 bits"
        n = scale.numel()
        size = (3 * n if zero is not None else 2 * n) + 1 & ~1  # even: the next entry's float16 stays aligned
        if size > SLAB_BYTES or self.max_bytes < SLAB_BYTES:
            return
        with _LOCK:
            if key in self._items:
                return
            if size > self._room:
                while self._slabs and (len(self._slabs) + 1) * SLAB_BYTES > self.max_bytes:
                    old, _ = self._slabs.popitem(last=False)
                    for k in self._keys.pop(old):
                        del self._items[k]
                self._slabs[self._next] = torch.empty(SLAB_BYTES, dtype=torch.uint8)
                self._keys[self._next] = []
                self._next += 1
                self._room = SLAB_BYTES
            slab_id = self._next - 1
            slab = self._slabs[slab_id]
            off = slab.numel() - self._room
            slab[off:off + 2 * n].view(torch.float16).copy_(s16.reshape(-1))
            if zero is not None:
                slab[off + 2 * n:off + 3 * n].copy_(zero.reshape(-1).to(torch.uint8))
            self._items[key] = (slab_id, off, tuple(scale.shape), zero is not None)
            self._keys[slab_id].append(key)
            self._room -= size

    @property
    def nbytes(self) -> int:
        return len(self._slabs) * SLAB_BYTES

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with _LOCK:
            self._items.clear()
            self._slabs.clear()
            self._keys.clear()
            self._room = 0
            self.hits = self.misses = 0


PARAMS = ParamMemo()
