"""Chat on top of generation: Harmony prompts in, reasoning / answer / tool calls out, streamed or whole.

Structured output (`response_format`) and forced calls (`tool_choice`) are enforced token by token over a grammar
of the whole completion (constrain.py); the reasoning stays free. A call to a tool the request did not declare is
not the caller's to run: the turn answers it with `UNDECLARED_TOOL_ERROR` and the model goes on, up to
`MAX_UNDECLARED_CALLS` times, so the caller gets an answer instead.

A `ChatSession` keeps one conversation's KV cache between turns. Each turn's prompt is compared with the tokens
already in the cache; the shared prefix is kept and only the rest is prefilled. Sliding-window layers keep only a
ring of recent positions, so the cache can step back only by restoring the ring snapshot taken when the previous
prompt was prefilled — which is exactly where the next turn's prompt departs from the last generation (Harmony
drops the previous answer's analysis from the history).
"""

from __future__ import annotations

import datetime
import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np

from .constrain import (Constraint, Grammar, JsonFormat, completion_grammar, function_arguments_format,
                        json_object_format, json_schema_format)
from .engine.engine import Engine
from .engine.generate import Generation, StopReason, check_max_tokens
from .engine.kv_cache import KVCache, KVSnapshot
from .engine.sampling import Sampler
from .errors import ParameterError
from .harmony import (DEFAULT_REASONING_EFFORT, REASONING_EFFORTS, ContentDelta, Event, HarmonyParser, PreambleDelta,
                      ReasoningDelta, ResponseFormat, ToolCall, ToolCallBegin, ToolCallDelta, completion_to_message,
                      render_conversation, render_tool_result, tool_functions, tool_recipient)

__all__ = ["ChatRequest", "ChatResponse", "ChatSession", "ChatStream", "Done", "FinishReason", "Usage", "Timing",
           "ReasoningDelta", "ContentDelta", "PreambleDelta", "ToolCallBegin", "ToolCallDelta", "ToolCall",
           "chat_request", "common_prefix"]


class FinishReason(str, enum.Enum):
    """Why a chat turn ended (equal to its value as a string, OpenAI's names)."""

    STOP = "stop"  # the answer ended (<|return|>, or <|end|> without a call)
    LENGTH = "length"  # max_tokens or the end of the context
    TOOL_CALLS = "tool_calls"  # the model called tools and waits for their results (<|call|>)
    CANCELLED = "cancelled"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated tokens, the final stop token included
    reasoning_tokens: int = 0  # of those, the analysis channel's content and end tokens
    cached_tokens: int = 0  # prompt tokens reused from the session's cache, not prefilled again

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timing:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_tokens_per_second: float = 0.0  # over the tokens actually prefilled
    decode_tokens_per_second: float = 0.0
    total_seconds: float = 0.0


@dataclass
class ChatResponse:
    content: str | None  # the final answer (or the preamble when the model only calls tools)
    reasoning: str | None  # the analysis channel
    tool_calls: list[dict[str, Any]]  # OpenAI style: {"id", "type": "function", "function": {"name", "arguments"}}
    finish_reason: FinishReason
    usage: Usage
    timing: Timing
    message: dict[str, Any]  # the assistant message to append to the history for the next turn
    problems: list[str] = field(default_factory=list)  # malformed model output the parser worked around
    undeclared_calls: int = 0  # calls to tools the request did not declare: answered with an error, not reported


@dataclass(frozen=True)
class Done:
    """The last event of a stream."""

    response: ChatResponse


ChatEvent = Union[Event, Done]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share: the one rule for how much of a cached conversation a prompt reuses."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


# What the model is told when it calls a tool the request did not declare; it then answers without it.
UNDECLARED_TOOL_ERROR = "Error: there is no tool {recipient!r} in this conversation. Answer without it."
MAX_UNDECLARED_CALLS = 3  # then the turn ends where the model stopped

TOOL_CHOICES = ("auto", "none", "required")
# The developer instruction a forced call adds, so the reasoning heads where the grammar will go.
_MUST_CALL_ONE = "In this turn you must call one of the functions in the tools list; do not answer directly."
_MUST_CALL = "In this turn you must call the function `{name}`; do not answer directly."


@dataclass(frozen=True)
class ChatRequest:
    """A chat turn rendered once and checked: the Harmony prompt ids, how to sample the answer, the grammar its
    output must follow (None: free), and the recipients of the tools it declares."""

    prompt: list[int]
    sampler: Sampler
    max_tokens: int | None
    grammar: Grammar | None = None
    recipients: frozenset[str] = frozenset()

    def declares(self, recipient: str) -> bool:
        """Whether a call to `recipient` is one the caller can run ("NAME" alone meaning "functions.NAME")."""
        return recipient in self.recipients or f"functions.{recipient}" in self.recipients


def chat_request(engine: Engine, messages: Sequence[Mapping[str, Any]], *,
                 tools: Sequence[Mapping[str, Any]] | None = None,
                 reasoning_effort: str = DEFAULT_REASONING_EFFORT, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0,
                 max_tokens: int | None = None, seed: int | None = None,
                 current_date: str | datetime.date | None = None,
                 response_format: Mapping[str, Any] | JsonFormat | None = None,
                 tool_choice: str | Mapping[str, Any] = "auto") -> ChatRequest:
    """Check a turn's arguments (ParameterError naming the first bad one; the messages' and tools' contents get
    ChatFormatError from the renderer), render the conversation in Harmony and check it fits the context.

    `response_format` is OpenAI's: `{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema":
    {"name", "schema", "strict", "description"}}` (or a `JsonFormat` built already). `tool_choice`: "auto",
    "none" (the tools leave the prompt), "required", or a function: `{"type": "function", "function": {"name"}}`
    (or `{"type": "function", "name"}`)."""
    if not isinstance(messages, (list, tuple)):
        raise ParameterError(f"messages must be a list of message objects, got {type(messages).__name__}")
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise ParameterError(f"tools must be a list of tool objects or None, got {type(tools).__name__}")
    if not isinstance(reasoning_effort, str) or reasoning_effort.lower() not in REASONING_EFFORTS:
        raise ParameterError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                             f"got {reasoning_effort!r:.80}")
    check_max_tokens(max_tokens)
    if current_date is not None and not isinstance(current_date, (str, datetime.date)):
        raise ParameterError(f"current_date must be a 'YYYY-MM-DD' string, a date or None, got {current_date!r:.80}")
    sampler = Sampler(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    answer = _answer_format(response_format)
    functions = tool_functions(tools)
    forced = _forced_calls(tool_choice, functions)
    if tool_choice == "none":
        tools, functions = None, {}
    elif forced:
        instruction = _MUST_CALL.format(name=functions[forced[0]].name) if isinstance(tool_choice, Mapping) \
            else _MUST_CALL_ONE
        messages = list(messages) + [{"role": "developer", "content": instruction}]
    grammar = None
    if answer is not None or forced:
        calls = {r: function_arguments_format(functions[r].function, functions[r].where) for r in forced or functions}
        grammar = completion_grammar(answer=answer, calls=calls, call_required=bool(forced))
    shown = ResponseFormat(answer.name, answer.description, answer.schema) if answer and answer.name else None
    prompt = render_conversation(engine.tokenizer, messages, tools=tools, reasoning_effort=reasoning_effort,
                                 current_date=current_date, response_format=shown)
    engine.check_tokens(prompt)
    return ChatRequest(prompt, sampler, max_tokens, grammar, frozenset(functions))


def _answer_format(response_format: Any) -> JsonFormat | None:
    """The JSON the final answer must be, from OpenAI's `response_format`; None for free text."""
    if response_format is None or isinstance(response_format, JsonFormat):
        return response_format
    if not isinstance(response_format, Mapping):
        raise ParameterError(f"response_format must be an object with a 'type', got {response_format!r:.80}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_format()
    if kind == "json_schema":
        return json_schema_format(response_format.get("json_schema"))
    raise ParameterError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r:.80}")


def _forced_calls(tool_choice: Any, functions: Mapping[str, Any]) -> list[str]:
    """The recipients `tool_choice` makes the model call one of: all the tools' for "required", one for a named
    function, none for "auto" and "none"."""
    if isinstance(tool_choice, str) and tool_choice in TOOL_CHOICES:
        if tool_choice == "required":
            if not functions:
                raise ParameterError("tool_choice 'required' needs tools to call")
            return list(functions)
        return []
    if not isinstance(tool_choice, Mapping) or tool_choice.get("type") != "function":
        raise ParameterError(f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', "
                             f"'function': {{'name': ...}}}}, got {tool_choice!r:.80}")
    fn = tool_choice.get("function", tool_choice)
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or tool_recipient(name) not in functions:
        raise ParameterError(f"tool_choice names function {name!r}, which is not in tools")
    return [tool_recipient(name)]


class ChatSession:
    """One conversation's KV cache, reused across turns for the prefix shared with the previous prompt.
    One turn at a time: `busy` is held while a turn runs."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.cache: KVCache | None = None
        self.tokens: list[int] = []  # the ids whose keys and values are in the cache, in order
        self.snapshot: KVSnapshot | None = None  # taken right after the last prompt was prefilled
        self.snapshot_logits: np.ndarray | None = None  # the logits of that prompt's last token
        self.busy = threading.Lock()

    def reset(self) -> None:
        self.tokens, self.snapshot, self.snapshot_logits = [], None, None
        if self.cache is not None:
            self.cache.length = 0

    def reuse(self, prompt: Sequence[int]) -> tuple[int, np.ndarray | None]:
        """Keep the longest usable prefix of `prompt` in the cache. Returns its length and, when that is the whole
        prompt (the previous prompt again, e.g. to regenerate), the logits to continue from."""
        if self.cache is None:
            self.cache = self.engine.new_cache()
        cache, snap = self.cache, self.snapshot
        common = common_prefix(self.tokens, prompt)
        usable = snap is not None and snap.length <= common and cache.can_restore(snap)
        if usable and snap.length == len(prompt):
            cache.restore(snap)
            self.tokens = self.tokens[:snap.length]
            return snap.length, self.snapshot_logits
        common = min(common, len(prompt) - 1)  # the last prompt token must run to give the first logits
        if cache.can_truncate(common):
            cache.truncate(common)
        elif usable:
            cache.restore(snap)
        else:
            cache.length = 0
        self.tokens = self.tokens[:cache.length]
        return cache.length, None

    def chat(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
             reasoning_effort: str = DEFAULT_REASONING_EFFORT, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, min_p: float = 0.0, max_tokens: int | None = None, seed: int | None = None,
             stream: bool = False, current_date: str | None = None,
             response_format: Mapping[str, Any] | JsonFormat | None = None,
             tool_choice: str | Mapping[str, Any] = "auto") -> "ChatResponse | ChatStream":
        """See `Model.chat`."""
        if not isinstance(stream, bool):
            raise ParameterError(f"stream must be True or False, got {stream!r:.80}")
        request = chat_request(self.engine, messages, tools=tools, reasoning_effort=reasoning_effort,
                               temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                               max_tokens=max_tokens, seed=seed, current_date=current_date,
                               response_format=response_format, tool_choice=tool_choice)
        return self.answer(request, stream=stream)

    def answer(self, request: ChatRequest, *, stream: bool = False) -> "ChatResponse | ChatStream":
        """Run a turn already rendered by `chat_request`: a `ChatStream`, or its `ChatResponse` when not streaming."""
        s = ChatStream(self, request)
        if stream:
            return s
        for _ in s:
            pass
        return s.response


class ChatStream:
    """Iterator of chat events: `ReasoningDelta`, `PreambleDelta`, `ContentDelta`, `ToolCallBegin`,
    `ToolCallDelta`, `ToolCall`, and finally `Done(response)`. `cancel()` (from any thread) or `close()` stops
    generation; a cancelled stream still ends with `Done` (finish_reason "cancelled")."""

    def __init__(self, session: ChatSession, request: ChatRequest):
        self.session = session
        self.request = request
        self.response: ChatResponse | None = None
        self._cancel = threading.Event()
        self._step = threading.Lock()  # one `next` at a time, and `close` waits for the one in progress
        self._events = self._run()

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> ChatEvent:
        with self._step:
            return next(self._events)

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        """Stop and release the session; safe from any thread (it waits for a step in progress to return)."""
        self._cancel.set()
        with self._step:
            self._events.close()

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> Iterator[ChatEvent]:
        session = self.session
        if not session.busy.acquire(blocking=False):
            # The session is in use by another turn (another thread): answer from a fresh, private cache.
            session = ChatSession(session.engine)
            session.busy.acquire()
        try:
            yield from self._turn(session)
        finally:
            session.busy.release()

    def _turn(self, session: ChatSession) -> Iterator[ChatEvent]:
        engine, request = session.engine, self.request
        tok = engine.tokenizer
        t_start = time.perf_counter()
        cached, last_logits = session.reuse(request.prompt)
        cache = session.cache
        parser = HarmonyParser(tok)
        sample = request.sampler
        if request.grammar is not None:
            sample = _constrained(request.sampler, Constraint(request.grammar, tok))
        fed = list(request.prompt)  # every id put in the cache this turn, generated or answered
        generated = reasoning_tokens = answered_tokens = undeclared = 0
        hidden: set[str] = set()  # ids of calls to undeclared tools: not the caller's, not shown
        prompt = np.asarray(request.prompt[cached:], dtype=np.int64)
        prefill_seconds = decode_seconds = 0.0
        decode_steps = 0

        def prefilled(logits: np.ndarray) -> None:
            session.snapshot, session.snapshot_logits = cache.snapshot(), logits

        try:
            while True:
                ids = Generation(engine, cache, prompt, sample, max_tokens=_left(request.max_tokens, generated),
                                 stop_tokens=tok.stop_tokens_for_assistant, should_stop=self._cancel.is_set,
                                 on_prefilled=prefilled if not undeclared else None, last_logits=last_logits,
                                 context=fed[:len(fed) - len(prompt)])
                stats = ids.stats
                try:
                    for token in ids:
                        fed.append(token)
                        generated += 1
                        reasoning_tokens += _in_analysis(parser)
                        yield from _shown(parser.feed(token), request, hidden)
                    if stats.stop_token is not None:
                        generated += 1
                        yield from _shown(parser.feed(stats.stop_token), request, hidden)
                finally:
                    ids.close()
                prefill_seconds += stats.prefill_seconds
                decode_seconds += stats.decode_seconds
                decode_steps += stats.decode_steps
                call = parser.messages[-1] if parser.messages else None
                if (stats.stop_token != tok.call or call is None or call.call_id not in hidden
                        or undeclared == MAX_UNDECLARED_CALLS):
                    break
                # The model called a tool the caller does not have: tell it so, and let it go on.
                undeclared += 1
                answer = render_tool_result(tok, call.recipient,
                                            UNDECLARED_TOOL_ERROR.format(recipient=call.recipient))
                prompt = np.asarray([tok.call] + answer, dtype=np.int64)
                answered_tokens += len(prompt)
                fed += [int(t) for t in prompt]
                last_logits = None
                parser.feed_many(answer[-2:])  # "<|start|>assistant": the next message's header begins
            yield from _shown(parser.finish(), request, hidden)
        finally:
            session.tokens = fed[:cache.length]
        message = completion_to_message([m for m in parser.messages if m.call_id not in hidden])
        calls = message.get("tool_calls", [])
        finish = finish_reason(stats.stop_reason, calls_waiting=bool(calls) and parser.stop_reason == "call")
        timing = Timing(prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                        prefill_tokens_per_second=(len(request.prompt) - cached + answered_tokens) / prefill_seconds
                        if prefill_seconds else 0.0,
                        decode_tokens_per_second=decode_steps / decode_seconds if decode_seconds else 0.0,
                        total_seconds=time.perf_counter() - t_start)
        problems = list(parser.problems)
        if hidden:
            problems.append(f"the model made {len(hidden)} call(s) to tools the request did not declare, answered "
                            f"with an error {undeclared} time(s)" + ("" if undeclared == len(hidden) else
                                                                     "; the turn ended on the last one"))
        usage = Usage(prompt_tokens=len(request.prompt) + answered_tokens, cached_tokens=cached,
                      completion_tokens=generated, reasoning_tokens=reasoning_tokens)
        self.response = ChatResponse(content=message.get("content"), reasoning=message.get("reasoning"),
                                     tool_calls=calls, finish_reason=finish, usage=usage, timing=timing,
                                     message=message, problems=problems, undeclared_calls=len(hidden))
        yield Done(self.response)


def _constrained(sampler: Sampler, constraint: Constraint):
    """`sampler` over the logits `constraint` allows, advancing it past each sampled id."""
    def sample(logits: np.ndarray) -> int:
        token = sampler(constraint.apply(logits.astype(np.float32, copy=True)))  # the session keeps `logits`
        constraint.consume(token)
        return token
    return sample


def _left(max_tokens: int | None, generated: int) -> int | None:
    return None if max_tokens is None else max(max_tokens - generated, 0)


def _shown(events: list[Event], request: ChatRequest, hidden: set[str]) -> Iterator[Event]:
    """`events` without those of calls to tools `request` does not declare (their ids go into `hidden`)."""
    for e in events:
        if isinstance(e, ToolCallBegin) and not request.declares(e.recipient):
            hidden.add(e.id)
        if not isinstance(e, (ToolCallBegin, ToolCallDelta, ToolCall)) or e.id not in hidden:
            yield e


def _in_analysis(parser: HarmonyParser) -> bool:
    """Whether the next token fed to `parser` belongs to an analysis message's content (its end token included)."""
    return parser.state == "content" and parser.current is not None and parser.current.channel == "analysis"


def finish_reason(stop: StopReason, *, calls_waiting: bool) -> FinishReason:
    """A generation's stop reason as a chat turn's finish reason."""
    if stop is StopReason.CANCELLED:
        return FinishReason.CANCELLED
    if stop is StopReason.STOP:
        return FinishReason.TOOL_CALLS if calls_waiting else FinishReason.STOP
    return FinishReason.LENGTH  # max_tokens or the end of the context
