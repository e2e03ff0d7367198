"""Stop sequences (Chat Completions' `stop`): the field, and the matcher that cuts streamed text at the first one."""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ApiError

MAX_STOP_SEQUENCES = 4  # as OpenAI


def stop_field(body: Mapping[str, Any]) -> list[str]:
    """`stop`: a string or up to MAX_STOP_SEQUENCES strings; empty strings never match and are dropped."""
    value = body.get("stop")
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
        """The text held back, once generation has ended without completing a stop sequence."""
        out, self.held = self.held, ""
        return out
