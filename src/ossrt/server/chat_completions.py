"""POST /v1/chat/completions: the request as a `Turn`, and chat events as a completion or as SSE chunks.

Reasoning goes out as `reasoning_content`, mirrored as `reasoning` (the two names clients read), never in
`content`. A preamble (commentary text before tool calls) streams as content; a non-streamed reply carries it as
content only when there is no final answer, like `ChatResponse.content`."""

from __future__ import annotations

import time
from typing import Any, Mapping

from ..chat import (ChatResponse, ContentDelta, FinishReason, PreambleDelta, ReasoningDelta, ToolCall, ToolCallBegin,
                    ToolCallDelta)
from .errors import ApiError
from .fields import field_of, max_tokens_field, objects_of, reasoning_effort_field
from .ids import new_id
from .stop import StopMatcher, stop_field
from .turn import Turn, answer_format, read_turn

# Chat Completions has no "cancelled": a turn is cancelled when a stop sequence appeared (or the client left).
FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.TOOL_CALLS: "tool_calls",
                  FinishReason.CANCELLED: "stop"}


def parse_chat_request(body: Mapping[str, Any], context_length: int) -> tuple[Turn, bool, bool]:
    """The turn, `stream`, and `stream_options.include_usage`."""
    messages = field_of(body, "messages", "array", required=True)
    if not messages:
        raise ApiError(400, "'messages' must not be empty", param="messages", code="invalid_value")
    check_messages(messages)
    n = field_of(body, "n", "integer", 1)
    if n != 1:
        raise ApiError(400, f"only n=1 is supported, got {n}", param="n", code="unsupported_value")
    if field_of(body, "logprobs", "boolean", False):
        raise ApiError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")
    turn = read_turn(body, list(messages), flat=False,
                     reasoning_effort=reasoning_effort_field(body, "reasoning_effort"),
                     max_tokens=max_tokens_field(body, ("max_completion_tokens", "max_tokens"), context_length),
                     response_format=answer_format(field_of(body, "response_format", "object"), "response_format",
                                                   flat=False),
                     stop=stop_field(body))
    stream = field_of(body, "stream", "boolean", False)
    options = field_of(body, "stream_options", "object", {})
    include_usage = field_of(options, "include_usage", "boolean", False, where="stream_options.")
    return turn, stream, include_usage


def check_messages(messages: list[Any]) -> None:
    """The JSON types of every message field the renderer reads (422 naming the field); the values (roles, tool
    call ids, ...) are the renderer's to check (400)."""
    for at, m in objects_of(messages, "messages"):
        field_of(m, "role", "string", required=True, where=f"{at}.")
        for key in ("name", "tool_call_id", "reasoning", "reasoning_content"):
            field_of(m, key, "string", where=f"{at}.")
        content = field_of(m, "content", "string|array", where=f"{at}.")
        for where, part in objects_of(content if isinstance(content, list) else [], f"{at}.content"):
            if field_of(part, "type", "string", required=True, where=f"{where}.") == "text":
                field_of(part, "text", "string", required=True, where=f"{where}.")
        for where, call in objects_of(field_of(m, "tool_calls", "array", [], where=f"{at}."), f"{at}.tool_calls"):
            field_of(call, "id", "string", where=f"{where}.")
            field_of(call, "type", "string", where=f"{where}.")
            fn = field_of(call, "function", "object", required=True, where=f"{where}.")
            field_of(fn, "name", "string", required=True, where=f"{where}.function.")
            field_of(fn, "arguments", "string", where=f"{where}.function.")


def usage(r: ChatResponse) -> dict[str, Any]:
    u = r.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


class ChatCompletion:
    """Turns one generation's events into `chat.completion.chunk`s (`start`, `event`, `finish`) and its end
    into a `chat.completion` (`result`). `stopped` is set when a stop sequence appeared: generation should end."""

    named_events = False  # "data:" lines only, then "data: [DONE]"

    def __init__(self, model_id: str, stop: list[str], include_usage: bool = False):
        self.model_id = model_id
        self.id = new_id("chatcmpl-")
        self.created = int(time.time())
        self.include_usage = include_usage
        self.matcher = StopMatcher(stop)
        self.content: list[str] = []  # what went out as content, stop sequences applied
        self.calls: list[ToolCallBegin] = []  # the tool calls streamed so far
        self.complete: set[str] = set()  # the ids of those whose arguments ended

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def event(self, e: Any) -> list[dict[str, Any]]:
        if self.stopped:
            return []
        if isinstance(e, ReasoningDelta):
            return [self._chunk({"reasoning_content": e.text, "reasoning": e.text})]
        if isinstance(e, (ContentDelta, PreambleDelta)):
            text = self.matcher.feed(e.text)
            self.content.append(text)
            return [self._chunk({"content": text})] if text else []
        if isinstance(e, ToolCallBegin):
            self.calls.append(e)
            return [self._chunk({"tool_calls": [{"index": len(self.calls) - 1, "id": e.id, "type": "function",
                                                 "function": {"name": e.name, "arguments": ""}}]})]
        if isinstance(e, ToolCallDelta):
            return [self._chunk({"tool_calls": [{"index": len(self.calls) - 1,
                                                 "function": {"arguments": e.text}}]})]
        if isinstance(e, ToolCall) and e.complete:
            self.complete.add(e.id)
        return []

    def finish_reason(self, r: ChatResponse) -> str:
        return "stop" if self.stopped else FINISH_REASONS[r.finish_reason]

    def finish(self, r: ChatResponse) -> list[dict[str, Any]]:
        out = []
        rest = self.matcher.flush()
        if rest:
            self.content.append(rest)
            out.append(self._chunk({"content": rest}))
        out.append(self._chunk({}, self.finish_reason(r)))
        if self.include_usage:
            out.append({**self._chunk({}), "choices": [], "usage": usage(r)})
        return out

    def result(self, r: ChatResponse) -> dict[str, Any]:
        self.matcher.flush()
        message: dict[str, Any] = {"role": "assistant"}
        if self.stopped:
            message["content"] = "".join(self.content)
            calls = [c for c in r.tool_calls if c["id"] in self.complete]  # the calls the client saw whole
        else:
            message["content"] = r.content
            calls = r.tool_calls
        if calls:
            message["tool_calls"] = calls
        if r.reasoning is not None:
            message["reasoning_content"] = message["reasoning"] = r.reasoning
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": self.finish_reason(r)}],
                "usage": usage(r)}

    def error(self, err: ApiError) -> dict[str, Any]:
        return err.body()
