"""`ossrt serve`: an OpenAI-compatible HTTP server over one loaded model (Starlette + uvicorn, the `serve` extra).

Each request's turn runs on its own thread, on a session of a pool (`runner`). At most `parallel` turns run at
once; up to `queue` more wait, and beyond that requests get 503. A client that disconnects has its turn cancelled.
Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/responses.

A request that fails gets OpenAI's error body and one log line (method, path, status, message); only a bug (an
unexpected exception) logs a traceback. Running it under uvicorn is `serve`'s job."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import OssrtError, ParameterError
from .body import read_json_object
from .chat_completions import ChatCompletion, parse_chat_request
from .errors import ApiError, api_error
from .fields import field_of
from .page import page_routes
from .responses import FINAL_EVENTS, ResponsesOutput, parse_responses_request
from .runner import ApiOutput, SessionPool, TurnThread
from .sealing import Sealer
from .store import ResponseStore
from .turn import Turn

log = logging.getLogger("ossrt.server.app")

DEFAULT_MAX_BODY = 8 * 2**20  # bytes; a full 131072-token context is well under 1 MB of text
_BEARER = re.compile(r"bearer +(.*)", re.IGNORECASE)


class Server:
    """The state behind the endpoints: the model and its session pool, admission (`parallel` slots, a queue of
    `queue`), the counts /health reports."""

    def __init__(self, model, *, model_id: str, aliases: Iterable[str] = (), api_key: str | None = None,
                 parallel: int = 2, queue: int = 16, max_body: int = DEFAULT_MAX_BODY, sealer: Sealer | None = None,
                 store: ResponseStore | None = None):
        if parallel < 1 or queue < 0:
            raise ValueError("parallel must be at least 1 and queue at least 0")
        self.model, self.model_id, self.api_key = model, model_id, api_key
        self.names = {_norm(n) for n in (model_id, *aliases)}
        self.parallel, self.queue_size, self.max_body = parallel, queue, max_body
        self.sealer = sealer or Sealer()  # a fresh key: sealed reasoning is valid while this server runs
        self.store = store  # stored responses (previous_response_id, GET/DELETE); None: nothing is stored
        self.pool = SessionPool(model.new_session() for _ in range(parallel))
        self.slots = asyncio.Semaphore(parallel)
        self.waiting = 0
        self.running: set[TurnThread] = set()
        self.changed = threading.Condition()  # notified when a turn queues, starts, ends or loses its client
        self.created = int(time.time())
        self.counts = dict(requests=0, rejected=0, disconnected=0, prompt_tokens=0, completion_tokens=0)

    # --- turns ---
    async def start(self, turn: Turn) -> TurnThread:
        """Wait for a free slot (503 when the queue is full), start the turn, and return once it is rendered and
        validated: a bad conversation raises here, before any response is sent."""
        if len(self.running) + self.waiting >= self.parallel + self.queue_size:
            self.counts["rejected"] += 1
            raise ApiError(503, f"the server is busy ({len(self.running)} requests running, {self.waiting} "
                                f"waiting); try again shortly", type="server_error", code="server_busy",
                           headers={"Retry-After": "1"})
        self.waiting += 1
        self._notify()
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        run = TurnThread(turn, self.model.engine, self.pool, self._ended)
        self.running.add(run)
        self._notify()
        try:
            await run.started()
        except OssrtError as e:
            raise api_error(e, turn.where) from None
        return run

    def _ended(self, run: TurnThread) -> None:
        self.running.discard(run)
        self.slots.release()
        if run.response is not None:
            self.counts["prompt_tokens"] += run.response.usage.prompt_tokens
            self.counts["completion_tokens"] += run.response.usage.completion_tokens
            if run.response.undeclared_calls:  # the client sees only an answer, maybe an empty one: say why here
                log.info("the model called tools the request did not declare %d time(s): answered with an error, "
                         "not reported", run.response.undeclared_calls)
            if run.response.problems:
                log.debug("model output: %s", "; ".join(run.response.problems))
        self._notify()

    def _disconnected(self) -> None:
        self.counts["disconnected"] += 1
        self._notify()

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """From a thread other than the server's (a test, a monitor): wait until `predicate()`, a question about
        `running`, `waiting` or the turns' counts, is true; False after `timeout` seconds."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    # --- requests ---
    async def read_json(self, request: Request) -> dict[str, Any]:
        self.check_key(request)
        body = await read_json_object(request, self.max_body)
        self.check_model(field_of(body, "model", "string", required=True))
        self.counts["requests"] += 1
        return body

    def check_model(self, name: str) -> None:
        if _norm(name) not in self.names:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")

    def check_key(self, request: Request) -> None:
        """`Authorization: Bearer KEY`: the scheme in any case (RFC 9110 makes it case-insensitive), then one or more
        spaces, then exactly the key (HTTP strips whitespace around the whole value)."""
        if self.api_key is None:
            return
        auth = request.headers.get("authorization")
        if auth is None:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        m = _BEARER.fullmatch(auth)
        if m is None:
            raise ApiError(401, "the Authorization header must be 'Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(m.group(1).encode("latin-1"), self.api_key.encode()):  # the header's bytes
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    async def respond(self, request: Request, turn: Turn, output: ApiOutput, stream: bool,
                      keep: Callable[[dict[str, Any]], None] | None = None) -> Response:
        """Run `turn` and answer with `output`'s objects; `keep` gets the final object (a stored response) once it
        is complete, before the non-streamed answer or the stream's end."""
        run = await self.start(turn)
        if stream:
            return StreamingResponse(self._sse(request, run, output, keep), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(self._watch_disconnect(request, run))
        try:
            async for _ in run.payloads(output):
                pass
        except OssrtError as e:
            raise api_error(e, turn.where) from None
        finally:
            watcher.cancel()
        result = output.result(run.response)
        if keep is not None:
            await asyncio.to_thread(keep, result)
        return JSONResponse(result)

    async def _watch_disconnect(self, request: Request, run: TurnThread) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        run.cancel()
        self._disconnected()

    async def _sse(self, request: Request, run: TurnThread, output: ApiOutput,
                   keep: Callable[[dict[str, Any]], None] | None) -> AsyncIterator[bytes]:
        try:
            async for p in run.payloads(output):
                if keep is not None and p.get("type") in FINAL_EVENTS:
                    await asyncio.to_thread(keep, p["response"])
                yield _sse_event(p, output.named_events)
            if not output.named_events:
                yield b"data: [DONE]\n\n"
        except Exception as e:  # the status line is sent: the error goes out as an event
            err = api_error(e) if isinstance(e, OssrtError) else _internal(request, e)
            if isinstance(e, OssrtError):
                _log_failure(request, err, "in the stream")
            yield _sse_event(output.error(err), output.named_events)
        finally:
            if not run.consumed:  # the client went away (or an error ended the stream): stop generating
                run.cancel()
                self._disconnected()

    # --- endpoints ---
    async def health(self, request: Request) -> Response:
        return JSONResponse(self.status())

    def status(self) -> dict[str, Any]:
        """What /health reports: the admission counts, and the expert cache's under a memory bound."""
        body = {"status": "ok", "model": self.model_id, "parallel": self.parallel, "queue": self.queue_size,
                "running": len(self.running), "waiting": self.waiting, **self.counts}
        experts = self.model.expert_cache
        if experts is not None:
            body |= {"max_memory": self.model.max_memory, "expert_cache": experts.report()}
        return body

    def model_object(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "ossrt",
                "context_length": self.model.context_length}

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self.model_object()]})

    async def model_info(self, request: Request) -> Response:
        self.check_key(request)
        self.check_model(request.path_params["name"])
        return JSONResponse(self.model_object())

    async def chat_completions(self, request: Request) -> Response:
        body = await self.read_json(request)
        turn, stream, include_usage = parse_chat_request(body, self.model.context_length)
        return await self.respond(request, turn, ChatCompletion(self.model_id, turn.stop, include_usage), stream)

    async def responses(self, request: Request) -> Response:
        body = await self.read_json(request)
        req = parse_responses_request(body, self.model.context_length, self.sealer, self.store)
        output = ResponsesOutput(self.model_id, req.echo, self.sealer if req.sealed else None)

        def keep(response: dict[str, Any]) -> None:
            if response["status"] != "cancelled":
                self.store.put(response, req.items, previous_response_id=req.previous_response_id,
                               session_hint=req.turn.cache_key)

        return await self.respond(request, req.turn, output, req.stream, keep if req.store else None)

    def _stored(self, request: Request) -> str:
        self.check_key(request)
        if self.store is None:
            raise ApiError(404, "this server stores no responses (--no-store)", code="not_found")
        return request.path_params["id"]

    async def get_response(self, request: Request) -> Response:
        response_id = self._stored(request)
        found = await asyncio.to_thread(self.store.get, response_id)
        if found is None:
            raise ApiError(404, f"no stored response has id {response_id!r}", code="not_found")
        return JSONResponse(found)

    async def delete_response(self, request: Request) -> Response:
        response_id = self._stored(request)
        if not await asyncio.to_thread(self.store.delete, response_id):
            raise ApiError(404, f"no stored response has id {response_id!r}", code="not_found")
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    async def input_items(self, request: Request) -> Response:
        response_id = self._stored(request)
        q = request.query_params
        limit = q.get("limit", "20")
        if not limit.isdigit():
            raise ApiError(400, f"'limit' must be an integer from 1 to 100, got {limit!r:.40}", param="limit",
                           code="invalid_value")
        try:
            page = await asyncio.to_thread(self.store.input_items, response_id, after=q.get("after"),
                                           limit=int(limit), order=q.get("order", "desc"))
        except ParameterError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        if page is None:
            raise ApiError(404, f"no stored response has id {response_id!r}", code="not_found")
        return JSONResponse(page)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        yield
        for run in list(self.running):
            run.cancel()


def _norm(name: str) -> str:
    name = name.strip().lower()
    return name[len("openai/"):] if name.startswith("openai/") else name


def _sse_event(payload: dict[str, Any], named: bool) -> bytes:
    """One server-sent event; `named` ones say their type on an `event:` line."""
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return ((f"event: {payload['type']}\n" if named else "") + f"data: {data}\n\n").encode()


def _log_failure(request: Request, err: ApiError, when: str = "") -> None:
    """The one log line of a request that failed as expected (no traceback): method, path, status, message."""
    level = logging.INFO if err.status < 500 else logging.WARNING if err.status == 503 else logging.ERROR
    log.log(level, "%s %s %d%s: %s", request.method, request.url.path, err.status, f" {when}" if when else "",
            err.message)


def _internal(request: Request, e: BaseException) -> ApiError:
    """A bug: its traceback, logged once, and the 500 for the client."""
    err = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error", code="internal_error")
    log.error("%s %s %d: %s", request.method, request.url.path, err.status, err.message, exc_info=e)
    return err


class _Failures:
    """ASGI middleware inside Starlette's outermost layer, which would log every exception it sees with a traceback
    and re-raise it for uvicorn to log again. Here an unexpected exception is logged once (`_internal`) and answered
    with a 500 if the response has not started; a client gone before its request body arrived gets one line."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_noting_start(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except ClientDisconnect:
            log.info("%s %s: the client closed the connection before sending the whole request", scope["method"],
                     scope["path"])
        except Exception as e:
            err = _internal(Request(scope), e)
            if not started:
                await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)


def create_app(model, *, model_id: str, aliases: Iterable[str] = (), api_key: str | None = None,
               parallel: int = 2, queue: int = 16, max_body: int = DEFAULT_MAX_BODY,
               sealer: Sealer | None = None, store: ResponseStore | None = None) -> Starlette:
    """The ASGI app serving `model` (an `ossrt.Model`) as `model_id` (requests may also name an alias); `sealer`
    seals reasoning for stateless clients (default: a key of this app's own); `store` keeps responses."""
    server = Server(model, model_id=model_id, aliases=aliases, api_key=api_key, parallel=parallel, queue=queue,
                    max_body=max_body, sealer=sealer, store=store)

    async def api_error_response(request: Request, e: ApiError) -> Response:
        _log_failure(request, e)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def http_error(request: Request, e: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        err = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code,
                       headers=e.headers)
        return await api_error_response(request, err)

    routes = [Route("/health", server.health), Route("/v1/models", server.models),
              Route("/v1/models/{name:path}", server.model_info),
              Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
              Route("/v1/responses", server.responses, methods=["POST"]),
              Route("/v1/responses/{id}", server.get_response, methods=["GET"]),
              Route("/v1/responses/{id}", server.delete_response, methods=["DELETE"]),
              Route("/v1/responses/{id}/input_items", server.input_items, methods=["GET"]), *page_routes()]
    app = Starlette(routes=routes, lifespan=server.lifespan, middleware=[Middleware(_Failures)],
                    exception_handlers={ApiError: api_error_response, HTTPException: http_error})
    app.router.redirect_slashes = False  # "/v1/responses/" is an unknown path (404, an error body), as at OpenAI
    app.state.server = server
    return app
