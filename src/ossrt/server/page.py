"""The chat page `ossrt serve` serves at /: static files from `static/` (HTML, CSS, JavaScript modules, and the
vendored Markdown renderer and sanitizer), no build step, nothing from another origin. The page talks to the
server's own /v1/chat/completions; it needs no key to load, the API calls do when the server has one.

Every page response carries a Content-Security-Policy that allows scripts, styles and requests from this origin
only, and no inline script or style: should model output ever get past the page's escaping and sanitizing as HTML,
it can neither run code nor load anything from elsewhere."""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

STATIC = Path(__file__).parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new ossrt version's page replaces the old at once
}


def _assets() -> dict[str, Path]:
    """URL path under /static/ -> file, for the files of a served type: only these are ever read, so no request
    path reaches the file system."""
    return {p.relative_to(STATIC).as_posix(): p for p in sorted(STATIC.rglob("*"))
            if p.is_file() and p.suffix in CONTENT_TYPES}


def _file_response(path: Path) -> Response:
    return Response(path.read_bytes(), media_type=CONTENT_TYPES[path.suffix], headers=SECURITY_HEADERS)


def page_routes() -> list[BaseRoute]:
    """The routes of the chat page and its assets."""
    assets = _assets()

    async def index(request: Request) -> Response:
        return _file_response(STATIC / "index.html")

    async def asset(request: Request) -> Response:
        path = assets.get(request.path_params["path"])
        if path is None:
            raise HTTPException(404, "no such file")
        return _file_response(path)

    return [Route("/", index), Route("/static/{path:path}", asset)]
