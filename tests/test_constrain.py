"""Constrained decoding on llguidance over the real o200k_harmony vocabulary: a seeded random "model" steered only
by the masks writes valid JSON that matches the schema, ending on the stop token exactly when the text is complete;
the completion grammar leaves reasoning free and allows exactly the Harmony forms of an answer or a declared call;
bad schemas are refused with the field named."""

import json

import numpy as np
import pytest

from ossrt import constrain
from ossrt.constrain import (Constraint, completion_grammar, function_arguments_format, json_object_format,
                             json_schema_format)
from ossrt.errors import ParameterError

RETURN, CALL = 200002, 200012

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string",
                                                                                "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "active"],
    "additionalProperties": False,
}


def check_person(value):
    """PERSON, checked by hand (jsonschema is not a dependency)."""
    assert set(value) == {"name", "age", "tags", "address", "active"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert type(value["age"]) is int and 0 <= value["age"] <= 120
    assert len(value["tags"]) <= 3 and all(t in ("red", "green", "blue") for t in value["tags"])
    assert set(value["address"]) == {"city", "zip"} and len(value["address"]["city"]) <= 10
    assert len(value["address"]["zip"]) == 5 and value["address"]["zip"].isdigit()
    assert type(value["active"]) is bool


def structure_bias(tokenizer) -> np.ndarray:
    """A push towards closing strings, objects and lists, so random text ends in a few dozen steps."""
    bias = np.zeros(tokenizer.n_vocab, dtype=np.float32)
    for text in ('"', "}", "]", '"}', "},", '",', "}}", '"}}'):
        for i in tokenizer.encode(text):
            bias[i] = 2.5
    return bias


FINAL = "<|channel|>final<|message|>"


def call_header(recipient: str) -> str:
    return f"<|channel|>commentary to={recipient} <|constrain|>json<|message|>"


def after(constraint: Constraint, tokenizer, text: str) -> Constraint:
    """`constraint` once the Harmony text `text` (a header) has been written."""
    for token in tokenizer.encode(text, allowed_special="all"):
        assert constraint.mask()[token], text
        constraint.consume(token)
    return constraint


def complete(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def run(constraint: Constraint, tokenizer, seed: int, stop: int, max_steps: int = 400) -> str:
    """A deterministic stand-in for a model writing a message's content: seeded random logits plus the bias, masked,
    argmax. Checks on every step that the stop token is allowed exactly when the JSON so far is complete."""
    rng = np.random.default_rng(seed)
    bias = structure_bias(tokenizer)
    others = [i for i in tokenizer.special_tokens.values() if i != stop]
    ids = []
    for _ in range(max_steps):
        logits = rng.standard_normal(tokenizer.n_vocab).astype(np.float32) + bias
        constraint.apply(logits)
        assert np.isneginf(logits[stop]) != complete(tokenizer.decode(ids))
        assert np.isneginf(logits[others]).all() and np.isneginf(logits[200019:]).all()
        token = int(np.argmax(logits))
        constraint.consume(token)
        if constraint.finished:
            assert token == stop
            return tokenizer.decode(ids, errors="strict")
        ids.append(token)
    raise AssertionError(f"no stop token after {max_steps} steps: {tokenizer.decode(ids)!r}")


def answer_constraint(fmt, tokenizer) -> Constraint:
    return after(Constraint(completion_grammar(answer=fmt), tokenizer), tokenizer, FINAL)


@pytest.mark.parametrize("seed", range(4))
def test_strict_schema_output_is_valid_and_matches(o200k_tokenizer, seed):
    fmt = json_schema_format({"name": "person", "schema": PERSON, "strict": True})
    text = run(answer_constraint(fmt, o200k_tokenizer), o200k_tokenizer, seed, RETURN)
    check_person(json.loads(text))


@pytest.mark.parametrize("seed", range(4))
def test_json_object_output_is_an_object(o200k_tokenizer, seed):
    text = run(answer_constraint(json_object_format(), o200k_tokenizer), o200k_tokenizer, seed, RETURN)
    assert isinstance(json.loads(text), dict)


WEATHER = {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}


def test_forced_call_arguments_match_parameters(o200k_tokenizer):
    grammar = completion_grammar(calls={"functions.get_weather": function_arguments_format(WEATHER)},
                                 call_required=True)
    constraint = after(Constraint(grammar, o200k_tokenizer), o200k_tokenizer, call_header("functions.get_weather"))
    args = json.loads(run(constraint, o200k_tokenizer, 7, CALL))
    assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f") and len(args["city"]) <= 20


def test_function_without_parameters_takes_an_object(o200k_tokenizer):
    grammar = completion_grammar(calls={"functions.ping": function_arguments_format({"name": "ping"})},
                                 call_required=True)
    constraint = after(Constraint(grammar, o200k_tokenizer), o200k_tokenizer, call_header("functions.ping"))
    assert isinstance(json.loads(run(constraint, o200k_tokenizer, 3, CALL)), dict)


def test_masks_forbid_bad_tokens_and_specials(o200k_tokenizer):
    tok = o200k_tokenizer
    constraint = answer_constraint(json_schema_format({"name": "p", "schema": PERSON, "strict": True}), tok)
    mask = constraint.mask()
    assert mask.shape == (tok.n_vocab,) and mask.dtype == bool
    # Compact JSON with the required keys in order: the text must begin '{"name":"', and llguidance allows only
    # the canonical tokens of such forced text.
    assert np.flatnonzero(mask).tolist() == tok.encode('{"')
    for bad in ("{", "[", " {", "hello", "1"):
        assert not mask[tok.encode(bad)[0]], bad
    assert not mask[list(tok.special_tokens.values())].any()  # the stop token too: nothing is complete yet
    assert not mask[200019:].any()  # ids without a string
    for token in tok.encode('{"name'):
        constraint.consume(token)
    mask = constraint.mask()
    assert mask[tok.encode('":"')[0]]
    assert not mask[tok.encode("age")[0]]


def test_stop_token_allowed_only_when_complete(o200k_tokenizer):
    tok = o200k_tokenizer
    constraint = answer_constraint(json_object_format(), tok)
    text = '{"a":[1,2],"b":{"c":null}}'
    for token in tok.encode(text):
        mask = constraint.mask()
        assert mask[token] and not mask[RETURN]
        constraint.consume(token)
    mask = constraint.mask()
    assert np.flatnonzero(mask).tolist() == [RETURN]  # after the closing brace nothing else fits, no other stop
    constraint.consume(RETURN)
    assert constraint.finished
    with pytest.raises(ValueError, match="already ended"):
        constraint.mask()


TEXT = "Some thinking: <tags>, {braces}, 'quotes'.\n\nMore."
ANALYSIS = f"<|channel|>analysis<|message|>{TEXT}<|end|><|start|>assistant"
PREAMBLE = f"<|channel|>commentary<|message|>{TEXT}<|end|><|start|>assistant"
ANSWER = FINAL + '{"city":"Paris"}<|return|>'
CITY = {"name": "city", "strict": True, "schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                                   "required": ["city"], "additionalProperties": False}}
CALL_FORMS = [  # as openai-harmony renders a call, and the close forms the model was trained on
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris","unit":"c"}<|call|>',
    '<|channel|>commentary to=functions.get_weather<|constrain|>json<|message|>{"city":"Paris","unit":"c"}<|call|>',
    ' to=functions.get_weather<|channel|>commentary json<|message|>{"city":"Paris","unit":"c"}<|call|>',
    '<|channel|>commentary to=functions.get_weather<|message|>{"city":"Paris","unit":"c"}<|call|>',
]


def accepts(grammar, tokenizer, text: str) -> bool:
    """Whether the grammar lets a model write `text` to the end, token by token (the mask checked each step)."""
    constraint = Constraint(grammar, tokenizer)
    for token in tokenizer.encode(text, allowed_special="all"):
        if not constraint.mask()[token]:
            return False
        constraint.consume(token)
    return constraint.finished


@pytest.mark.parametrize("calls", [False, True])
def test_completion_grammar_leaves_reasoning_free_and_constrains_the_answer(o200k_tokenizer, calls):
    tok = o200k_tokenizer
    grammar = completion_grammar(answer=json_schema_format(CITY), calls={
        "functions.get_weather": function_arguments_format(WEATHER)} if calls else None)
    assert accepts(grammar, tok, ANSWER)
    assert accepts(grammar, tok, ANALYSIS + ANALYSIS + ANSWER)
    assert not accepts(grammar, tok, FINAL + '{"town":"Paris"}<|return|>')  # not the schema
    assert not accepts(grammar, tok, FINAL + '{"city":"Paris"}<|end|>')  # a final answer ends in <|return|>
    assert not accepts(grammar, tok, FINAL + "Paris!<|return|>")
    assert accepts(grammar, tok, ANALYSIS + PREAMBLE + CALL_FORMS[0]) == calls  # preambles only before calls
    for form in CALL_FORMS:
        assert accepts(grammar, tok, ANALYSIS + form) == calls, form
    # Analysis text is free: every token with a string that can be part of UTF-8 text is allowed in it, and <|end|>.
    constraint = after(Constraint(grammar, tok), tok, "<|channel|>analysis<|message|>Hm")
    mask = constraint.mask()
    assert mask[tok.end] and not mask[RETURN] and not mask[CALL] and mask[:199998].sum() > 199600


def test_required_call_grammar_allows_only_declared_calls(o200k_tokenizer):
    tok = o200k_tokenizer
    grammar = completion_grammar(calls={"functions.get_weather": function_arguments_format(WEATHER),
                                        "tools_ns.ping": function_arguments_format({"name": "ping"})},
                                 call_required=True)
    for form in CALL_FORMS:
        assert accepts(grammar, tok, ANALYSIS + form), form
    assert accepts(grammar, tok, PREAMBLE + "<|channel|>commentary to=tools_ns.ping <|constrain|>json<|message|>{}"
                                            "<|call|>")
    assert not accepts(grammar, tok, ANALYSIS + ANSWER)  # no answer without the call
    assert not accepts(grammar, tok, CALL_FORMS[0].replace("get_weather", "get_time"))  # undeclared
    assert not accepts(grammar, tok, CALL_FORMS[0].replace('"unit":"c"', '"unit":"k"'))  # arguments off-schema
    assert not accepts(grammar, tok, "<|channel|>analysis to=functions.get_weather<|message|>{}<|call|>")


def test_completion_grammar_needs_something_to_constrain():
    with pytest.raises(ValueError, match="nothing to constrain"):
        completion_grammar()
    with pytest.raises(ValueError, match="needs functions"):
        completion_grammar(calls={}, call_required=True)


def test_consuming_a_forbidden_token_raises(o200k_tokenizer):
    tok = o200k_tokenizer
    constraint = answer_constraint(json_object_format(), tok)
    with pytest.raises(ValueError, match=f"token {RETURN} is not allowed"):
        constraint.consume(RETURN)  # the stop token before the object is complete
    with pytest.raises(ValueError, match="not allowed here by an answer in a JSON object"):
        answer_constraint(json_object_format(), tok).consume(tok.encode("[")[0])


def test_apply_sets_disallowed_logits_to_minus_infinity(o200k_tokenizer):
    constraint = answer_constraint(json_object_format(), o200k_tokenizer)
    logits = np.zeros(o200k_tokenizer.n_vocab, dtype=np.float32)
    mask = constraint.mask()
    constraint.apply(logits)
    assert np.array_equal(np.isfinite(logits), mask) and 0 < mask.sum() < 100
    with pytest.raises(ValueError, match="shape"):
        constraint.apply(np.zeros(10, dtype=np.float32))


def test_mask_kernel_matches_numpy():
    rng = np.random.default_rng(5)
    for n in (1, 31, 32, 33, 1000):
        bits = rng.integers(0, 2**32, (n + 31) // 32, dtype=np.uint64).astype(np.uint32)
        bits[::3] = 0xFFFFFFFF  # the whole-word shortcuts
        bits[1::3] = 0
        logits = rng.standard_normal(n).astype(np.float32)
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little", count=n).view(bool)
        expected = np.where(allowed, logits, np.float32(-np.inf))
        constrain._mask_logits(logits, bits)
        assert np.array_equal(logits, expected)


def test_engine_tokenizer_is_built_once(o200k_tokenizer):
    assert constrain.engine_tokenizer(o200k_tokenizer) is constrain.engine_tokenizer(o200k_tokenizer)


@pytest.mark.parametrize(("spec", "message"), [
    ("person", r"response_format.json_schema must be an object"),
    ({"schema": PERSON}, r"response_format.json_schema.name must be 1 to 64"),
    ({"name": "a b", "schema": PERSON}, r"\.name must be 1 to 64 .* got 'a b'"),
    ({"name": "p"}, r"response_format.json_schema.schema must be a JSON schema object, got null"),
    ({"name": "p", "schema": [1]}, r"\.schema must be a JSON schema object, got list"),
    ({"name": "p", "schema": PERSON, "strict": "yes"}, r"\.strict must be true or false, got 'yes'"),
    ({"name": "p", "schema": {"type": "objekt"}}, r"\.schema is not a usable JSON schema: .*objekt"),
    ({"name": "p", "schema": {"$ref": "#/$defs/missing"}}, r"\.schema is not a usable JSON schema: .*missing"),
    ({"name": "p", "schema": {"type": "string", "format": "no-such-format"}, "strict": True},
     r"\.schema is not a usable JSON schema: .*no-such-format"),
])
def test_bad_json_schema_is_a_parameter_error(spec, message):
    with pytest.raises(ParameterError, match=message):
        json_schema_format(spec)


def test_non_strict_schema_skips_what_cannot_be_enforced():
    json_schema_format({"name": "p", "schema": {"type": "string", "format": "no-such-format"}})


def test_bad_function_parameters_are_a_parameter_error():
    with pytest.raises(ParameterError, match=r"tools\[0\].function.parameters must be a JSON schema object"):
        function_arguments_format({"name": "f", "parameters": "x"}, field="tools[0].function")
    with pytest.raises(ParameterError, match=r"tools\[\].function.name"):
        function_arguments_format({"parameters": {"type": "object"}})
    with pytest.raises(ParameterError, match=r"parameters is not a usable JSON schema"):
        function_arguments_format({"name": "f", "parameters": {"type": "object", "properties": {"a": {
            "type": "nope"}}}})
