"""ResponseStore on a real SQLite file: storing, paging, chaining, eviction, reopening, threads, bad files."""

import json
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from ossrt.errors import OssrtError, ParameterError
from ossrt.server import store as store_module
from ossrt.server.store import MissingResponseError, ResponseStore, default_store_path


def user(text, **extra):
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}], **extra}


def response(rid, text="hi", created=1700000000):
    out = [{"type": "message", "id": f"msg_out_{rid}", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    return {"id": rid, "object": "response", "created_at": created, "model": "gpt-oss-20b", "status": "completed",
            "output": out}


@pytest.fixture
def db(tmp_path):
    with ResponseStore(tmp_path / "r.sqlite3") as s:
        yield s


def test_round_trip_and_ids_given_to_items(db):
    items = [user("one", id="msg_mine"), user("two"),
             {"type": "function_call_output", "call_id": "call_1", "output": "42"},
             {"role": "user", "content": "plain"}]
    assert db.put(response("resp_a"), items, session_hint="conv-7") == []
    assert db.get("resp_a") == response("resp_a")
    assert db.session_hint("resp_a") == "conv-7"
    assert db.get("resp_missing") is None
    data = db.input_items("resp_a", order="asc")["data"]
    assert data[0] == user("one", id="msg_mine")
    assert [d["id"][:4] for d in data[1:]] == ["msg_", "fco_", "msg_"]
    assert all(len(d["id"].split("_")[1]) == 24 for d in data[1:])
    assert {k: v for k, v in data[2].items() if k != "id"} == items[2]
    assert "id" not in items[1]  # the caller's items are not changed
    with pytest.raises(ParameterError, match="resp_a is already stored"):
        db.put(response("resp_a"), [])


def test_delete(db):
    db.put(response("resp_a"), [user("x")])
    assert db.delete("resp_a") is True
    assert db.get("resp_a") is None
    assert db.input_items("resp_a") is None
    assert db.delete("resp_a") is False
    assert db._db.execute("SELECT count(*) FROM input_items").fetchone()[0] == 0


def test_input_items_pages_both_orders(db):
    items = [user(str(i), id=f"msg_{i}") for i in range(5)]
    db.put(response("resp_a"), items)
    page = db.input_items("resp_a", limit=2, order="asc")
    assert page == {"object": "list", "data": items[:2], "first_id": "msg_0", "last_id": "msg_1", "has_more": True}
    page = db.input_items("resp_a", after="msg_1", limit=2, order="asc")
    assert [page["first_id"], page["last_id"], page["has_more"]] == ["msg_2", "msg_3", True]
    page = db.input_items("resp_a", after="msg_3", limit=2, order="asc")
    assert page["data"] == items[4:] and page["has_more"] is False
    page = db.input_items("resp_a", limit=2)  # desc by default: the last item first
    assert [d["id"] for d in page["data"]] == ["msg_4", "msg_3"] and page["has_more"] is True
    page = db.input_items("resp_a", after="msg_3", limit=3)
    assert [d["id"] for d in page["data"]] == ["msg_2", "msg_1", "msg_0"] and page["has_more"] is False
    page = db.input_items("resp_a", after="msg_0")
    assert page == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    assert [d["id"] for d in db.input_items("resp_a")["data"]] == [f"msg_{i}" for i in (4, 3, 2, 1, 0)]
    with pytest.raises(ParameterError, match="after: no input item 'msg_9' in response resp_a"):
        db.input_items("resp_a", after="msg_9")
    with pytest.raises(ParameterError, match="limit must be an integer from 1 to 100, got 101"):
        db.input_items("resp_a", limit=101)
    with pytest.raises(ParameterError, match="order must be 'asc' or 'desc', got 'up'"):
        db.input_items("resp_a", order="up")


def test_chain_of_three(db):
    db.put(response("resp_1", "a1"), [user("q1", id="msg_q1")])
    db.put(response("resp_2", "a2"), [user("q2", id="msg_q2")], previous_response_id="resp_1")
    db.put(response("resp_3", "a3"), [user("q3", id="msg_q3")], previous_response_id="resp_2")
    got = db.chain("resp_3")
    assert [item["id"] for item in got] == ["msg_q1", "msg_out_resp_1", "msg_q2", "msg_out_resp_2", "msg_q3",
                                            "msg_out_resp_3"]
    assert got[1]["content"][0]["text"] == "a1"
    assert [item["id"] for item in db.chain("resp_1")] == ["msg_q1", "msg_out_resp_1"]
    # input_items lists only the items sent with that request, not the inherited ones.
    assert [d["id"] for d in db.input_items("resp_3")["data"]] == ["msg_q3"]


def test_chain_with_missing_ancestor_names_it(db):
    db.put(response("resp_1"), [user("q1")])
    db.put(response("resp_2"), [user("q2")], previous_response_id="resp_1")
    db.put(response("resp_3"), [user("q3")], previous_response_id="resp_2")
    db.delete("resp_2")
    with pytest.raises(MissingResponseError, match="response resp_2 \\(the previous response of resp_3\\) is not "
                                                   "stored") as e:
        db.chain("resp_3")
    assert e.value.response_id == "resp_2"
    with pytest.raises(MissingResponseError, match="response resp_x is not stored") as e:
        db.chain("resp_x")
    assert e.value.response_id == "resp_x"
    with pytest.raises(ParameterError, match="cannot continue itself"):
        db.put(response("resp_4"), [], previous_response_id="resp_4")


def test_eviction_oldest_first_under_a_small_bound(tmp_path):
    def size_of(rid, items):
        return sum(len(json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode())
                   for v in (response(rid)["output"], response(rid), *items))

    items = [user("é" * 200, id="msg_x")]  # non-ASCII: the bound counts UTF-8 bytes
    one = size_of("resp_0", items)
    with ResponseStore(tmp_path / "r.sqlite3", max_bytes=3 * one + 10) as db:
        for i in range(3):
            assert db.put(response(f"resp_{i}"), items) == []
        assert db._db.execute("SELECT sum(size) FROM responses").fetchone()[0] == 3 * one
        assert db.put(response("resp_3"), items) == ["resp_0"]
        db.get("resp_1")  # reading does not change the order: eviction is by insertion, not use
        assert db.put(response("resp_4"), items) == ["resp_1"]
        assert [db.get(f"resp_{i}") is not None for i in range(5)] == [False, False, True, True, True]
        assert db._db.execute("SELECT count(*) FROM input_items").fetchone()[0] == 3
        big = [user("x" * (4 * one))]
        assert db.put(response("resp_big"), big) == ["resp_2", "resp_3", "resp_4", "resp_big"]
        assert db._db.execute("SELECT count(*) FROM responses").fetchone()[0] == 0


def test_reopen_keeps_data(tmp_path):
    path = tmp_path / "sub" / "r.sqlite3"  # the folder is made on first use
    with ResponseStore(path) as db:
        db.put(response("resp_1"), [user("q1", id="msg_q1")], session_hint="s1")
        db.put(response("resp_2"), [user("q2", id="msg_q2")], previous_response_id="resp_1")
    with ResponseStore(path) as db:
        assert db.get("resp_1") == response("resp_1")
        assert db.session_hint("resp_1") == "s1"
        assert [item["id"] for item in db.chain("resp_2")] == ["msg_q1", "msg_out_resp_1", "msg_q2",
                                                               "msg_out_resp_2"]


def test_concurrent_writers_from_threads(db):
    errors, per_thread, threads = [], 25, 8

    def work(t):
        try:
            for i in range(per_thread):
                rid = f"resp_{t}_{i}"
                db.put(response(rid), [user(rid)], previous_response_id=f"resp_{t}_{i - 1}" if i else None)
                assert db.get(rid)["id"] == rid
                assert len(db.input_items(rid)["data"]) == 1
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    assert db._db.execute("SELECT count(*) FROM responses").fetchone()[0] == threads * per_thread
    assert len(db.chain(f"resp_3_{per_thread - 1}")) == 2 * per_thread


def test_wal_mode_and_schema_version(tmp_path):
    path = tmp_path / "r.sqlite3"
    ResponseStore(path).close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION
    con.close()


def test_a_file_that_is_not_sqlite_is_refused_by_name(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the bytes of a database\n" * 100)
    with pytest.raises(OssrtError, match=f"{path}: not a response store"):
        ResponseStore(path)
    assert path.read_bytes().startswith(b"these are not")


def test_a_future_schema_version_is_refused_by_name(tmp_path):
    path = tmp_path / "r.sqlite3"
    ResponseStore(path).close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version=99")
    con.close()
    with pytest.raises(OssrtError, match=f"{path}: response store schema version 99, this ossrt reads version 2"):
        ResponseStore(path)


def test_another_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite3"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x)")
    con.close()
    with pytest.raises(OssrtError, match="a SQLite database of something else"):
        ResponseStore(path)


def test_default_path_is_in_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSRT_CACHE", str(tmp_path))
    assert default_store_path() == tmp_path / "responses.sqlite3"


def test_bad_max_bytes(tmp_path):
    with pytest.raises(ParameterError, match="max_bytes must be a positive integer, got 0"):
        ResponseStore(tmp_path / "r.sqlite3", max_bytes=0)


_WRITER = """
import sys
from ossrt.server.store import ResponseStore
db = ResponseStore(sys.argv[1], max_bytes=400_000)  # small: evictions run too while the process is killed
items = [{"type": "message", "role": "user", "content": "x" * 500} for _ in range(50)]
for i in range(10**6):
    db.put({"id": f"resp_{i}", "created_at": i, "model": "m", "output": []}, items)
    if i == 20:
        print("writing", flush=True)
"""


def test_a_writer_killed_mid_write_leaves_a_consistent_store(tmp_path):
    path = tmp_path / "r.sqlite3"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"writing\n"
        time.sleep(0.3)
    finally:
        writer.kill()
        writer.wait()
    with ResponseStore(path) as db:
        assert db._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counts = db._db.execute("SELECT r.id, count(i.position) FROM responses r LEFT JOIN input_items i "
                                "ON i.response_seq = r.seq GROUP BY r.seq").fetchall()
        assert len(counts) > 0 and {n for _, n in counts} == {50}
        assert db._db.execute("SELECT count(*) FROM input_items WHERE response_seq NOT IN "
                              "(SELECT seq FROM responses)").fetchone()[0] == 0
        assert db._db.execute("SELECT sum(size) FROM responses").fetchone()[0] <= 400_000


def test_output_items_are_found_by_id_until_their_response_goes(db):
    db.put(response("resp_a", "first"), [user("q")])
    item = db.output_item("msg_out_resp_a")
    assert item["content"][0]["text"] == "first" and db.output_item("msg_unknown") is None
    db.delete("resp_a")
    assert db.output_item("msg_out_resp_a") is None
    assert db._db.execute("SELECT count(*) FROM output_items").fetchone()[0] == 0


def test_a_version_1_store_is_upgraded_and_keeps_its_responses(tmp_path):
    path = tmp_path / "r.sqlite3"
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    for statement in store_module._SCHEMA_1.split(";"):
        if statement.strip():
            con.execute(statement)
    con.execute("PRAGMA user_version=1")
    con.execute("INSERT INTO responses (id, created_at, model, output, response, size) VALUES "
                "('resp_old', 1, 'm', '[]', '{\"id\": \"resp_old\"}', 10)")
    con.close()
    with ResponseStore(path) as s:
        assert s.get("resp_old") == {"id": "resp_old"}
        s.put(response("resp_new"), [])
        assert s.output_item("msg_out_resp_new")["id"] == "msg_out_resp_new"
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2
