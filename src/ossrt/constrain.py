"""Constrained decoding: grammars for structured output and forced function calls, on llguidance.

A `Grammar` is built once per request from what the client sent (`json_object_grammar`, `json_schema_grammar`,
`function_arguments_grammar`); bad schemas fail there with a `ParameterError`. A `Constraint` follows one
generation over it: `mask()` / `apply(logits)` before each sampling step, `consume(token)` after it. The stop token
the caller names (`<|return|>` for a final answer, `<|call|>` for a tool call's arguments) is allowed exactly when
the text so far is complete; every other special token, and every id without a string, is never allowed.

The JSON is compact (no whitespace between tokens), as gpt-oss writes tool arguments in Harmony, so a model cannot
loop on whitespace. `strict` schemas are enforced exactly and a keyword llguidance cannot enforce is an error;
non-strict schemas skip such keywords (OpenAI does not promise them either).

llguidance's view of a vocabulary costs ~0.7 s to build for o200k, so it is built once per `Tokenizer` and shared.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import llguidance
import numba
import numpy as np
from llguidance.tiktoken import lltokenizer_from_encoding

from .errors import ParameterError
from .tokenizer import Tokenizer

# OpenAI's rule for a response format's or function's name.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Compact JSON; strict decides whether unenforceable keywords are errors (lenient=False) or skipped.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


@dataclass(frozen=True)
class Grammar:
    """A checked llguidance grammar (its serialized form) and what it was made from, for messages and logs."""

    text: str
    description: str


def json_object_grammar() -> Grammar:
    """`response_format: {"type": "json_object"}`: any JSON object."""
    return _schema_grammar({"type": "object"}, strict=False, field="response_format", description="a JSON object")


def json_schema_grammar(spec: Any, field: str = "response_format.json_schema") -> Grammar:
    """OpenAI's `json_schema` format, `{"name", "schema", "strict", "description"}` (chat completions'
    `response_format.json_schema`, Responses' `text.format`); `field` is where the request put it."""
    if not isinstance(spec, dict):
        raise ParameterError(f"{field} must be an object with 'name' and 'schema', got {type(spec).__name__}")
    name = _check_name(spec.get("name"), f"{field}.name")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ParameterError(f"{field}.schema must be a JSON schema object, got {_kind(schema)}")
    strict = _check_strict(spec.get("strict"), f"{field}.strict")
    return _schema_grammar(schema, strict, f"{field}.schema", f"JSON schema {name!r}")


def function_arguments_grammar(function: Any, field: str = "tools[].function") -> Grammar:
    """The arguments of a forced call to `function` (`{"name", "parameters", "strict"}`): a JSON object matching
    `parameters`; a function without `parameters` takes any object."""
    if not isinstance(function, dict):
        raise ParameterError(f"{field} must be an object with 'name' and 'parameters', got {_kind(function)}")
    name = _check_name(function.get("name"), f"{field}.name")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object"}
    elif not isinstance(parameters, dict):
        raise ParameterError(f"{field}.parameters must be a JSON schema object, got {_kind(parameters)}")
    strict = _check_strict(function.get("strict"), f"{field}.strict")
    # Arguments are always an object, whatever the schema allows besides.
    schema = {"allOf": [{"type": "object"}, parameters]} if parameters.get("type") != "object" else parameters
    return _schema_grammar(schema, strict, f"{field}.parameters", f"arguments of {name!r}")


def _schema_grammar(schema: dict, strict: bool, field: str, description: str) -> Grammar:
    options = dict(_JSON_OPTIONS, lenient=not strict)
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    except ValueError as e:
        raise ParameterError(f"{field}: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise ParameterError(f"{field} is not a usable JSON schema: {messages[0]}")
    return Grammar(text, description)


def _check_name(name: Any, field: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ParameterError(f"{field} must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
    return name


def _check_strict(strict: Any, field: str) -> bool:
    if strict is not None and not isinstance(strict, bool):
        raise ParameterError(f"{field} must be true or false, got {strict!r}")
    return bool(strict)


def _kind(value: Any) -> str:
    return json.dumps(value) if value is None or isinstance(value, (bool, int, float, str)) else type(value).__name__


# --- llguidance's view of a Tokenizer, built once ---------------------------------------------------------------
_engine_tokenizers: "weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()
_engine_tokenizers_lock = threading.Lock()


def engine_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """The llguidance tokenizer for `tokenizer`, built on first use (~0.7 s for o200k) and kept while `tokenizer`
    lives. Its end tokens are the assistant's stop tokens; `Constraint` decides which one a generation may end on."""
    with _engine_tokenizers_lock:  # server turns run in threads; build once
        built = _engine_tokenizers.get(tokenizer)
        if built is None:
            built = lltokenizer_from_encoding(tokenizer.tiktoken_encoding, n_vocab=tokenizer.n_vocab,
                                              eos_token=sorted(tokenizer.stop_tokens_for_assistant))
            _engine_tokenizers[tokenizer] = built
        return built


# --- one constrained generation ---------------------------------------------------------------------------------
class Constraint:
    """A `Grammar` followed over one generation. Per step: `mask()` (or `apply(logits)`), sample, `consume(token)`.
    The generation ends when `stop_token` is consumed, which is allowed exactly when `accepting`."""

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer, stop_token: int):
        self._llt = engine_tokenizer(tokenizer)
        if stop_token not in self._llt.eos_tokens:
            raise ValueError(f"stop token {stop_token} is not one of the assistant's stop tokens "
                             f"{sorted(self._llt.eos_tokens)}")
        self._matcher = llguidance.LLMatcher(self._llt, grammar.text, log_level=0)
        if self._matcher.is_error():  # limits that depend on the vocabulary
            raise ParameterError(f"{grammar.description}: {self._matcher.get_error()}")
        self.grammar = grammar
        self.stop_token = stop_token
        self.n_vocab = tokenizer.n_vocab
        self._other_stops = [t for t in self._llt.eos_tokens if t != stop_token]
        self._bits = np.zeros((self.n_vocab + 31) // 32, dtype=np.uint32)
        self.finished = False

    @property
    def accepting(self) -> bool:
        """True when the text so far is complete, so the stop token may come next."""
        return self._matcher.is_accepting()

    def bitmask(self) -> np.ndarray:
        """The allowed tokens of the next step as bits: uint32 words, token i is bit i % 32 of word i // 32.
        The array is reused by the next call."""
        if self.finished:
            raise ValueError("the constrained generation has already ended with its stop token")
        bits = self._bits
        self._matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        for t in self._other_stops:
            bits[t >> 5] &= ~np.uint32(1 << (t & 31))
        # llguidance allows the end tokens when its parser accepts; make the rule explicit for the one we use.
        stop_bit = np.uint32(1 << (self.stop_token & 31))
        if self._matcher.is_accepting():
            bits[self.stop_token >> 5] |= stop_bit
        else:
            bits[self.stop_token >> 5] &= ~stop_bit
        return bits

    def mask(self) -> np.ndarray:
        """The allowed tokens of the next step as a bool array over the vocabulary."""
        return np.unpackbits(self.bitmask().view(np.uint8), bitorder="little", count=self.n_vocab).view(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Sets the logits of disallowed tokens to -inf, in place (a 1-D float32 array over the vocabulary)."""
        if logits.shape != (self.n_vocab,) or logits.dtype != np.float32 or not logits.flags.writeable:
            raise ValueError(f"logits must be a writeable float32 array of shape ({self.n_vocab},), got "
                             f"{logits.dtype} {logits.shape}")
        _mask_logits(logits, self.bitmask())
        return logits

    def consume(self, token_id: int) -> None:
        """Advances past `token_id`, which must have been allowed; the stop token ends the generation."""
        token_id = int(token_id)
        if self.finished:
            raise ValueError("the constrained generation has already ended with its stop token")
        if token_id in self._other_stops or (token_id == self.stop_token and not self._matcher.is_accepting()):
            raise ValueError(f"token {token_id} is not allowed here by {self.grammar.description}")
        if not self._matcher.consume_token(token_id):
            raise ValueError(f"token {token_id} is not allowed here by {self.grammar.description}: "
                             f"{self._matcher.get_error()}")
        self.finished = token_id == self.stop_token


@numba.njit(cache=True)
def _mask_logits(logits, bits):
    """-inf where a bit is 0, word by word: a boolean-index store over 201,088 logits costs ~0.8 ms, this ~0.1."""
    n = logits.shape[0]
    for w in range(bits.shape[0]):
        word = bits[w]
        if word == 0xFFFFFFFF:
            continue
        base = w * 32
        for i in range(base, min(base + 32, n)):
            if not (word >> (i - base)) & 1:
                logits[i] = -np.inf
