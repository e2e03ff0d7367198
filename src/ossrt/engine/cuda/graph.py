"""A KV cache's decode step, recorded once as a CUDA graph and replayed (on a GPU; the simulator runs it eagerly).

A decode step launches some 15 kernels a layer, and from Python a launch costs more than most of those kernels
take. Recorded by CuPy's stream capture, the whole step replays in one call. A step can be replayed because its
inputs, the token and its position, live in device buffers written before each replay, every kernel reads them
there (never as a Python number), and nothing in the step waits for the host. The arrays the step allocates come
from a memory pool of the graph's own, which keeps them, the output included, for as long as the graph lives.

The first step of a cache runs eagerly (kernels compile and load; module-level device arrays such as the kernels'
empty placeholders are allocated outside the graph's pool); the second is recorded and replayed, as is every
later one. A graph holds the addresses of its cache's arrays: it belongs to that cache.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np

from . import device


class DecodeStep:
    """`step(token, position)`: the residual stream [1, n_embd] after the last block, by
    `blocks(tokens, positions, cache, None)` over device buffers holding the token and its position. The array a
    replay returns is rewritten by the next replay."""

    def __init__(self, blocks: Callable, cache):
        self._blocks = blocks
        self._cache = cache
        self.tokens = device.zeros(1, np.int32)
        self.positions = device.zeros(1, np.int32)
        self._warmed_up = False  # the first step has run eagerly
        self._graph = None
        self._output = None
        self._pool = None

    def __call__(self, token: int, position: int):
        self.tokens[0] = token
        self.positions[0] = position
        if device.SIMULATOR or not self._warmed_up:
            self._warmed_up = True
            return self._blocks(self.tokens, self.positions, self._cache, None)
        cupy = device.xp
        stream = cupy.cuda.get_current_stream()
        if self._graph is None:
            self._record(cupy, stream)
        self._graph.launch(stream)
        return self._output

    def _record(self, cupy, stream) -> None:
        """Capture the step on the current stream (a stream of the backend's: capture cannot use the legacy
        default stream) into a graph, with its allocations in a pool of its own."""
        pool = cupy.cuda.MemoryPool()
        with cupy.cuda.using_allocator(pool.malloc):
            stream.begin_capture()
            try:
                output = self._blocks(self.tokens, self.positions, self._cache, None)
            except BaseException:
                with contextlib.suppress(Exception):  # the capture is broken; end it so the stream stays usable
                    stream.end_capture()
                raise
            graph = stream.end_capture()
        self._graph, self._output, self._pool = graph, output, pool
