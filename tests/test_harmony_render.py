"""Harmony renderer (ossrt.harmony.render and the tools section from .schema): token for token against
openai-harmony (differential, hand-written and hypothesis-generated), exact layouts from the spec, history round
trips through the parser, input validation."""

import datetime
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
    ToolNamespaceConfig,
)

from ossrt.errors import ChatFormatError
from ossrt.harmony import (
    REASONING_EFFORTS,
    ROLES,
    completion_to_message,
    parse_completion,
    render_conversation,
    to_harmony_messages,
)
from ossrt.tokenizer import N_VOCAB

HYPO = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
BERLIN = [{"role": "user", "content": "What's the weather in Berlin right now?"}]


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


def _recipient(name):
    return name if "." in name else "functions." + name


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
        functions = [t for t in tools or [] if t.get("type", "function") == "function"]
        if functions:
            dev = dev.with_function_tools([ToolDescription.new(
                t["function"]["name"], t["function"].get("description") or "", t["function"].get("parameters"))
                for t in functions])
        for ns in (t for t in tools or [] if t.get("type") == "namespace"):
            dev = dev.with_tools(ToolNamespaceConfig(name=ns["name"], description=ns.get("description"), tools=[
                ToolDescription.new(f["name"], f.get("description") or "", f.get("parameters"))
                for f in ns["tools"]]))
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
                           .with_channel("commentary").with_recipient(_recipient(c["function"]["name"]))
                           .with_content_type("<|constrain|>json"))
        else:
            name = names[m["tool_call_id"]] if "tool_call_id" in m else m["name"]
            out.append(Message.from_author_and_content(Author.new(Role.TOOL, _recipient(name)), _text(m))
                       .with_recipient("assistant").with_channel("commentary"))
    return enc.render_conversation_for_completion(Conversation.from_messages(out), Role.ASSISTANT)


AGENTS = {"type": "namespace", "name": "multi_agent_v1", "description": "Tools for spawning and managing sub-agents.",
          "tools": [{"type": "function", "name": "close_agent", "description": "Close an agent.",
                     "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}},
                    {"type": "function", "name": "list_agents", "description": "List them."}]}


def test_namespace_tools_and_calls_into_them(o200k_tokenizer, harmony_encoding):
    """A namespace tool (the Codex CLI's multi_agent_v1) is a namespace of its own after `functions`; calls into it
    go to NAMESPACE.NAME and its results come from there."""
    call = {"id": "c1", "type": "function", "function": {"name": "multi_agent_v1.close_agent",
                                                         "arguments": '{"id":"a1"}'}}
    conversation = BERLIN + [{"role": "assistant", "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": "c1", "content": "closed"}]
    for tools in ([WEATHER_TOOL, AGENTS], [AGENTS]):
        ids = assert_same(o200k_tokenizer, harmony_encoding, conversation, tools=tools)
        text = o200k_tokenizer.decode(ids)
        assert ("## multi_agent_v1\n\n// Tools for spawning and managing sub-agents.\nnamespace multi_agent_v1 {"
                in text)
        assert "<|start|>assistant to=multi_agent_v1.close_agent<|channel|>commentary" in text
        assert "<|start|>multi_agent_v1.close_agent to=assistant<|channel|>commentary" in text
    for bad, message in ((dict(AGENTS, name="functions"), "taken"), (dict(AGENTS, tools=[]), "non-empty"),
                         (dict(AGENTS, tools=[{"type": "web_search"}]), "must be a function tool")):
        with pytest.raises(ChatFormatError, match=message):
            render_conversation(o200k_tokenizer, BERLIN, tools=[bad])


def assert_same(tok, enc, messages, **kw):
    mine = render_conversation(tok, messages, **kw)
    ref = reference_render(enc, messages, **kw)
    assert tok.decode(mine) == tok.decode(ref)
    assert mine == ref
    return mine


def test_berlin_weather_prompt(o200k_tokenizer, harmony_encoding):
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


def test_berlin_round_trip_through_history(o200k_tokenizer, harmony_encoding):
    """Parsed completion -> assistant message -> tool result -> the next prompt, equal to openai-harmony's."""
    tok = o200k_tokenizer
    completion = tok.encode("<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant"
                            "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
                            '{"city":"Berlin"}<|call|>', allowed_special="all")
    parsed, _, _ = parse_completion(tok, completion)
    reply = completion_to_message(parsed)
    call_id = parsed[1].call_id
    assert re.fullmatch("call_[0-9a-f]{24}", call_id)
    assert reply == {"role": "assistant", "content": None, "reasoning": "Need the weather tool.", "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Berlin"}'}}]}
    history = BERLIN + [reply, {"role": "tool", "tool_call_id": call_id, "content": '{"temp_c": 21}'}]
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


def test_current_date_as_date_and_reasoning_effort_case(o200k_tokenizer):
    a = render_conversation(o200k_tokenizer, BERLIN, current_date=datetime.date(2025, 1, 2), reasoning_effort="HIGH")
    b = render_conversation(o200k_tokenizer, BERLIN, current_date="2025-01-02", reasoning_effort="high")
    assert a == b and "Current date: 2025-01-02\n\nReasoning: high" in o200k_tokenizer.decode(a)


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


# --- bad input: valid conversations with parts damaged ------------------------------------------------------------
# Damaging one or two parts of a valid request (rather than drawing all-random values, which stop at the first check)
# reaches every check and leaves many requests valid, so both outcomes are exercised.
def _paths(value, path=()):
    yield path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _paths(child, path + (key,))


def _replaced(value, path, new):
    """`value` with the part at `path` replaced by `new`, or removed if `new` is `_REMOVE` (copies, no mutation)."""
    if not path:
        return new
    out = dict(value) if isinstance(value, dict) else list(value)
    if len(path) == 1 and new is _REMOVE:
        del out[path[0]]
    else:
        out[path[0]] = _replaced(value[path[0]], path[1:], new)
    return out


_REMOVE = object()
garbage = st.one_of(json_value, st.sampled_from(ROLES + ("function",)), tool_name, st.sampled_from(["call_1", "x"]),
                    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2),
                    st.just(_REMOVE))


@st.composite
def damaged_requests(draw):
    request = {"messages": draw(conversations()), "tools": draw(st.one_of(st.none(), st.just([WEATHER_TOOL]),
                                                                          tools_strategy())),
               "reasoning_effort": draw(st.sampled_from(REASONING_EFFORTS + ("HIGH",))),
               "current_date": draw(st.one_of(st.none(), st.dates(), st.dates().map(str)))}
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from(list(_paths(request))[1:]))
        new = draw(garbage)
        request = _replaced(request, path, None if new is _REMOVE and len(path) == 1 else new)
    return request


FIELDS = re.compile(r"(messages|tools|reasoning_effort|current_date)\b")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(request=damaged_requests())
def test_garbage_input_raises_only_chat_format_error(o200k_tokenizer, harmony_encoding, request):
    """Any other exception fails; an error must name the field; a prompt that renders must be well formed:
    openai-harmony's parser reads back exactly the messages `to_harmony_messages` made, after the system message
    with the requested reasoning effort."""
    tok = o200k_tokenizer
    messages, kw = request["messages"], {k: v for k, v in request.items() if k != "messages"}
    try:
        ids = render_conversation(tok, messages, **kw)
    except ChatFormatError as e:
        assert FIELDS.match(str(e)), str(e)
        return
    expected = to_harmony_messages(messages, **kw)
    assert all(type(i) is int and 0 <= i < N_VOCAB for i in ids)
    assert ids[-2:] == [tok.start] + tok.encode("assistant")
    parsed = harmony_encoding.parse_messages_from_completion_tokens(ids[:-2], None)
    assert [(m.author.role.value, m.author.name, m.channel, m.recipient, m.content_type, m.content[0].text)
            for m in parsed] == [(m.role, m.name, m.channel, m.recipient, m.content_type, m.content)
                                 for m in expected]
    assert expected[0].role == "system" and f"Reasoning: {kw['reasoning_effort'].lower()}" in expected[0].content


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

