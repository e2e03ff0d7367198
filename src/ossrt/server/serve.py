"""Running the server: the listening socket, the names a model is served under, and uvicorn with a timeout for
request heads (`ossrt serve`)."""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
from pathlib import Path
from typing import Iterable

from ..errors import OssrtError
from ..resolve import ALIASES, cache_dir
from .app import create_app
from .sealing import KEY_FILE, Sealer
from .store import ResponseStore

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 20.0  # seconds a connection gets to send a request head: clients send it at once
_OUTTYPES = ("-q8_0", "-bf16", "-f16", "-f32", "-mxfp4")


def model_names(spec: str, path: Path) -> tuple[str, list[str]]:
    """The id to serve a model under and the other names requests may use: for a file, its name with and without
    `.gguf` and the output-type suffix; for a hub name, the repository and its short aliases."""
    if Path(spec).exists():
        stem = path.stem
        base = next((stem[:-len(s)] for s in _OUTTYPES if stem.lower().endswith(s)), stem)
        return base, [spec, path.name, stem]
    repo = ALIASES.get(spec.lower(), spec)
    return repo.split("/")[-1], [spec, repo, *(k for k, v in ALIASES.items() if v == repo)]


def listen(host: str, port: int) -> socket.socket:
    """A listening socket for `host`:`port` (0: any free port), or OssrtError saying why not. Connections made
    before the server runs (while the model loads) wait in its backlog."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen()
    except OSError as e:
        raise OssrtError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(model, sock: socket.socket, *, model_id: str, aliases: Iterable[str] = (), api_key: str | None = None,
          parallel: int = 2, queue: int = 16, log_level: str = "info", store: ResponseStore | None = None) -> None:
    """Serve on `sock` (from `listen`) until interrupted, keeping responses in `store` (None: none kept).
    Reasoning is sealed with the key in the cache folder, so clients' sealed reasoning still opens after a
    restart."""
    import uvicorn

    app = create_app(model, model_id=model_id, aliases=aliases, api_key=api_key, parallel=parallel, queue=queue,
                     sealer=reasoning_sealer(), store=store)
    uvicorn.Server(uvicorn_config(app, log_level=log_level, timeout_graceful_shutdown=3)).run(sockets=[sock])


def reasoning_sealer() -> Sealer:
    """The sealer with the key in the cache folder (made there on first use)."""
    key_file = cache_dir() / KEY_FILE
    try:
        return Sealer.from_key_file(key_file)
    except OSError as e:
        raise OssrtError(f"cannot read or create the reasoning key {key_file}: {e.strerror or e}") from None
    except ValueError:
        raise OssrtError(f"{key_file} is not a reasoning key; delete it and a new one is made") from None


def uvicorn_config(app, *, header_timeout: float = HEADER_TIMEOUT, log_level: str = "info", **settings):
    """A `uvicorn.Config` for `app`: connections get `header_timeout` seconds to send each request head, and the
    server's log lines go out in uvicorn's format. `settings` are more `uvicorn.Config` arguments."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    logging_config = copy.deepcopy(LOGGING_CONFIG)
    logging_config["loggers"]["ossrt"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    return uvicorn.Config(app, http=_with_header_timeout(header_timeout), log_config=logging_config,
                          log_level=log_level, **settings)


def _with_header_timeout(seconds: float) -> type:
    """uvicorn's HTTP/1.1 protocol class, closing a connection that has not sent a whole request head `seconds`
    after it opened or after its last response. uvicorn has no such timeout: its keep-alive timer starts only after
    a response and stops at the next request's first byte, so a client sending half a head holds the connection
    for ever (slowloris)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # h11, or httptools when installed

    class HeaderTimeoutProtocol(AutoHTTPProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._expect_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._expect_head()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _expect_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

        def _head_timed_out(self) -> None:
            # A request whose head arrived is running (`cycle`); it re-arms the timer when its response is done.
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                log.info("closing a connection from %s: no complete request head within %g s",
                         "%s:%d" % self.client if self.client else "?", seconds)
                self.transport.close()

    return HeaderTimeoutProtocol
