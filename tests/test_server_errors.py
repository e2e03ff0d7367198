"""`ossrt serve` against malformed requests, through raw httpx and sockets on live servers on 127.0.0.1: every one
gets a 4xx with OpenAI's error body and one log line, never a 500 or a traceback; bugs get one traceback; a
connection that stalls in its request head is closed."""

import json
import logging
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import ossrt  # noqa: E402
from ossrt.errors import ModelOutputError  # noqa: E402
from ossrt.server import chat_completions as server_chat  # noqa: E402
from ossrt.server import responses as server_responses  # noqa: E402
from server_support import live_server  # noqa: E402

ID = "gpt-oss-test"
KEY = "sekrit"
ANSWER = "<|channel|>final<|message|>Hello there, friend!<|return|>"
CHAT, RESPONSES = "/v1/chat/completions", "/v1/responses"
ASK = [{"role": "user", "content": "Hi!"}]
JSON = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
FN = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
FLAT = {"type": "function", "name": "f"}
HEADER_TIMEOUT = 0.5


class Records(logging.Handler):
    """The log records of the server; `wait_for` blocks until one satisfies a test."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.added = threading.Condition()

    def emit(self, record):
        with self.added:
            self.records.append(record)
            self.added.notify_all()

    def wait_for(self, predicate, timeout=30.0) -> bool:  # a bound for a failing test
        with self.added:
            return self.added.wait_for(predicate, timeout)


@pytest.fixture(scope="module")
def live(scripted_gguf):
    """Two servers on one model: `url` (API key, default header timeout) and `slow_url` (no key, a header timeout of
    HEADER_TIMEOUT, for raw sockets only); `log` holds what the server and uvicorn log."""
    model = ossrt.load(scripted_gguf(ANSWER), context_length=512, threads=1)  # as `ossrt serve -t 1`
    log = Records()
    with live_server(model, model_id=ID, api_key=KEY) as main, \
            live_server(model, model_id=ID, header_timeout=HEADER_TIMEOUT) as slow:
        yield type("Live", (), dict(url=main.url, slow_url=slow.url, log=log, app=main.app))
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(log)
        logging.getLogger("ossrt.server").setLevel(logging.NOTSET)


LOGGERS = ("ossrt.server", "uvicorn.error")  # every server module logs below "ossrt.server"


@pytest.fixture
def log(live):
    """The log records of one test. Attached anew each time: starting a uvicorn server configures logging, which
    resets the handlers and levels of the loggers it names and of their children."""
    for name in LOGGERS:
        if live.log not in logging.getLogger(name).handlers:
            logging.getLogger(name).addHandler(live.log)
    logging.getLogger("ossrt.server").setLevel(logging.INFO)
    live.log.records.clear()
    return live.log


def post(live, path, body, headers=JSON):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(live.url + path, content=content, headers=headers, timeout=60)


def assert_error(r, status, param, code, type="invalid_request_error"):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == (type, param, code), error
    return error


def lines(log, prefix="ossrt.server"):
    """What the server logged (not uvicorn)."""
    return [r.getMessage() for r in log.records if r.name.startswith(prefix)]


def assert_no_traceback(log):
    assert [r.getMessage() for r in log.records if r.exc_info] == []


def wait_for_line(log, text):
    """The log lines containing `text`, once the server wrote one (after the client saw the connection end)."""
    assert log.wait_for(lambda: any(text in line for line in lines(log))), lines(log)
    return [line for line in lines(log) if text in line]


def deep(n):
    return "[" * n + "]" * n


def chat(**fields):
    return {"model": ID, "messages": ASK, **fields}


def responses(**fields):
    return {"model": ID, "input": "Hi!", **fields}


# --- bodies that are not JSON the server can use -----------------------------------------------------------------
@pytest.mark.parametrize("path, body, status, param, code", [
    (CHAT, ('{"model": "%s", "messages": %s}' % (ID, deep(5000))).encode(), 400, None, "invalid_json"),
    (RESPONSES, ('{"model": "%s", "input": "hi", "metadata": {"a": %s}}' % (ID, deep(150))).encode(), 400, None,
     "invalid_json"),
    (CHAT, ('{"model": "%s", "messages": [], "tools": [{"type": "function", "function": {"name": "f", "parameters": '
            '{"type": "object", "properties": {"x": {"type": "number", "default": NaN}}}}}]}' % ID).encode(), 400,
     None, "invalid_json"),
    (CHAT, ('{"model": "%s", "messages": [], "temperature": Infinity}' % ID).encode(), 400, None, "invalid_json"),
    (CHAT, ('{"model": "%s", "messages": [], "temperature": -1e999}' % ID).encode(), 400, None, "invalid_json"),
    (CHAT, b'{"model": "\xff"}', 400, None, "invalid_json"),
    (CHAT, chat(temperature=10**400), 400, "temperature", "invalid_value"),
    (RESPONSES, responses(instructions="be \ud800 brief"), 400, "instructions", "invalid_value"),
    (RESPONSES, responses(metadata={"k": "v\udfff"}), 400, "metadata.k", "invalid_value"),
    (RESPONSES, responses(metadata={"k\ud800": "v"}), 400, "metadata.k\\ud800", "invalid_value"),
    (RESPONSES, b'{"model": "%s", "input": "\xed\xa0\x80"}' % ID.encode(), 400, "input", "invalid_value"),
    # (a surrogate encoded as UTF-8 bytes: Python's JSON parser lets them through)
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]), 400,
     "messages[0].content[0].text", "invalid_value"),
    (RESPONSES, responses(tools=[{**FLAT, "description": "\udc00"}]), 400, "tools[0].description", "invalid_value"),
])
def test_bodies_that_cannot_be_used(live, log, path, body, status, param, code):
    assert_error(post(live, path, body), status, param, code)
    [line] = lines(log)
    assert line.startswith(f"POST {path} {status}: ") and len(line.splitlines()) == 1
    assert_no_traceback(log)


@pytest.mark.parametrize("method, path, status, code", [
    ("POST", CHAT + "/", 404, "not_found"), ("POST", RESPONSES + "/", 404, "not_found"),
    ("POST", "/v1/embeddings", 404, "not_found"), ("GET", CHAT, 405, "method_not_allowed"),
])
def test_unknown_paths_and_methods(live, log, method, path, status, code):
    r = httpx.request(method, live.url + path, json=chat(), headers=JSON, timeout=60)
    error = assert_error(r, status, None, code)
    assert error["message"].startswith(f"{method} {path}: ")
    assert lines(log) == [f"{method} {path} {status}: {error['message']}"]


def test_what_is_refused_can_still_be_echoed(live):
    """Surrogate pairs are text, and nesting within the limit comes back as sent."""
    metadata = {"a": json.loads(deep(90)), "emoji": "😀"}  # sent as the escaped pair "\ud83d\ude00"
    r = post(live, RESPONSES, responses(instructions="Smile 😀", metadata=metadata))
    assert r.status_code == 200, r.text
    assert r.json()["instructions"] == "Smile 😀" and r.json()["metadata"] == metadata


# --- fields of the wrong JSON type or shape ----------------------------------------------------------------------
@pytest.mark.parametrize("path, body, status, param, code", [
    # tools and tool_choice
    *[(CHAT, chat(tools=[{"type": "function", "function": "f"}], tool_choice=choice), 422, "tools[0].function",
       "invalid_type") for choice in ("required", {"type": "function", "function": {"name": "f"}}, "auto")],
    *[(RESPONSES, responses(tools=[{"type": "function", "function": "f"}], tool_choice=choice), 422,
       "tools[0].function", "invalid_type") for choice in ("required", {"type": "function", "name": "f"})],
    (CHAT, chat(tools="f"), 422, "tools", "invalid_type"),
    (CHAT, chat(tools=[5]), 422, "tools[0]", "invalid_type"),
    (CHAT, chat(tools=[{"function": FN["function"]}]), 422, "tools[0].type", "missing_required_parameter"),
    (CHAT, chat(tools=[{"type": 5, "function": FN["function"]}]), 422, "tools[0].type", "invalid_type"),
    (CHAT, chat(tools=[{"type": "spreadsheet"}]), 400, "tools[0].type", "unsupported_value"),
    (CHAT, chat(tools=[FLAT]), 422, "tools[0].function", "missing_required_parameter"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": ["f"]}}]), 422, "tools[0].function.name",
     "invalid_type"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "description": 5}}]), 422,
     "tools[0].function.description", "invalid_type"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]), 422,
     "tools[0].function.parameters", "invalid_type"),
    (RESPONSES, responses(tools=[{"type": "function"}]), 422, "tools[0].name", "missing_required_parameter"),
    (RESPONSES, responses(tools=[{**FLAT, "parameters": "x"}]), 422, "tools[0].parameters", "invalid_type"),
    (RESPONSES, responses(tools=[{"type": "computer"}]), 400, "tools[0].type", "unsupported_value"),
    (RESPONSES, responses(tools=[{"type": "namespace", "name": "ns", "tools": [{"type": "web_search"}]}]), 400,
     "tools[0].tools[0].type", "unsupported_value"),
    (RESPONSES, responses(tools=[{"type": "namespace", "name": "ns"}]), 422, "tools[0].tools",
     "missing_required_parameter"),
    (RESPONSES, responses(include=["reasoning.encrypted_content", 7]), 422, "include[1]", "invalid_type"),
    (CHAT, chat(tools=[FN], tool_choice=5), 422, "tool_choice", "invalid_type"),
    (CHAT, chat(tools=[FN], tool_choice=["f"]), 422, "tool_choice", "invalid_type"),
    (CHAT, chat(tools=[FN], tool_choice="sometimes"), 400, "tool_choice", "invalid_value"),
    (CHAT, chat(tools=[FN], tool_choice={"type": "function"}), 422, "tool_choice.function",
     "missing_required_parameter"),
    (CHAT, chat(tools=[FN], tool_choice={"type": "function", "function": "f"}), 422, "tool_choice.function",
     "invalid_type"),
    (CHAT, chat(tools=[FN], tool_choice={"type": "function", "function": {"name": 5}}), 422,
     "tool_choice.function.name", "invalid_type"),
    (CHAT, chat(tools=[FN], tool_choice={"type": "allowed_tools", "allowed_tools": {}}), 400, "tool_choice.type",
     "unsupported_value"),
    (CHAT, chat(tool_choice={"type": "function", "function": {"name": "f"}}), 400, "tool_choice", "invalid_value"),
    (RESPONSES, responses(tools=[FLAT], tool_choice={"type": "function"}), 422, "tool_choice.name",
     "missing_required_parameter"),
    (RESPONSES, responses(tools=[FLAT], tool_choice={"type": "function", "name": "g"}), 400, "tool_choice",
     "invalid_value"),
    (RESPONSES, responses(tools=[FLAT], tool_choice={"type": "web_search_preview"}), 400, "tool_choice.type",
     "unsupported_value"),
    # Responses input items
    (RESPONSES, responses(input=[{"type": "reasoning", "content": [{"type": "reasoning_text", "text": 5}]}]), 422,
     "input[0].content[0].text", "invalid_type"),
    (RESPONSES, responses(input=[{"type": "reasoning", "summary": [{"text": 5}]}]), 422, "input[0].summary[0].text",
     "invalid_type"),
    (RESPONSES, responses(input=[{"type": "reasoning", "summary": "thoughts"}]), 422, "input[0].summary",
     "invalid_type"),
    (RESPONSES, responses(input=[{"type": "reasoning", "content": ["thoughts"]}]), 422, "input[0].content[0]",
     "invalid_type"),
    (RESPONSES, responses(input=[5]), 422, "input[0]", "invalid_type"),
    (RESPONSES, responses(input=[{"type": 5}]), 422, "input[0].type", "invalid_type"),
    (RESPONSES, responses(input=[{"role": "user"}]), 422, "input[0].content", "missing_required_parameter"),
    (RESPONSES, responses(input=[{"role": "user", "content": {"text": "hi"}}]), 422, "input[0].content",
     "invalid_type"),
    (RESPONSES, responses(input=[{"role": "user", "content": [5]}]), 422, "input[0].content[0]", "invalid_type"),
    (RESPONSES, responses(input=[{"role": "user", "content": [{"type": "input_text", "text": 5}]}]), 422,
     "input[0].content[0].text", "invalid_type"),
    (RESPONSES, responses(input=[{"role": "user", "content": [{"text": "hi"}]}]), 422, "input[0].content[0].type",
     "missing_required_parameter"),
    (RESPONSES, responses(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), 400,
     "input[0].content[0].type", "unsupported_value"),
    (RESPONSES, responses(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]), 422,
     "input[0].arguments", "invalid_type"),
    (RESPONSES, responses(input=[{"type": "function_call_output", "call_id": "c", "output": 5}]), 422,
     "input[0].output", "invalid_type"),
    (RESPONSES, responses(input=[{"type": "function_call_output", "call_id": "c"}]), 422, "input[0].output",
     "missing_required_parameter"),
    # chat messages
    (CHAT, chat(messages=[5]), 422, "messages[0]", "invalid_type"),
    (CHAT, chat(messages=[{"role": 5, "content": "hi"}]), 422, "messages[0].role", "invalid_type"),
    (CHAT, chat(messages=[{"content": "hi"}]), 422, "messages[0].role", "missing_required_parameter"),
    (CHAT, chat(messages=[{"role": "user", "content": 5}]), 422, "messages[0].content", "invalid_type"),
    (CHAT, chat(messages=[{"role": "user", "content": [5]}]), 422, "messages[0].content[0]", "invalid_type"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), 422,
     "messages[0].content[0].text", "invalid_type"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": None, "text": "hi"}]}]), 422,
     "messages[0].content[0].type", "missing_required_parameter"),
    (CHAT, chat(messages=[{"role": "assistant", "tool_calls": "f"}]), 422, "messages[0].tool_calls", "invalid_type"),
    (CHAT, chat(messages=[{"role": "assistant", "tool_calls": [{"id": "c", "function": "f"}]}]), 422,
     "messages[0].tool_calls[0].function", "invalid_type"),
    (CHAT, chat(messages=[{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f",
                                                                                        "arguments": {}}}]}]),
     422, "messages[0].tool_calls[0].function.arguments", "invalid_type"),
    (CHAT, chat(messages=[{"role": "assistant", "content": "x", "reasoning_content": 5}]), 422,
     "messages[0].reasoning_content", "invalid_type"),
    (CHAT, chat(messages=[*ASK, {"role": "tool", "tool_call_id": 5, "content": "x"}]), 422,
     "messages[1].tool_call_id", "invalid_type"),
])
def test_fields_of_the_wrong_type_or_shape(live, log, path, body, status, param, code):
    test_bodies_that_cannot_be_used(live, log, path, body, status, param, code)


# --- headers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type, status", [
    ("application/json", 200), ("Application/JSON; charset=UTF-8", 200), ('application/json;charset="utf-8"', 200),
    ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("application/json; charset=latin-1", 415),
    ("application/jsonl", 415), (None, 415),
])
def test_content_type(live, log, content_type, status):
    headers = {"Authorization": f"Bearer {KEY}", **({"Content-Type": content_type} if content_type else {})}
    r = post(live, CHAT, chat(max_tokens=2), headers=headers)
    if status == 200:
        assert r.status_code == 200, r.text
        assert lines(log) == []
    else:
        assert_error(r, 415, None, "unsupported_content_type")
        assert lines(log) == [f"POST {CHAT} 415: {r.json()['error']['message']}"]


def test_the_openai_client_sends_what_is_accepted(live):
    c = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert c.chat.completions.create(model=ID, messages=ASK).choices[0].message.content == "Hello there, friend!"
    assert c.responses.create(model=ID, input="Hi!").output_text == "Hello there, friend!"


@pytest.mark.parametrize("authorization, ok", [
    (f"Bearer {KEY}", True), (f"bearer {KEY}", True), (f"BEARER {KEY}", True), (f"Bearer    {KEY}", True),
    (None, False), ("Bearer wrong", False), (f"Basic {KEY}", False), (f"Bearer{KEY}", False),
    (f"Bearer\t{KEY}", False), (f"Bearer {KEY} {KEY}", False), (f"Bearer {KEY}x", False), ("Bearer", False),
    (f"Token {KEY}", False),
])
def test_authorization_rule(live, log, authorization, ok):
    """The scheme in any case, one or more spaces, then exactly the key; on POST and GET."""
    headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
    r = post(live, CHAT, chat(max_tokens=2), headers=headers)
    models = httpx.get(live.url + "/v1/models", headers=headers, timeout=60)
    if ok:
        assert (r.status_code, models.status_code) == (200, 200), r.text
    else:
        assert_error(r, 401, None, "invalid_api_key")
        assert_error(models, 401, None, "invalid_api_key")
        assert len(lines(log)) == 2
    assert_no_traceback(log)


# --- threads -----------------------------------------------------------------------------------------------------
def test_requests_run_with_the_models_thread_count(live, monkeypatch):
    """Numba's thread count is per thread: each request's turn thread must apply the model's (-t)."""
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: a single thread is also Numba's default")
    transformer = live.app.state.server.model.engine.transformer
    forward, seen = transformer.forward, []

    def counting(*args, **kwargs):
        logits = forward(*args, **kwargs)
        seen.append((threading.current_thread().name, numba.get_num_threads()))  # what the pass set in this thread
        return logits

    monkeypatch.setattr(transformer, "forward", counting)
    assert post(live, CHAT, chat(max_tokens=2)).status_code == 200
    assert seen and set(seen) == {("ossrt-turn", 1)}


# --- failures of the server, not of the request ------------------------------------------------------------------
def stream_events(lines):
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


def nan_logits(self, event):
    raise ModelOutputError("the model produced NaN logits: the model file is probably corrupt")


def test_model_output_error_is_a_500_that_says_so(live, log, monkeypatch):
    monkeypatch.setattr(server_chat.ChatCompletion, "event", nan_logits)
    error = assert_error(post(live, CHAT, chat()), 500, None, "model_error", type="server_error")
    assert "not a problem with the request" in error["message"] and "probably corrupt" in error["message"]
    assert lines(log) == [f"POST {CHAT} 500: {error['message']}"]
    assert [r.levelname for r in log.records] == ["ERROR"]
    log.records.clear()
    with httpx.stream("POST", live.url + CHAT, json=chat(stream=True), headers=JSON, timeout=60) as r:
        assert r.status_code == 200  # the stream had started: the error comes as its last event
        events = stream_events(r.iter_lines())
    assert events[-1]["error"]["code"] == "model_error" and "probably corrupt" in events[-1]["error"]["message"]
    assert lines(log) == [f"POST {CHAT} 500 in the stream: {error['message']}"]
    assert_no_traceback(log)


def test_an_error_in_a_responses_stream_is_its_last_event(live, log, monkeypatch):
    monkeypatch.setattr(server_responses.ResponsesOutput, "event", nan_logits)
    with httpx.stream("POST", live.url + RESPONSES, json=responses(stream=True), headers=JSON, timeout=60) as r:
        assert r.status_code == 200
        body = list(r.iter_lines())
    events = stream_events(body)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "error"]
    assert body[-3] == "event: error" and events[-1]["sequence_number"] == 2
    assert (events[-1]["code"], events[-1]["param"]) == ("model_error", None)
    assert "probably corrupt" in events[-1]["message"] and "not a problem with the request" in events[-1]["message"]
    assert lines(log) == [f"POST {RESPONSES} 500 in the stream: {events[-1]['message']}"]


def test_a_corrupt_model_file_gets_a_500(tiny_gguf, tmp_path):
    """A file whose output weights are NaN: the model's failure, reported as such by both endpoints."""
    import numpy as np

    from ossrt.format.modelfile import ModelFile

    path = tmp_path / "nan.gguf"
    path.write_bytes(tiny_gguf("f32").read_bytes())
    with ModelFile.open(path) as mf:
        weight = mf.tensors["output.weight"].data
        offset = weight.__array_interface__["data"][0] - np.frombuffer(mf._buf, np.uint8).__array_interface__["data"][0]
        count = weight.size
    np.memmap(path, mode="r+", dtype=np.float32, offset=offset, shape=(count,))[:] = np.nan
    with live_server(ossrt.load(path, context_length=256), model_id=ID) as live:
        for path, body in ((CHAT, chat()), (RESPONSES, responses())):
            r = httpx.post(live.url + path, json=body, timeout=60)
            error = assert_error(r, 500, None, "model_error", type="server_error")
            assert "non-finite" in error["message"] and "not a problem with the request" in error["message"]


def test_a_bug_gets_one_traceback(live, log, monkeypatch):
    def bug(self, event):
        raise KeyError("oops")

    monkeypatch.setattr(server_chat.ChatCompletion, "event", bug)
    error = assert_error(post(live, CHAT, chat()), 500, None, "internal_error", type="server_error")
    assert error["message"] == "internal error: KeyError: 'oops'"
    assert [(r.name, r.getMessage(), r.exc_info[0]) for r in log.records] == [
        ("ossrt.server.app", f"POST {CHAT} 500: {error['message']}", KeyError)]
    log.records.clear()
    with httpx.stream("POST", live.url + CHAT, json=chat(stream=True), headers=JSON, timeout=60) as r:
        events = stream_events(r.iter_lines())
    assert events[-1]["error"]["code"] == "internal_error"
    assert [(r.name, r.exc_info[0]) for r in log.records] == [("ossrt.server.app", KeyError)]
    log.records.clear()
    monkeypatch.setattr(live.app.state.server, "model_object", lambda: 1 / 0)  # a bug outside any turn
    assert_error(httpx.get(live.url + "/v1/models", headers=JSON, timeout=60), 500, None, "internal_error",
                 type="server_error")
    assert [(r.name, r.exc_info[0]) for r in log.records] == [("ossrt.server.app", ZeroDivisionError)]


def raw(url) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)  # a bound for a failing test, not a measurement
    return s


def read_response(s) -> bytes:
    """One response with a Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def read_until_closed(s) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_a_body_cut_short_gets_one_line(live, log):
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n")
    with raw(live.url) as s:  # a malformed chunked body: uvicorn answers 400 and the app sees the client leave
        s.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
        assert read_until_closed(s).startswith(b"HTTP/1.1 400 ")
    wait_for_line(log, "closed the connection before sending the whole request")
    log.records.clear()
    with raw(live.url) as s:  # half the announced body, then gone
        s.sendall(head.encode() + b"Content-Length: 100\r\n\r\n" + b'{"model": "x"')
    assert wait_for_line(log, "closed the connection") == [
        f"POST {CHAT}: the client closed the connection before sending the whole request"]
    assert_no_traceback(log)


# --- the header timeout ------------------------------------------------------------------------------------------
def test_a_stalled_request_head_is_closed(live, log):
    with raw(live.slow_url) as s:  # half a head
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        assert read_until_closed(s) == b""
    with raw(live.slow_url) as s:  # nothing at all
        assert read_until_closed(s) == b""
    with raw(live.slow_url) as s:  # a whole request, then half of the next head on the same connection
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = read_response(s)
        assert first.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in first
        s.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert read_until_closed(s) == b""
    closed = [line for line in lines(log) if line.startswith("closing a connection from 127.0.0.1:")]
    assert len(closed) == 3 and all(line.endswith(f"no complete request head within {HEADER_TIMEOUT:g} s")
                                    for line in closed)
    # A request whose body comes slowly is not cut: the timeout covers the head only.
    with raw(live.slow_url) as s:
        body = json.dumps({"model": "another-model", "messages": ASK}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
        time.sleep(3 * HEADER_TIMEOUT)
        s.sendall(body[10:])
        assert read_until_closed(s).startswith(b"HTTP/1.1 404 ")  # the whole body was read: the model is unknown
