"""Harmony parser (ossrt.harmony.parse): against openai-harmony's StreamableParser (differential, hand-written and
hypothesis-generated), lenient on malformed output, one id per tool call on every event and in the history
message."""

import dataclasses
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai_harmony import Role, StreamableParser

from ossrt.harmony import (
    ContentDelta,
    HarmonyParser,
    ParsedMessage,
    PreambleDelta,
    ReasoningDelta,
    ToolCall,
    ToolCallBegin,
    ToolCallDelta,
    completion_to_message,
    parse_completion,
)

BERLIN_CALL = ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Berlin"}'
               '<|call|>')
CALL_ID = re.compile("call_[0-9a-f]{24}")


def _parse(tok, text, extra=()):
    ids = tok.encode(text, allowed_special="all") + list(extra)
    return parse_completion(tok, ids)


def _texts(events, kind):
    return "".join(e.text for e in events if isinstance(e, kind))


def assert_one_id_per_call(events, messages):
    """Each call's id is on its `ToolCallBegin`, `ToolCallDelta`s and `ToolCall`, its `ParsedMessage` and its entry
    in `completion_to_message`; no two calls share one."""
    ids, current = [], None
    for e in events:
        if isinstance(e, ToolCallBegin):
            ids.append(current := e.id)
        elif isinstance(e, (ToolCallDelta, ToolCall)):
            assert e.id == current
    assert len(set(ids)) == len(ids) and all(CALL_ID.fullmatch(i) for i in ids)
    assert [e.id for e in events if isinstance(e, ToolCall)] == ids
    assert [m.call_id for m in messages if m.call_id is not None] == ids
    assert [c["id"] for c in completion_to_message(messages).get("tool_calls", [])] == ids
    return ids


def _calls(events):
    """The `ToolCall` events, their ids checked for form and then blanked, to compare with expected calls."""
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert all(CALL_ID.fullmatch(e.id) for e in calls)
    return [dataclasses.replace(e, id="") for e in calls]


# --- the case users try first -------------------------------------------------------------------------------------
def test_berlin_call(o200k_tokenizer):
    tok = o200k_tokenizer
    messages, events, parser = _parse(tok, BERLIN_CALL)
    assert _calls(events) == [ToolCall("", "get_weather", '{"city":"Berlin"}', "functions.get_weather", "commentary",
                                       "<|constrain|>json")]
    call = events[-1]
    assert json.loads(call.arguments) == {"city": "Berlin"}
    assert parser.problems == [] and parser.stop_reason == "call"
    assert [e for e in events if isinstance(e, (ContentDelta, ReasoningDelta, PreambleDelta))] == []
    assert events[0] == ToolCallBegin(call.id, "get_weather", "functions.get_weather", "commentary",
                                      "<|constrain|>json")
    assert "".join(e.text for e in events if isinstance(e, ToolCallDelta)) == '{"city":"Berlin"}'


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


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
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
def test_parser_routes_channels(o200k_tokenizer):
    _, ev, p = _parse(o200k_tokenizer, "<|channel|>analysis<|message|>hmm<|end|><|start|>assistant<|channel|>"
                      "commentary<|message|>On it.<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>")
    assert (_texts(ev, ReasoningDelta), _texts(ev, PreambleDelta), _texts(ev, ContentDelta)) == ("hmm", "On it.",
                                                                                                 "Done.")
    assert p.problems == [] and p.stop_reason == "return"
    assert [m.end for m in p.messages] == ["end", "end", "return"]


def test_recipient_on_analysis_and_bare_recipient(o200k_tokenizer):
    _, ev, p = _parse(o200k_tokenizer, "<|channel|>analysis to=functions.get_weather<|message|>{}<|call|>")
    assert _calls(ev) == [ToolCall("", "get_weather", "{}", "functions.get_weather", "analysis", None)]
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
    assert _calls(ev) == [ToolCall("", "f", "{}", "functions.f", "commentary", "json")]
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


def test_a_cut_off_header_is_dropped(o200k_tokenizer):
    """max_tokens ending generation inside a header: no header words arrive as an answer."""
    for text in ("<|channel|>commentary to", " to=functions.get", "<|channel|>final"):
        _, ev, p = _parse(o200k_tokenizer, text)
        assert ev == [] and p.messages == [] and len(p.problems) == 1, text
        assert p.problems[0].endswith("output ended inside a message header; the header was dropped")
    _, ev, p = _parse(o200k_tokenizer, "Hello there")  # no header at all: a model writing plain text
    assert _texts(ev, ContentDelta) == "Hello there"


def test_unexpected_tokens_in_content_are_skipped(o200k_tokenizer):
    tok = o200k_tokenizer
    ids = tok.encode("<|channel|>final<|message|>a", allowed_special="all") + [
        tok.constrain, tok.message, 200004, 200500, 201088, -3, "x", None] + tok.encode("b") + [tok.return_]
    _, ev, p = parse_completion(tok, ids)
    assert _texts(ev, ContentDelta) == "ab" and len(p.problems) == 8


def test_cut_off_tool_call_and_partial_utf8(o200k_tokenizer):
    tok = o200k_tokenizer
    _, ev, p = _parse(tok, '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Be')
    assert _calls(ev) == [ToolCall(
        "", "get_weather", '{"city":"Be', "functions.get_weather", "commentary", "<|constrain|>json", complete=False)]
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
    calls = [m for m in p.messages if m.role == "assistant" and m.recipient not in (None, "all")]
    assert [e.arguments for e in events if isinstance(e, ToolCall)] == [m.content for m in calls]
    assert [m for m in p.messages if m.call_id is not None] == calls
    assert_one_id_per_call(events, p.messages)


def test_completion_to_message_preamble_and_final():
    msgs = [ParsedMessage("assistant", "plan", channel="analysis"),
            ParsedMessage("assistant", "Checking.", channel="commentary"),
            ParsedMessage("assistant", "{}", channel="commentary", recipient="functions.f",
                          content_type="<|constrain|>json", end="call", call_id="call_1")]
    assert completion_to_message(msgs) == {
        "role": "assistant", "content": "Checking.", "reasoning": "plan",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert completion_to_message([]) == {"role": "assistant", "content": None}


def test_streamed_call_ids_equal_the_message_ids(o200k_tokenizer):
    """What a server streams (the events, token by token) and what it returns at the end (completion_to_message)
    name each call by the same id; the last call is cut off and keeps its id too."""
    tok = o200k_tokenizer
    ids = tok.encode("<|channel|>commentary<|message|>Checking both.<|end|><|start|>assistant<|channel|>commentary"
                     ' to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|end|>'
                     "<|start|>assistant" + BERLIN_CALL + '<|start|>assistant<|channel|>commentary to=functions.'
                     'get_weather <|constrain|>json<|message|>{"city":', allowed_special="all")
    parser = HarmonyParser(tok)
    events = [e for t in ids for e in parser.feed(t)] + parser.finish()
    call_ids = assert_one_id_per_call(events, parser.messages)
    assert len(call_ids) == 3 and sum(isinstance(e, ToolCallDelta) for e in events) > 3
    message = completion_to_message(parser.messages)
    assert [(c["id"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        (call_ids[0], '{"city":"Paris"}'), (call_ids[1], '{"city":"Berlin"}'), (call_ids[2], '{"city":')]
    assert [e.complete for e in events if isinstance(e, ToolCall)] == [True, True, False]
    assert message["content"] == "Checking both."
