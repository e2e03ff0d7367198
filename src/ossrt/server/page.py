"""The chat page `ossrt serve` serves at / (filled in by issue 17's work)."""

from __future__ import annotations

from starlette.routing import BaseRoute


def page_routes() -> list[BaseRoute]:
    """The routes of the chat page and its assets."""
    return []
