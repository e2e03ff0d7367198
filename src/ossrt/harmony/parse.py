"""The streaming Harmony parser (spec §7.9): generated ids → events (reasoning, preamble and answer text, tool
calls) and messages, lenient on malformed output; `completion_to_message` turns the messages into the assistant
message for chat history.

Each tool call gets its id here, once, when its header arrives: the id travels on `ToolCallBegin`,
`ToolCallDelta` and `ToolCall` and on the call's `ParsedMessage`, so a streamed call and the call in the final
message carry the same id."""

from __future__ import annotations

import codecs
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

from ..tokenizer import Tokenizer
from .constants import CHANNELS, CONSTRAIN, ROLES


@dataclass(frozen=True)
class ReasoningDelta:
    """Chain-of-thought text (`analysis` channel, no recipient). Not for the end user."""

    text: str


@dataclass(frozen=True)
class PreambleDelta:
    """User-visible commentary before tool calls (`commentary` channel, no recipient)."""

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """Final-answer text (`final` channel)."""

    text: str


@dataclass(frozen=True)
class ToolCallBegin:
    """A tool call's header has arrived; its arguments follow as `ToolCallDelta`s. `id` is the call's id
    (`call_` and 24 hex digits), the same on its `ToolCallDelta`s, its `ToolCall` and its `ParsedMessage`."""

    id: str
    name: str
    recipient: str
    channel: str | None
    content_type: str | None


@dataclass(frozen=True)
class ToolCallDelta:
    """Arguments text of the tool call `id`, which is in progress."""

    id: str
    text: str


@dataclass(frozen=True)
class ToolCall:
    """A whole tool call. `name` is the recipient without the `functions.` prefix; `arguments` the message text
    (JSON for function tools). `complete` is False when the output was cut off inside the call."""

    id: str
    name: str
    arguments: str
    recipient: str
    channel: str | None
    content_type: str | None
    complete: bool = True


Event = Union[ReasoningDelta, PreambleDelta, ContentDelta, ToolCallBegin, ToolCallDelta, ToolCall]


@dataclass
class ParsedMessage:
    """One message of a completion. `end` is the token that closed it: "end", "return", "call", "endoftext", or
    None if the output stopped (or a new message began) before its end token. `call_id`: when the message is a
    tool call (an assistant message with a recipient), the id its events carry; else None."""

    role: str
    content: str = ""
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    end: str | None = None
    call_id: str | None = None


def _new_call_id() -> str:
    """An id in OpenAI's form for tool calls."""
    return f"call_{secrets.token_hex(12)}"


def _function_name(recipient: str) -> str:
    """The tool a recipient names: "functions.NAME" -> NAME; other recipients (e.g. "browser.search") as they are."""
    return recipient[len("functions."):] if recipient.startswith("functions.") else recipient


_EXPECT_START, _HEADER, _CONTENT = "expect_start", "header", "content"
_ASCII_WS = re.compile(r"[ \t\n\x0c\r]+")  # Rust's split_ascii_whitespace
_MAX_HEADER_TOKENS = 64  # a header is a few tokens; beyond this the model is writing text without one


class _Route(Enum):
    """Where the text of the message being read goes."""

    REASONING = "reasoning"
    PREAMBLE = "preamble"
    FINAL = "final"
    TOOL = "tool"
    OTHER = "other"  # a message the model wrote as another role: kept in `messages`, not surfaced


_TEXT_EVENTS = {_Route.REASONING: ReasoningDelta, _Route.PREAMBLE: PreambleDelta, _Route.FINAL: ContentDelta}


class HarmonyParser:
    """Streaming parser of generated ids (spec §7.9). `feed(id)` returns the events that id completes; `finish()`
    closes a message cut off by the end of generation. It never raises on model output: whatever is malformed
    is surfaced as well as possible and described in `problems`.

    Start it with `role="assistant"` (the default) when the prompt ended in `<|start|>assistant`, as
    `render_conversation` prompts do; `role=None` expects a `<|start|>` first. `stop_reason` is "return", "call"
    or "endoftext" once a stop token (spec §6) has been seen."""

    def __init__(self, tokenizer: Tokenizer, role: str | None = "assistant"):
        self.tok = tokenizer
        self.messages: list[ParsedMessage] = []
        self.problems: list[str] = []
        self.stop_reason: str | None = None
        self._stops = {tokenizer.end: "end", tokenizer.return_: "return", tokenizer.call: "call",
                       tokenizer.endoftext: "endoftext"}
        self._n = 0  # ids fed, for problem messages
        self._role = role
        self._state = _HEADER if role is not None else _EXPECT_START
        self._header: list[int] = []
        self._msg: ParsedMessage | None = None
        self._route: _Route | None = None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []

    # --- public ---
    @property
    def state(self) -> str:
        """"expect_start", "header" or "content"."""
        return self._state

    @property
    def current(self) -> ParsedMessage | None:
        """The message whose content is arriving (its header is known), else None."""
        return self._msg

    def feed_many(self, ids: Iterable[int]) -> list[Event]:
        events: list[Event] = []
        for i in ids:
            events += self.feed(i)
        return events

    def feed(self, token_id: int) -> list[Event]:
        events: list[Event] = []
        self._n += 1
        try:
            token_id = self.tok.check_id(token_id)
        except ValueError:
            self._problem(f"token {token_id!r} is not a vocabulary id; skipped")
            return events
        stop = self._stops.get(token_id)
        if stop in ("return", "call", "endoftext"):
            self.stop_reason = stop
        if self._state == _EXPECT_START:
            self._expect_start(token_id, stop, events)
        elif self._state == _HEADER:
            self._in_header(token_id, stop, events)
        else:
            self._in_content(token_id, stop, events)
        return events

    def finish(self) -> list[Event]:
        """The end of generation: close a message that is still open (its end token never came)."""
        events: list[Event] = []
        if self._state == _HEADER and self._header:
            if self.tok.channel in self._header or "to=" in self.tok.decode(self._header):
                # A header cut off (by max_tokens): its words are not text the model meant for anyone.
                self._problem("output ended inside a message header; the header was dropped")
                self._header = []
            else:
                self._problem("output ended inside a message header")
                self._header_without_message(None, events)
        elif self._state == _CONTENT:
            self._problem("output ended inside a message (no end token)")
            self._close(None, events)
        self._state = _EXPECT_START
        self._role = None
        return events

    # --- states ---
    def _expect_start(self, t: int, stop: str | None, events: list[Event]) -> None:
        if t == self.tok.start:
            self._state, self._role, self._header = _HEADER, None, []
        elif stop is not None:
            self._problem(f"{self._name(t)} where <|start|> was expected; ignored")
        else:
            # The model skipped "<|start|>assistant" (typically it went straight on with "<|channel|>…").
            self._problem(f"{self._name(t)} where <|start|> was expected; assuming an assistant message")
            self._state, self._role, self._header = _HEADER, "assistant", []
            self._in_header(t, stop, events)

    def _in_header(self, t: int, stop: str | None, events: list[Event]) -> None:
        if t == self.tok.message:
            self._open(self._parse_header(self.tok.decode(self._header), self._role), events)
        elif stop is not None:
            self._problem(f"{self._name(t)} inside a message header (no <|message|>)")
            self._header_without_message(stop, events)
            self._state, self._role = _EXPECT_START, None
        elif t == self.tok.start:
            if self._header:
                self._problem(f"<|start|> inside a message header; dropped {self.tok.decode(self._header)!r}")
            self._role, self._header = None, []
        elif not self.tok.has_string(t):
            self._problem(f"token {t} has no string; skipped")
        else:
            self._header.append(t)
            if len(self._header) > _MAX_HEADER_TOKENS:
                self._problem(f"no <|message|> after {_MAX_HEADER_TOKENS} header tokens; reading them as content")
                self._header_without_message(None, events, keep_open=True)

    def _in_content(self, t: int, stop: str | None, events: list[Event]) -> None:
        if stop is not None:
            if stop == "call" and self._msg.recipient is None:
                self._problem("<|call|> ends a message without a recipient")
            self._close(stop, events)
            self._state, self._role = _EXPECT_START, None
        elif t == self.tok.start:
            self._problem("<|start|> inside a message: the previous message had no end token")
            self._close(None, events)
            self._state, self._role, self._header = _HEADER, None, []
        elif t == self.tok.channel:
            self._problem("<|channel|> inside a message: reading it as a new assistant message")
            self._close(None, events)
            self._state, self._role, self._header = _HEADER, "assistant", [t]
        elif self.tok.is_special(t) or not self.tok.has_string(t):
            self._problem(f"{self._name(t)} inside message content; skipped")
        else:
            self._emit(self._utf8.decode(self.tok.token_bytes(t)), events)

    # --- messages ---
    def _parse_header(self, text: str, role: str | None) -> ParsedMessage:
        """openai-harmony's header rules (spec §7.9), with what it rejects recorded instead."""
        channel, text = self._split_channel(text)
        if CONSTRAIN in text:
            text = text.replace(CONSTRAIN, " " + CONSTRAIN).strip()
        parts = [p for p in _ASCII_WS.split(text) if p]
        name = None
        if role is None:
            first = parts[0] if parts else ""
            if first in ROLES:
                role = first
            elif len(parts) > 1 or first.startswith("to="):
                role, name = "tool", parts.pop(0)
            elif first in CHANNELS and channel is None:
                self._problem(f"header {first!r} lacks <|channel|>; reading it as the channel")
                role, channel = "assistant", parts.pop(0)
            else:
                self._problem(f"message header without a role ({first!r}); assuming assistant")
                role = "assistant"
                if parts:
                    parts.pop(0)
        if parts and parts[0] == role:
            parts.pop(0)
        recipient = content_type = None
        to = [k for k, part in enumerate(parts) if part.startswith("to=")]
        if to:
            # "to=X" names the recipient wherever it stands; what follows it is the content type.
            recipient = parts.pop(to[-1])[3:]
            if parts:
                content_type = parts.pop()
        elif len(parts) == 1:
            # A lone word is a bare recipient (openai-harmony's rule), unless it is a constrained format.
            if parts[0].startswith(CONSTRAIN):
                content_type = parts.pop()
            else:
                recipient = parts.pop()
        elif parts:
            content_type, recipient = parts.pop(), parts.pop()
        if parts:
            self._problem(f"unexpected text in message header ignored: {' '.join(parts)!r}")
        return ParsedMessage(role=role, name=name, channel=channel, recipient=recipient, content_type=content_type)

    def _split_channel(self, text: str) -> tuple[str | None, str]:
        """The channel named after `<|channel|>` (up to whitespace or "<"), and the header text without it."""
        at = text.find("<|channel|>")
        if at < 0:
            return None, text.strip()
        after = text[at + len("<|channel|>"):]
        value = re.match(r"[^\s<]*", after).group()
        if not value:
            self._problem("<|channel|> without a channel name")
        return value or None, (text[:at] + after[len(value):]).strip()

    def _header_without_message(self, stop: str | None, events: list[Event], keep_open: bool = False) -> None:
        """A header that never reached <|message|>: its channel is used, the rest of its text becomes content."""
        channel, text = self._split_channel(self.tok.decode(self._header))
        role = self._role or "assistant"
        if text.split(maxsplit=1)[:1] == [role]:
            text = text[len(role):].lstrip()
        self._header = []
        if not text and not keep_open:
            return
        self._open(ParsedMessage(role=role, channel=channel), events)
        self._emit(text, events)
        if not keep_open:
            self._close(stop, events)

    def _open(self, msg: ParsedMessage, events: list[Event]) -> None:
        self._msg, self._parts, self._header = msg, [], []
        self._state = _CONTENT
        self._utf8.reset()
        recipient = msg.recipient if msg.recipient != "all" else None
        if msg.role != "assistant":
            self._problem(f"the model wrote a message as {msg.name or msg.role!r}; its text is not surfaced")
            self._route = _Route.OTHER
        elif recipient is not None:
            name = _function_name(recipient)
            if recipient.startswith("functions.") and msg.channel != "commentary":
                self._problem(f"function call {name!r} on channel {msg.channel!r} (expected commentary); accepted")
            self._route = _Route.TOOL
            msg.call_id = _new_call_id()
            events.append(ToolCallBegin(msg.call_id, name, recipient, msg.channel, msg.content_type))
        elif msg.channel == "analysis":
            self._route = _Route.REASONING
        elif msg.channel == "commentary":
            self._route = _Route.PREAMBLE
        elif msg.channel == "final":
            self._route = _Route.FINAL
        elif msg.channel is None:
            self._problem("assistant message without a channel; treated as final")
            self._route = _Route.FINAL
        else:
            self._problem(f"unknown channel {msg.channel!r}; treated as reasoning")
            self._route = _Route.REASONING

    def _emit(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        self._parts.append(text)
        if self._route is _Route.TOOL:
            events.append(ToolCallDelta(self._msg.call_id, text))
        elif self._route in _TEXT_EVENTS:
            events.append(_TEXT_EVENTS[self._route](text))

    def _close(self, end: str | None, events: list[Event]) -> None:
        self._emit(self._utf8.decode(b"", final=True), events)
        self._utf8.reset()
        msg = self._msg
        msg.content, msg.end = "".join(self._parts), end
        self.messages.append(msg)
        if self._route is _Route.TOOL:
            events.append(ToolCall(msg.call_id, _function_name(msg.recipient), msg.content, msg.recipient,
                                   msg.channel, msg.content_type, complete=end is not None))
        self._msg, self._route, self._parts = None, None, []

    def _name(self, t: int) -> str:
        return self.tok.decode([t]) if self.tok.is_special(t) else f"token {t}"

    def _problem(self, text: str) -> None:
        self.problems.append(f"at token {self._n}: {text}")


def parse_completion(tokenizer: Tokenizer, ids: Iterable[int], role: str | None = "assistant"
                     ) -> tuple[list[ParsedMessage], list[Event], HarmonyParser]:
    """Parse a whole completion: its messages, all events, and the parser (for `problems`, `stop_reason`)."""
    p = HarmonyParser(tokenizer, role)
    events = p.feed_many(ids)
    events += p.finish()
    return p.messages, events, p


def completion_to_message(messages: Sequence[ParsedMessage]) -> dict[str, Any]:
    """The assistant message (OpenAI style) for chat history: `content` (final answer, or the preamble when the
    completion calls tools), `reasoning` (analysis text), `tool_calls` with the ids the parser gave the calls.
    `render_conversation` renders it back in Harmony form."""
    reasoning, final, preamble, calls = [], [], [], []
    for m in messages:
        if m.role != "assistant":
            continue
        if m.call_id is not None:
            calls.append({"id": m.call_id, "type": "function",
                          "function": {"name": _function_name(m.recipient), "arguments": m.content}})
        elif m.channel == "analysis":
            reasoning.append(m.content)
        elif m.channel == "commentary":
            preamble.append(m.content)
        elif m.channel in ("final", None):
            final.append(m.content)
        else:
            reasoning.append(m.content)
    content = "\n".join(final) if final else ("\n".join(preamble) if preamble else None)
    out: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        out["reasoning"] = "\n".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out
