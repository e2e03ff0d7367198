"""The generation loop: prefill the prompt in chunks, then decode one token at a time with the KV cache.

`generate_tokens` is a generator that yields each new id as soon as it is sampled; closing it stops the work.
Timing covers only the model and the sampler, not the time the caller spends between tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..errors import ModelOutputError, ParameterError
from .kv_cache import KVCache
from .model import Cancelled, Transformer
from .sampling import is_integer

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


def as_token_ids(value: Any, name: str, n_vocab: int, *, allow_empty: bool = False) -> np.ndarray:
    """`value` (a list, tuple, range or other iterable of integer ids, or an integer NumPy array) as int64, or
    ParameterError naming `name` and what is wrong: not a sequence, empty, an element that is not an integer (a
    bool, a float, a string), or an id outside the vocabulary."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "iu":
            raise ParameterError(f"{name} must be a 1-D sequence of integer token ids, got an array of "
                                 f"{value.dtype} with shape {value.shape}")
        outside = value[(value < 0) | (value >= n_vocab)]
        bad = outside[0] if outside.size else None
    else:
        if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
            raise ParameterError(f"{name} must be a sequence of integer token ids, got {type(value).__name__}")
        value = list(value)
        for i, t in enumerate(value):
            if not is_integer(t):
                raise ParameterError(f"{name}[{i}] must be an integer token id, got {t!r:.80}")
        bad = next((t for t in value if not 0 <= t < n_vocab), None)  # before NumPy meets an int beyond int64
    if bad is not None:
        raise ParameterError(f"{name}: token id {bad} is outside the vocabulary of {n_vocab}")
    if len(value) == 0 and not allow_empty:
        raise ParameterError(f"{name} must not be empty")
    return np.asarray(value, dtype=np.int64)


def check_finite(logits: np.ndarray, position: int) -> None:
    """ModelOutputError unless every logit in `logits` [rows, vocab] is finite: NaN or infinity comes from corrupt
    weights, never from a request. `position` is the sequence position of the first row, for the message."""
    finite = np.isfinite(logits)
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(axis=-1))[0])
        raise ModelOutputError(f"the model produced non-finite values (NaN or infinity) at position "
                               f"{position + row}; the model file may be corrupt")


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
        _check_output(logits, cache)
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
        logits = transformer.forward([token], cache)[-1]
        _check_output(logits, cache)
        token = sample(logits)
        stats.decode_seconds += time.perf_counter() - t0
        stats.decode_steps += 1



def _check_output(logits: np.ndarray, cache: KVCache) -> None:
    """`check_finite` on the logits of the cache's last token; a failure empties the cache, whose keys and values
    may hold the same NaNs."""
    try:
        check_finite(logits[None], cache.length - 1)
    except ModelOutputError:
        cache.length = 0
        raise
