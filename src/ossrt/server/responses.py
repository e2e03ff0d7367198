"""POST /v1/responses: input items as chat messages, and chat events as Responses output items and stream events.

Output items follow the Harmony messages in order: `reasoning` (analysis, as `reasoning_text` content), `message`
(a preamble with phase "commentary", the answer with phase "final_answer") and `function_call`. Sending them back
as input, with `function_call_output` items, continues the conversation; so does `previous_response_id` when the
server stores responses (server/store.py); reasoning may travel sealed (`encrypted_content`, server/sealing.py)."""

from __future__ import annotations

import time
from typing import Any, Mapping, NamedTuple

from ..chat import (ChatResponse, ContentDelta, FinishReason, PreambleDelta, ReasoningDelta, ToolCall, ToolCallBegin,
                    ToolCallDelta)
from .errors import ApiError
from .fields import field_of, max_tokens_field, objects_of, reasoning_effort_field
from .ids import new_id
from .sealing import Sealer
from .store import MissingResponseError, ResponseStore
from .turn import Turn, answer_format, read_turn

_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")
ENCRYPTED_REASONING = "reasoning.encrypted_content"  # the `include` entry asking for sealed reasoning
# gpt-oss has no summarizer: any requested summary is the reasoning text itself, for clients that show only summaries.
REASONING_SUMMARIES = ("auto", "concise", "detailed")


class ResponsesRequest(NamedTuple):
    turn: Turn
    stream: bool
    echo: dict[str, Any]  # the request fields a Response object echoes
    sealed: bool  # reasoning items carry their text sealed (`include: ["reasoning.encrypted_content"]`)
    items: list[dict[str, Any]]  # this request's own input items, as stored
    previous_response_id: str | None
    store: bool


def parse_responses_request(body: Mapping[str, Any], context_length: int, sealer: Sealer,
                            store: ResponseStore | None) -> ResponsesRequest:
    """The request, its conversation continuing a stored response's when it names `previous_response_id`;
    `sealer` opens reasoning earlier turns sealed."""
    previous = field_of(body, "previous_response_id", "string")
    if previous is not None and store is None:
        raise ApiError(400, "previous_response_id needs stored responses, and this server stores none (--no-store); "
                            "send the whole conversation as 'input'", param="previous_response_id",
                       code="unsupported_value")
    if field_of(body, "background", "boolean", False):
        raise ApiError(400, "background responses are not supported", param="background", code="unsupported_value")
    text_format = field_of(field_of(body, "text", "object", {}), "format", "object", where="text.")
    answer = answer_format(text_format, "text.format", flat=True)
    instructions = field_of(body, "instructions", "string")
    value = field_of(body, "input", "string|array", required=True)
    items = [_stored_item(i) for i in ([{"role": "user", "content": value}] if isinstance(value, str) else value)]
    earlier = []
    if previous is not None:
        try:
            earlier = store.chain(previous)
        except MissingResponseError as e:
            raise ApiError(404, str(e), param="previous_response_id", code="not_found") from None
    messages, where = input_messages(earlier + items, instructions, sealer, store)
    include = field_of(body, "include", "array", [])
    for i, entry in enumerate(include):
        if not isinstance(entry, str):
            raise ApiError(422, f"'include[{i}]' must be a string", param=f"include[{i}]", code="invalid_type")
    reasoning = field_of(body, "reasoning", "object", {})
    summary = field_of(reasoning, "summary", "string", where="reasoning.")
    if summary not in (None, *REASONING_SUMMARIES):
        raise ApiError(400, f"'reasoning.summary' must be {', '.join(REASONING_SUMMARIES)} or null, got {summary!r}",
                       param="reasoning.summary", code="invalid_value")
    turn = read_turn(body, messages, flat=True,
                     reasoning_effort=reasoning_effort_field(reasoning, "effort", where="reasoning."),
                     max_tokens=max_tokens_field(body, ("max_output_tokens",), context_length),
                     response_format=answer, where=where)
    if turn.cache_key is None and previous is not None:  # the chain's turns prefer the cache its last turn used
        turn.cache_key = store.session_hint(previous)
    echo = {"instructions": instructions, "max_output_tokens": turn.max_tokens, "temperature": turn.temperature,
            "top_p": turn.top_p, "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
            "reasoning": {"effort": turn.reasoning_effort, "summary": summary},
            "metadata": field_of(body, "metadata", "object", {}), "previous_response_id": previous,
            "text": {"format": text_format or {"type": "text"}}}
    return ResponsesRequest(turn, field_of(body, "stream", "boolean", False), echo, ENCRYPTED_REASONING in include,
                            items, previous, field_of(body, "store", "boolean", True) and store is not None)


def input_messages(value: str | list, instructions: str | None, sealer: Sealer,
                   store: ResponseStore | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Chat messages for `input`, and for each message the request field it came from (for error messages).
    Reasoning, assistant messages and function calls in a row become one assistant message. With a `store`, an
    `item_reference` is the stored output item it names, and a reasoning item sent back by id alone gets its
    stored text."""
    msgs: list[dict[str, Any]] = []
    where: list[str] = []
    if instructions is not None:
        msgs.append({"role": "developer", "content": instructions})
        where.append("instructions")
    if isinstance(value, str):
        return msgs + [{"role": "user", "content": value}], where + ["input"]
    pending: dict[str, Any] | None = None
    pending_at = ""

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            msgs.append(pending)
            where.append(pending_at)
        pending = None

    for at, item in objects_of(value, "input"):
        kind = field_of(item, "type", "string", "message", where=f"{at}.")
        if kind == "item_reference":
            item = _stored_output_item(field_of(item, "id", "string", required=True, where=f"{at}."), at, store)
            kind = item.get("type")
        if kind == "message":
            role = field_of(item, "role", "string", required=True, where=f"{at}.")
            if role not in _ROLES:
                raise ApiError(400, f"'{at}.role' must be one of {', '.join(_ROLES)}, got {role!r}",
                               param=f"{at}.role", code="invalid_value")
            text = _text(field_of(item, "content", "string|array", required=True, where=f"{at}."), f"{at}.content")
            if role != "assistant":
                flush()
                msgs.append({"role": role, "content": text})
                where.append(at)
                continue
            if pending is not None and (pending.get("content") or pending.get("tool_calls")):
                flush()
            if pending is None:
                pending, pending_at = {"role": "assistant"}, at
            pending["content"] = text
        elif kind == "reasoning":
            # The reasoning text itself ("content"), else what this server sealed, else its summary: the model
            # reads any of them as its analysis. A sealed text another key made (or altered) is passed over.
            content, summary = _reasoning_text(item, "content", at), _reasoning_text(item, "summary", at)
            sealed = field_of(item, "encrypted_content", "string", where=f"{at}.")
            text = content or (sealed is not None and sealer.open(sealed)) or summary
            if not text and sealed is None and isinstance(item.get("id"), str) and store is not None:
                stored = store.output_item(item["id"])  # a client that sends back only the ids of stored items
                text = _reasoning_text(stored, "content", at) if stored and stored.get("type") == "reasoning" else ""
            if not text and sealed is not None:
                raise ApiError(400, f"'{at}.encrypted_content' was not made by this server (or was altered): send "
                                    f"the reasoning as 'content', or leave the item out",
                               param=f"{at}.encrypted_content", code="invalid_encrypted_content")
            if pending is not None and (pending.get("content") or pending.get("tool_calls")):
                flush()
            if pending is None:
                pending, pending_at = {"role": "assistant"}, at
            pending["reasoning"] = text
        elif kind == "function_call":
            name = field_of(item, "name", "string", required=True, where=f"{at}.")
            namespace = field_of(item, "namespace", "string", where=f"{at}.")
            call = {"id": field_of(item, "call_id", "string", required=True, where=f"{at}."), "type": "function",
                    "function": {"name": name if namespace is None else f"{namespace}.{name}",
                                 "arguments": field_of(item, "arguments", "string", "", where=f"{at}.")}}
            if pending is None:
                pending, pending_at = {"role": "assistant"}, at
            pending.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            flush()
            call_id = field_of(item, "call_id", "string", required=True, where=f"{at}.")
            output = field_of(item, "output", "string|array", required=True, where=f"{at}.")
            msgs.append({"role": "tool", "tool_call_id": call_id, "content": _text(output, f"{at}.output")})
            where.append(at)
        else:
            raise ApiError(400, f"'{at}': input items of type {kind!r} are not supported (message, reasoning, "
                                f"function_call, function_call_output, item_reference)", param=f"{at}.type",
                           code="unsupported_value")
    flush()
    return msgs, where


def _stored_output_item(item_id: str, at: str, store: ResponseStore | None) -> dict[str, Any]:
    stored = store.output_item(item_id) if store is not None else None
    if stored is None:
        why = "is not stored" if store is not None else "cannot be found: this server stores no responses (--no-store)"
        raise ApiError(400, f"'{at}.id': item {item_id!r} {why}", param=f"{at}.id", code="invalid_value")
    return stored


def _text(content: str | list, at: str) -> str:
    """A message's text: a string, or text parts concatenated."""
    if isinstance(content, str):
        return content
    out = []
    for where, p in objects_of(content, at):
        kind = field_of(p, "type", "string", required=True, where=f"{where}.")
        if kind not in _TEXT_PARTS:
            raise ApiError(400, f"'{where}': only text parts ({', '.join(_TEXT_PARTS)}) are supported, got "
                                f"{kind!r:.40}", param=f"{where}.type", code="unsupported_value")
        out.append(field_of(p, "text", "string", required=True, where=f"{where}."))
    return "".join(out)


def _reasoning_text(item: Mapping[str, Any], key: str, at: str) -> str:
    """The text of a reasoning item's `content` or `summary` parts (`{"type": ..., "text": ...}`), concatenated."""
    out = []
    for where, p in objects_of(field_of(item, key, "array", [], where=f"{at}."), f"{at}.{key}"):
        out.append(field_of(p, "text", "string", required=True, where=f"{where}."))
    return "".join(out)


def _stored_item(item: Any) -> Any:
    """An input item as OpenAI lists it back: a message's text content as one text part."""
    if not isinstance(item, Mapping):
        return item  # input_messages names what is wrong with it
    item = dict(item)
    if item.get("type", "message") == "message" and isinstance(item.get("content"), str):
        part = "output_text" if item.get("role") == "assistant" else "input_text"
        item.update(type="message", content=[{"type": part, "text": item["content"]}])
    return item


class Outcome(NamedTuple):
    status: str  # the Response's
    item_status: str  # of the output item open at the end
    event: str  # the stream's last event
    incomplete_details: dict[str, Any] | None


# How each way a turn ends reads in the Responses API. A cancelled turn (the client left, or the server is
# stopping) has no event of its own.
OUTCOMES = {
    FinishReason.STOP: Outcome("completed", "completed", "response.completed", None),
    FinishReason.TOOL_CALLS: Outcome("completed", "completed", "response.completed", None),
    FinishReason.LENGTH: Outcome("incomplete", "incomplete", "response.incomplete", {"reason": "max_output_tokens"}),
    FinishReason.CANCELLED: Outcome("cancelled", "incomplete", "response.failed", None),
}


FINAL_EVENTS = frozenset(o.event for o in OUTCOMES.values())  # a stream's last events, each with the Response


class ResponsesOutput:
    """Turns one generation's events into Responses stream events (`start`, `event`, `finish`) and its end into a
    Response object (`result`); the output items are built the same way for both."""

    stopped = False  # the Responses API has no stop sequences
    named_events = True

    def __init__(self, model_id: str, echo: dict[str, Any], sealer: Sealer | None = None):
        self.model_id, self.echo = model_id, echo
        self.sealer = sealer  # seals each reasoning item's text into its `encrypted_content`
        self.id = new_id("resp_")
        self.created_at = int(time.time())
        self.items: list[dict[str, Any]] = []
        self.seq = 0
        self.kind: str | None = None  # of the open item: "reasoning", "preamble", "final", "call"
        self.summary = echo.get("reasoning", {}).get("summary") is not None  # reasoning also as a summary_text
        self.text: list[str] = []  # the open item's text so far

    def _ev(self, type: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": type, "sequence_number": self.seq - 1, **fields}

    def response(self, r: ChatResponse | None = None) -> dict[str, Any]:
        """The Response object: in progress, or the finished turn `r`."""
        out = {"id": self.id, "object": "response", "created_at": self.created_at, "status": "in_progress",
               "model": self.model_id, "output": [dict(i) for i in self.items], "error": None,
               "incomplete_details": None, "parallel_tool_calls": True,
               "truncation": "disabled", "usage": None, **self.echo}
        if r is not None:
            u = r.usage
            outcome = OUTCOMES[r.finish_reason]
            out["status"], out["incomplete_details"] = outcome.status, outcome.incomplete_details
            out["usage"] = {"input_tokens": u.prompt_tokens,
                            "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
                            "output_tokens": u.completion_tokens,
                            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
                            "total_tokens": u.total_tokens}
        return out

    def start(self) -> list[dict[str, Any]]:
        return [self._ev("response.created", response=self.response()),
                self._ev("response.in_progress", response=self.response())]

    def _place(self) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    def _open(self, kind: str) -> list[dict[str, Any]]:
        out = self._close()
        self.kind, self.text = kind, []
        if kind == "reasoning":
            item = {"type": "reasoning", "id": new_id("rs_"), "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"type": "message", "id": new_id("msg_"), "role": "assistant", "status": "in_progress",
                    "content": [], "phase": "commentary" if kind == "preamble" else "final_answer"}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.items.append(item)
        out += [self._ev("response.output_item.added", output_index=len(self.items) - 1, item=dict(item))]
        if kind == "reasoning" and self.summary:
            out.append(self._ev("response.reasoning_summary_part.added", **self._place(), summary_index=0,
                                part={"type": "summary_text", "text": ""}))
        return out + [self._ev("response.content_part.added", **self._place(), content_index=0, part=part)]

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        kind, self.kind = self.kind, None
        if kind is None or kind == "call":
            return []
        item, text = self.items[-1], "".join(self.text)
        summary_done = []
        if kind == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            done = self._ev("response.reasoning_text.done", **self._place(), content_index=0, text=text)
            if self.sealer is not None:
                item["encrypted_content"] = self.sealer.seal(text)
            if self.summary:
                item["summary"] = [{"type": "summary_text", "text": text}]
                summary_done = [
                    self._ev("response.reasoning_summary_text.done", **self._place(), summary_index=0, text=text),
                    self._ev("response.reasoning_summary_part.done", **self._place(), summary_index=0,
                             part=dict(item["summary"][0]))]
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            done = self._ev("response.output_text.done", **self._place(), content_index=0, text=text, logprobs=[])
        item["content"], item["status"] = [part], status
        return [done, self._ev("response.content_part.done", **self._place(), content_index=0, part=part),
                *summary_done,
                self._ev("response.output_item.done", output_index=len(self.items) - 1, item=dict(item))]

    def event(self, e: Any) -> list[dict[str, Any]]:
        if isinstance(e, (ReasoningDelta, PreambleDelta, ContentDelta)):
            kind = ("reasoning" if isinstance(e, ReasoningDelta) else
                    "preamble" if isinstance(e, PreambleDelta) else "final")
            out = self._open(kind) if self.kind != kind else []
            self.text.append(e.text)
            if kind == "reasoning":
                out.append(self._ev("response.reasoning_text.delta", **self._place(), content_index=0, delta=e.text))
                if self.summary:
                    out.append(self._ev("response.reasoning_summary_text.delta", **self._place(), summary_index=0,
                                        delta=e.text))
                return out
            return out + [self._ev("response.output_text.delta", **self._place(), content_index=0, delta=e.text,
                                   logprobs=[])]
        if isinstance(e, ToolCallBegin):
            out = self._close()
            self.kind = "call"
            item = {"type": "function_call", "id": new_id("fc_"), "call_id": e.id, "name": e.name, "arguments": "",
                    "status": "in_progress"}
            if "." in e.name:  # a call into a namespace tool: its name and namespace apart, as OpenAI's API has them
                item["namespace"], item["name"] = e.name.split(".", 1)
            self.items.append(item)
            return out + [self._ev("response.output_item.added", output_index=len(self.items) - 1, item=dict(item))]
        if isinstance(e, ToolCallDelta):
            self.items[-1]["arguments"] += e.text
            return [self._ev("response.function_call_arguments.delta", **self._place(), delta=e.text)]
        if isinstance(e, ToolCall):
            item = self.items[-1]
            item["arguments"], item["status"] = e.arguments, "completed" if e.complete else "incomplete"
            self.kind = None
            return [self._ev("response.function_call_arguments.done", **self._place(), arguments=e.arguments),
                    self._ev("response.output_item.done", output_index=len(self.items) - 1, item=dict(item))]
        return []

    def finish(self, r: ChatResponse) -> list[dict[str, Any]]:
        outcome = OUTCOMES[r.finish_reason]
        return self._close(outcome.item_status) + [self._ev(outcome.event, response=self.response(r))]

    def result(self, r: ChatResponse) -> dict[str, Any]:
        self._close(OUTCOMES[r.finish_reason].item_status)
        return self.response(r)

    def error(self, err: ApiError) -> dict[str, Any]:
        return self._ev("error", code=err.code, message=err.message, param=err.param)
