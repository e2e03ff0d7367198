"""What both OpenAI endpoints share: the error type and its JSON form, the request body (content type, JSON),
typed reading of request fields, the chat turn a request asks for, `tools`, `tool_choice`, and `stop` sequences."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ChatFormatError, ContextLengthError, ModelOutputError, OssrtError, ParameterError

MAX_STOP_SEQUENCES = 4  # as OpenAI
# Deeper request JSON is refused: the Harmony renderer and the JSON encoder recurse through tool schemas and echoed
# fields. A tool schema's nesting costs two levels per level (`properties`, then the property), so this is ~45 deep.
MAX_JSON_DEPTH = 100


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
    """The error an expected failure of the chat API becomes: a 400, with `param` taken from the message where it
    names the field (e.g. "messages[2].tool_calls[0]: ..."; `where` renames "messages[i]" to the field it came
    from), or a 500 when the model failed (`ModelOutputError`)."""
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
    if isinstance(e, ModelOutputError):
        return ApiError(500, f"{e} (a failure of the model, not a problem with the request)", type="server_error",
                        code="model_error")
    return ApiError(500, str(e), type="server_error")


# --- the body --------------------------------------------------------------------------------------------------------
_JSON_TYPE = re.compile(r"application/json\s*(;\s*charset\s*=\s*\"?utf-8\"?\s*)?", re.IGNORECASE)


def check_content_type(value: str | None) -> None:
    """Request bodies are JSON in UTF-8: `application/json`, optionally with `charset=utf-8`; else 415, as OpenAI."""
    if value is None or not _JSON_TYPE.fullmatch(value.strip()):
        shown = "no Content-Type header" if value is None else f"Content-Type {value!r:.80}"
        raise ApiError(415, f"unsupported content type: this endpoint takes 'application/json' bodies, the request "
                            f"has {shown}", code="unsupported_content_type")


def parse_json(data: bytes) -> Any:
    """The request body as JSON, or 400: not JSON (also NaN and Infinity, which Python's parser accepts, and numbers
    that overflow a float), nested deeper than `MAX_JSON_DEPTH`, or a string holding a lone UTF-16 surrogate
    ("\\ud800": not text; it cannot be tokenized or encoded again). Whatever passes can be echoed back as JSON."""
    try:
        body = json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    _check_tree(body)
    return body


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    f = float(text)
    if not math.isfinite(f):
        raise ValueError(f"the number {text:.40} is out of range")
    return f


def _too_deep() -> ApiError:
    return ApiError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json")


_SURROGATE = re.compile("[\ud800-\udfff]")  # the JSON parser has already joined valid pairs into one character


def _check_tree(body: Any) -> None:
    # Iterative: a recursive walk would fail on the depths this refuses.
    stack: list[tuple[Any, str, int]] = [(body, "", 1)] if isinstance(body, (dict, list)) else []
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        for key, v in (value.items() if isinstance(value, dict) else enumerate(value)):
            if isinstance(key, str):
                at = f"{path}.{_shown(key)}" if path else _shown(key)
                _check_text(key, at, key=True)
            else:
                at = f"{path}[{key}]"
            if isinstance(v, str):
                _check_text(v, at)
            elif isinstance(v, (dict, list)):
                stack.append((v, at, depth + 1))


def _check_text(s: str, at: str, key: bool = False) -> None:
    if (m := _SURROGATE.search(s)) is not None:
        what = "a key" if key else "the string"
        raise ApiError(400, f"'{at}': {what} holds a lone UTF-16 surrogate (\\u{ord(m.group()):04x}) at character "
                            f"{m.start()}, which is not valid Unicode text", param=at, code="invalid_value")


def _shown(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


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
            if k == "number" and not -1e300 < value < 1e300:  # an integer too large for a float
                raise ApiError(400, f"'{name}' is out of range", param=name, code="invalid_value")
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


def tools_field(body: Mapping[str, Any], *, flat: bool) -> list[Any] | None:
    """`tools`, with every field's JSON type checked (422) so the renderer and `tool_choice` read well-formed objects;
    names and schemas are checked when rendering (400). Chat nests the function (`{"type": "function", "function":
    {"name", "description", "parameters"}}`); the Responses API's tools are `flat`, but may nest too."""
    tools = field_of(body, "tools", "array")
    for j, t in enumerate(tools or []):
        at = f"tools[{j}]"
        if not isinstance(t, Mapping):
            raise ApiError(422, f"'{at}' must be an object", param=at, code="invalid_type")
        kind = field_of(t, "type", "string", required=True, where=f"{at}.")
        if kind != "function":
            raise ApiError(400, f"'{at}': tools of type {kind!r:.40} are not supported; only 'function' tools",
                           param=f"{at}.type", code="unsupported_value")
        if flat and "function" not in t:
            fn, where = t, f"{at}."
        else:
            fn, where = field_of(t, "function", "object", required=True, where=f"{at}."), f"{at}.function."
        field_of(fn, "name", "string", required=True, where=where)
        field_of(fn, "description", "string", where=where)
        field_of(fn, "parameters", "object", where=where)
        field_of(fn, "strict", "boolean", where=where)
    return tools


def apply_tool_choice(turn: Turn, body: Mapping[str, Any], *, flat: bool) -> None:
    """`tool_choice`: "auto" (default), "none" (the tools leave the prompt), "required", or a named function
    (`{"type": "function", "function": {"name": ...}}`, `flat` in the Responses API: `{"type": "function", "name":
    ...}`). Decoding cannot be constrained here, so the last two become a developer instruction at the end of the
    prompt, where the model weighs it most; the model may still answer without the call. `turn.tools` has passed
    `tools_field`."""
    choice = field_of(body, "tool_choice", "string|object", "auto")
    if choice == "auto":
        return
    if choice == "none":
        turn.tools = None
        return
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
    names = [(t["function"] if "function" in t else t)["name"] for t in turn.tools or []]
    if not names:
        raise ApiError(400, "'tool_choice' requires 'tools'", param="tool_choice", code="invalid_value")
    if named is None:
        text = "In this turn you must call one of the functions in the tools list; do not answer directly."
    elif named in names:
        text = f"In this turn you must call the function `{named}`; do not answer directly."
    else:
        raise ApiError(400, f"'tool_choice' names function {named!r}, which is not in 'tools'",
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
