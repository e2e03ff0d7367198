"""`ossrt serve-cluster`: `ossrt serve`'s API on a Ray Serve application of several replicas (the `ray` extra).

Two deployments:

- `Replica` (N of them, autoscaled by Ray Serve within bounds): each loads the model once, with `threads` compute
  threads and `num_cpus=threads` reserved so replicas sharing a node do not oversubscribe its cores, and runs the
  same Starlette app as `ossrt serve` (`create_app`): one implementation of the routes, validation, errors,
  streaming and cancellation. It takes requests as ASGI (scope, body) and streams back the app's ASGI messages.
- `Ingress` (one, no CPUs reserved): the HTTP entry point behind Ray's proxy. It reads the body, computes the
  request's affinity key and forwards the request to a replica through a deployment handle whose router is
  `ConversationAffinityRouter`, then relays the replica's messages to the client.

Conversation affinity: the key is the request's `prompt_cache_key`, else a hash of the conversation's head (the
instructions or system messages, the tools, and the messages up to the first user message), which every later
turn of the conversation repeats; for a Responses request continuing `previous_response_id` the head is read from
the store. The router remembers which replica ran each key last (its session pool holds that conversation's KV
cache) and sends the next request with the key there; when that replica is gone or has all its `parallel` slots
busy, the request goes to the less loaded of two others (Ray's power-of-two choice), which recomputes the prompt
and becomes the key's replica.

A request whose replica dies before anything of the response reached the client (a non-streamed answer, or a
stream not yet begun) is sent again to another replica; a stream already begun ends early (the client sees it cut
off, without its final event). On shutdown, or when autoscaling removes a replica, Ray Serve stops routing to it
and waits up to `graceful_shutdown_timeout_s` for its requests to finish (the drain).

Stored responses live in a Ray actor owning the SQLite `ResponseStore`, pinned to the node that started the
application (its disk holds the file, so responses survive a restart there). Every replica, on any node, reaches it
through Ray; a SQLite file per replica would split conversations between replicas, and one file on a shared
network disk is unsafe for SQLite's locking. One actor serialises the store's operations, which take milliseconds
each, as the single-process server's lock does. The reasoning-sealing key is read once from the starting node's
cache folder and given to every replica, so any replica opens what another sealed.

Ray is imported by this module only; the core package and the CLI import it when `serve-cluster` runs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import OssrtError
from .app import DEFAULT_MAX_BODY, create_app
from .errors import ApiError
from .sealing import Sealer
from .store import ResponseStore

log = logging.getLogger("ossrt.server.cluster")

APP_NAME = "ossrt"
MAX_AFFINITY_KEYS = 100_000  # conversations the router remembers; the oldest are forgotten first
RETRIES = 3  # times a request is sent again after its replica died before answering
RETRY_DELAY = 0.5  # seconds before sending again: Ray needs a moment to stop routing to a dead replica
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path",
               "headers", "client", "server")  # the plain (picklable) parts of an ASGI scope a replica needs


# --- affinity keys -------------------------------------------------------------------------------------------------
def conversation_key(path: str, body: Any, head: Sequence[Mapping[str, Any]] | None = None) -> str | None:
    """The affinity key of a request to `path` with JSON `body`: its `prompt_cache_key`, else a hash of its
    conversation's head; None when there is none (not a chat request, or not a JSON object: the replica will say
    what is wrong). `head` gives the start of a stored conversation the request continues (`previous_response_id`)."""
    if not isinstance(body, dict) or path not in ("/v1/chat/completions", "/v1/responses"):
        return None
    if isinstance(body.get("prompt_cache_key"), str):
        return "key:" + body["prompt_cache_key"]
    if path == "/v1/chat/completions":
        messages, preamble = body.get("messages"), None
    else:
        value = body.get("input")
        messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
        preamble = body.get("instructions")
    if head is None:
        if not isinstance(messages, list):
            return None
        head = conversation_head(messages)
    digest = hashlib.sha256(json.dumps([preamble, body.get("tools"), head], sort_keys=True,
                                       ensure_ascii=False, default=str).encode())
    return "head:" + digest.hexdigest()


def conversation_head(messages: Sequence[Any]) -> list[tuple[Any, str]]:
    """(role, text) of the messages up to and including the first user message: what later turns repeat. Item
    ids and content layout (a string or a list of parts) are left out, since the store adds ids to what it keeps."""
    head = []
    for m in messages:
        if not isinstance(m, Mapping):
            break
        head.append((m.get("role") or m.get("type"), _text(m.get("content"))))
        if m.get("role") == "user":
            break
    return head


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return ""


class ConversationAffinityRouter(RequestRouter):
    """Sends a request to the replica that last ran its affinity key (the `affinity_key` keyword of the call), when
    that replica is alive and has a free slot; otherwise, and for requests without a key, to the less loaded of two
    replicas picked at random."""

    def initialize_state(self, max_keys: int = MAX_AFFINITY_KEYS) -> None:
        self._replica_of: OrderedDict[str, ReplicaID] = OrderedDict()
        self._max_keys = max_keys

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        owner = self._replica_of.get(_key_of(pending_request))
        holding = [r for r in candidate_replicas if r.replica_id == owner]
        others = [r for r in candidate_replicas if r.replica_id != owner]
        two = random.sample(others, min(2, len(others)))
        return [holding, two] if holding else [two]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        key = _key_of(pending_request)
        if key is not None:
            self._replica_of[key] = replica_id
            self._replica_of.move_to_end(key)
            while len(self._replica_of) > self._max_keys:
                self._replica_of.popitem(last=False)


def _key_of(pending_request: PendingRequest | None) -> str | None:
    return None if pending_request is None else pending_request.kwargs.get("affinity_key")


# --- the shared store ----------------------------------------------------------------------------------------------
class StoreActor:
    """The Ray actor owning the cluster's `ResponseStore`. Expected errors come back as values (`call`), so that
    replicas raise them as the store itself would, not wrapped in Ray's task errors."""

    def __init__(self, path: str, max_bytes: int | None = None):
        self.store = ResponseStore(path) if max_bytes is None else ResponseStore(path, max_bytes)

    def call(self, method: str, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        try:
            return True, getattr(self.store, method)(*args, **kwargs)
        except OssrtError as e:
            return False, e

    def conversation_head(self, response_id: str) -> list[tuple[Any, str]] | None:
        """The head of the conversation `response_id` continues (`conversation_head`), or None if not stored."""
        try:
            return conversation_head(self.store.chain(response_id))
        except OssrtError:
            return None

    def close(self) -> None:
        self.store.close()


class RemoteStore:
    """The `ResponseStore` methods the server uses, run by the store actor."""

    def __init__(self, actor):
        self.actor = actor

    def _call(self, method: str, *args, **kwargs) -> Any:
        ok, value = ray.get(self.actor.call.remote(method, args, kwargs))
        if not ok:
            raise value
        return value

    def put(self, *args, **kwargs):
        return self._call("put", *args, **kwargs)

    def get(self, response_id):
        return self._call("get", response_id)

    def chain(self, response_id):
        return self._call("chain", response_id)

    def output_item(self, item_id):
        return self._call("output_item", item_id)

    def session_hint(self, response_id):
        return self._call("session_hint", response_id)

    def delete(self, response_id):
        return self._call("delete", response_id)

    def input_items(self, response_id, **kwargs):
        return self._call("input_items", response_id, **kwargs)


def start_store(path: str, *, name: str, max_bytes: int | None = None):
    """The store actor `name` (detached, so the application outlives the process that deployed it), on this node,
    whose disk keeps the file; an existing actor of that name is reused. OssrtError when the file is no store."""
    ResponseStore(path, *(() if max_bytes is None else (max_bytes,))).close()  # a bad file fails here, plainly
    node = ray.get_runtime_context().get_node_id()
    return ray.remote(StoreActor).options(
        name=name, namespace="ossrt", lifetime="detached", get_if_exists=True, num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(path, max_bytes)


# --- deployments ---------------------------------------------------------------------------------------------------
class Replica:
    """One copy of the model behind `ossrt serve`'s app; `handle_http` runs one request through the app."""

    def __init__(self, model: str, *, model_id: str, aliases: Sequence[str], api_key: str | None, parallel: int,
                 queue: int, load_options: Mapping[str, Any], sealing_key: bytes, store_actor, max_body: int):
        import ossrt
        from ..resolve import resolve_model

        self.model = ossrt.load(resolve_model(model), **load_options)
        self.app = create_app(self.model, model_id=model_id, aliases=aliases, api_key=api_key, parallel=parallel,
                              queue=queue, max_body=max_body, sealer=Sealer(sealing_key),
                              store=None if store_actor is None else RemoteStore(store_actor))
        self._apps: set[asyncio.Task] = set()  # requests still running after their caller went away

    async def handle_http(self, scope: dict[str, Any], body: bytes, affinity_key: str | None = None):
        """The app's ASGI messages answering the request (`scope`, `body`), as they are sent. When the caller stops
        reading (the client disconnected, or the caller was cancelled), the app sees the client disconnect, which
        cancels the turn."""
        messages: asyncio.Queue = asyncio.Queue()
        disconnected = asyncio.Event()
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop()
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def run() -> None:
            try:
                await self.app(scope, receive, messages.put)
            finally:
                await messages.put(None)

        task = asyncio.create_task(run())
        self._apps.add(task)
        task.add_done_callback(self._apps.discard)
        try:
            while (message := await messages.get()) is not None:
                yield message
        finally:
            disconnected.set()

    def health(self) -> dict[str, Any]:
        """This replica's `/health` body and its Ray Serve replica id (the HTTP route reaches any one replica)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, **self.app.state.server.status()}


class Ingress:
    """The HTTP entry point: forwards each request, with its affinity key, to a replica, and relays the answer."""

    def __init__(self, replicas, *, store_actor, max_body: int):
        self.replicas = replicas.options(stream=True)
        self.store_actor = store_actor
        self.max_body = max_body

    def __serve_build_asgi_app__(self):
        async def app(scope, receive, send) -> None:  # a function: uvicorn takes a bound method for ASGI 2
            await self.asgi(scope, receive, send)

        return app

    async def asgi(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        body = await self._read_body(receive)
        key = await self._affinity_key(scope, body)
        forwarded = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
        for attempt in range(RETRIES + 1):
            started = False
            answer = self.replicas.handle_http.remote(forwarded, body, affinity_key=key)
            try:
                async for message in answer:
                    started = True
                    await send(message)
                return
            except RayActorError as e:
                if started:
                    log.warning("%s %s: the replica died while answering; the response is cut off (%s)",
                                scope["method"], scope["path"], type(e).__name__)
                    return
                log.warning("%s %s: the replica died before answering; sending the request again",
                            scope["method"], scope["path"])
            except BackPressureError:
                return await _send_error(send, ApiError(503, "the server is busy (every replica is busy and the "
                                                             "queue is full); try again shortly", type="server_error",
                                                        code="server_busy", headers={"Retry-After": "1"}))
            except BaseException:
                answer.cancel()  # the client went away: the replica's app sees the disconnect and stops the turn
                raise
            await asyncio.sleep(RETRY_DELAY)
        await _send_error(send, ApiError(503, f"the replicas answering this request died {RETRIES + 1} times; try "
                                              "again shortly", type="server_error", code="replica_unavailable"))

    async def _read_body(self, receive) -> bytes:
        """The request body, up to one byte past the limit (the replica answers 413 for it)."""
        chunks, size, more = [], 0, True
        while more and size <= self.max_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        return b"".join(chunks)[:self.max_body + 1]

    async def _affinity_key(self, scope, body: bytes) -> str | None:
        if scope["method"] != "POST":
            return None
        try:
            request = json.loads(body)
        except ValueError:
            return None
        head = None
        previous = request.get("previous_response_id") if isinstance(request, dict) else None
        if isinstance(previous, str) and self.store_actor is not None and "prompt_cache_key" not in request:
            head = await self.store_actor.conversation_head.remote(previous)
        return conversation_key(scope["path"], request, head)


async def _send_error(send, err: ApiError) -> None:
    headers = [(b"content-type", b"application/json"),
               *((k.lower().encode(), v.encode()) for k, v in err.headers.items())]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(err.body()).encode()})


def cluster_app(model: str, *, model_id: str, aliases: Sequence[str] = (), api_key: str | None = None,
                replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
                threads: int = 1, parallel: int = 2, queue: int = 16, load_options: Mapping[str, Any] | None = None,
                sealing_key: bytes, store_actor=None, max_body: int = DEFAULT_MAX_BODY,
                graceful_shutdown_timeout_s: float = 30.0) -> serve.Application:
    """The Ray Serve application serving `model` (a path every node can read, or a hub name each node resolves) as
    `model_id`. `replicas` copies; with `min_replicas`/`max_replicas`, Ray Serve autoscales between them, starting
    from `replicas`. Each replica runs `parallel` requests at once with `threads` threads on as many reserved CPUs;
    up to `queue` requests per replica wait for a slot beyond those, and more get 503. `store_actor`
    (`start_store`) keeps responses; None keeps none."""
    if min_replicas is None and max_replicas is None:
        scaling: dict[str, Any] = {"num_replicas": replicas}
    else:
        low, high = min_replicas or 1, max_replicas or max(replicas, min_replicas or 1)
        if not 1 <= low <= high:
            raise OssrtError(f"the replica bounds must satisfy 1 <= min <= max, got min {low} and max {high}")
        scaling = {"autoscaling_config": AutoscalingConfig(
            min_replicas=low, max_replicas=high, initial_replicas=min(max(replicas, low), high),
            target_ongoing_requests=parallel)}
    replica = serve.deployment(
        Replica, name="Replica", max_ongoing_requests=parallel, max_queued_requests=queue * (max_replicas or replicas),
        ray_actor_options={"num_cpus": threads}, graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
        request_router_config=RequestRouterConfig(request_router_class=ConversationAffinityRouter), **scaling)
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", num_replicas=1, max_ongoing_requests=10_000,
                               ray_actor_options={"num_cpus": 0},
                               graceful_shutdown_timeout_s=graceful_shutdown_timeout_s)
    # The replica's app keeps `parallel` sessions and admits that many more requests waiting: Ray only lets
    # `parallel` requests reach it at once, but its own slot is freed a moment after Ray counts the request done.
    bound = replica.bind(model, model_id=model_id, aliases=list(aliases), api_key=api_key, parallel=parallel,
                         queue=parallel, load_options=dict(load_options or {}, threads=threads),
                         sealing_key=sealing_key, store_actor=store_actor, max_body=max_body)
    return ingress.bind(bound, store_actor=store_actor, max_body=max_body)


def application(spec: str, *, name: str | None = None, store: str | None = None, keep_responses: bool = True,
                **options) -> tuple[serve.Application, Any]:
    """The application serving `spec` (a model file every node can read, or a hub name), named as `ossrt serve`
    names it, sealing reasoning with this node's key and keeping responses in `store` (default: the cache
    folder's file) on this node unless `keep_responses` is false; and its store actor (None without one).
    `options` go to `cluster_app`."""
    from ..resolve import resolve_model
    from .serve import model_names, reasoning_sealer
    from .store import default_store_path

    path = resolve_model(spec)
    model_id, aliases = model_names(spec, path)
    sealer = reasoning_sealer()
    store_actor = start_store(str(Path(store or default_store_path()).resolve()), name=f"{APP_NAME}-responses") \
        if keep_responses else None
    app = cluster_app(str(path) if Path(spec).exists() else spec, model_id=name or model_id,
                      aliases=[model_id, *aliases], sealing_key=sealer.key, store_actor=store_actor, **options)
    return app, store_actor


_BUILD_ARGS = {"replicas": int, "min_replicas": int, "max_replicas": int, "threads": int, "parallel": int,
               "queue": int, "drain_timeout": float, "ctx": int, "kv_type": str, "api_key": str, "name": str,
               "store": str, "no_store": lambda v: str(v).lower() in ("1", "true", "yes")}


def build_app(args: Mapping[str, Any]) -> serve.Application:
    """Ray Serve's application builder: `serve run ossrt.server.cluster:build_app model=PATH replicas=2 threads=4`,
    or `import_path: ossrt.server.cluster:build_app` with `args` in a `serve deploy`/`serve run` config file. The
    arguments are `serve-cluster`'s options, with underscores (`min_replicas`, `api_key`, `no_store`, ...)."""
    unknown = set(args) - set(_BUILD_ARGS) - {"model"}
    if unknown or "model" not in args:
        raise OssrtError(f"build_app takes model=PATH_OR_NAME and {', '.join(sorted(_BUILD_ARGS))}"
                         + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""))
    try:
        given = {k: _BUILD_ARGS[k](v) for k, v in args.items() if k != "model"}
    except ValueError as e:
        raise OssrtError(f"build_app: {e}") from None
    load_options = {"context_length": given.pop("ctx", None), "kv_type": given.pop("kv_type", "f16")}
    keep = not given.pop("no_store", False)
    timeout = given.pop("drain_timeout", 30.0)
    app, _ = application(str(args["model"]), keep_responses=keep, load_options=load_options,
                         graceful_shutdown_timeout_s=timeout, **given)
    return app
