"""The generation loop: prefill the prompt in chunks, then decode one token at a time with the KV cache.

`Generation` is an iterator that yields each new id as soon as it is sampled and carries its own `stats`; closing
it stops the work. Timing covers only the model and the sampler, not the time the caller spends between tokens.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..errors import ParameterError
from .engine import Engine
from .kv_cache import KVCache
from .model import Cancelled
from .sampling import is_integer


class StopReason(str, enum.Enum):
    """Why generation ended (equal to its value as a string)."""

    STOP = "stop"  # a stop token
    LENGTH = "length"  # max_tokens
    CONTEXT_LENGTH = "context_length"  # the cache is full
    CANCELLED = "cancelled"  # should_stop() said so


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # forward passes of single tokens after the prompt
    decode_steps: int = 0
    stop_reason: StopReason | None = None
    stop_token: int | None = None  # the stop token that ended generation; it is not yielded

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


def check_max_tokens(max_tokens: object) -> None:
    """The one rule for `max_tokens`: None (until a stop token or the end of the context) or an integer >= 0."""
    if max_tokens is not None and (not is_integer(max_tokens) or max_tokens < 0):
        raise ParameterError(f"max_tokens must be an integer >= 0 or None, got {max_tokens!r:.80}")


class Generation:
    """The ids generated after `prompt` in `cache`: iterate to run, `close()` to stop, `stats` as it goes.

    It stops at a token of `stop_tokens` (not yielded), after `max_tokens`, at the end of the context, or when
    `should_stop()` says so (asked between the layers of prefill and before each decode step). An empty `prompt`
    continues from `last_logits`, the logits of the last token already in the cache. `on_prefilled(logits)` runs
    once the prompt is in the cache."""

    def __init__(self, engine: Engine, cache: KVCache, prompt: np.ndarray, sample: Callable[[np.ndarray], int], *,
                 max_tokens: int | None, stop_tokens: frozenset[int],
                 should_stop: Callable[[], bool] | None = None,
                 on_prefilled: Callable[[np.ndarray], None] | None = None,
                 last_logits: np.ndarray | None = None):
        if not len(prompt) and last_logits is None:
            raise ValueError("an empty prompt needs the logits of the last cached token")
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self._ids = self._run(engine, cache, prompt, sample, max_tokens, stop_tokens, should_stop, on_prefilled,
                              last_logits)

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> int:
        return next(self._ids)

    def close(self) -> None:
        self._ids.close()

    def _stop(self, reason: StopReason, token: int | None = None) -> None:
        self.stats.stop_reason, self.stats.stop_token = reason, token

    def _run(self, engine, cache, prompt, sample, max_tokens, stop_tokens, should_stop, on_prefilled,
             last_logits) -> Iterator[int]:
        stats = self.stats
        if max_tokens == 0:
            self._stop(StopReason.LENGTH)
            return
        t0 = time.perf_counter()
        if len(prompt):
            try:
                logits = engine.forward(prompt, cache, should_stop=should_stop)[-1]
            except Cancelled:
                self._stop(StopReason.CANCELLED)
                return
        else:
            logits = last_logits
        if on_prefilled is not None:
            on_prefilled(logits)
        token = sample(logits)
        stats.prefill_seconds = time.perf_counter() - t0
        while True:
            if token in stop_tokens:
                self._stop(StopReason.STOP, token)
                return
            stats.generated_tokens += 1
            yield token
            if max_tokens is not None and stats.generated_tokens >= max_tokens:
                self._stop(StopReason.LENGTH)
                return
            if cache.length >= cache.context_length:
                self._stop(StopReason.CONTEXT_LENGTH)
                return
            # Asked before a decode step, not inside it: an interrupted forward pass empties the cache.
            if should_stop is not None and should_stop():
                self._stop(StopReason.CANCELLED)
                return
            t0 = time.perf_counter()
            token = sample(engine.forward(np.array([token]), cache)[-1])
            stats.decode_seconds += time.perf_counter() - t0
            stats.decode_steps += 1
