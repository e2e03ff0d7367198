"""Live `ossrt serve` apps for the server tests: uvicorn on a thread, on a free port of 127.0.0.1."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import uvicorn
from starlette.applications import Starlette

from ossrt.server.app import Server, create_app
from ossrt.server.serve import HEADER_TIMEOUT, uvicorn_config

START_TIMEOUT = 60.0  # seconds: a bound for a failing test on a loaded machine, not a measurement


@dataclass(frozen=True)
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    app: Starlette

    @property
    def server(self) -> Server:
        return self.app.state.server


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, setting `up` once it accepts connections."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.up = threading.Event()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        self.up.set()


@contextlib.contextmanager
def live_server(model, *, header_timeout: float = HEADER_TIMEOUT, **app_options) -> Iterator[LiveServer]:
    """`create_app(model, **app_options)` served until the block ends."""
    app = create_app(model, **app_options)
    server = _Uvicorn(uvicorn_config(app, header_timeout=header_timeout, host="127.0.0.1", port=0,
                                     log_level="warning"))

    def run() -> None:
        try:
            server.run()
        finally:
            server.up.set()  # also when it failed to start

    thread = threading.Thread(target=run, daemon=True, name="uvicorn")
    thread.start()
    assert server.up.wait(START_TIMEOUT) and server.started, "the server did not start"
    try:
        yield LiveServer(f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", app)
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def servers_per_text(model_for: Callable[[str], Any], **app_options) -> Iterator[Callable[[str], str]]:
    """text -> the URL of a live server of `model_for(text)` (a scripted model that writes `text`), started on first
    use and kept until the block ends: one server per scripted text, shared by a module's tests."""
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}

        def url(text: str) -> str:
            if text not in urls:
                urls[text] = stack.enter_context(live_server(model_for(text), **app_options)).url
            return urls[text]

        yield url
