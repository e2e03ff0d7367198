"""What both OpenAI endpoints share: the error type and its JSON form, typed reading of request fields, the chat
turn a request asks for, `tool_choice`, and `stop` sequences."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ChatFormatError, ContextLengthError, OssrtError, ParameterError

MAX_STOP_SEQUENCES = 4  # as OpenAI


class ApiError(Exception):
    """A request that gets an OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_PARAM = re.compile(r"^((?:messages|tools|input|instructions)(?:\[\d+\])?(?:\.[A-Za-z_]+(?:\[\d+\])?)*)")


_MESSAGE_INDEX = re.compile(r"^messages\[(\d+)\]")


def api_error(e: OssrtError, where: list[str] | None = None) -> ApiError:
    """The 400 an expected failure of the chat API becomes, with `param` taken from the message where it names
    the field (e.g. "messages[2].tool_calls[0]: ..."); `where` renames "messages[i]" to the field it came from."""
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, ChatFormatError):
        text = str(e)
        m = _MESSAGE_INDEX.match(text)
        if where is not None and m and int(m.group(1)) < len(where):
            text = where[int(m.group(1))] + text[m.end():]
        m = _PARAM.match(text)
        return ApiError(400, text, param=m.group(1) if m else None, code="invalid_value")
    if isinstance(e, ParameterError):
        return ApiError(400, str(e), code="invalid_value")
    return ApiError(500, str(e), type="server_error")


# --- reading request fields ------------------------------------------------------------------------------------------
_KINDS = {"string": str, "boolean": bool, "integer": int, "number": (int, float), "object": Mapping, "array": list}


def field_of(body: Mapping[str, Any], key: str, kind: str, default: Any = None, *, required: bool = False,
             where: str = "") -> Any:
    """`body[key]` checked against a JSON type ("string", "integer", "number", "boolean", "object", "array", or
    several joined by "|"); null counts as absent. Wrong type or a missing required field: 422."""
    name = f"{where}{key}"
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(422, f"missing required field '{name}'", param=name, code="missing_required_parameter")
        return default
    for k in kind.split("|"):
        t = _KINDS[k]
        if isinstance(value, t) and not (isinstance(value, bool) and k in ("integer", "number")):
            return float(value) if k == "number" else value
    raise ApiError(422, f"'{name}' must be {' or '.join(_article(k) for k in kind.split('|'))}, got "
                        f"{_json_type(value)} {value!r:.60}", param=name, code="invalid_type")


def _article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _json_type(v: Any) -> str:
    for name, t in (("boolean", bool), ("integer", int), ("number", float), ("string", str), ("array", list),
                    ("object", Mapping)):
        if isinstance(v, t):
            return name
    return type(v).__name__


def check_range(name: str, value: float | None, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if value is not None and not ((lo < value if lo_open else lo <= value) and value <= hi):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ApiError(400, f"'{name}' must be in {interval}, got {value:g}", param=name, code="invalid_value")


def max_tokens_field(body: Mapping[str, Any], keys: tuple[str, ...], context_length: int) -> int | None:
    """The output token limit from the first of `keys` present: 1 .. the context length, or None (until done)."""
    for key in keys:
        n = field_of(body, key, "integer")
        if n is not None:
            if not 1 <= n <= context_length:
                raise ApiError(400, f"'{key}' must be between 1 and the context length {context_length}, got {n}",
                               param=key, code="invalid_value")
            return n
    return None


def reasoning_effort(value: str | None, param: str) -> str:
    if value is None:
        return "medium"
    effort = {"minimal": "low", "none": "low"}.get(value.lower(), value.lower())  # gpt-oss has no lower level
    if effort not in ("low", "medium", "high"):
        raise ApiError(400, f"'{param}' must be low, medium or high, got {value!r}", param=param,
                       code="invalid_value")
    return effort


# --- the turn ------------------------------------------------------------------------------------------------------
@dataclass
class Turn:
    """One chat turn as the model runs it: `ChatSession.chat` arguments, plus `stop` strings for the server."""

    messages: list[dict[str, Any]]
    tools: list[Any] | None = None
    reasoning_effort: str = "medium"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    where: list[str] | None = None  # the request field each message came from, when not "messages[i]"

    def chat_kwargs(self) -> dict[str, Any]:
        return dict(tools=self.tools, reasoning_effort=self.reasoning_effort, temperature=self.temperature,
                    top_p=self.top_p, max_tokens=self.max_tokens, seed=self.seed)


def apply_tool_choice(turn: Turn, choice: Any, *, named: str | None) -> None:
    """`tool_choice`: "auto" (default), "none" (the tools leave the prompt), "required" or a named function.
    Decoding cannot be constrained here, so the last two become a developer instruction at the end of the prompt,
    where the model weighs it most; the model may still answer without the call."""
    if choice is None or choice == "auto":
        return
    if choice == "none":
        turn.tools = None
        return
    names = [(t.get("function", t) or {}).get("name") if isinstance(t, Mapping) else None for t in turn.tools or []]
    if not names:
        raise ApiError(400, "'tool_choice' requires 'tools'", param="tool_choice", code="invalid_value")
    if choice == "required":
        text = "In this turn you must call one of the functions in the tools list; do not answer directly."
    elif named is not None:
        if named not in names:
            raise ApiError(400, f"'tool_choice' names function {named!r}, which is not in 'tools'",
                           param="tool_choice", code="invalid_value")
        text = f"In this turn you must call the function `{named}`; do not answer directly."
    else:
        raise ApiError(400, f"'tool_choice' must be 'none', 'auto', 'required' or a function, got {choice!r:.80}",
                       param="tool_choice", code="invalid_value")
    turn.messages = turn.messages + [{"role": "developer", "content": text}]


def stop_field(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(422, "'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop",
                       code="invalid_value")
    return [s for s in stops if s]


class StopMatcher:
    """Cuts streamed text at the first stop sequence. `feed` returns what can be shown now: text that could still
    be the start of a stop sequence is held back until the next piece decides it."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[:min(hits)]
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
