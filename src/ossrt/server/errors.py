"""The error a failed request gets, in OpenAI's form, and what the chat API's expected failures become."""

from __future__ import annotations

import re
from typing import Any

from ..errors import ChatFormatError, ContextLengthError, ModelOutputError, OssrtError, ParameterError


class ApiError(Exception):
    """A request that gets an OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# The request field a renderer message starts with, e.g. "messages[2].tool_calls[0]" or "tools[1].function.name".
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
