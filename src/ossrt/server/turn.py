"""The chat turn a request asks for: its messages, `tools` and `tool_choice`, the format of its answer, and how to
sample it; both endpoints build one with `read_turn`, and it renders once, as a `ChatRequest`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..chat import ChatRequest, chat_request
from ..constrain import JsonFormat, json_object_format, json_schema_format
from ..engine.engine import Engine
from ..errors import ParameterError
from .errors import ApiError
from .fields import field_of, number_in_range, objects_of

log = logging.getLogger(__name__)

# Tools OpenAI runs on its side. ossrt cannot run them, and clients send them by default (the Codex CLI sends
# web_search with every request): they are left out of the prompt, with a log line, rather than refused.
HOSTED_TOOL_TYPES = ("web_search", "web_search_preview", "web_search_preview_2025_03_11", "file_search",
                     "code_interpreter", "computer_use_preview", "image_generation", "mcp", "local_shell")

# OpenAI's sampling defaults, and its ranges (top_p 0 would sample nothing).
DEFAULT_TEMPERATURE, TEMPERATURE_RANGE = 1.0, (0.0, 2.0)
DEFAULT_TOP_P, TOP_P_RANGE = 1.0, (0.0, 1.0)


@dataclass
class Turn:
    """One chat turn as the server runs it: what `chat_request` renders, plus `stop` strings for the server and,
    for error messages, the request field each message came from (`where`, when not "messages[i]")."""

    messages: list[dict[str, Any]]
    tools: list[Any] | None
    tool_choice: str | dict[str, Any]  # chat_request's forms
    response_format: JsonFormat | None
    reasoning_effort: str
    temperature: float
    top_p: float
    max_tokens: int | None
    seed: int | None
    stop: list[str] = field(default_factory=list)
    where: list[str] | None = None
    cache_key: str | None = None  # which pooled KV cache to prefer (`prompt_cache_key`, or a stored chain's)

    def chat_request(self, engine: Engine) -> ChatRequest:
        """The turn rendered in Harmony and checked (ChatFormatError, ContextLengthError, ParameterError)."""
        return chat_request(engine, self.messages, tools=self.tools, reasoning_effort=self.reasoning_effort,
                            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                            seed=self.seed, response_format=self.response_format, tool_choice=self.tool_choice)


def read_turn(body: Mapping[str, Any], messages: list[dict[str, Any]], *, flat: bool, reasoning_effort: str,
              max_tokens: int | None, response_format: JsonFormat | None = None, stop: list[str] | None = None,
              where: list[str] | None = None) -> Turn:
    """The turn of `messages`: with the request's `tools` and `tool_choice` (`flat`: the Responses API's forms)
    and the sampling fields both APIs share (temperature, top_p, seed)."""
    tools = tools_field(body, flat=flat)
    temperature = number_in_range(body, "temperature", DEFAULT_TEMPERATURE, *TEMPERATURE_RANGE)
    top_p = number_in_range(body, "top_p", DEFAULT_TOP_P, *TOP_P_RANGE, lo_open=True)
    seed = field_of(body, "seed", "integer")
    choice = tool_choice(body, tools, flat=flat)
    return Turn(messages, tools, choice, response_format, reasoning_effort, temperature, top_p, max_tokens, seed,
                stop or [], where, field_of(body, "prompt_cache_key", "string"))


def answer_format(fmt: Mapping[str, Any] | None, field: str, *, flat: bool) -> JsonFormat | None:
    """The JSON an answer must be, from chat's `response_format` or the Responses API's `text.format` (`flat`: the
    json_schema's fields beside "type" instead of in "json_schema"); None for text. A bad schema is a 400 naming
    `field`."""
    if fmt is None:
        return None
    kind = field_of(fmt, "type", "string", "text", where=f"{field}.")
    try:
        if kind == "json_object":
            return json_object_format()
        if kind == "json_schema":
            if flat:
                return json_schema_format(dict(fmt), field)
            return json_schema_format(field_of(fmt, "json_schema", "object", required=True, where=f"{field}."),
                                      f"{field}.json_schema")
    except ParameterError as e:  # its message begins with the field at fault
        raise ApiError(400, str(e), param=str(e).split(" ", 1)[0].rstrip(":"), code="invalid_value") from None
    if kind != "text":
        raise ApiError(400, f"'{field}.type' must be 'text', 'json_object' or 'json_schema', got {kind!r:.40}",
                       param=f"{field}.type", code="invalid_value")
    return None


def tools_field(body: Mapping[str, Any], *, flat: bool) -> list[Any] | None:
    """`tools`, with every field's JSON type checked (422) so the renderer and `tool_choice` read well-formed objects;
    names and schemas are checked when rendering (400). Chat nests the function (`{"type": "function", "function":
    {"name", "description", "parameters"}}`); the Responses API's tools are `flat`, but may nest too. Returns the
    function and namespace tools: hosted ones are left out, other types refused."""
    tools = field_of(body, "tools", "array")
    functions, hosted = [], []
    for at, t in objects_of(tools or [], "tools"):
        kind = field_of(t, "type", "string", required=True, where=f"{at}.")
        if kind in HOSTED_TOOL_TYPES:
            hosted.append(kind)
            continue
        if kind == "namespace":  # its own Harmony namespace (the Codex CLI's multi_agent_v1, MCP servers' tools)
            field_of(t, "name", "string", required=True, where=f"{at}.")
            field_of(t, "description", "string", where=f"{at}.")
            for inner_at, inner in objects_of(field_of(t, "tools", "array", required=True, where=f"{at}."),
                                              f"{at}.tools"):
                if field_of(inner, "type", "string", "function", where=f"{inner_at}.") != "function":
                    raise ApiError(400, f"'{inner_at}': a namespace holds function tools only",
                                   param=f"{inner_at}.type", code="unsupported_value")
                _function_fields(inner, f"{inner_at}.")
            functions.append(t)
            continue
        if kind != "function":
            raise ApiError(400, f"'{at}': tools of type {kind!r:.40} are not supported; only 'function' tools",
                           param=f"{at}.type", code="unsupported_value")
        if flat and "function" not in t:
            _function_fields(t, f"{at}.")
        else:
            _function_fields(field_of(t, "function", "object", required=True, where=f"{at}."), f"{at}.function.")
        functions.append(t)
    if hosted:
        log.info("tools of type %s left out: ossrt cannot run OpenAI's hosted tools", ", ".join(sorted(set(hosted))))
    return functions if tools is not None else None


def _function_fields(fn: Mapping[str, Any], where: str) -> None:
    field_of(fn, "name", "string", required=True, where=where)
    field_of(fn, "description", "string", where=where)
    field_of(fn, "parameters", "object", where=where)
    field_of(fn, "strict", "boolean", where=where)


def tool_choice(body: Mapping[str, Any], tools: list[Any] | None, *, flat: bool) -> str | dict[str, Any]:
    """`tool_choice`, checked, in chat_request's forms: "auto" (default), "none", "required", or a named function
    (`{"type": "function", "function": {"name": ...}}`; `flat` in the Responses API: `{"type": "function", "name":
    ...}`). `tools` has passed `tools_field`."""
    choice = field_of(body, "tool_choice", "string|object", "auto")
    if choice in ("auto", "none"):
        return choice
    named = None
    if isinstance(choice, Mapping):
        kind = field_of(choice, "type", "string", required=True, where="tool_choice.")
        if kind != "function":
            raise ApiError(400, f"'tool_choice' of type {kind!r:.40} is not supported; only 'function'",
                           param="tool_choice.type", code="unsupported_value")
        fn, where = (choice, "tool_choice.") if flat else (
            field_of(choice, "function", "object", required=True, where="tool_choice."), "tool_choice.function.")
        named = field_of(fn, "name", "string", required=True, where=where)
    elif choice != "required":
        raise ApiError(400, f"'tool_choice' must be 'none', 'auto', 'required' or a function, got {choice!r:.80}",
                       param="tool_choice", code="invalid_value")
    names = [(t["function"] if "function" in t else t)["name"] for t in tools or []]
    if not names:
        raise ApiError(400, "'tool_choice' requires 'tools'", param="tool_choice", code="invalid_value")
    if named is None:
        return "required"
    if named in names:
        return {"type": "function", "function": {"name": named}}
    raise ApiError(400, f"'tool_choice' names function {named!r}, which is not in 'tools'", param="tool_choice",
                   code="invalid_value")
