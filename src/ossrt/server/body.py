"""A request's body: JSON in UTF-8 (415 otherwise), within the size limit (413), parsed into a JSON object that
can be rendered and echoed back (400 otherwise)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from starlette.requests import Request

from .errors import ApiError

# Deeper request JSON is refused: the Harmony renderer and the JSON encoder recurse through tool schemas and echoed
# fields. A tool schema's nesting costs two levels per level (`properties`, then the property), so this is ~45 deep.
MAX_JSON_DEPTH = 100

_JSON_TYPE = re.compile(r"application/json\s*(;\s*charset\s*=\s*\"?utf-8\"?\s*)?", re.IGNORECASE)
_SURROGATE = re.compile("[\ud800-\udfff]")  # the JSON parser has already joined valid pairs into one character


async def read_json_object(request: Request, max_body: int) -> dict[str, Any]:
    """The body of `request` as a JSON object, read up to `max_body` bytes."""
    check_content_type(request.headers.get("content-type"))
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise ApiError(413, f"request body of {length} bytes is over the limit of {max_body}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():  # without a Content-Length the limit holds while reading
        size += len(chunk)
        if size > max_body:
            raise ApiError(413, f"request body is over the limit of {max_body} bytes", code="request_too_large")
        chunks.append(chunk)
    body = parse_json(b"".join(chunks))
    if not isinstance(body, dict):
        raise ApiError(422, "the request body must be a JSON object", code="invalid_type")
    return body


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
