"""The chat API: Harmony in and out on scripted model files, streaming, cancellation, cache reuse, threads."""

import threading

import pytest

import ossrt
from ossrt.chat import ContentDelta, Done, ToolCall

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Berlin"}<|call|>'
ANSWER = "<|channel|>final<|message|>Hello from the scripted model!<|return|>"
ASK = [{"role": "user", "content": "What's the weather in Berlin right now?"}]


def test_tool_call_from_the_model(scripted_gguf):
    with ossrt.load(scripted_gguf(TOOL_CALL), context_length=512) as m:
        r = m.chat(ASK, tools=[WEATHER_TOOL], temperature=0)
    assert r.finish_reason == "tool_calls"
    assert [c["function"] for c in r.tool_calls] == [{"name": "get_weather", "arguments": '{"city":"Berlin"}'}]
    assert r.tool_calls[0]["id"].startswith("call_") and r.content is None and r.problems == []
    assert r.usage.completion_tokens == len(m.tokenizer.encode(TOOL_CALL, allowed_special="all"))


def test_answer_and_usage(scripted_gguf):
    with ossrt.load(scripted_gguf(ANSWER), context_length=512) as m:
        r = m.chat(ASK)
    assert (r.content, r.reasoning, r.tool_calls, r.finish_reason) == ("Hello from the scripted model!", None, [],
                                                                        "stop")
    assert r.message == {"role": "assistant", "content": "Hello from the scripted model!"}
    assert r.usage.prompt_tokens > 20 and r.usage.cached_tokens == 0
    assert r.timing.total_seconds > 0 and r.timing.prefill_tokens_per_second > 0


def test_stream_events_add_up_to_the_response(scripted_gguf):
    with ossrt.load(scripted_gguf(TOOL_CALL), context_length=512) as m:
        events = list(m.chat(ASK, tools=[WEATHER_TOOL], stream=True))
    assert isinstance(events[-1], Done)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Berlin"}')]
    assert events[-1].response.finish_reason == "tool_calls"
    with ossrt.load(scripted_gguf(ANSWER), context_length=512) as m:
        events = list(m.chat(ASK, stream=True))
    text = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert text == events[-1].response.content == "Hello from the scripted model!"


def test_max_tokens_gives_length(scripted_gguf):
    with ossrt.load(scripted_gguf(ANSWER), context_length=512) as m:
        r = m.chat(ASK, max_tokens=5)
        empty = m.chat(ASK, max_tokens=0)  # the same rule as generate: nothing generated
    assert r.finish_reason == "length" and r.usage.completion_tokens == 5
    assert empty.finish_reason == "length" and empty.usage.completion_tokens == 0 and empty.content is None


def test_cancel_from_another_thread_and_close(scripted_gguf):
    with ossrt.load(scripted_gguf("<|channel|>final<|message|>one two three four five", loop=True),
                    context_length=4096) as m:
        stream = m.chat(ASK, stream=True)
        seen = []
        for event in stream:
            seen.append(event)
            if len(seen) == 10:
                cancelled = threading.Event()
                threading.Thread(target=lambda: (stream.cancel(), cancelled.set())).start()
                cancelled.wait()
        assert isinstance(seen[-1], Done) and seen[-1].response.finish_reason == "cancelled"
        assert len(seen) < 20  # stopped at once, not after thousands of tokens
        stream = m.chat(ASK, stream=True)
        for _ in range(5):
            next(stream)
        stream.close()
        with pytest.raises(StopIteration):
            next(stream)
        # The session is free again and still answers correctly.
        assert m.chat(ASK, max_tokens=4).usage.completion_tokens == 4


def test_next_turn_reuses_the_cache_and_matches_a_fresh_session(tiny_gguf):
    with ossrt.load(tiny_gguf(), context_length=1024) as m:
        first = m.chat(ASK, max_tokens=12, temperature=0)
        history = ASK + [first.message, {"role": "user", "content": "And tomorrow?"}]
        second = m.chat(history, max_tokens=12, temperature=0)
        assert second.usage.cached_tokens == first.usage.prompt_tokens
        again = m.chat(history, max_tokens=12, temperature=0)  # regenerate: the whole prompt is cached
        assert again.usage.cached_tokens == second.usage.prompt_tokens
        fresh = m.new_session().chat(history, max_tokens=12, temperature=0)
        assert fresh.usage.cached_tokens == 0
        assert second.message == again.message == fresh.message


def test_two_threads_share_a_model(tiny_gguf):
    with ossrt.load(tiny_gguf(), context_length=1024) as m:
        convs = [ASK, [{"role": "user", "content": "Tell me a joke"}]]
        alone = [m.new_session().chat(c, max_tokens=10, seed=3).message for c in convs]
        results = [None, None]

        def run(i):
            results[i] = m.chat(convs[i], max_tokens=10, seed=3).message

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == alone


def test_chat_errors(tiny_gguf):
    from ossrt.errors import ChatFormatError, ContextLengthError, ParameterError

    with ossrt.load(tiny_gguf(), context_length=64) as m:
        with pytest.raises(ChatFormatError):
            m.chat([{"role": "wizard", "content": "hi"}])
        with pytest.raises(ParameterError, match="max_tokens"):
            m.chat(ASK, max_tokens=-1)
        with pytest.raises(ParameterError, match="temperature"):
            m.chat(ASK, temperature=-1)
        with pytest.raises(ContextLengthError):
            m.chat([{"role": "user", "content": "word " * 100}])
