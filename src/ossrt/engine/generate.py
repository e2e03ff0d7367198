"""The generation loop: prefill the prompt in chunks, then decode one token at a time with the KV cache (or a few,
when drafted tokens are checked).

`Generation` is an iterator that yields each new id as soon as it is sampled and carries its own `stats`; closing
it stops the work. Timing covers only the model and the sampler, not the time the caller spends between tokens.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import ParameterError
from .engine import Engine
from .kv_cache import KVCache
from .lookup import DraftLength, PromptLookup
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
    decode_seconds: float = 0.0  # forward passes after the prompt
    decode_steps: int = 0  # tokens sampled after the first (a pass checking drafted tokens may give several)
    drafted_tokens: int = 0  # tokens prompt lookup drafted and a pass checked
    accepted_tokens: int = 0  # of which the sampler chose the same, so they came without a pass of their own
    stop_reason: StopReason | None = None
    stop_token: int | None = None  # the stop token that ended generation; it is not yielded

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def acceptance(self) -> float:
        """The share of drafted tokens the sampler chose (0 when none were drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


def check_max_tokens(max_tokens: object) -> None:
    """The one rule for `max_tokens`: None (until a stop token or the end of the context) or an integer >= 0."""
    if max_tokens is not None and (not is_integer(max_tokens) or max_tokens < 0):
        raise ParameterError(f"max_tokens must be an integer >= 0 or None, got {max_tokens!r:.80}")


class Generation:
    """The ids generated after `prompt` in `cache`: iterate to run, `close()` to stop, `stats` as it goes.

    It stops at a token of `stop_tokens` (not yielded), after `max_tokens`, at the end of the context, or when
    `should_stop()` says so (asked between the layers of prefill and before each decode step). An empty `prompt`
    continues from `last_logits`, the logits of the last token already in the cache. `on_prefilled(logits)` runs
    once the prompt is in the cache.

    With the engine's `draft_tokens`, a decode pass also runs up to that many tokens drafted by prompt lookup
    (`lookup.PromptLookup` over `context`, the ids already in the cache, then the prompt and the tokens generated)
    after the sampled one, as many as `lookup.DraftLength` expects to pay; while the sampler picks the drafted token,
    the next comes from the logits that pass computed, without a pass of its own. The backend computes each token of
    such a pass bit for bit as a pass of it alone, and the sampler is called once a token in the same order, so the
    ids are those of one token a pass, for greedy and seeded sampling alike."""

    def __init__(self, engine: Engine, cache: KVCache, prompt: np.ndarray, sample: Callable[[np.ndarray], int], *,
                 max_tokens: int | None, stop_tokens: frozenset[int],
                 should_stop: Callable[[], bool] | None = None,
                 on_prefilled: Callable[[np.ndarray], None] | None = None,
                 last_logits: np.ndarray | None = None, context: Sequence[int] = ()):
        if not len(prompt) and last_logits is None:
            raise ValueError("an empty prompt needs the logits of the last cached token")
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        drafts = min(engine.draft_tokens, engine.few_tokens - 1, cache.chunk - 1)
        lookup = PromptLookup([*context, *prompt.tolist()]) if drafts > 0 else None
        self._ids = self._run(engine, cache, prompt, sample, max_tokens, stop_tokens, should_stop, on_prefilled,
                              last_logits, lookup, drafts)

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> int:
        return next(self._ids)

    def close(self) -> None:
        self._ids.close()

    def _stop(self, reason: StopReason, token: int | None = None) -> None:
        self.stats.stop_reason, self.stats.stop_token = reason, token

    def _run(self, engine, cache, prompt, sample, max_tokens, stop_tokens, should_stop, on_prefilled,
             last_logits, lookup, drafts) -> Iterator[int]:
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
        ahead: list[tuple[int, np.ndarray]] = []  # drafted tokens run past the cache's length, each with its logits
        length = DraftLength(drafts)
        last_pass = None
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
            if lookup is not None:
                lookup.append(token)
            if ahead and ahead[0][0] == token:
                # The sampler chose the drafted token: its keys and values are in the cache past its length already.
                logits = ahead.pop(0)[1]
                cache.length += 1
                stats.accepted_tokens += 1
                last_pass[1] += 1
            else:
                draft = []
                if lookup is not None:
                    if last_pass is not None:
                        length.record(*last_pass)
                    draft = lookup.draft(min(drafts, cache.context_length - cache.length - 1))
                    draft = draft[:length.choose(len(draft))] if draft else draft
                t_pass = time.perf_counter()
                rows = engine.forward(np.array([token, *draft]), cache, all_logits=bool(draft))
                last_pass = [len(draft), 0, time.perf_counter() - t_pass]  # drafted, kept so far, seconds
                logits = rows[0]
                if draft:
                    cache.length -= len(draft)  # kept as far as the sampler agrees
                    stats.drafted_tokens += len(draft)
                ahead = list(zip(draft, rows[1:]))
            token = sample(logits)
            stats.decode_seconds += time.perf_counter() - t0
            stats.decode_steps += 1
