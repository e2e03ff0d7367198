"""The engine: the one interface to a loaded model that generation, chat and the front-ends use.

An `Engine` wraps a backend's transformer — the forward pass over the model file's tensors (`engine.model` on the
CPU) — with what every sequence shares: the context length, the KV cache's precision, and the tokenizer. Anything
with `config`, `new_cache(context_length, kv_type)` and `forward(tokens, cache, *, all_logits, should_stop)` can be
a backend (and `few_tokens`, if it checks drafted tokens). Above this line nothing touches a transformer, a model
file or a `Model`.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..errors import ContextLengthError, ModelOutputError, ParameterError
from ..format.config import ModelConfig
from .kv_cache import KVCache
from .sampling import is_integer

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

class Engine:
    """Forward passes over caches of one context length and precision. Thread-safe: the backend serialises
    forward passes, and each sequence has its own cache."""

    def __init__(self, transformer: Any, load_tokenizer: Callable[[], "Tokenizer"], *, context_length: int,
                 kv_type: str, draft_tokens: int = 0):
        self.transformer = transformer
        self.context_length = context_length
        self.kv_type = kv_type
        self.draft_tokens = draft_tokens  # prompt lookup's drafts checked a decode pass (generate.Generation)
        self._load_tokenizer = load_tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.transformer.config

    @property
    def few_tokens(self) -> int:
        """The most tokens a pass takes with each token's logits bit for bit those of a pass of it alone (a backend
        without `few_tokens`: 1)."""
        return getattr(self.transformer, "few_tokens", 1)

    @cached_property
    def tokenizer(self) -> "Tokenizer":
        """Built on first use: chat needs it, raw generation from ids does not."""
        return self._load_tokenizer()

    def new_cache(self, context_length: int | None = None) -> KVCache:
        """An empty KV cache for one sequence of up to `context_length` (default: the engine's) positions."""
        return self.transformer.new_cache(context_length or self.context_length, self.kv_type)

    def forward(self, tokens: np.ndarray, cache: KVCache, *, all_logits: bool = False,
                should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """Run `tokens` (any number: the backend steps through a long prompt) at the cache's next positions; float32
        logits [len(tokens), vocab] with `all_logits`, else [1, vocab] of the last token. `should_stop` is asked
        between layers (`Cancelled`). Non-finite logits come from corrupt weights, never from a request:
        ModelOutputError, and the cache, whose keys and values may hold the same NaNs, is emptied."""
        start = cache.length
        logits = self.transformer.forward(tokens, cache, all_logits=all_logits, should_stop=should_stop)
        finite = np.isfinite(logits)
        if not finite.all():
            cache.length = 0
            row = int(np.flatnonzero(~finite.all(axis=-1))[0]) + (0 if all_logits else len(tokens) - 1)
            raise ModelOutputError(f"the model produced non-finite values (NaN or infinity) at position "
                                   f"{start + row}; the model file may be corrupt")
        return logits

    def check_tokens(self, token_ids: Any, name: str = "token_ids") -> np.ndarray:
        """A prompt's ids as int64: ParameterError naming `name` if they are not ids of this vocabulary,
        ContextLengthError if they do not fit the context."""
        tokens = as_token_ids(token_ids, name, self.config.n_vocab)
        if len(tokens) > self.context_length:
            raise ContextLengthError(f"{len(tokens)} prompt tokens do not fit the context length "
                                     f"{self.context_length}")
        return tokens


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
