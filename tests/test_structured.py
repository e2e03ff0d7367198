"""Structured output and forced calls through the chat API, the server (with the openai client's own `parse`
helpers) and the CLI, on scripted models (real format, real forward pass): the grammar steers the sampler away from
the script wherever the script breaks the format. Also: calls to tools the request did not declare."""

import json
import logging
import time
from typing import Literal

import pytest

import ossrt
from ossrt.chat import MAX_UNDECLARED_CALLS, ToolCall, ToolCallBegin
from ossrt.errors import ParameterError

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

PROSE = "<|channel|>final<|message|>It is Paris, of course.<|return|>"
THINK = "<|channel|>analysis<|message|>Let me think about the city.<|end|>"
TIME_CALL = '<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{"tz":"UTC"}<|call|>'
ASK = [{"role": "user", "content": "Which city is the capital of France?"}]
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Berlin", "Paris"]}},
               "required": ["city"], "additionalProperties": False}
CITY = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Berlin", "Paris"]}},
    "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}


@pytest.fixture(scope="module")
def model(scripted_gguf):
    opened = {}

    def load(text: str):
        if text not in opened:
            opened[text] = ossrt.load(scripted_gguf(text), context_length=1024)
        return opened[text]

    yield load
    for m in opened.values():
        m.close()


def test_response_format_turns_prose_into_the_schema(model):
    m = model(PROSE)
    assert m.chat(ASK, temperature=0).content == "It is Paris, of course."
    r = m.chat(ASK, temperature=0, response_format=CITY)
    assert json.loads(r.content)["city"] in ("Berlin", "Paris") and set(json.loads(r.content)) == {"city"}
    assert r.finish_reason == "stop" and r.tool_calls == []


def test_reasoning_is_not_constrained(model):
    r = model(THINK).chat(ASK, temperature=0, max_tokens=24, response_format=CITY)
    assert r.reasoning.startswith("Let me think about the city.") and r.finish_reason == "length"


def test_response_format_is_shown_to_the_model(model):
    m = model(PROSE)
    prompt = m.tokenizer.decode(ossrt.chat.chat_request(m.engine, ASK, response_format=CITY).prompt)
    assert ("<|start|>developer<|message|># Response Formats\n\n## city\n\n" + json.dumps(
        CITY_SCHEMA, separators=(",", ":")) + "<|end|>") in prompt
    described = dict(CITY, json_schema=dict(CITY["json_schema"], description="Where it is.\nOne city."))
    prompt = m.tokenizer.decode(ossrt.chat.chat_request(m.engine, ASK, response_format=described).prompt)
    assert "## city\n\n// Where it is.\n// One city.\n{" in prompt
    json_object = ossrt.chat.chat_request(m.engine, ASK, response_format={"type": "json_object"})
    assert json_object.grammar is not None and "developer" not in m.tokenizer.decode(json_object.prompt)


def test_a_named_function_is_called_with_arguments_in_its_schema(model):
    m = model(TIME_CALL)
    r = m.chat(ASK, temperature=0, tools=[TIME, WEATHER])
    assert r.tool_calls[0]["function"] == {"name": "get_time", "arguments": '{"tz":"UTC"}'}
    r = m.chat(ASK, temperature=0, tools=[TIME, WEATHER],
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.tool_calls
    assert call["function"]["name"] == "get_weather" and r.finish_reason == "tool_calls"
    assert json.loads(call["function"]["arguments"])["city"] in ("Berlin", "Paris")


def test_required_allows_only_the_declared_tools(model):
    """The script calls get_time; with only get_weather and get_date declared, "required" steers the call to one
    of them (without the grammar the call would be undeclared and answered with an error)."""
    date = {"type": "function", "function": {"name": "get_date", "parameters": {"type": "object", "properties": {},
                                                                                  "additionalProperties": False}}}
    r = model(TIME_CALL).chat(ASK, temperature=0, tools=[WEATHER, date], tool_choice="required")
    (call,) = r.tool_calls
    assert r.finish_reason == "tool_calls" and call["function"]["name"] in ("get_weather", "get_date")
    assert isinstance(json.loads(call["function"]["arguments"]), dict)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"response_format": {"type": "yaml"}}, "response_format.type must be"),
    ({"response_format": "json"}, "response_format must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     r"response_format.json_schema.schema is not a usable JSON schema"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice must be"),
    ({"tool_choice": "required"}, "tool_choice 'required' needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice names function 'get_time', which is not in tools"),
])
def test_bad_formats_and_choices_are_parameter_errors(model, kwargs, message):
    with pytest.raises(ParameterError, match=message):
        model(PROSE).chat(ASK, **kwargs)


# --- calls to tools the request did not declare ---------------------------------------------------------------
def test_an_undeclared_call_is_answered_with_an_error_and_not_reported(model):
    """The scripted model calls get_time whatever it is told: each call is answered with an error, and after
    MAX_UNDECLARED_CALLS answers the turn ends without reporting a call."""
    m = model(TIME_CALL)
    session = m.new_session()
    events = list(session.chat(ASK, temperature=0, tools=[WEATHER], stream=True))
    assert not any(isinstance(e, (ToolCallBegin, ToolCall)) for e in events)
    r = events[-1].response
    assert r.tool_calls == [] and r.finish_reason == "stop" and r.content is None
    assert r.undeclared_calls == MAX_UNDECLARED_CALLS + 1
    assert r.problems[-1] == (f"the model made {MAX_UNDECLARED_CALLS + 1} call(s) to tools the request did not "
                              f"declare, answered with an error {MAX_UNDECLARED_CALLS} time(s); the turn ended on "
                              "the last one")
    assert r.message == {"role": "assistant", "content": None}
    call_tokens = len(m.tokenizer.encode(TIME_CALL, allowed_special="all"))
    assert r.usage.completion_tokens == (MAX_UNDECLARED_CALLS + 1) * call_tokens
    text = m.tokenizer.decode(session.tokens)
    error = ossrt.chat.UNDECLARED_TOOL_ERROR.format(recipient="functions.get_time")
    assert text.count(f"<|start|>functions.get_time to=assistant<|channel|>commentary<|message|>{error}<|end|>"
                      "<|start|>assistant") == MAX_UNDECLARED_CALLS
    assert r.usage.prompt_tokens > len(ossrt.chat.chat_request(m.engine, ASK, tools=[WEATHER]).prompt)


def test_without_tools_every_call_is_undeclared(model):
    r = model(TIME_CALL).chat(ASK, temperature=0)
    assert r.tool_calls == [] and r.finish_reason == "stop"
    r = model(TIME_CALL).chat(ASK, temperature=0, tools=[TIME], tool_choice="none")
    assert r.tool_calls == []




# --- the server, through the openai client's structured-output helpers -------------------------------------------
@pytest.fixture(scope="module")
def served(model):
    pytest.importorskip("uvicorn")
    from server_support import servers_per_text

    with servers_per_text(model, model_id="gpt-oss-20b") as url:
        yield lambda text: openai.OpenAI(base_url=url(text) + "/v1", api_key="x", max_retries=0)


class City(pydantic.BaseModel):
    city: Literal["Berlin", "Paris"]


def test_chat_completions_parse(served):
    r = served(PROSE).chat.completions.parse(model="gpt-oss-20b", messages=ASK, response_format=City, temperature=0)
    assert r.choices[0].message.parsed.city in ("Berlin", "Paris") and r.choices[0].finish_reason == "stop"
    r = served(PROSE).chat.completions.create(model="gpt-oss-20b", messages=ASK, max_tokens=5,
                                              response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")


def test_responses_parse_and_echo(served):
    r = served(PROSE).responses.parse(model="gpt-oss-20b", input="Capital of France?", text_format=City,
                                      temperature=0)
    assert r.output_parsed.city in ("Berlin", "Paris")
    assert r.text.format.type == "json_schema" and r.text.format.name == "City" and r.text.format.strict


def test_tool_choice_is_enforced_by_the_server(served):
    c = served(TIME_CALL)
    r = c.chat.completions.create(model="gpt-oss-20b", messages=ASK, tools=[TIME, WEATHER], temperature=0,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    flat = {"type": "function", **WEATHER["function"]}
    r = c.responses.create(model="gpt-oss-20b", input="Weather?", tools=[flat], tool_choice="required",
                           temperature=0)
    assert [(i.type, i.name) for i in r.output] == [("function_call", "get_weather")]


def test_undeclared_calls_are_not_reported_by_the_server(served, caplog):
    c = served(TIME_CALL)  # first: starting a server applies its logging config, which resets the loggers below
    app_log = logging.getLogger("ossrt.server.app")  # serve's logging config stops "ossrt" records propagating
    app_log.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="ossrt.server.app"):
            r = c.chat.completions.create(model="gpt-oss-20b", messages=ASK, temperature=0)
            logged = lambda: any("did not declare 4 time(s)" in m for m in caplog.messages)  # noqa
            deadline = time.monotonic() + 10  # logged when the turn's thread has ended, just after the reply
            while not logged() and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        app_log.removeHandler(caplog.handler)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert logged()
    r = c.responses.create(model="gpt-oss-20b", input="Time?", temperature=0)
    assert [i.type for i in r.output if i.type == "function_call"] == [] and r.status == "completed"


@pytest.mark.parametrize(("api", "body", "param", "message"), [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema", "is not a usable JSON schema"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format.json_schema", "missing required field"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format.type", "'xml'"),
    ("responses", {"text": {"format": {"type": "json_schema", "name": "a b", "schema": CITY_SCHEMA}}},
     "text.format.name", "must be 1 to 64"),
    ("responses", {"text": {"format": {"type": "json_schema", "name": "c", "schema": CITY_SCHEMA, "strict": 1}}},
     "text.format.strict", "must be true or false"),
])
def test_bad_formats_get_400_naming_the_field(served, api, body, param, message):
    c = served(PROSE)
    with pytest.raises(openai.APIStatusError) as e:
        if api == "chat":
            c.chat.completions.create(model="gpt-oss-20b", messages=ASK, extra_body=body)
        else:
            c.responses.create(model="gpt-oss-20b", input="Hi", extra_body=body)
    assert e.value.status_code in (400, 422) and e.value.body["param"] == param
    assert message in e.value.body["message"]


