"""Typed reading of request fields: a JSON type checked (422 naming the field), then a range or vocabulary (400)."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from ..harmony import DEFAULT_REASONING_EFFORT, REASONING_EFFORTS
from .errors import ApiError

# OpenAI's efforts below gpt-oss's lowest level.
_LOWER_EFFORTS = {"minimal": REASONING_EFFORTS[0], "none": REASONING_EFFORTS[0]}

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


def objects_of(items: list[Any], at: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The elements of the array field `at`, which must be objects, each with its name ("at[i]"); 422 naming the
    first that is not."""
    for i, item in enumerate(items):
        name = f"{at}[{i}]"
        if not isinstance(item, Mapping):
            raise ApiError(422, f"'{name}' must be an object", param=name, code="invalid_type")
        yield name, item


def _article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _json_type(v: Any) -> str:
    for name, t in (("boolean", bool), ("integer", int), ("number", float), ("string", str), ("array", list),
                    ("object", Mapping)):
        if isinstance(v, t):
            return name
    return type(v).__name__


def number_in_range(body: Mapping[str, Any], key: str, default: float, lo: float, hi: float, *,
                    lo_open: bool = False) -> float:
    """A number field in [lo, hi] (or (lo, hi] when `lo_open`)."""
    value = field_of(body, key, "number", default)
    if not ((lo < value if lo_open else lo <= value) and value <= hi):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ApiError(400, f"'{key}' must be in {interval}, got {value:g}", param=key, code="invalid_value")
    return value


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


def reasoning_effort_field(body: Mapping[str, Any], key: str, where: str = "") -> str:
    """gpt-oss's reasoning effort from a string field; OpenAI's lower levels ("minimal", "none") become its lowest."""
    value = field_of(body, key, "string", where=where)
    if value is None:
        return DEFAULT_REASONING_EFFORT
    effort = _LOWER_EFFORTS.get(value.lower(), value.lower())
    if effort not in REASONING_EFFORTS:
        shown = ", ".join(REASONING_EFFORTS[:-1]) + " or " + REASONING_EFFORTS[-1]
        raise ApiError(400, f"'{where}{key}' must be {shown}, got {value!r}", param=f"{where}{key}",
                       code="invalid_value")
    return effort
