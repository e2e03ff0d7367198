"""The generation loop: prefill the prompt in chunks, then decode one token at a time with the KV cache.

`generate_tokens` is a generator that yields each new id as soon as it is sampled; closing it stops the work.
Timing covers only the model and the sampler, not the time the caller spends between tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .kv_cache import KVCache
from .model import Cancelled, Transformer

PREFILL_CHUNK = 512


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # forward passes of single tokens after the prompt
    decode_steps: int = 0
    stop_reason: str | None = None  # "stop" (a stop token), "length" (max_tokens), "context_length", "cancelled"
    stop_token: int | None = None  # the stop token that ended generation; it is not yielded

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


def prefill(transformer: Transformer, cache: KVCache, tokens: np.ndarray, chunk: int = PREFILL_CHUNK,
            should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Append `tokens` to the cache in chunks; return the logits [vocab] of the last one."""
    for i in range(0, len(tokens), chunk):
        logits = transformer.forward(tokens[i:i + chunk], cache, should_stop=should_stop)
    return logits[-1]


def generate_tokens(transformer: Transformer, cache: KVCache, prompt: np.ndarray, sample: Callable[[np.ndarray], int],
                    *, max_tokens: int | None, stop_tokens: frozenset[int], stats: GenerationStats,
                    prefill_chunk: int = PREFILL_CHUNK, should_stop: Callable[[], bool] | None = None,
                    on_prefilled: Callable[[np.ndarray], None] | None = None,
                    last_logits: np.ndarray | None = None) -> Iterator[int]:
    """Continue the cache's sequence with `prompt`, then yield sampled ids until a stop token, `max_tokens`,
    the end of the context, or `should_stop()` (asked between the layers of prefill and before each decode step).
    An empty `prompt` continues from `last_logits`, the logits of the last token already in the cache.
    `on_prefilled(logits)` runs once the prompt is in the cache. `stats` is filled in as it goes."""
    stats.prompt_tokens = len(prompt)
    if max_tokens == 0:
        stats.stop_reason = "length"
        return
    t0 = time.perf_counter()
    if len(prompt):
        try:
            logits = prefill(transformer, cache, prompt, prefill_chunk, should_stop)
        except Cancelled:
            stats.stop_reason = "cancelled"
            return
    elif last_logits is not None:
        logits = last_logits
    else:
        raise ValueError("an empty prompt needs the logits of the last cached token")
    if on_prefilled is not None:
        on_prefilled(logits)
    token = sample(logits)
    stats.prefill_seconds = time.perf_counter() - t0
    while True:
        if token in stop_tokens:
            stats.stop_reason, stats.stop_token = "stop", token
            return
        stats.generated_tokens += 1
        yield token
        if max_tokens is not None and stats.generated_tokens >= max_tokens:
            stats.stop_reason = "length"
            return
        if cache.length >= cache.context_length:
            stats.stop_reason = "context_length"
            return
        # Asked before a decode step, not inside it: an interrupted forward pass empties the cache.
        if should_stop is not None and should_stop():
            stats.stop_reason = "cancelled"
            return
        t0 = time.perf_counter()
        token = sample(transformer.forward([token], cache)[-1])
        stats.decode_seconds += time.perf_counter() - t0
        stats.decode_steps += 1
