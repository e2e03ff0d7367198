"""Harmony renderer and parser: token-for-token against openai-harmony (differential, hand-written and
hypothesis-generated), exact layouts from the spec, lenient parsing of malformed output, input validation."""

import datetime
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

openai_harmony = pytest.importorskip("openai_harmony")
from openai_harmony import (  # noqa: E402
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    StreamableParser,
    SystemContent,
    ToolDescription,
)

from ossrt.errors import ChatFormatError  # noqa: E402
from ossrt.harmony import (  # noqa: E402
    ContentDelta,
    HarmonyParser,
    ParsedMessage,
    PreambleDelta,
    ReasoningDelta,
    ToolCall,
    ToolCallBegin,
    ToolCallDelta,
    completion_to_message,
    json_text,
    parse_completion,
    render_conversation,
    schema_to_typescript,
)

HYPO = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
BERLIN = [{"role": "user", "content": "What's the weather in Berlin right now?"}]
BERLIN_CALL = ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Berlin"}'
               '<|call|>')


# --- the reference: the same conversation built with openai-harmony's own objects ---------------------------------
def _text(m):
    c = m.get("content")
    return "".join(p["text"] for p in c) if isinstance(c, list) else c


def _kept_reasoning(messages):
    """Spec §7.7 docs rule: a turn that ended with a final answer and is followed by a user message loses its
    reasoning."""
    keep, turn = set(), []
    for i, m in enumerate(messages + [{"role": "user"}]):
        if m["role"] == "user":
            ended_final = turn and messages[turn[-1]].get("content") and not messages[turn[-1]].get("tool_calls")
            if not (ended_final and i < len(messages)):
                keep.update(turn)
            turn = []
        elif m["role"] == "assistant":
            turn.append(i)
    return keep


def reference_render(enc, messages, tools=None, reasoning_effort="medium", current_date=None):
    sysc = SystemContent.new().with_reasoning_effort(ReasoningEffort[reasoning_effort.upper()])
    if current_date:
        sysc = sysc.with_conversation_start_date(current_date)
    out = [Message.from_role_and_content(Role.SYSTEM, sysc)]
    lead = 0
    while lead < len(messages) and messages[lead]["role"] in ("system", "developer"):
        lead += 1
    if lead or tools:
        dev = DeveloperContent.new()
        if lead:
            dev = dev.with_instructions("\n\n".join(_text(m) for m in messages[:lead]))
        if tools:
            dev = dev.with_function_tools([ToolDescription.new(
                t["function"]["name"], t["function"].get("description") or "", t["function"].get("parameters"))
                for t in tools])
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    keep = _kept_reasoning(messages)
    names = {}
    for i, m in enumerate(messages[lead:], lead):
        role = m["role"]
        if role in ("system", "developer"):
            out.append(Message.from_role_and_content(Role.DEVELOPER, _text(m)))
        elif role == "user":
            out.append(Message.from_role_and_content(Role.USER, _text(m)))
        elif role == "assistant":
            reasoning = m.get("reasoning") or m.get("reasoning_content")
            if reasoning and i in keep:
                out.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
            calls = m.get("tool_calls") or []
            if m.get("content"):
                out.append(Message.from_role_and_content(Role.ASSISTANT, _text(m)).with_channel(
                    "commentary" if calls else "final"))
            for c in calls:
                names[c["id"]] = c["function"]["name"]
                out.append(Message.from_role_and_content(Role.ASSISTANT, c["function"]["arguments"])
                           .with_channel("commentary").with_recipient("functions." + c["function"]["name"])
                           .with_content_type("<|constrain|>json"))
        else:
            name = names[m["tool_call_id"]] if "tool_call_id" in m else m["name"]
            out.append(Message.from_author_and_content(Author.new(Role.TOOL, "functions." + name), _text(m))
                       .with_recipient("assistant").with_channel("commentary"))
    return enc.render_conversation_for_completion(Conversation.from_messages(out), Role.ASSISTANT)


def assert_same(tok, enc, messages, **kw):
    mine = render_conversation(tok, messages, **kw)
    ref = reference_render(enc, messages, **kw)
    assert tok.decode(mine) == tok.decode(ref)
    assert mine == ref
    return mine


# --- the case users try first -------------------------------------------------------------------------------------
def test_berlin_weather_prompt_and_call(o200k_tokenizer, harmony_encoding):
    tok = o200k_tokenizer
    ids = assert_same(tok, harmony_encoding, BERLIN, tools=[WEATHER_TOOL], current_date="2025-06-28")
    assert tok.decode(ids) == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
        "Calls to these tools must go to the commentary channel: 'functions'.<|end|>"
        "<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n"
        "// Get the current weather for a city.\ntype get_weather = (_: {\ncity: string,\n}) => any;\n\n"
        "} // namespace functions<|end|>"
        "<|start|>user<|message|>What's the weather in Berlin right now?<|end|><|start|>assistant")
    assert ids[-2:] == [200006, 173781]

    completion = tok.encode(BERLIN_CALL, allowed_special="all")
    messages, events, parser = parse_completion(tok, completion)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls == [ToolCall("get_weather", '{"city":"Berlin"}', "functions.get_weather", "commentary",
                              "<|constrain|>json")]
    assert json.loads(calls[0].arguments) == {"city": "Berlin"}
    assert parser.problems == [] and parser.stop_reason == "call"
    assert [e for e in events if isinstance(e, (ContentDelta, ReasoningDelta, PreambleDelta))] == []
    assert events[0] == ToolCallBegin("get_weather", "functions.get_weather", "commentary", "<|constrain|>json")
    assert "".join(e.text for e in events if isinstance(e, ToolCallDelta)) == '{"city":"Berlin"}'


def test_berlin_round_trip_through_history(o200k_tokenizer, harmony_encoding):
    """Parsed completion -> assistant message -> tool result -> the next prompt, equal to openai-harmony's."""
    tok = o200k_tokenizer
    completion = tok.encode("<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant"
                            + BERLIN_CALL, allowed_special="all")
    parsed, _, _ = parse_completion(tok, completion)
    reply = completion_to_message(parsed, make_id=lambda: "call_1")
    assert reply == {"role": "assistant", "content": None, "reasoning": "Need the weather tool.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Berlin"}'}}]}
    history = BERLIN + [reply, {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
    ids = assert_same(tok, harmony_encoding, history, tools=[WEATHER_TOOL])
    assert tok.decode(ids).endswith(
        "<|start|>assistant<|channel|>analysis<|message|>Need the weather tool.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        '{"city":"Berlin"}<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
        '{"temp_c": 21}<|end|><|start|>assistant')
    # The answer turn: once it ends in a final message and the user speaks again, its reasoning is dropped.
    answer = tok.encode("<|channel|>analysis<|message|>It is 21 C.<|end|><|start|>assistant<|channel|>final"
                        "<|message|>It is 21 °C in Berlin.<|return|>", allowed_special="all")
    final = completion_to_message(parse_completion(tok, answer)[0])
    assert final == {"role": "assistant", "content": "It is 21 °C in Berlin.", "reasoning": "It is 21 C."}
    history += [final, {"role": "user", "content": "Thanks!"}]
    text = tok.decode(assert_same(tok, harmony_encoding, history, tools=[WEATHER_TOOL]))
    assert "Need the weather tool." not in text and "It is 21 C." not in text
    assert "<|channel|>final<|message|>It is 21 °C in Berlin.<|end|><|start|>user<|message|>Thanks!" in text


# --- rendering: hand-written conversations ------------------------------------------------------------------------
COMPLEX_PARAMS = {
    "type": "object", "description": "Search options.",
    "properties": {
        "query": {"type": "string", "title": "Query", "description": "What to look for.",
                  "examples": ["cats", "dogs"]},
        "limit": {"type": "integer", "default": 10, "description": "Max results"},
        "ratio": {"type": "number", "default": 0.5},
        "big": {"type": "number", "default": 1e20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "name": {"type": "string", "default": "anon"},
        "flags": {"type": "array", "items": {"type": "boolean"}},
        "anything": {"type": "array"},
        "id": {"type": ["number", "string", "integer"], "default": -1},
        "maybe": {"type": "string", "nullable": True},
        "nested": {"type": "object", "description": "Inner.", "properties": {
            "a": {"type": "string", "description": "deep"}, "b": {"type": "object", "properties": {
                "c": {"type": "integer"}}}}, "required": ["a"]},
        "choice": {"description": "One of these.", "default": "x", "oneOf": [
            {"type": "string", "description": "One of these."}, {"type": "number", "description": "a number",
                                                                 "default": 3},
            {"type": "object", "properties": {"k": {"type": "boolean"}}, "nullable": True}]},
        "choice2": {"oneOf": [{"type": "string", "enum": ["a", "b"], "default": "a"}, {"type": "integer"}]},
        "weird": {"type": "tuple"},
        "obj_default": {"type": "object", "default": {"k": [1, 2.5, None, True, "é\n"]}},
        "no_type": {},
    },
    "required": ["query", "choice"],
}


@pytest.mark.parametrize("case", [
    dict(messages=[{"role": "user", "content": "Hi"}]),
    dict(messages=[{"role": "user", "content": "Hi"}], reasoning_effort="low"),
    dict(messages=[{"role": "user", "content": "Hi"}], reasoning_effort="high", current_date="2024-12-31"),
    dict(messages=[{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}]),
    dict(messages=[{"role": "system", "content": "A."}, {"role": "developer", "content": "B.\n"},
                   {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]},
                   {"role": "developer", "content": "Later rule."}, {"role": "user", "content": "z"}]),
    dict(messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER_TOOL, {"type": "function", "function": {
        "name": "get_location", "description": "Gets the location of the user."}}]),
    dict(messages=[{"role": "developer", "content": "Use tools."}, {"role": "user", "content": "Search"}],
         tools=[{"type": "function", "function": {"name": "search", "description": "Line one.\r\nLine two.\n",
                                                  "parameters": COMPLEX_PARAMS}},
                {"type": "function", "function": {"name": "noop", "parameters": {"type": "object",
                                                                                 "properties": {}}}}]),
    dict(messages=[{"role": "user", "content": "special <|start|> <|end|> <|return|> text stays text"}]),
    dict(messages=[  # multi-turn: finished turns lose their reasoning
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "reasoning": "Easy.", "content": "2"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "reasoning_content": "Also easy.",
                                              "content": "4"},
        {"role": "user", "content": "3+3?"}]),
    dict(messages=[  # a tool-calling turn in progress keeps its reasoning and preamble
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "reasoning": "Two calls.", "content": "Checking both cities.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "18"}, {"role": "tool", "name": "get_weather",
                                                                 "content": "25"}],
        tools=[WEATHER_TOOL]),
    dict(messages=[  # the last assistant message is final: harmony's own rule drops analysis before it
        {"role": "user", "content": "Hi"}, {"role": "assistant", "reasoning": "Greet.", "content": "Hello!"}]),
    dict(messages=[  # finals in two turns, the last turn still running
        {"role": "user", "content": "a"}, {"role": "assistant", "reasoning": "r1", "content": "A"},
        {"role": "user", "content": "b"}, {"role": "assistant", "reasoning": "r2", "content": "B"},
        {"role": "assistant", "reasoning": "r3", "tool_calls": [
            {"id": "t", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t", "content": ""}], tools=[WEATHER_TOOL]),
])
def test_renders_like_openai_harmony(case, o200k_tokenizer, harmony_encoding):
    assert_same(o200k_tokenizer, harmony_encoding, **case)


def test_render_functions_with_parameters_layout():
    """Spec §7.5 example (openai/harmony test-data/test_render_functions_with_parameters.txt)."""
    params = {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
        "required": ["location"]}
    assert schema_to_typescript(params) == (
        '{\n// The city and state, e.g. San Francisco, CA\nlocation: string,\n'
        'format?: "celsius" | "fahrenheit", // default: celsius\n}')
    assert schema_to_typescript({"type": "object", "properties": {"o": {"type": "object", "properties": {
        "i": {"type": "integer", "nullable": True}}}}}) == "{\no?: {\n    i?: number | null,\n    },\n}"


def test_current_date_as_date_and_reasoning_effort_case(o200k_tokenizer):
    a = render_conversation(o200k_tokenizer, BERLIN, current_date=datetime.date(2025, 1, 2), reasoning_effort="HIGH")
    b = render_conversation(o200k_tokenizer, BERLIN, current_date="2025-01-02", reasoning_effort="high")
    assert a == b and "Current date: 2025-01-02\n\nReasoning: high" in o200k_tokenizer.decode(a)


def test_json_text_matches_serde_json():
    assert json_text({"a": [1, 2.5, 1e20, 1.5e-7, -0.0, 1e16, 1e15, None, True], "é": "x\n\"y\""}) == (
        '{"a":[1,2.5,1e20,1.5e-7,-0.0,1e16,1000000000000000.0,null,true],"é":"x\\n\\"y\\""}')


# --- rendering: hypothesis ----------------------------------------------------------------------------------------
text = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
                 st.sampled_from(["", "a\nb", "x\r\ny\n", "<|start|>", " to=x", "é😀世界", "\n", "\r", "  "]))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
                        st.floats(allow_nan=False, allow_infinity=False), text)
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3),
                          max_leaves=5)
type_name = st.sampled_from(["string", "number", "integer", "boolean", "null", "array", "object", "weird"])
schema_extras = {"description": text, "default": json_value, "nullable": st.one_of(st.booleans(), json_value),
                 "title": text, "examples": st.lists(st.one_of(text, st.integers()), max_size=3),
                 "enum": st.lists(st.one_of(text, st.integers()), max_size=3)}


def _schema_nodes(children):
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(text, children, max_size=4)},
                              optional={"required": st.lists(text, max_size=3), **schema_extras}),
        st.fixed_dictionaries({"type": st.just("array")}, optional={"items": children, **schema_extras}),
        st.fixed_dictionaries({"oneOf": st.lists(children, max_size=3)}, optional={"type": type_name,
                                                                                  **schema_extras}),
    )


schema = st.recursive(
    st.one_of(st.fixed_dictionaries({"type": st.one_of(type_name, st.lists(st.one_of(type_name, st.integers()),
                                                                           max_size=3))}, optional=schema_extras),
              st.just({}), json_scalar),
    _schema_nodes, max_leaves=8)
tool_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,12}", fullmatch=True)


@st.composite
def tools_strategy(draw):
    names = draw(st.lists(tool_name, max_size=4, unique=True))
    tools = []
    for n in names:
        fn = {"name": n}
        if draw(st.booleans()):
            fn["description"] = draw(text)
        if draw(st.integers(0, 3)):
            fn["parameters"] = draw(st.one_of(
                st.fixed_dictionaries({"type": st.just("object"),
                                       "properties": st.dictionaries(text, schema, max_size=5)},
                                      optional={"required": st.lists(text, max_size=3), **schema_extras}),
                st.dictionaries(st.sampled_from(["type", "oneOf", "description"]), schema, max_size=2)))
        tools.append({"type": "function", "function": fn})
    return tools


@st.composite
def conversations(draw):
    msgs = [{"role": r, "content": draw(text)} for r in draw(st.lists(st.sampled_from(["system", "developer"]),
                                                                      max_size=2))]
    n_calls = 0
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.integers(0, 5)) == 0:
            msgs.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(text)})
        msgs.append({"role": "user", "content": draw(text)})
        for _ in range(draw(st.integers(0, 3))):
            m = {"role": "assistant"}
            if draw(st.booleans()):
                m[draw(st.sampled_from(["reasoning", "reasoning_content"]))] = draw(text)
            if draw(st.booleans()):
                calls = []
                for _ in range(draw(st.integers(1, 2))):
                    n_calls += 1
                    calls.append({"id": f"call_{n_calls}", "type": "function", "function": {
                        "name": draw(tool_name), "arguments": draw(st.one_of(text, json_value.map(json.dumps)))}})
                m["tool_calls"] = calls
                if draw(st.booleans()):
                    m["content"] = draw(text)
                msgs.append(m)
                for c in calls:
                    if draw(st.booleans()):
                        msgs.append({"role": "tool", "tool_call_id": c["id"], "content": draw(text)})
                    else:
                        msgs.append({"role": "tool", "name": c["function"]["name"], "content": draw(text)})
            else:
                m["content"] = draw(text.filter(bool))
                msgs.append(m)
    return msgs


@HYPO
@given(tools=tools_strategy(), effort=st.sampled_from(["low", "medium", "high"]),
       date=st.one_of(st.none(), st.dates().map(str)))
def test_hypothesis_tool_schemas_render_like_harmony(o200k_tokenizer, harmony_encoding, tools, effort, date):
    assert_same(o200k_tokenizer, harmony_encoding, [{"role": "user", "content": "hi"}], tools=tools,
                reasoning_effort=effort, current_date=date)


@HYPO
@given(messages=conversations(), tools=st.one_of(st.none(), st.just([WEATHER_TOOL])))
def test_hypothesis_histories_render_like_harmony(o200k_tokenizer, harmony_encoding, messages, tools):
    assert_same(o200k_tokenizer, harmony_encoding, messages, tools=tools)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.dictionaries(st.sampled_from(["role", "content", "tool_calls", "tool_call_id", "name",
                                                          "reasoning"]), json_value, max_size=4),
                          json_value), max_size=4),
       st.one_of(st.none(), st.lists(json_value, max_size=2)))
def test_garbage_input_raises_only_chat_format_error(o200k_tokenizer, messages, tools):
    try:
        render_conversation(o200k_tokenizer, messages, tools=tools)
    except ChatFormatError:
        pass


# --- input validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("messages, kw, match", [
    ([{"role": "robot", "content": "x"}], {}, r"messages\[0\]: unknown role 'robot'"),
    ([{"content": "x"}], {}, r"messages\[0\]: unknown role None"),
    (["hello"], {}, r"messages\[0\] must be an object"),
    ("hello", {}, "messages must be a list"),
    ([{"role": "user"}], {}, r"messages\[0\] \(user\): missing 'content'"),
    ([{"role": "user", "content": 5}], {}, r"messages\[0\] \(user\): 'content' must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], {}, r"messages\[0\].content\[0\]"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}], {},
     r"messages\[1\] \(assistant\): needs 'content', 'tool_calls' or 'reasoning'"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}], {},
     r"messages\[1\] \(tool\): no earlier assistant tool call has id 'nope'"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "name": "get_weather", "content": "1"}], {},
     r"no earlier assistant tool call to 'get_weather'"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}], {}, r"needs 'tool_call_id'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": "1", "function": {
        "name": "bad name", "arguments": "{}"}}]}], {}, r"messages\[1\].tool_calls\[0\]: tool name"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": "1"}]}], {},
     r"messages\[1\].tool_calls\[0\]: missing 'function'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "reasoning": 3, "content": "y"}], {},
     r"'reasoning' must be a string"),
    (BERLIN, {"reasoning_effort": "max"}, "reasoning_effort must be one of low, medium, high; got 'max'"),
    (BERLIN, {"current_date": 20250101}, "current_date must be a date"),
    (BERLIN, {"tools": [{"type": "retrieval"}]}, r"tools\[0\]: type 'retrieval' is not supported"),
    (BERLIN, {"tools": [{"type": "function", "function": {"description": "x"}}]}, r"tools\[0\].function.name"),
    (BERLIN, {"tools": [WEATHER_TOOL, WEATHER_TOOL]}, r"tools\[1\]: a second tool named 'get_weather'"),
    (BERLIN, {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     r"tools\[0\].function.parameters must be a JSON-schema object"),
])
def test_bad_input_raises_chat_format_error(o200k_tokenizer, messages, kw, match):
    with pytest.raises(ChatFormatError, match=match):
        render_conversation(o200k_tokenizer, messages, **kw)


def test_flat_tool_form_and_dict_arguments(o200k_tokenizer):
    flat = {"type": "function", **WEATHER_TOOL["function"]}
    assert (render_conversation(o200k_tokenizer, BERLIN, tools=[flat])
            == render_conversation(o200k_tokenizer, BERLIN, tools=[WEATHER_TOOL]))
    as_dict = BERLIN + [{"role": "assistant", "tool_calls": [
        {"id": "1", "function": {"name": "get_weather", "arguments": {"city": "Berlin"}}}]}]
    assert '<|message|>{"city":"Berlin"}<|call|>' in o200k_tokenizer.decode(
        render_conversation(o200k_tokenizer, as_dict))


# --- parser: differential against openai-harmony's StreamableParser -----------------------------------------------
def _harmony_parse(enc, ids):
    p = StreamableParser(enc, Role.ASSISTANT)
    deltas = []
    for t in ids:
        before = p.state_data["state"]
        p.process(t)
        deltas.append((p.last_content_delta or "") if before == "Content" and p.state_data["state"] == "Content"
                      else None)
    p.process_eos()
    msgs = [(m.author.role.value, m.channel, m.recipient, m.content_type, m.content[0].text) for m in p.messages]
    return msgs, deltas


def _mine(tok, ids):
    p = HarmonyParser(tok)
    per_token = []
    for t in ids:
        ev = p.feed(t)
        per_token.append("".join(e.text for e in ev if hasattr(e, "text")))
    p.finish()
    msgs = [(m.role, m.channel, m.recipient, m.content_type, m.content) for m in p.messages]
    return msgs, per_token, p


content_text = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
                         st.sampled_from(["", "{\"city\":\"Berlin\"}", "é😀世界𝔘", "line\nline", "  "]))


@st.composite
def completions(draw, tok):
    """A well-formed completion: assistant messages as the model emits them (either header order)."""
    ids, n = [], draw(st.integers(1, 4))
    for k in range(n):
        if k:
            ids += [tok.start] + tok.encode("assistant")
        kind = draw(st.sampled_from(["analysis", "commentary", "final", "call", "call_model_order", "raw_bytes"]))
        recipient = None
        if kind in ("call", "call_model_order"):
            recipient = draw(st.sampled_from(["functions.get_weather", "functions.f_1", "browser.search", "python"]))
            ctype = draw(st.sampled_from([None, "json", "<|constrain|>json", "code"]))
            channel = draw(st.sampled_from(["commentary", "analysis"]))
            ct = [] if ctype is None else (tok.encode(" ") + [tok.constrain] + tok.encode("json")
                                           if ctype.startswith("<|") else tok.encode(f" {ctype}"))
            if kind == "call":  # renderer order
                ids += tok.encode(f" to={recipient}") + [tok.channel] + tok.encode(channel) + ct
            else:  # the order the model generates
                ids += [tok.channel] + tok.encode(channel) + tok.encode(f" to={recipient}") + ct
        else:
            ids += [tok.channel] + tok.encode("final" if kind == "raw_bytes" else kind)
        ids.append(tok.message)
        if kind == "raw_bytes":  # byte-level tokens that form invalid or split UTF-8
            ids += draw(st.lists(st.sampled_from(tok.encode("𝔘é") + [tok.encode("a")[0]]
                                                 + [tok._enc.encode_single_token(bytes([b]))
                                                    for b in (0xE4, 0xFF, 0x80, 0xF0, 0x9D)]), max_size=8))
        else:
            ids += tok.encode(draw(content_text))
        last = k == n - 1
        if recipient is not None:
            ids.append(tok.call if last else tok.end)
        elif last:
            ids += draw(st.sampled_from([[tok.return_], [tok.end], []]))  # [] = cut off
        else:
            ids.append(tok.end)
    return ids


@pytest.mark.parametrize("completion", [
    BERLIN_CALL,
    "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Answer.<|return|>",
    "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant to=functions.get_weather"
    "<|channel|>commentary <|constrain|>json<|message|>{}<|call|>",
    "<|channel|>analysis to=browser.search code<|message|>{\"query\": \"x\"}<|call|>",
    "<|channel|>commentary to=functions.get_weather<|constrain|>json<|message|>{}<|call|>",
    "<|channel|>commentary to=functions.get_weather json<|message|>{}<|call|>",
    "<|channel|>final<|message|>cut off mid sent",
])
def test_parser_matches_harmony_on_examples(completion, o200k_tokenizer, harmony_encoding):
    ids = o200k_tokenizer.encode(completion, allowed_special="all")
    ref_msgs, ref_deltas = _harmony_parse(harmony_encoding, ids)
    msgs, deltas, p = _mine(o200k_tokenizer, ids)
    assert msgs == ref_msgs
    assert [d for d, r in zip(deltas, ref_deltas) if r is not None] == [r for r in ref_deltas if r is not None]


@HYPO
@given(data=st.data())
def test_hypothesis_parser_matches_harmony(o200k_tokenizer, harmony_encoding, data):
    tok = o200k_tokenizer
    ids = data.draw(completions(tok))
    ref_msgs, ref_deltas = _harmony_parse(harmony_encoding, ids)
    msgs, deltas, p = _mine(tok, ids)
    assert msgs == ref_msgs
    # Streaming deltas agree token by token, except after invalid UTF-8: openai-harmony replaces one invalid
    # sequence per token and holds the valid bytes behind it until the next token; we emit them at once.
    if not any("\ufffd" in (r or "") for r in ref_deltas):
        assert [d for d, r in zip(deltas, ref_deltas) if r is not None] == [r for r in ref_deltas if r is not None]
    problems = [x for x in p.problems if "expected commentary" not in x and "ended inside" not in x]
    assert problems == []


# --- parser: lenient on malformed output --------------------------------------------------------------------------
def _parse(tok, text, extra=()):
    ids = tok.encode(text, allowed_special="all") + list(extra)
    return parse_completion(tok, ids)


def _texts(events, kind):
    return "".join(e.text for e in events if isinstance(e, kind))


def test_parser_routes_channels(o200k_tokenizer):
    _, ev, p = _parse(o200k_tokenizer, "<|channel|>analysis<|message|>hmm<|end|><|start|>assistant<|channel|>"
                      "commentary<|message|>On it.<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>")
    assert (_texts(ev, ReasoningDelta), _texts(ev, PreambleDelta), _texts(ev, ContentDelta)) == ("hmm", "On it.",
                                                                                                 "Done.")
    assert p.problems == [] and p.stop_reason == "return"
    assert [m.end for m in p.messages] == ["end", "end", "return"]


def test_recipient_on_analysis_and_bare_recipient(o200k_tokenizer):
    _, ev, p = _parse(o200k_tokenizer, "<|channel|>analysis to=functions.get_weather<|message|>{}<|call|>")
    assert [e for e in ev if isinstance(e, ToolCall)] == [
        ToolCall("get_weather", "{}", "functions.get_weather", "analysis", None)]
    assert any("expected commentary" in x for x in p.problems)
    _, ev, p = _parse(o200k_tokenizer, "<|channel|>commentary to=get_weather <|constrain|>json<|message|>{}<|call|>")
    assert [e.name for e in ev if isinstance(e, ToolCall)] == ["get_weather"] and p.problems == []


def test_stop_token_where_start_expected(o200k_tokenizer, harmony_encoding):
    """vllm-project/vllm#46464: openai-harmony raises here; we record it and keep the message."""
    ids = o200k_tokenizer.encode("<|channel|>final<|message|>Hi<|end|><|return|>", allowed_special="all")
    p = StreamableParser(harmony_encoding, Role.ASSISTANT)
    with pytest.raises(Exception, match="Unexpected token 200002 while expecting start token 200006"):
        for t in ids:
            p.process(t)
    msgs, ev, parser = parse_completion(o200k_tokenizer, ids)
    assert _texts(ev, ContentDelta) == "Hi" and parser.stop_reason == "return"
    assert len(parser.problems) == 1 and "<|return|> where <|start|> was expected" in parser.problems[0]


def test_malformed_header_recorded_not_raised(o200k_tokenizer, harmony_encoding):
    text = "<|channel|>commentary to=functions.f extra junk json<|message|>{}<|call|>"
    ids = o200k_tokenizer.encode(text, allowed_special="all")
    with pytest.raises(Exception, match="unexpected tokens remaining in message header"):
        harmony_encoding.parse_messages_from_completion_tokens(ids, Role.ASSISTANT)
    _, ev, p = parse_completion(o200k_tokenizer, ids)
    assert [e for e in ev if isinstance(e, ToolCall)] == [ToolCall("f", "{}", "functions.f", "commentary", "json")]
    assert len(p.problems) == 1 and "unexpected text in message header ignored: 'extra junk'" in p.problems[0]
    # Content type before the recipient.
    _, ev, p = _parse(o200k_tokenizer, "<|channel|>commentary <|constrain|>json to=functions.f<|message|>{}<|call|>")
    assert [(e.name, e.content_type) for e in ev if isinstance(e, ToolCall)] == [("f", "<|constrain|>json")]


def test_missing_start_and_channel_inside_content(o200k_tokenizer):
    _, ev, p = _parse(o200k_tokenizer, "<|channel|>analysis<|message|>a<|end|><|channel|>final<|message|>b<|return|>")
    assert (_texts(ev, ReasoningDelta), _texts(ev, ContentDelta)) == ("a", "b")
    assert len(p.problems) == 1
    _, ev, p = _parse(o200k_tokenizer, "<|channel|>analysis<|message|>a<|channel|>final<|message|>b<|return|>")
    assert (_texts(ev, ReasoningDelta), _texts(ev, ContentDelta)) == ("a", "b")
    assert p.messages[0].end is None and len(p.problems) == 1


def test_header_without_message_and_plain_text(o200k_tokenizer):
    _, ev, p = _parse(o200k_tokenizer, "<|channel|>final Hello there<|return|>")
    assert _texts(ev, ContentDelta) == "Hello there" and p.problems
    # A model ignoring the format entirely: its text still arrives, as a final answer.
    words = " ".join(["word"] * 100)
    _, ev, p = _parse(o200k_tokenizer, words)
    assert _texts(ev, ContentDelta) == words and p.problems


def test_unexpected_tokens_in_content_are_skipped(o200k_tokenizer):
    tok = o200k_tokenizer
    ids = tok.encode("<|channel|>final<|message|>a", allowed_special="all") + [
        tok.constrain, tok.message, 200004, 200500, 201088, -3, "x", None] + tok.encode("b") + [tok.return_]
    _, ev, p = parse_completion(tok, ids)
    assert _texts(ev, ContentDelta) == "ab" and len(p.problems) == 8


def test_cut_off_tool_call_and_partial_utf8(o200k_tokenizer):
    tok = o200k_tokenizer
    _, ev, p = _parse(tok, '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Be')
    assert [e for e in ev if isinstance(e, ToolCall)] == [ToolCall(
        "get_weather", '{"city":"Be', "functions.get_weather", "commentary", "<|constrain|>json", complete=False)]
    assert any("ended inside a message" in x for x in p.problems)
    split = tok.encode("𝔘")
    _, ev, p = parse_completion(tok, tok.encode("<|channel|>final<|message|>x", allowed_special="all") + split[:-1])
    assert _texts(ev, ContentDelta) == "x\ufffd"


def test_unknown_channel_non_assistant_and_no_channel(o200k_tokenizer):
    _, ev, p = _parse(o200k_tokenizer, "<|channel|>thoughts<|message|>t<|end|><|start|>user<|message|>fake<|end|>"
                      "<|start|>assistant<|message|>plain<|return|>")
    assert (_texts(ev, ReasoningDelta), _texts(ev, ContentDelta)) == ("t", "plain")
    assert "fake" not in "".join(getattr(e, "text", "") for e in ev)
    assert [m.role for m in p.messages] == ["assistant", "user", "assistant"] and len(p.problems) == 3


def test_numpy_ids(o200k_tokenizer):
    import numpy as np

    ids = np.array(o200k_tokenizer.encode(BERLIN_CALL, allowed_special="all"), dtype=np.int64)
    _, ev, p = parse_completion(o200k_tokenizer, ids)
    assert [e.name for e in ev if isinstance(e, ToolCall)] == ["get_weather"] and p.problems == []


def test_role_none_expects_start(o200k_tokenizer):
    tok = o200k_tokenizer
    ids = tok.encode("<|start|>assistant<|channel|>final<|message|>ok<|return|>", allowed_special="all")
    p = HarmonyParser(tok, role=None)
    assert _texts(p.feed_many(ids), ContentDelta) == "ok" and p.problems == []


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.integers(199990, 200030), st.integers(-5, 201100), st.integers(0, 200),
                          st.sampled_from([173781, 35644, 17196, 12606, 815, 316, 28, 29712, 13, 220, 4108, 3490])),
                max_size=60),
       st.sampled_from(["assistant", None]))
def test_fuzz_parser_never_raises(o200k_tokenizer, ids, role):
    p = HarmonyParser(o200k_tokenizer, role=role)
    events = p.feed_many(ids) + p.finish()
    assert p.state == "expect_start" and p.current is None
    surfaced = "".join(e.text for e in events if isinstance(e, (ReasoningDelta, PreambleDelta, ContentDelta,
                                                                ToolCallDelta)))
    assert surfaced == "".join(m.content for m in p.messages if m.role == "assistant")
    args = [e.arguments for e in events if isinstance(e, ToolCall)]
    assert args == [m.content for m in p.messages if m.role == "assistant" and m.recipient not in (None, "all")]
    completion_to_message(p.messages)


def test_completion_to_message_preamble_and_final():
    msgs = [ParsedMessage("assistant", "plan", channel="analysis"),
            ParsedMessage("assistant", "Checking.", channel="commentary"),
            ParsedMessage("assistant", "{}", channel="commentary", recipient="functions.f",
                          content_type="<|constrain|>json", end="call")]
    assert completion_to_message(msgs, make_id=lambda: "id1") == {
        "role": "assistant", "content": "Checking.", "reasoning": "plan",
        "tool_calls": [{"id": "id1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert completion_to_message([]) == {"role": "assistant", "content": None}
