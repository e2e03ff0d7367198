"""Stored responses: a SQLite database (stdlib `sqlite3`, WAL mode) of what `POST /v1/responses` made, for
`GET`/`DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items` and `previous_response_id` chains.

Each response keeps its request's input items, its output items, the whole response object, the
`previous_response_id` it continued and a session hint (an opaque string the server uses to find the KV cache
holding the conversation). Output items are also found by their own ids (`output_item`), for clients that send a
reasoning item back by id alone, or an `item_reference`. Input items get ids when stored: an item without an `id` gets one made from its type's
prefix (`msg_`, `fc_`, `fco_`, `rs_`, else `item_`) and 24 random hex digits, as the server's own output ids.

The store is bounded by the bytes of JSON it holds (the sum of the stored texts' UTF-8 lengths, not the file size,
which SQLite grows and reuses in pages): after an insert the oldest responses (by insertion order) are evicted
until the total is under the bound.

One connection guarded by a lock serves every thread: the server runs each turn on a fresh thread, so
per-thread connections would be opened for every request and closed only when their thread is collected, and
SQLite runs one writer at a time anyway; every operation here takes a few milliseconds. Every write is one
`BEGIN IMMEDIATE` transaction, so a crash mid-write leaves the previous state (WAL with `synchronous=NORMAL`:
consistent after any crash; a power loss may drop the last commits).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import OssrtError, ParameterError
from ..resolve import cache_dir
from .ids import new_id

SCHEMA_VERSION = 2  # 2: output_items; a version 1 file gains the table (its older items stay unindexed)
DEFAULT_MAX_BYTES = 256 * 2**20
STORE_FILE = "responses.sqlite3"
BUSY_TIMEOUT_MS = 5000  # another process (a second server) may hold the write lock briefly
MAX_PAGE = 100  # OpenAI's limit on input_items' page size
ITEM_ID_PREFIX = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}
OTHER_ITEM_PREFIX = "item_"

_SCHEMA_1 = """
CREATE TABLE responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order: eviction removes the lowest first
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    model TEXT NOT NULL,
    previous_response_id TEXT,
    session_hint TEXT,
    output TEXT NOT NULL,
    response TEXT NOT NULL,
    size INTEGER NOT NULL  -- bytes of JSON this response and its input items hold
);
CREATE INDEX responses_size ON responses (seq, size);  -- the total is summed from this index alone
CREATE TABLE input_items (
    response_seq INTEGER NOT NULL REFERENCES responses (seq) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (response_seq, position)
);
"""
_SCHEMA_2 = """
CREATE TABLE output_items (
    item_id TEXT PRIMARY KEY,
    response_seq INTEGER NOT NULL REFERENCES responses (seq) ON DELETE CASCADE
);
CREATE INDEX output_items_response ON output_items (response_seq);  -- cascading deletes find the rows
"""


class MissingResponseError(OssrtError):
    """A response a chain needs is not stored (never was, deleted, or evicted); `response_id` names it."""

    def __init__(self, response_id: str, message: str):
        super().__init__(message)
        self.response_id = response_id

    def __reduce__(self):  # pickled to other processes (a cluster's store actor) with both arguments
        return type(self), (self.response_id, str(self))


def default_store_path() -> Path:
    """The store's file in the cache folder models are converted into (`$OSSRT_CACHE`, else the platform's)."""
    return cache_dir() / STORE_FILE


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def with_item_ids(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `items`, each with an `id`: its own, or a new one with its type's prefix."""
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ParameterError(f"input[{i}] must be an object, got {type(item).__name__}")
        item = dict(item)
        if not isinstance(item.get("id"), str) or not item["id"]:
            item["id"] = new_id(ITEM_ID_PREFIX.get(item.get("type", "message"), OTHER_ITEM_PREFIX))
        out.append(item)
    return out


class ResponseStore:
    """Responses in the SQLite file at `path`, at most `max_bytes` of JSON. Safe to share between threads."""

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ParameterError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are begun here explicitly, never implicitly by the module.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=BUSY_TIMEOUT_MS / 1000)
        except (OSError, sqlite3.Error) as e:
            raise OssrtError(f"{self.path}: cannot open the response store: {e}") from None
        try:
            self._open()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise OssrtError(f"{self.path}: not a response store (use another --store path or remove the file): "
                             f"{e}") from None
        except OssrtError:
            self._db.close()
            raise

    def _open(self) -> None:
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]  # first read: a non-database fails here
        if mode.lower() != "wal":
            raise OssrtError(f"{self.path}: SQLite cannot use WAL mode on this file (journal mode {mode!r})")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._write():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0 and self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise OssrtError(f"{self.path}: a SQLite database of something else, not a response store "
                                 "(use another --store path)")
            if version > SCHEMA_VERSION:
                raise OssrtError(f"{self.path}: response store schema version {version}, this ossrt reads version "
                                 f"{SCHEMA_VERSION} (written by a newer ossrt; use another --store path)")
            # Tables and version in one transaction: another process sees both or neither (so statement by
            # statement: executescript would commit first).
            for schema in (_SCHEMA_1, _SCHEMA_2)[version:]:
                for statement in schema.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, taken at once (IMMEDIATE) so it cannot fail halfway on another writer's lock."""
        with self._transaction("BEGIN IMMEDIATE"):
            yield

    @contextmanager
    def _read(self) -> Iterator[None]:
        """Several reads from one snapshot, even while another process writes."""
        with self._transaction("BEGIN"):
            yield

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[None]:
        self._db.execute(begin)
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResponseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, response: Mapping[str, Any], input_items: Sequence[Mapping[str, Any]], *,
            previous_response_id: str | None = None, session_hint: str | None = None) -> list[str]:
        """Store `response` (a Responses object: `id`, `created_at`, `model`, `output`) with the request's input
        items (ids given where missing). Returns the ids evicted to stay under the bound, oldest first (the new
        response itself last, when it alone is larger than the bound)."""
        try:
            rid, created, model, output = (response[k] for k in ("id", "created_at", "model", "output"))
        except KeyError as e:
            raise ParameterError(f"the response to store has no {e.args[0]!r} field") from None
        if not isinstance(rid, str) or not rid:
            raise ParameterError(f"the response's id must be a non-empty string, got {rid!r}")
        if previous_response_id == rid:
            raise ParameterError(f"response {rid} cannot continue itself (previous_response_id)")
        items = [(item["id"], _json(item)) for item in with_item_ids(input_items)]
        output_json, response_json = _json(output), _json(response)
        size = sum(len(text.encode()) for text in (output_json, response_json, *(text for _, text in items)))
        with self._lock, self._write():
            try:
                seq = self._db.execute(
                    "INSERT INTO responses (id, created_at, model, previous_response_id, session_hint, output, "
                    "response, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (rid, created, model, previous_response_id, session_hint, output_json, response_json,
                     size)).lastrowid
            except sqlite3.IntegrityError:
                raise ParameterError(f"response {rid} is already stored") from None
            self._db.executemany("INSERT INTO input_items (response_seq, position, item_id, item) VALUES (?, ?, ?, ?)",
                                 [(seq, i, item_id, text) for i, (item_id, text) in enumerate(items)])
            # An id already indexed (an item of a response sent again as input) keeps its first response.
            self._db.executemany("INSERT OR IGNORE INTO output_items (item_id, response_seq) VALUES (?, ?)",
                                 [(item["id"], seq) for item in output if isinstance(item.get("id"), str)])
            return self._evict()

    def _evict(self) -> list[str]:
        total = self._db.execute("SELECT coalesce(sum(size), 0) FROM responses").fetchone()[0]
        evicted = []
        if total <= self.max_bytes:
            return evicted
        while total > self.max_bytes:
            seq, rid, size = self._db.execute("SELECT seq, id, size FROM responses ORDER BY seq LIMIT 1").fetchone()
            self._db.execute("DELETE FROM responses WHERE seq = ?", (seq,))
            evicted.append(rid)
            total -= size
        return evicted

    def get(self, response_id: str) -> dict[str, Any] | None:
        """The stored response object, or None."""
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE id = ?", (response_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def output_item(self, item_id: str) -> dict[str, Any] | None:
        """The stored output item with this id (a reasoning item, a message, a function call), or None."""
        with self._lock:
            row = self._db.execute("SELECT r.output FROM output_items o JOIN responses r ON r.seq = o.response_seq "
                                   "WHERE o.item_id = ?", (item_id,)).fetchone()
        if row is None:
            return None
        return next((item for item in json.loads(row[0]) if item.get("id") == item_id), None)

    def session_hint(self, response_id: str) -> str | None:
        """The session hint stored with the response (None when it had none or is not stored)."""
        with self._lock:
            row = self._db.execute("SELECT session_hint FROM responses WHERE id = ?", (response_id,)).fetchone()
        return None if row is None else row[0]

    def delete(self, response_id: str) -> bool:
        """Remove a response and its input items; False when it was not stored."""
        with self._lock, self._write():
            return self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def input_items(self, response_id: str, *, after: str | None = None, limit: int = 20,
                    order: str = "desc") -> dict[str, Any] | None:
        """A page of the response's input items as OpenAI's list object (`data`, `first_id`, `last_id`,
        `has_more`); `order` "desc" lists the last item first; `after` is the id of the item the previous page
        ended with. None when the response is not stored."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise ParameterError(f"limit must be an integer from 1 to {MAX_PAGE}, got {limit!r}")
        if order not in ("asc", "desc"):
            raise ParameterError(f"order must be 'asc' or 'desc', got {order!r}")
        with self._lock, self._read():
            row = self._db.execute("SELECT seq FROM responses WHERE id = ?", (response_id,)).fetchone()
            if row is None:
                return None
            seq = row[0]
            start = -1 if order == "asc" else 2**62  # before the first / after the last position
            if after is not None:
                found = self._db.execute("SELECT min(position) FROM input_items WHERE response_seq = ? AND "
                                         "item_id = ?", (seq, after)).fetchone()[0]
                if found is None:
                    raise ParameterError(f"after: no input item {after!r} in response {response_id}")
                start = found
            compare, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
            rows = self._db.execute(f"SELECT item FROM input_items WHERE response_seq = ? AND position {compare} ? "
                                    f"ORDER BY position {direction} LIMIT ?", (seq, start, limit + 1)).fetchall()
        data = [json.loads(text) for text, in rows[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}

    def chain(self, response_id: str) -> list[dict[str, Any]]:
        """The conversation up to and including `response_id`, oldest first: each response's input items, then
        its output items, from the first of its `previous_response_id` chain. MissingResponseError names the
        first response of the chain that is not stored."""
        links = []
        with self._lock, self._read():
            wanted, seen = response_id, set()
            while wanted is not None:
                if wanted in seen:  # put() cannot make a cycle unless ids were reused after deletes
                    raise MissingResponseError(wanted, f"response {wanted} continues itself through its chain")
                seen.add(wanted)
                row = self._db.execute("SELECT seq, previous_response_id, output FROM responses WHERE id = ?",
                                       (wanted,)).fetchone()
                if row is None:
                    child = f" (the previous response of {links[-1][0]})" if links else ""
                    raise MissingResponseError(wanted, f"response {wanted}{child} is not stored: it was never "
                                                       "stored, was deleted, or was evicted")
                links.append((wanted, row[0], row[2]))
                wanted = row[1]
            conversation = []
            for _, seq, output in reversed(links):
                conversation += [json.loads(text) for text, in self._db.execute(
                    "SELECT item FROM input_items WHERE response_seq = ? ORDER BY position", (seq,))]
                conversation += json.loads(output)
        return conversation
