"""`ossrt serve` through the official openai client against live servers on 127.0.0.1 (tiny scripted models)."""

import json
import socket
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import ossrt  # noqa: E402
from ossrt.server import create_app  # noqa: E402

ANSWER = "<|channel|>final<|message|>Hello there, friend!<|return|>"
TOOL_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Berlin"}<|call|>'
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ASK = [{"role": "user", "content": "What's the weather in Berlin right now?"}]


def start(model, **kwargs) -> tuple[str, uvicorn.Server]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model, "gpt-oss-test", **kwargs), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


@pytest.fixture(scope="module")
def servers(scripted_gguf, tiny_gguf):
    models = {name: ossrt.load(path, context_length=512) for name, path in
              (("answer", scripted_gguf(ANSWER)), ("tool", scripted_gguf(TOOL_CALL)),
               ("endless", scripted_gguf("<|channel|>final<|message|>one two three four five", loop=True)),
               ("random", tiny_gguf()))}
    started = {name: start(m) for name, m in models.items()}
    started["locked"] = start(models["answer"], api_key="sekrit", max_body_bytes=4096)
    yield {name: url for name, (url, _) in started.items()}, models
    for _, server in started.values():
        server.should_exit = True


def client(url, key="x"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_plain_and_models(servers):
    urls, _ = servers
    c = client(urls["answer"])
    r = c.chat.completions.create(model="gpt-oss-test", messages=ASK)
    assert r.choices[0].message.content == "Hello there, friend!" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 20 and r.usage.completion_tokens > 5
    assert [m.id for m in c.models.list()] == ["gpt-oss-test"]
    assert httpx.get(urls["answer"] + "/health").json() == {"status": "ok"}


def test_streaming_with_usage(servers):
    urls, _ = servers
    chunks = list(client(urls["answer"]).chat.completions.create(
        model="gpt-oss-test", messages=ASK, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Hello there, friend!"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 5


def test_stop_strings(servers):
    urls, _ = servers
    c = client(urls["answer"])
    r = c.chat.completions.create(model="gpt-oss-test", messages=ASK, stop=[", friend"])
    assert r.choices[0].message.content == "Hello there" and r.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model="gpt-oss-test", messages=ASK, stop=", friend", stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Hello there"


def test_tool_call_round_trip(servers):
    urls, _ = servers
    c = client(urls["tool"])
    r = c.chat.completions.create(model="gpt-oss-test", messages=ASK, tools=[WEATHER])
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Berlin"})
    history = ASK + [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    again = c.chat.completions.create(model="gpt-oss-test", messages=history, tools=[WEATHER])
    assert again.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result were rendered
    chunks = list(c.chat.completions.create(model="gpt-oss-test", messages=ASK, tools=[WEATHER], stream=True))
    deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    assert "".join(d.function.arguments or "" for d in deltas) == '{"city":"Berlin"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_concurrent_seeded_requests_match_solo_answers(servers):
    urls, _ = servers
    c = client(urls["random"])
    ask = lambda seed: c.chat.completions.create(  # noqa: E731
        model="gpt-oss-test", messages=ASK, max_tokens=8, seed=seed).choices[0].message
    solo = [ask(1), ask(2)]
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(i + 1))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo


def test_disconnect_stops_generation(servers):
    urls, models = servers
    with httpx.stream("POST", urls["endless"] + "/v1/chat/completions", timeout=60,
                      json={"model": "gpt-oss-test", "messages": ASK, "stream": True}) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 10:
                break
    time.sleep(1.0)
    session = models["endless"]._session
    assert session.busy.acquire(timeout=10)  # the generation ended and freed the session
    session.busy.release()


@pytest.mark.parametrize("body, status, code", [
    ({"model": "nope", "messages": ASK}, 404, "model_not_found"),
    ({"model": "gpt-oss-test", "messages": []}, 400, None),
    ({"model": "gpt-oss-test", "messages": ASK, "max_tokens": -1}, 400, None),
    ({"model": "gpt-oss-test", "messages": ASK, "temperature": "hot"}, 400, None),
    ({"model": "gpt-oss-test", "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ({"model": "gpt-oss-test", "messages": [{"role": "user", "content": "word " * 600}]}, 400,
     "context_length_exceeded"),
    ({"model": "gpt-oss-test", "messages": ASK, "tools": [{"type": "function", "function": {"name": "a b"}}]},
     400, None),
])
def test_bad_requests_get_openai_errors(servers, body, status, code):
    urls, _ = servers
    r = httpx.post(urls["answer"] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["code"] == code


def test_malformed_json_api_key_and_size_limit(servers):
    urls, _ = servers
    r = httpx.post(urls["answer"] + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        client(urls["locked"], key="wrong").chat.completions.create(model="gpt-oss-test", messages=ASK)
    ok = client(urls["locked"], key="sekrit").chat.completions.create(model="gpt-oss-test", messages=ASK)
    assert ok.choices[0].message.content == "Hello there, friend!"
    big = httpx.post(urls["locked"] + "/v1/chat/completions", headers={"authorization": "Bearer sekrit"},
                     json={"model": "gpt-oss-test", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert big.status_code == 413
