"""Keys and values of one sequence, for every layer.

Full-attention layers keep every position up to the context length; sliding-window layers keep a ring of the last
`sliding_window` positions (spec §2.4; RoPE is applied before caching, so a ring is enough). Position p lives in
slot p % capacity. Arrays are allocated zeroed, so the OS commits their pages only as positions are written.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, context_length: int):
        self.config = config
        self.context_length = context_length
        self.capacity = [min(config.sliding_window, context_length) if config.is_sliding(layer) else context_length
                         for layer in range(config.n_layer)]
        self.keys = [np.zeros((config.n_head_kv, c, config.head_dim), dtype=np.float32) for c in self.capacity]
        self.values = [np.zeros_like(k) for k in self.keys]
        self.length = 0  # positions [0, length) are filled

    @property
    def nbytes(self) -> int:
        """Bytes reserved (full layers at the whole context length)."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

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
        return self.keys[layer][:, slots], self.values[layer][:, slots]

    def store(self, layer: int, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Write keys/values [T, n_head_kv, head_dim] of positions [start, start + T); a ring keeps the last ones."""
        cap = self.capacity[layer]
        T = keys.shape[0]
        first = max(start, start + T - cap)
        slots = np.arange(first, start + T) % cap
        self.keys[layer][:, slots] = keys[first - start:].transpose(1, 0, 2)
        self.values[layer][:, slots] = values[first - start:].transpose(1, 0, 2)

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (to reuse a shared prefix). A ring must still hold the window before
        `length`, so sliding layers allow stepping back only as far as their spare capacity."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        for layer, cap in enumerate(self.capacity):
            if self.window_start(layer, length) < self.length - cap:
                raise ValueError(f"layer {layer} no longer holds the positions before {length}")
        self.length = length
