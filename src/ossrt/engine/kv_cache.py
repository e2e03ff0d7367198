"""Keys and values of one sequence, for every layer.

Full-attention layers keep every position up to the context length; sliding-window layers keep a ring of the last
`sliding_window` positions (spec §2.4; RoPE is applied before caching, so a ring is enough). Position p lives in
slot p % capacity. Arrays are allocated zeroed, so the OS commits their pages only as positions are written.

`kv_type` is "f16" (llama.cpp's default: half the memory of f32), "q8_0" (llama.cpp's 8-bit type: int8 values
with one float32 scale per 32, 1.125 bytes a value) or "f32" (exact). f16 entries are stored as their uint16 bit
patterns, since Numba has no float16 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from ..format.config import ModelConfig


KV_TYPES = {"f32": np.float32, "f16": np.uint16, "q8_0": np.int8}
BYTES_PER_VALUE = {"f32": 4.0, "f16": 2.0, "q8_0": 1.125}


class KVCache:
    def __init__(self, config: ModelConfig, context_length: int, kv_type: str = "f16"):
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        if kv_type == "q8_0" and config.head_dim % 32:
            raise ValueError(f"kv_type q8_0 needs a head dimension that is a multiple of 32, not {config.head_dim}")
        self.config = config
        self.context_length = context_length
        self.kv_type = kv_type
        self.capacity = [min(config.sliding_window, context_length) if config.is_sliding(layer) else context_length
                         for layer in range(config.n_layer)]
        self.keys = [np.zeros((config.n_head_kv, c, config.head_dim), dtype=KV_TYPES[kv_type])
                     for c in self.capacity]
        self.values = [np.zeros_like(k) for k in self.keys]
        # q8_0: one scale per 32 values of each head vector; None for the other types.
        self.key_scales = [np.zeros(k.shape[:2] + (config.head_dim // 32,), dtype=np.float32)
                           if kv_type == "q8_0" else None for k in self.keys]
        self.value_scales = [np.zeros_like(k) if k is not None else None for k in self.key_scales]
        self._length = 0  # positions [0, length) are filled
        self._floor = 0  # the lowest length since the last snapshot: a snapshot above it is stale
        self._snapshots = 0  # only the latest snapshot can be restored

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        self._length = value
        self._floor = min(self._floor, value)

    @property
    def nbytes(self) -> int:
        """Bytes reserved (full layers at the whole context length)."""
        return sum(a.nbytes for a in self._arrays(range(self.config.n_layer)))

    def _arrays(self, layers) -> list[np.ndarray]:
        return [a for layer in layers for a in (self.keys[layer], self.values[layer], self.key_scales[layer],
                                                self.value_scales[layer]) if a is not None]

    def window_start(self, layer: int, position: int) -> int:
        """The first key position a query at `position` attends to in `layer`."""
        if self.config.is_sliding(layer):
            return max(0, position - self.config.sliding_window + 1)
        return 0

    def past(self, layer: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of positions [start, stop), in order: [n_head_kv, stop - start, head_dim]."""
        cap = self.capacity[layer]
        if not (0 <= start <= stop <= self.length and stop - start <= cap and start >= self.length - cap):
            raise IndexError(f"layer {layer}: positions [{start}, {stop}) are not in the cache")
        slots = np.arange(start, stop) % cap
        if self.kv_type == "q8_0":
            return (_dequantize_q8(self.keys[layer][:, slots], self.key_scales[layer][:, slots]),
                    _dequantize_q8(self.values[layer][:, slots], self.value_scales[layer][:, slots]))
        return self._float(self.keys[layer][:, slots]), self._float(self.values[layer][:, slots])

    def store(self, layer: int, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Write keys/values [T, n_head_kv, head_dim] of positions [start, start + T); a ring keeps the last ones."""
        cap = self.capacity[layer]
        T = keys.shape[0]
        first = max(start, start + T - cap)
        slots = np.arange(first, start + T) % cap
        k = keys[first - start:].transpose(1, 0, 2)
        v = values[first - start:].transpose(1, 0, 2)
        if self.kv_type == "q8_0":
            self.keys[layer][:, slots], self.key_scales[layer][:, slots] = _quantize_q8(k)
            self.values[layer][:, slots], self.value_scales[layer][:, slots] = _quantize_q8(v)
        else:
            self.keys[layer][:, slots] = self._stored(k)
            self.values[layer][:, slots] = self._stored(v)

    def _stored(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float16).view(np.uint16) if self.kv_type == "f16" else x

    def _float(self, x: np.ndarray) -> np.ndarray:
        return x.view(np.float16).astype(np.float32) if self.kv_type == "f16" else x

    def attend(self, layer: int, q: np.ndarray, position: int, sinks: np.ndarray, scale: float) -> np.ndarray:
        """Attention of one query q [n_head, d] at `position` (already stored) over its window in the cache."""
        first = self.window_start(layer, position)
        slot, n = first % self.capacity[layer], position + 1 - first
        if self.kv_type == "q8_0":
            return kernels.attend_q8(q, self.keys[layer], self.key_scales[layer], self.values[layer],
                                     self.value_scales[layer], slot, n, sinks, scale)
        return kernels.attend(q, self.keys[layer], self.values[layer], slot, n, sinks, scale)

    def can_truncate(self, length: int) -> bool:
        """Whether `truncate(length)` is possible: every ring must still hold the window before `length`."""
        return 0 <= length <= self.length and all(
            self.window_start(layer, length) >= self.length - cap for layer, cap in enumerate(self.capacity))

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (to reuse a shared prefix)."""
        if not self.can_truncate(length):
            raise ValueError(f"a cache of {self.length} positions no longer holds the window before {length}")
        self.length = length

    def snapshot(self) -> "KVSnapshot":
        """The rings as they are now (full layers need no copy: later positions never overwrite earlier ones)."""
        rings = {layer: [a.copy() for a in self._arrays([layer])]
                 for layer, cap in enumerate(self.capacity) if cap < self.context_length}
        self._floor = self.length
        self._snapshots += 1
        return KVSnapshot(self.length, rings, self._snapshots)

    def can_restore(self, snap: "KVSnapshot") -> bool:
        """Whether `snap` is this cache's latest snapshot and nothing before it has been rewritten since."""
        return snap.serial == self._snapshots and self._floor >= snap.length

    def restore(self, snap: "KVSnapshot") -> None:
        """Go back to the positions and rings of `snap`."""
        if not self.can_restore(snap):
            raise ValueError(f"the cache has been rewritten below the snapshot at {snap.length}")
        for layer, saved in snap.rings.items():
            for a, b in zip(self._arrays([layer]), saved):
                a[...] = b
        self.length = snap.length


@dataclass
class KVSnapshot:
    length: int
    rings: dict[int, list[np.ndarray]]
    serial: int


def _quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., d] → int8 [..., d] and scales [..., d/32] (llama.cpp's Q8_0 rule: amax/127, round half away
    from zero)."""
    blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // 32, 32))
    scale = np.abs(blocks).max(axis=-1) / 127
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.trunc(blocks * inv[..., None] + np.copysign(0.5, blocks)).astype(np.int8)
    return q.reshape(x.shape), scale.astype(np.float32)


def _dequantize_q8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    blocks = q.reshape(q.shape[:-1] + (q.shape[-1] // 32, 32)).astype(np.float32) * scale[..., None]
    return blocks.reshape(q.shape)
