"""Keys and values of one sequence, for every layer: storage only (attention reads it in `attention`).

Each layer's `LayerKV` holds position p in slot p % capacity. Full-attention layers have a slot for every position
up to the context length. A sliding-window layer has a ring of its window plus one chunk of new positions (less
one), so a forward step can store its up to `chunk` new keys and values first and then attend over the cache, as
decode does, without overwriting a position its first query still sees (spec §2.4; RoPE is applied before caching,
so a ring is enough). Arrays are allocated zeroed, so the OS commits their pages only as positions are written.

`kv_type` is "f16" (llama.cpp's default: half the memory of f32), "q8_0" (llama.cpp's 8-bit rule: int8 values
with one float32 scale per 32) or "f32" (exact). f16 entries are stored as their uint16 bit patterns, since Numba
has no float16 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from ..defaults import DEFAULT_KV_TYPE, KV_TYPES
from ..format.config import ModelConfig

Q8_0_BLOCK_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]  # values per scale (from gguf's table, as in simd)

STORED_DTYPE = {"f16": np.uint16, "q8_0": np.int8, "f32": np.float32}  # for each of KV_TYPES
BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 1 + 4 / Q8_0_BLOCK_SIZE, "f32": 4.0}  # q8_0: a float32 scale per block
CHUNK = 512  # the most positions a forward step appends (longer inputs are split into steps)


def capacities(config: ModelConfig, context_length: int, chunk: int = CHUNK) -> list[int]:
    """Slots per layer: the context length for full layers; for sliding layers the window plus a chunk, less one
    (the chunk's first query sees the window - 1 positions before it), at most the context length."""
    return [min(config.sliding_window + chunk - 1, context_length) if config.is_sliding(layer) else context_length
            for layer in range(config.n_layer)]


def cache_bytes(config: ModelConfig, context_length: int, kv_type: str, chunk: int = CHUNK) -> int:
    """Bytes a `KVCache` of these arguments reserves."""
    values = 2 * config.kv_dim * sum(capacities(config, context_length, chunk))  # keys and values
    return round(values * BYTES_PER_VALUE[kv_type])


class LayerKV:
    """One layer's keys and values, [n_head_kv, capacity, head_dim] each, position p in slot p % capacity. q8_0
    adds float32 scales [n_head_kv, capacity, head_dim / 32]; the other types have None there. A query at position
    t sees positions from max(0, t - window + 1) to t (the window is the context length in full layers)."""

    def __init__(self, n_head_kv: int, capacity: int, head_dim: int, kv_type: str, window: int):
        self.kv_type = kv_type
        self.window = window
        self.keys = np.zeros((n_head_kv, capacity, head_dim), dtype=STORED_DTYPE[kv_type])
        self.values = np.zeros_like(self.keys)
        scales = (n_head_kv, capacity, head_dim // Q8_0_BLOCK_SIZE)
        self.key_scales = np.zeros(scales, dtype=np.float32) if kv_type == "q8_0" else None
        self.value_scales = np.zeros(scales, dtype=np.float32) if kv_type == "q8_0" else None

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    @property
    def arrays(self) -> list[np.ndarray]:
        return [a for a in (self.keys, self.values, self.key_scales, self.value_scales) if a is not None]

    def first_visible(self, position: int) -> int:
        """The first key position a query at `position` attends to."""
        return max(0, position - self.window + 1)

    def store(self, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Write keys/values [T, n_head_kv, head_dim] of positions [start, start + T), T at most the capacity."""
        T = keys.shape[0]
        if T > self.capacity:
            raise ValueError(f"{T} positions do not fit {self.capacity} slots")
        shape = (T,) + self.keys.shape[::2]
        if keys.shape != shape or values.shape != shape:
            raise ValueError(f"keys {keys.shape} / values {values.shape} are not {shape}")
        keys, values = (np.ascontiguousarray(a, dtype=np.float32) for a in (keys, values))
        if self.kv_type == "q8_0":
            _store_q8_0(self.keys, self.key_scales, keys, start)
            _store_q8_0(self.values, self.value_scales, values, start)
        elif self.kv_type == "f16":
            _store_f16(self.keys, keys.view(np.uint32), start)
            _store_f16(self.values, values.view(np.uint32), start)
        else:
            _store_f32(self.keys, keys, start)
            _store_f32(self.values, values, start)


# One compiled call a layer and step: as NumPy (transposes, conversions, a fancy-indexed write) a decode step's store
# took some 40 µs a layer, most of it the calls themselves once the weights had swept the caches.
@njit(cache=True)
def _store_f32(dst, src, start):
    """dst[g, (start + t) % capacity] = src[t, g] for dst [n_kv, capacity, d], src [T, n_kv, d]."""
    for t in range(src.shape[0]):
        slot = (start + t) % dst.shape[1]
        for g in range(src.shape[1]):
            dst[g, slot] = src[t, g]


@njit(cache=True)
def _store_f16(dst, src_bits, start):
    """`_store_f32` into f16 bit patterns (uint16), from float32 bit patterns (uint32): round to nearest even, as
    NumPy's astype(np.float16)."""
    for t in range(src_bits.shape[0]):
        slot = (start + t) % dst.shape[1]
        for g in range(src_bits.shape[1]):
            for i in range(src_bits.shape[2]):
                dst[g, slot, i] = f16_bits(src_bits[t, g, i])


@njit(cache=True, inline="always")
def f16_bits(u):
    """The f16 bit pattern (uint16) nearest a float32 of bit pattern u (uint32), ties to even: overflow to
    infinity, NaN kept quiet, subnormal halves rounded from the full float."""
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x7F800000:  # inf, NaN
        h = 0x7C00 | (0x200 if a > 0x7F800000 else 0) | ((a >> 13) & 0x3FF)
    elif a >= 0x477FF000:  # 65520 and up round past 65504, the largest half
        h = 0x7C00
    elif a >= 0x38800000:  # a normal half: rebias the exponent, round the 13 dropped bits
        h = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13
    elif a > 0x33000000:  # above 2^-25, half the smallest subnormal: a subnormal (or the smallest normal)
        shift = 126 - (a >> 23)
        m = (a & 0x7FFFFF) | 0x800000
        h = m >> shift
        rest, half = m & ((1 << shift) - 1), 1 << (shift - 1)
        if rest > half or (rest == half and h & 1):
            h += 1
    else:
        h = 0
    return np.uint16(sign | h)


@njit(cache=True)
def _store_q8_0(dst, scales, src, start):
    """`_store_f32` quantized by llama.cpp's Q8_0 rule in float32: per 32 values scale = max |x| / 127, values
    trunc(x · (1 / scale) + copysign(0.5, x)), a zero block all zeros."""
    n_blocks = src.shape[2] // Q8_0_BLOCK_SIZE
    for t in range(src.shape[0]):
        slot = (start + t) % dst.shape[1]
        for g in range(src.shape[1]):
            for b in range(n_blocks):
                x = src[t, g, b * Q8_0_BLOCK_SIZE:(b + 1) * Q8_0_BLOCK_SIZE]
                amax = np.float32(0.0)
                for i in range(Q8_0_BLOCK_SIZE):
                    amax = max(amax, abs(x[i]))
                scale = amax / np.float32(127.0)
                inv = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
                for i in range(Q8_0_BLOCK_SIZE):
                    half = np.float32(0.5) if x[i] >= 0 else np.float32(-0.5)
                    dst[g, slot, b * Q8_0_BLOCK_SIZE + i] = np.int8(np.trunc(x[i] * inv + half))
                scales[g, slot, b] = scale


class KVCache:
    def __init__(self, config: ModelConfig, context_length: int, kv_type: str = DEFAULT_KV_TYPE, chunk: int = CHUNK):
        """`chunk`: the most positions one forward step may append (a smaller one makes small rings for tests)."""
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        if kv_type == "q8_0" and config.head_dim % Q8_0_BLOCK_SIZE:
            raise ValueError(f"kv_type q8_0 needs a head dimension that is a multiple of {Q8_0_BLOCK_SIZE}, "
                             f"not {config.head_dim}")
        self.context_length = context_length
        self.kv_type = kv_type
        self.chunk = chunk
        self.layers = [LayerKV(config.n_head_kv, capacity, config.head_dim, kv_type,
                               config.sliding_window if config.is_sliding(layer) else context_length)
                       for layer, capacity in enumerate(capacities(config, context_length, chunk))]
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
        return sum(a.nbytes for layer in self.layers for a in layer.arrays)

    def _rings(self) -> dict[int, LayerKV]:
        """The layers whose slots are reused; later positions never overwrite earlier ones in the others."""
        return {i: layer for i, layer in enumerate(self.layers) if layer.capacity < self.context_length}

    def can_truncate(self, length: int) -> bool:
        """Whether `truncate(length)` is possible: every ring must still hold the window before `length`."""
        return 0 <= length <= self.length and all(
            layer.first_visible(length) >= self.length - layer.capacity for layer in self._rings().values())

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (to reuse a shared prefix)."""
        if not self.can_truncate(length):
            raise ValueError(f"a cache of {self.length} positions no longer holds the window before {length}")
        self.length = length

    def snapshot(self) -> "KVSnapshot":
        """The rings as they are now (the other layers need no copy)."""
        rings = {i: [a.copy() for a in layer.arrays] for i, layer in self._rings().items()}
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
        for i, saved in snap.rings.items():
            for a, b in zip(self.layers[i].arrays, saved):
                a[...] = b
        self.length = snap.length


@dataclass
class KVSnapshot:
    length: int
    rings: dict[int, list[np.ndarray]]
    serial: int

