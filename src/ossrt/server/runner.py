"""Turns running beside the event loop: each on its own thread (the model is blocking CPU work and serialises its
forward passes, so concurrent turns interleave token by token), on a chat session from a pool whose KV caches
keep the conversations they last ran."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, AsyncIterator, Callable, Iterable, Protocol

from ..chat import ChatResponse, ChatSession, ChatStream, Done, common_prefix
from ..engine.engine import Engine
from ..harmony import Event
from .errors import ApiError
from .turn import Turn

_STARTED, _END = object(), object()


class ApiOutput(Protocol):
    """How an endpoint writes one turn: `start()`, `event(e)` for each chat event and `finish(response)` give the
    objects of its stream (`error(err)` the last one when the turn failed); `result(response)` the whole reply.
    `stopped` asks to end generation early (a stop sequence appeared); `named_events`: its stream's events carry
    their type on an `event:` line."""

    stopped: bool
    named_events: bool

    def start(self) -> list[dict[str, Any]]: ...

    def event(self, e: Event) -> list[dict[str, Any]]: ...

    def finish(self, r: ChatResponse) -> list[dict[str, Any]]: ...

    def result(self, r: ChatResponse) -> dict[str, Any]: ...

    def error(self, err: ApiError) -> dict[str, Any]: ...


class SessionPool:
    """Chat sessions, each with its own KV cache; `take` hands out the free one that already holds the longest
    prefix of the prompt, so a client's next turn reuses its cache. Among sessions that hold as much (a new
    conversation shares only the instructions and tools with every cached one), the one that ran the latest turn
    with the same cache key (`prompt_cache_key`) comes first, then the least recently used, so a new conversation
    overwrites the cache least likely to be needed again."""

    def __init__(self, sessions: Iterable[ChatSession]):
        self.free = list(sessions)
        self.lock = threading.Lock()
        self._keys: dict[ChatSession, str | None] = {}  # the cache key of each session's last turn
        self._last_used: dict[ChatSession, int] = {}
        self._turns = 0

    def take(self, prompt: list[int], cache_key: str | None = None) -> ChatSession:
        with self.lock:
            def rank(s: ChatSession) -> tuple[int, bool, int]:
                same_key = cache_key is not None and self._keys.get(s) == cache_key
                used = self._last_used.get(s, -1)
                return common_prefix(s.tokens, prompt), same_key, used if same_key else -used

            best = max(self.free, key=rank)
            self.free.remove(best)
            self._turns += 1
            self._keys[best], self._last_used[best] = cache_key, self._turns
            return best

    def give(self, session: ChatSession) -> None:
        with self.lock:
            self.free.append(session)


class TurnThread:
    """One turn on its own thread: rendered once, then answered on the pooled session that suits its prompt.
    `_STARTED` (the turn rendered and checked), its events, then `_END` reach the event loop through `queue`; an
    exception raised before or during generation arrives there instead. `cancel()` is thread-safe and idempotent.
    `on_end(self)` runs on the event loop once the session is back in the pool."""

    def __init__(self, turn: Turn, engine: Engine, pool: SessionPool, on_end: Callable[["TurnThread"], None]):
        self.turn, self.engine, self.pool, self.on_end = turn, engine, pool, on_end
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.response: ChatResponse | None = None
        self.consumed = False  # the client got everything up to `_END`
        self._stream: ChatStream | None = None
        self._cancelled = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="ossrt-turn").start()

    def cancel(self) -> None:
        self._cancelled.set()
        if self._stream is not None:
            self._stream.cancel()

    def _put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is shutting down
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _run(self) -> None:
        session = None
        try:
            request = self.turn.chat_request(self.engine)
            session = self.pool.take(request.prompt, self.turn.cache_key)
            self._stream = session.answer(request, stream=True)
            if self._cancelled.is_set():
                self._stream.cancel()
            self._put(_STARTED)
            for event in self._stream:
                if isinstance(event, Done):
                    self.response = event.response
                self._put(event)
        except BaseException as e:  # handed to the request's task, which answers or logs it
            self._put(e)
        finally:
            if self._stream is not None:
                self._stream.close()  # releases the session even when generation failed midway
            if session is not None:
                self.pool.give(session)
            self._put(_END)
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.on_end, self)

    async def started(self) -> None:
        """Return once the turn is rendered and checked; raise what failed instead (a bad conversation fails here,
        before any response is sent). Cancelled while waiting, the turn is cancelled too."""
        try:
            first = await self.queue.get()
        except BaseException:
            self.cancel()
            raise
        if isinstance(first, BaseException):
            raise first

    async def payloads(self, output: ApiOutput) -> AsyncIterator[dict[str, Any]]:
        """The API objects for the client: `output.start()`, one batch per event, `output.finish(response)`."""
        for p in output.start():
            yield p
        while (item := await self.queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            batch = output.finish(item.response) if isinstance(item, Done) else output.event(item)
            if output.stopped:
                self.cancel()
            for p in batch:
                yield p
        self.consumed = True
