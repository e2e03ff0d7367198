"""Constrained decoding on llguidance: structured output and forced tool calls, enforced token by token.

What the client asks for becomes a `JsonFormat` (`json_object_format`, `json_schema_format`,
`function_arguments_format`); bad schemas fail there with a `ParameterError` naming the field. `completion_grammar`
puts them in a grammar of the whole Harmony completion after `<|start|>assistant`: reasoning (and, when tools may
be called, preambles) stay free text, and only the final answer, or a call's recipient and arguments, are
constrained, ending on their stop token (`<|return|>`, `<|call|>`). A `Constraint` follows one generation over it:
`apply(logits)` before each sampling step, `consume(token)` after it.

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
from typing import Any, Mapping

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
class JsonFormat:
    """JSON the model must write: a checked schema, whether it is `strict`, and `label` for messages. A response
    format's `name` and `description` are also shown to the model (Harmony's "# Response Formats")."""

    schema: dict
    strict: bool
    label: str
    name: str | None = None
    description: str | None = None

    def lark(self) -> str:
        """The format as a Lark rule body (llguidance's `%json`, its options in the schema's "x-guidance")."""
        return "%json " + json.dumps({**self.schema, "x-guidance": dict(_JSON_OPTIONS, lenient=not self.strict)})


def json_object_format() -> JsonFormat:
    """`response_format: {"type": "json_object"}`: any JSON object."""
    return _checked(JsonFormat({"type": "object"}, False, "a JSON object"), "response_format")


def json_schema_format(spec: Any, field: str = "response_format.json_schema") -> JsonFormat:
    """OpenAI's `json_schema` format, `{"name", "schema", "strict", "description"}` (chat completions'
    `response_format.json_schema`, Responses' `text.format`); `field` is where the request put it."""
    if not isinstance(spec, dict):
        raise ParameterError(f"{field} must be an object with 'name' and 'schema', got {_kind(spec)}")
    name = _check_name(spec.get("name"), f"{field}.name")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ParameterError(f"{field}.schema must be a JSON schema object, got {_kind(schema)}")
    strict = _check_strict(spec.get("strict"), f"{field}.strict")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise ParameterError(f"{field}.description must be a string, got {_kind(description)}")
    fmt = JsonFormat(schema, strict, f"JSON schema {name!r}", name, description)
    return _checked(fmt, f"{field}.schema")


def function_arguments_format(function: Any, field: str = "tools[].function") -> JsonFormat:
    """The arguments of a call to `function` (`{"name", "parameters", "strict"}`): a JSON object matching
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
    return _checked(JsonFormat(schema, strict, f"arguments of {name!r}"), f"{field}.parameters")


def _checked(fmt: JsonFormat, field: str) -> JsonFormat:
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(fmt.schema, overrides=dict(_JSON_OPTIONS,
                                                                                        lenient=not fmt.strict))
    except ValueError as e:
        raise ParameterError(f"{field}: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise ParameterError(f"{field} is not a usable JSON schema: {messages[0]}")
    return fmt


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


# --- the Harmony completion ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grammar:
    """A checked llguidance grammar (its serialized form) and what it enforces, for messages and logs."""

    text: str
    description: str


def completion_grammar(*, answer: JsonFormat | None = None, calls: Mapping[str, JsonFormat] | None = None,
                       call_required: bool = False) -> Grammar:
    """The Harmony completion after `<|start|>assistant` (spec §7): any number of analysis messages (and, when
    `calls` may be made, commentary preambles), free text, then the last message: a final answer in `answer`'s
    format ending in `<|return|>`, or a call to one of `calls` (recipient -> its arguments' format) ending in
    `<|call|>`; with `call_required`, only a call. A call's header may carry its recipient after the channel or
    after the role, with or without `<|constrain|>json`, as the model was trained to write it."""
    if call_required and not calls:
        raise ValueError("a required call needs functions to call")
    if answer is None and not call_required:
        raise ValueError("nothing to constrain: give an answer format or require a call")
    # The header's tail after its recipient: " <|constrain|>json" as openai-harmony renders it, or close forms.
    lines = ['content_type: (" "? <|constrain|> "json" | " json")?',
             "TEXT: /(?s:.*)/",
             "reasoning: <|channel|> \"analysis\" <|message|> TEXT <|end|> <|start|> \"assistant\""]
    lasts, earlier = [], ["reasoning"]
    if not call_required:
        lines.append(f"final: <|channel|> \"final\" <|message|> answer <|return|>\nanswer: {answer.lark()}")
        lasts.append("final")
    if calls:
        earlier.append("preamble")
        lines.append("preamble: <|channel|> \"commentary\" <|message|> TEXT <|end|> <|start|> \"assistant\"")
        for i, (recipient, arguments) in enumerate(calls.items()):
            to = json.dumps(f" to={recipient}")
            lines.append(f"call_{i}: (<|channel|> \"commentary\" {to} | {to} <|channel|> \"commentary\") "
                         f"content_type <|message|> arguments_{i} <|call|>\narguments_{i}: {arguments.lark()}")
            lasts.append(f"call_{i}")
    lines.insert(0, f"start: ({' | '.join(earlier)})* ({' | '.join(lasts)})")
    text = llguidance.LLMatcher.grammar_from_lark("\n".join(lines))
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if is_error:  # the formats were checked one by one; this is a bug in the grammar above
        raise ValueError(f"the completion grammar does not compile: {messages[0]}")
    described = ([f"an answer in {answer.label}"] if answer is not None and not call_required else []) + \
        ([f"a call to {', '.join(calls)}"] if calls else [])
    return Grammar(text, " or ".join(described))


# --- llguidance's view of a Tokenizer, built once ---------------------------------------------------------------
_engine_tokenizers: "weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()
_engine_tokenizers_lock = threading.Lock()


def engine_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """The llguidance tokenizer for `tokenizer`, built on first use (~0.7 s for o200k) and kept while `tokenizer`
    lives. Completion grammars name their stop tokens themselves; llguidance's own end token is `<|endoftext|>`,
    which they never allow."""
    with _engine_tokenizers_lock:  # server turns run in threads; build once
        built = _engine_tokenizers.get(tokenizer)
        if built is None:
            built = lltokenizer_from_encoding(tokenizer.tiktoken_encoding, n_vocab=tokenizer.n_vocab,
                                              eos_token=tokenizer.special_tokens["<|endoftext|>"])
            _engine_tokenizers[tokenizer] = built
        return built


# --- one constrained generation ---------------------------------------------------------------------------------
class Constraint:
    """A `Grammar` followed over one generation. Per step: `apply(logits)` (or `mask()`), sample, `consume(token)`;
    `finished` once the completion's stop token is consumed."""

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer):
        self._matcher = llguidance.LLMatcher(engine_tokenizer(tokenizer), grammar.text, log_level=0)
        if self._matcher.is_error():  # limits that depend on the vocabulary
            raise ParameterError(f"{grammar.description}: {self._matcher.get_error()}")
        self.grammar = grammar
        self.n_vocab = tokenizer.n_vocab
        self._bits = np.zeros((self.n_vocab + 31) // 32, dtype=np.uint32)
        self.finished = False

    def bitmask(self) -> np.ndarray:
        """The allowed tokens of the next step as bits: uint32 words, token i is bit i % 32 of word i // 32.
        The array is reused by the next call."""
        if self.finished:
            raise ValueError("the constrained generation has already ended with its stop token")
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        return self._bits

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
        """Advances past `token_id`, which must have been allowed; a stop token ends the generation."""
        if self.finished:
            raise ValueError("the constrained generation has already ended with its stop token")
        if not self._matcher.consume_token(int(token_id)):
            raise ValueError(f"token {token_id} is not allowed here by {self.grammar.description}: "
                             f"{self._matcher.get_error()}")
        self.finished = self._matcher.is_accepting()


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
