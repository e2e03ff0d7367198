"""`ossrt serve` through the official openai client against live servers on 127.0.0.1, one per tiny scripted model
(the whole path model → Harmony parser → API is real)."""

import json
import os
import re
import socket
import threading

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import ossrt  # noqa: E402
from ossrt.chat import FinishReason  # noqa: E402
from ossrt.server.chat_completions import FINISH_REASONS, ChatCompletion  # noqa: E402
from ossrt.server.responses import OUTCOMES, ResponsesOutput, input_messages  # noqa: E402
from ossrt.server.runner import SessionPool  # noqa: E402
from ossrt.server.sealing import Sealer  # noqa: E402
from server_support import live_server  # noqa: E402

ID = "gpt-oss-test"
KEY = "sekrit"
ANSWER = "<|channel|>final<|message|>Hello there, friend!<|return|>"
TOOL_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Berlin"}<|call|>'
THINK = "<|channel|>analysis<|message|>Let me think.<|end|>"  # then nothing scripted: greedy "!!!" until max_tokens
ENDLESS = "<|channel|>final<|message|>one two three four five"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_FLAT = {"type": "function", **WEATHER["function"]}  # the Responses API's form
ASK = [{"role": "user", "content": "What's the weather in Berlin right now?"}]
MAX_BODY = 16384


def serving(path, context_length=512, int8_activations=True, **kwargs):
    return live_server(ossrt.load(path, context_length=context_length, int8_activations=int8_activations),
                       model_id=ID, aliases=["tiny"], **kwargs)


@pytest.fixture(scope="module")
def answer(scripted_gguf):
    with serving(scripted_gguf(ANSWER), api_key=KEY, max_body=MAX_BODY) as live:
        yield live


@pytest.fixture(scope="module")
def tool(scripted_gguf):
    with serving(scripted_gguf(TOOL_CALL), parallel=1) as live:
        yield live


@pytest.fixture(scope="module")
def think(scripted_gguf):
    with serving(scripted_gguf(THINK)) as live:
        yield live


@pytest.fixture(scope="module")
def endless(scripted_gguf):
    with serving(scripted_gguf(ENDLESS, loop=True), context_length=4096, parallel=1, queue=1) as live:
        yield live


@pytest.fixture(scope="module")
def random_model(tiny_gguf):
    """Float32 prompts: a request whose prompt another left in the session pool computes only its last token, in
    a float32 decode step, where a fresh prefill computes it with 8-bit activations, and on this random model's
    nearly flat logits that can change what a seed samples (as llama.cpp's cache_prompt can)."""
    with serving(tiny_gguf(), parallel=2, int8_activations=False) as live:
        yield live


def client(live, key=KEY):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0, timeout=60)


def health(live):
    return httpx.get(live.url + "/health", timeout=10).json()


# --- chat completions --------------------------------------------------------------------------------------------
def test_models_health_and_aliases(answer):
    c = client(answer)
    assert [m.id for m in c.models.list()] == [ID]
    assert c.models.retrieve("openai/" + ID).id == ID
    h = health(answer)  # no key needed
    assert h["status"] == "ok" and h["model"] == ID and h["running"] == 0
    for name in (ID, "TINY", "openai/gpt-oss-test"):
        r = c.chat.completions.create(model=name, messages=ASK)
        assert r.model == ID and r.choices[0].message.content == "Hello there, friend!"


def test_plain_answer(answer, o200k_tokenizer):
    r = client(answer).chat.completions.create(model=ID, messages=ASK, temperature=0.7, top_p=0.9, seed=3)
    m = r.choices[0].message
    assert (m.role, m.content, m.tool_calls, r.choices[0].finish_reason) == ("assistant", "Hello there, friend!",
                                                                             None, "stop")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage.completion_tokens == len(o200k_tokenizer.encode(ANSWER, allowed_special="all"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert getattr(m, "reasoning_content", None) is None


def test_streaming_with_usage(answer):
    chunks = list(client(answer).chat.completions.create(model=ID, messages=ASK, stream=True,
                                                         stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Hello there, friend!"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 5
    assert all(ch.usage is None for ch in chunks[:-1])
    plain = list(client(answer).chat.completions.create(model=ID, messages=ASK, stream=True))
    assert all(ch.choices for ch in plain)  # no usage chunk unless asked


@pytest.mark.parametrize("stop, expected", [(", friend", "Hello there"), (["zzz", "e, f"], "Hello ther"),
                                            ("!", "Hello there, friend"), ("nowhere", "Hello there, friend!")])
def test_stop_sequences(answer, stop, expected):
    c = client(answer)
    r = c.chat.completions.create(model=ID, messages=ASK, stop=stop)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
    chunks = list(c.chat.completions.create(model=ID, messages=ASK, stop=stop, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(answer):
    r = client(answer).chat.completions.create(model=ID, messages=ASK, max_completion_tokens=6)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6


def reasoning_token_count(tokenizer) -> int:
    """THINK's analysis content and its <|end|>, as usage counts them."""
    return len(tokenizer.encode("Let me think.")) + 1


def test_reasoning_goes_to_reasoning_content(think, o200k_tokenizer):
    c = client(think)
    r = c.chat.completions.create(model=ID, messages=ASK, max_tokens=8, temperature=0, reasoning_effort="high")
    m = r.choices[0].message
    assert m.reasoning_content == m.reasoning == "Let me think."
    assert r.usage.completion_tokens_details.reasoning_tokens == reasoning_token_count(o200k_tokenizer)
    assert r.usage.completion_tokens == 8
    assert "think" not in (m.content or "")
    chunks = list(c.chat.completions.create(model=ID, messages=ASK, max_tokens=8, temperature=0, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Let me think."
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == "Let me think."
    assert "think" not in "".join(d.content or "" for d in deltas)


def test_tool_call_round_trip(tool):
    c = client(tool)
    r = c.chat.completions.create(model=ID, messages=ASK, tools=[WEATHER])
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Berlin"})
    history = ASK + [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    again = c.chat.completions.create(model=ID, messages=history, tools=[WEATHER])
    assert again.usage.prompt_tokens > r.usage.prompt_tokens + 10  # the call and its result were rendered
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the session pool kept the conversation
    assert again.choices[0].finish_reason == "tool_calls"

    chunks = list(c.chat.completions.create(model=ID, messages=ASK, tools=[WEATHER], stream=True))
    deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    assert {d.index for d in deltas} == {0}
    assert "".join(d.function.arguments or "" for d in deltas) == '{"city":"Berlin"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_hosted_tools_are_left_out_with_a_log_line(tool, caplog):
    """Clients send OpenAI's hosted tools by default (the Codex CLI: web_search); ossrt cannot run them."""
    c = client(tool)
    with caplog.at_level("INFO", logger="ossrt.server.turn"):
        r = c.responses.create(model=ID, input="Weather in Berlin?",
                               tools=[{"type": "web_search", "external_web_access": False}, WEATHER_FLAT])
    assert [(i.type, i.name) for i in r.output] == [("function_call", "get_weather")]
    assert any("web_search left out" in m for m in caplog.messages)
    r = c.chat.completions.create(model=ID, messages=ASK, tools=[{"type": "file_search"}, WEATHER])
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_tool_choice(tool):
    c = client(tool)
    ask = lambda **kw: c.chat.completions.create(model=ID, messages=ASK, max_tokens=3, **kw)  # noqa: E731
    bare = ask().usage.prompt_tokens
    auto = ask(tools=[WEATHER]).usage.prompt_tokens
    assert auto > bare + 20
    assert ask(tools=[WEATHER], tool_choice="none").usage.prompt_tokens == bare  # the tools leave the prompt
    required = ask(tools=[WEATHER], tool_choice="required").usage.prompt_tokens
    named = ask(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert required > auto and named.usage.prompt_tokens > auto  # the instruction was added
    with pytest.raises(openai.BadRequestError) as e:
        ask(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert e.value.body["param"] == "tool_choice" and "get_time" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        ask(tool_choice="required")


# --- responses ---------------------------------------------------------------------------------------------------
def test_responses_plain(answer):
    r = client(answer).responses.create(model=ID, input="Hi!", instructions="Answer briefly.", max_output_tokens=50)
    assert (r.status, r.output_text, r.model) == ("completed", "Hello there, friend!", ID)
    assert [o.type for o in r.output] == ["message"] and r.output[0].content[0].type == "output_text"
    assert r.usage.input_tokens > 20 and r.usage.output_tokens > 5 and r.instructions == "Answer briefly."
    short = client(answer).responses.create(model=ID, input=[{"role": "user", "content": "Hi!"}],
                                            max_output_tokens=4)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"


def test_responses_stream(answer):
    events = list(client(answer).responses.create(model=ID, input=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi!"}]}], stream=True))
    types = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(types[4:-4]) == {"response.output_text.delta"} and "".join(deltas) == "Hello there, friend!"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    assert done.output_text == "Hello there, friend!" and done.usage.output_tokens > 5


def test_responses_reasoning(think):
    r = client(think).responses.create(model=ID, input="Hi!", max_output_tokens=8, temperature=0,
                                       reasoning={"effort": "low"})
    assert r.output[0].type == "reasoning" and r.output[0].content[0].text == "Let me think."
    assert "think" not in r.output_text and r.reasoning.effort == "low"
    events = list(client(think).responses.create(model=ID, input="Hi!", max_output_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Let me think."


def test_responses_reasoning_summary_and_count(think, o200k_tokenizer):
    """gpt-oss has no summarizer: a requested summary is the reasoning itself, for clients that show only summaries."""
    c = client(think)
    r = c.responses.create(model=ID, input="Hi!", max_output_tokens=8, temperature=0,
                           reasoning={"effort": "low", "summary": "auto"})
    item = r.output[0]
    assert item.type == "reasoning" and [(p.type, p.text) for p in item.summary] == [("summary_text", "Let me think.")]
    assert item.content[0].text == "Let me think." and r.reasoning.summary == "auto"
    assert r.usage.output_tokens_details.reasoning_tokens == reasoning_token_count(o200k_tokenizer)
    plain = c.responses.create(model=ID, input="Hi!", max_output_tokens=8, temperature=0)
    assert plain.output[0].summary == [] and plain.reasoning.summary is None

    events = list(c.responses.create(model=ID, input="Hi!", max_output_tokens=8, temperature=0, stream=True,
                                     reasoning={"summary": "detailed"}))
    kinds = [e.type for e in events if "reasoning_summary" in e.type]
    assert kinds[0] == "response.reasoning_summary_part.added" and kinds[-2:] == [
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done"]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta") == "Let me think."
    done = next(e for e in events if e.type == "response.output_item.done" and e.item.type == "reasoning")
    assert done.item.summary[0].text == "Let me think."
    with pytest.raises(openai.BadRequestError, match="reasoning.summary"):
        c.responses.create(model=ID, input="Hi!", reasoning={"summary": "brief"})


def test_responses_function_call_round_trip(tool):
    c = client(tool)
    first = c.responses.create(model=ID, input="Weather in Berlin?", tools=[WEATHER_FLAT])
    call = first.output[-1]
    assert (call.type, call.name, json.loads(call.arguments), call.status) == ("function_call", "get_weather",
                                                                                {"city": "Berlin"}, "completed")
    items = [{"role": "user", "content": "Weather in Berlin?"},
             *(o.model_dump(exclude_none=True) for o in first.output),
             {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}]
    second = c.responses.create(model=ID, input=items, tools=[WEATHER_FLAT])
    assert second.usage.input_tokens > first.usage.input_tokens + 10
    assert second.usage.input_tokens_details.cached_tokens > 0
    events = list(c.responses.create(model=ID, input="Weather in Berlin?", tools=[WEATHER_FLAT], stream=True))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert args == done[0].arguments == '{"city":"Berlin"}'
    added = [e.item.call_id for e in events if e.type == "response.output_item.added"]
    assert added == [events[-1].response.output[-1].call_id] and added[0].startswith("call_")
    with pytest.raises(openai.BadRequestError) as e:  # a result for a call that was never made
        c.responses.create(model=ID, input=[{"type": "function_call_output", "call_id": "nope", "output": "x"}])
    assert e.value.body["param"] == "input[0]"


# --- what both endpoints take from a turn ------------------------------------------------------------------------
def test_a_tool_calls_id_is_the_same_streamed_and_final(scripted_gguf):
    """A streamed tool call goes out with the id of the final message's call (the one a client sends back with the
    call's result), on both endpoints: the parser gives each call its id once."""
    model = ossrt.load(scripted_gguf(TOOL_CALL), context_length=512)
    events = list(model.chat(ASK, tools=[WEATHER], stream=True))
    response = events[-1].response
    [call_id] = [call["id"] for call in response.message["tool_calls"]]

    chat = ChatCompletion(ID, stop=[])
    chunks = [chunk for e in events[:-1] for chunk in chat.event(e)] + chat.finish(response)
    streamed = [tc["id"] for chunk in chunks for tc in chunk["choices"][0]["delta"].get("tool_calls", ())
                if "id" in tc]
    final = chat.result(response)["choices"][0]["message"]["tool_calls"]
    assert streamed == [call["id"] for call in final] == [call_id]

    out = ResponsesOutput(ID, echo={})
    stream = [p for e in events[:-1] for p in out.event(e)] + out.finish(response)
    added = [p["item"]["call_id"] for p in stream
             if p["type"] == "response.output_item.added" and p["item"]["type"] == "function_call"]
    completed = [item["call_id"] for item in stream[-1]["response"]["output"] if item["type"] == "function_call"]
    assert stream[-1]["type"] == "response.completed"
    assert added == completed == [call_id]


def test_a_request_renders_its_prompt_once(answer, monkeypatch):
    """A request's conversation is rendered once, on its turn's thread (the same ids pick the pooled session)."""
    from ossrt.harmony import render

    rendered, to_harmony_messages = [], render.to_harmony_messages

    def counting(*args, **kwargs):
        rendered.append(threading.current_thread().name)
        return to_harmony_messages(*args, **kwargs)

    monkeypatch.setattr(render, "to_harmony_messages", counting)
    c = client(answer)
    assert c.chat.completions.create(model=ID, messages=ASK, max_tokens=2).choices[0].finish_reason == "length"
    assert rendered == ["ossrt-turn"]
    assert c.responses.create(model=ID, input="Hi!", max_output_tokens=2).status == "incomplete"
    assert rendered == ["ossrt-turn"] * 2


def test_every_finish_reason_has_its_api_form():
    assert FINISH_REASONS == {FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
                              FinishReason.TOOL_CALLS: "tool_calls", FinishReason.CANCELLED: "stop"}
    assert {reason: (o.status, o.event) for reason, o in OUTCOMES.items()} == {
        FinishReason.STOP: ("completed", "response.completed"),
        FinishReason.TOOL_CALLS: ("completed", "response.completed"),
        FinishReason.LENGTH: ("incomplete", "response.incomplete"),
        FinishReason.CANCELLED: ("cancelled", "response.failed")}


# --- errors ------------------------------------------------------------------------------------------------------
CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("path, body, status, param, code", [
    (CHAT, {"model": "gpt-5", "messages": ASK}, 404, "model", "model_not_found"),
    (CHAT, {"messages": ASK}, 422, "model", "missing_required_parameter"),
    (CHAT, {"model": ID}, 422, "messages", "missing_required_parameter"),
    (CHAT, {"model": ID, "messages": "hi"}, 422, "messages", "invalid_type"),
    (CHAT, {"model": ID, "messages": ASK, "temperature": "hot"}, 422, "temperature", "invalid_type"),
    (CHAT, {"model": ID, "messages": ASK, "max_tokens": 2.5}, 422, "max_tokens", "invalid_type"),
    (CHAT, {"model": ID, "messages": []}, 400, "messages", "invalid_value"),
    (CHAT, {"model": ID, "messages": ASK, "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    (CHAT, {"model": ID, "messages": ASK, "max_tokens": 10**9}, 400, "max_tokens", "invalid_value"),
    (CHAT, {"model": ID, "messages": ASK, "temperature": 3}, 400, "temperature", "invalid_value"),
    (CHAT, {"model": ID, "messages": ASK, "n": 2}, 400, "n", "unsupported_value"),
    (CHAT, {"model": ID, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0]", "invalid_value"),
    (CHAT, {"model": ID, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages",
     "context_length_exceeded"),
    (CHAT, {"model": ID, "messages": ASK, "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400,
     "tools[0].function.name", "invalid_value"),
    (CHAT, {"model": ID, "messages": ASK, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": "not a schema"}}]}, 422, "tools[0].function.parameters", "invalid_type"),
    ("/v1/responses", {"model": ID, "input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id",
     "unsupported_value"),
    ("/v1/responses", {"model": ID, "input": [{"type": "image_generation_call"}]}, 400, "input[0].type",
     "unsupported_value"),
    ("/v1/responses", {"model": ID, "input": 7}, 422, "input", "invalid_type"),
    ("/v1/embeddings", {"model": ID, "input": "hi"}, 404, None, "not_found"),
])
def test_bad_requests_get_openai_errors(answer, path, body, status, param, code):
    r = httpx.post(answer.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_malformed_json_api_key_and_body_limit(answer):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(answer.url + CHAT, content=b'{"model": "gpt-oss', headers=auth, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(answer.url + CHAT, content=b"[1, 2]", headers=auth, timeout=30)
    assert r.status_code == 422
    with pytest.raises(openai.AuthenticationError):
        client(answer, key="wrong").chat.completions.create(model=ID, messages=ASK)
    r = httpx.post(answer.url + CHAT, json={"model": ID, "messages": ASK}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    big = {"model": ID, "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    r = httpx.post(answer.url + CHAT, json=big, headers=auth, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit holds while reading
        yield json.dumps(big).encode()

    r = httpx.post(answer.url + CHAT, content=chunked(), headers=auth, timeout=30)
    assert r.status_code == 413
    assert health(answer)["status"] == "ok"  # still serving


# --- load --------------------------------------------------------------------------------------------------------
def test_concurrent_seeded_streams_match_their_solo_answers(random_model):
    c = client(random_model)
    asks = [([{"role": "user", "content": "Tell me about cats."}], 1),
            ([{"role": "user", "content": "Tell me about dogs, please."}], 2),
            ([{"role": "user", "content": "Tell me about cats."}], 3)]

    def ask(messages, seed):
        text = []
        for ch in c.chat.completions.create(model=ID, messages=messages, seed=seed, max_tokens=24, stream=True):
            if ch.choices:
                d = ch.choices[0].delta
                text.append((getattr(d, "reasoning_content", None) or "") + "|" + (d.content or ""))
        return "".join(text)

    solo = [ask(*a) for a in asks]
    assert len(set(solo)) == 3  # different prompts / seeds give different answers
    together = [None] * len(asks)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(*asks[i]))) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == solo


def wait_idle(live, timeout=15.0):
    """/health once no turn runs or waits."""
    server = live.server
    assert server.wait_until(lambda: not server.running and not server.waiting, timeout), health(live)
    return health(live)


def test_client_disconnect_stops_generation(endless):
    before = wait_idle(endless)
    with httpx.stream("POST", endless.url + CHAT, timeout=60, headers={"Authorization": "Bearer x"},
                      json={"model": ID, "messages": ASK, "stream": True}) as r:
        lines = [line for _, line in zip(range(12), r.iter_lines())]
    assert any("one" in line for line in lines)
    after = wait_idle(endless)  # without the disconnect this would run to the 4096-token context
    assert after["disconnected"] == before["disconnected"] + 1
    assert after["completion_tokens"] - before["completion_tokens"] < 2000
    # The same for a non-streamed request whose client gives up.
    with pytest.raises(openai.APITimeoutError):
        openai.OpenAI(base_url=endless.url + "/v1", api_key="x", max_retries=0, timeout=0.5).chat.completions.create(
            model=ID, messages=ASK)
    final = wait_idle(endless)
    assert final["disconnected"] == before["disconnected"] + 2
    assert final["completion_tokens"] - after["completion_tokens"] < 2000


def test_full_queue_answers_503(endless):
    wait_idle(endless)
    c = client(endless)  # parallel 1, queue 1
    running = c.chat.completions.create(model=ID, messages=ASK, stream=True)
    next(iter(running))  # it has a slot
    queued = {}
    waiter = threading.Thread(target=lambda: queued.setdefault("r", c.chat.completions.create(
        model=ID, messages=ASK, max_tokens=3)))
    waiter.start()
    assert endless.server.wait_until(lambda: endless.server.waiting == 1, 10), health(endless)
    with pytest.raises(openai.InternalServerError) as e:  # 503
        c.chat.completions.create(model=ID, messages=ASK)
    assert e.value.status_code == 503 and e.value.body["code"] == "server_busy"
    assert e.value.response.headers["retry-after"] == "1"
    running.close()
    waiter.join(30)
    assert queued["r"].choices[0].finish_reason == "length" and queued["r"].usage.completion_tokens == 3
    assert health(endless)["rejected"] >= 1


# --- the command -------------------------------------------------------------------------------------------------
def test_serve_command(scripted_gguf, tmp_path):
    import signal
    import subprocess
    import sys

    path = scripted_gguf(ANSWER)
    cmd = [sys.executable, "-m", "ossrt.cli", "serve", str(path), "--port", "0", "-c", "512", "--name", "mine"]
    env = dict(os.environ, OSSRT_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        match = re.fullmatch(rf"serving {re.escape(str(path))} as 'mine' at (http://127\.0\.0\.1:\d+)/v1 "
                             rf"\(chat page: \1/\)\n", line)
        assert match, line
        url = match[1] + "/v1"
        assert "<title>" in httpx.get(match[1] + "/", timeout=10).text
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        # The socket listens before the model loads: a request made before uvicorn runs waits in its backlog.
        assert [m.id for m in c.models.list()] == ["mine"]
        r = c.chat.completions.create(model="mine", messages=ASK)
        assert r.choices[0].message.content == "Hello there, friend!"
        assert (tmp_path / "cache" / "reasoning.key").stat().st_mode & 0o777 == 0o600  # sealed reasoning survives
        stored = c.responses.create(model="mine", input="Hi!")
        assert c.responses.retrieve(stored.id).output_text == "Hello there, friend!"
        assert (tmp_path / "cache" / "responses.sqlite3").is_file()  # the default store
        with socket.socket() as taken:  # a port in use: one error line, exit 2
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = subprocess.run(cmd[:5] + ["--port", str(taken.getsockname()[1])], capture_output=True,
                                  text=True, timeout=60)
        assert busy.returncode == 2 and busy.stderr.startswith("error: cannot listen on 127.0.0.1:"), busy.stderr
        not_a_store = tmp_path / "notes.txt"
        not_a_store.write_text("my notes\n" * 100)
        for flags, message in ((["--store", str(not_a_store)], "notes.txt"),
                               (["--store", str(not_a_store), "--no-store"], "exclude each other")):
            bad = subprocess.run(cmd + flags, capture_output=True, text=True, timeout=60, env=env)
            assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr, bad.stderr
        assert not_a_store.read_text() == "my notes\n" * 100
        bad_key = tmp_path / "bad-key-cache"
        bad_key.mkdir()
        (bad_key / "reasoning.key").write_text("not a key")
        bad = subprocess.run(cmd + ["--no-store"], capture_output=True, text=True, timeout=120,
                             env=dict(env, OSSRT_CACHE=str(bad_key)))
        assert bad.returncode == 2 and "reasoning.key is not a reasoning key" in bad.stderr, bad.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) in (0, 130)  # uvicorn re-raises Ctrl-C after a clean shutdown: "interrupted", 130


def test_reasoning_travels_sealed_for_stateless_clients(think):
    """`include: ["reasoning.encrypted_content"]`: the analysis comes back sealed, and a later request that sends
    only the sealed form gets the analysis into its conversation; anything else sealed is refused."""
    c = client(think)
    r = c.responses.create(model=ID, input="Hi!", max_output_tokens=8, temperature=0, store=False,
                           include=["reasoning.encrypted_content"])
    item = r.output[0]
    assert item.type == "reasoning" and item.encrypted_content and "think" not in item.encrypted_content
    assert c.responses.create(model=ID, input="Hi!", max_output_tokens=8).output[0].encrypted_content is None

    sealer = think.server.sealer
    messages, _ = input_messages([{"role": "user", "content": "Hi!"},
                                  {"type": "reasoning", "summary": [], "encrypted_content": item.encrypted_content},
                                  {"role": "user", "content": "And?"}], None, sealer)
    assert messages[1] == {"role": "assistant", "reasoning": "Let me think."}
    again = c.responses.create(model=ID, max_output_tokens=4, input=[
        {"role": "user", "content": "Hi!"},
        {"type": "reasoning", "id": item.id, "summary": [], "encrypted_content": item.encrypted_content},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"}])
    assert again.status == "incomplete"
    forged = item.encrypted_content[:-8] + ("A" * 8 if not item.encrypted_content.endswith("A" * 8) else "B" * 8)
    for bad in (forged, Sealer().seal("Let me think.")):
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model=ID, input=[{"type": "reasoning", "summary": [], "encrypted_content": bad},
                                                {"role": "user", "content": "Hi!"}])
        assert e.value.body["param"] == "input[0].encrypted_content"
        assert e.value.body["code"] == "invalid_encrypted_content"


def test_sealer_key_file(tmp_path):
    path = tmp_path / "keys" / "reasoning.key"
    first = Sealer.from_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600 and list(path.parent.iterdir()) == [path]
    sealed = first.seal("Let me think. ü")
    assert Sealer.from_key_file(path).open(sealed) == "Let me think. ü"  # a restarted server opens it
    assert Sealer().open(sealed) is None and first.open("not sealed") is None


def test_stored_responses_chain_retrieve_and_delete(scripted_gguf, tmp_path):
    """Responses kept in a real SQLite file: `previous_response_id` continues one, GET/DELETE and input_items
    behave as OpenAI's, and a restarted server still has them."""
    from ossrt.server.store import ResponseStore

    path = tmp_path / "responses.sqlite3"
    with ResponseStore(path) as store, serving(scripted_gguf(ANSWER), store=store) as live:
        c = client(live)
        first = c.responses.create(model=ID, input="Hi!", max_output_tokens=20)
        second = c.responses.create(model=ID, input="And again?", previous_response_id=first.id,
                                    max_output_tokens=20)
        assert second.previous_response_id == first.id and second.output_text == "Hello there, friend!"
        # the chained prompt holds the first turn: its question, its answer, then the new question
        assert second.usage.input_tokens > first.usage.input_tokens + 10
        assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 2  # its KV cache reused
        streamed = [e for e in c.responses.create(model=ID, input="Once more", previous_response_id=second.id,
                                                  stream=True) if e.type == "response.completed"]
        assert c.responses.retrieve(streamed[0].response.id).output_text == "Hello there, friend!"
        unstored = c.responses.create(model=ID, input="Hi!", max_output_tokens=20, store=False)

        got = c.responses.retrieve(first.id)
        assert got.id == first.id and got.output_text == first.output_text and got.usage == first.usage
        items = c.responses.input_items.list(second.id)
        assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "And again?")]
        assert items.data[0].id.startswith("msg_")
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(unstored.id)
        c.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError) as e:
            c.responses.create(model=ID, input="?", previous_response_id=second.id)
        assert e.value.body["param"] == "previous_response_id" and first.id in e.value.body["message"]
        for query, param in (({"limit": 500}, None), ({"extra_query": {"limit": "ten"}}, "limit"),
                             ({"order": "sideways"}, None), ({"after": "msg_unknown"}, None)):
            with pytest.raises(openai.BadRequestError) as e:
                c.responses.input_items.list(second.id, **query)
            assert e.value.body["code"] == "invalid_value" and e.value.body["param"] == param
    with ResponseStore(path) as store, serving(scripted_gguf(ANSWER), store=store) as live:
        assert client(live).responses.retrieve(second.id).output_text == "Hello there, friend!"
    with serving(scripted_gguf(ANSWER)) as live:
        with pytest.raises(openai.BadRequestError, match="--no-store"):
            client(live).responses.create(model=ID, input="?", previous_response_id=second.id)
        with pytest.raises(openai.NotFoundError, match="stores no responses"):
            client(live).responses.retrieve(second.id)


def test_session_pool_prefers_the_longest_prefix_then_the_cache_key_then_the_least_recently_used(scripted_gguf):
    with ossrt.load(scripted_gguf(ANSWER), context_length=512) as model:
        a, b, c = sessions = [model.new_session() for _ in range(3)]
        pool = SessionPool(sessions)
        shared = [1, 2, 3]  # the instructions and tools every conversation starts with
        a.tokens, b.tokens, c.tokens = shared + [4, 5], shared + [9], shared + [7]

        def turn(prompt, key):
            session = pool.take(prompt, key)
            pool.give(session)
            return session

        assert turn(shared + [4, 5, 6], "codex-1") is a  # its conversation, whatever the key
        assert turn(shared + [9, 9], "codex-1") is b  # the longest prefix wins over the key
        assert turn(shared + [8], "codex-2") is c  # a new conversation takes the least recently used cache
        assert turn(shared + [8], "codex-1") is b  # ties: the session that last ran this key
        assert turn(shared + [8], None) is a  # no key: the least recently used


def test_prompt_cache_key_is_kept_with_a_stored_response(scripted_gguf, tmp_path):
    from ossrt.server.store import ResponseStore

    with ResponseStore(tmp_path / "r.sqlite3") as store, serving(scripted_gguf(ANSWER), store=store) as live:
        c = client(live)
        first = c.responses.create(model=ID, input="Hi!", max_output_tokens=20, prompt_cache_key="session-7")
        second = c.responses.create(model=ID, input="Again", max_output_tokens=20, previous_response_id=first.id)
        assert store.session_hint(first.id) == store.session_hint(second.id) == "session-7"
        chat = c.chat.completions.create(model=ID, messages=ASK, max_tokens=5, prompt_cache_key="session-7")
        assert chat.choices[0].message.content


def test_stored_items_sent_back_by_id(scripted_gguf, tmp_path, o200k_tokenizer):
    """Clients that keep only ids (langchain after a streamed turn) send a reasoning item back without its text,
    or an item_reference: a server that stored the response puts the stored item in its place."""
    from ossrt.server.store import ResponseStore

    with ResponseStore(tmp_path / "r.sqlite3") as store, serving(scripted_gguf(THINK), store=store) as live:
        c = client(live)
        first = c.responses.create(model=ID, input="Hi!", max_output_tokens=12)
        (reasoning,) = [i for i in first.output if i.type == "reasoning"]
        ask = {"role": "user", "content": "Go on."}

        def prompt_tokens(item):
            return c.responses.create(model=ID, input=[{"role": "user", "content": "Hi!"}, item, ask],
                                      max_output_tokens=1).usage.input_tokens

        with_text = prompt_tokens({"type": "reasoning", "id": reasoning.id, "summary": [],
                                   "content": [{"type": "reasoning_text", "text": reasoning.content[0].text}]})
        assert prompt_tokens({"type": "reasoning", "id": reasoning.id, "summary": []}) == with_text
        assert prompt_tokens({"type": "item_reference", "id": reasoning.id}) == with_text
        with pytest.raises(openai.BadRequestError, match="needs 'content', 'tool_calls' or 'reasoning'"):
            prompt_tokens({"type": "reasoning", "id": "rs_unknown", "summary": []})  # not stored: no text at all
        with pytest.raises(openai.BadRequestError) as e:
            prompt_tokens({"type": "item_reference", "id": "rs_unknown"})
        assert e.value.body["param"] == "input[1].id" and "not stored" in e.value.body["message"]


def test_an_item_reference_needs_stored_responses(answer):
    with pytest.raises(openai.BadRequestError) as e:
        client(answer).responses.create(model=ID, input=[{"type": "item_reference", "id": "rs_x"},
                                                         {"role": "user", "content": "Hi"}])
    assert e.value.body["param"] == "input[0].id" and "stores no responses (--no-store)" in e.value.body["message"]
