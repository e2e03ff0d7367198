"""`ossrt generate`: one answer on stdout, --json, --raw, and errors as one line with exit code 2."""

import json

import pytest
from click.testing import CliRunner

from ossrt.cli import main

ANSWER = "<|channel|>final<|message|>Hello from the scripted model!<|return|>"
TOOL_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Berlin"}<|call|>'


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def test_prints_the_answer(scripted_gguf):
    r = run("generate", str(scripted_gguf(ANSWER)), "-p", "Hi there", "-c", "512")
    assert r.exit_code == 0, r.output
    assert r.output == "Hello from the scripted model!\n"


def test_prompt_from_stdin_and_json(scripted_gguf):
    r = run("generate", str(scripted_gguf(ANSWER)), "-p", "-", "--json", "-c", "512",
            input="What's the weather in Berlin right now?")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert (out["finish_reason"], out["content"], out["tool_calls"]) == ("stop", "Hello from the scripted model!", [])
    assert out["usage"]["completion_tokens"] > 5 and out["timing"]["total_seconds"] > 0


def test_no_tools_are_declared_so_calls_are_not_reported(scripted_gguf):
    r = run("generate", str(scripted_gguf(TOOL_CALL)), "-p", "Weather?", "--json", "-c", "512")
    out = json.loads(r.output)
    assert out["finish_reason"] == "stop" and out["tool_calls"] == [] and out["content"] is None


def test_raw_continues_plain_text(scripted_gguf):
    # The scripted model continues "assistant" with the script's tokens, chat format or not.
    r = run("generate", str(scripted_gguf(ANSWER)), "-p", "assistant", "--raw", "-n", "4", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["content"] == "<|channel|>final<|message|>Hello"  # four tokens, special ones as their text
    assert out["usage"] == {"prompt_tokens": 1, "completion_tokens": 4} and out["finish_reason"] == "length"
    plain = run("generate", str(scripted_gguf(ANSWER)), "-p", "assistant", "--raw", "-n", "4")
    assert plain.output == out["content"] + "\n"


BAD_VALUES = [  # (command line after the model file, standard input, what the error line holds)
    (["generate", "-p", "hi", "--kv-type", "q8_0"], None, "multiple of 32"),  # the tiny model's head dim is 16
    (["generate", "-p", "hi", "--temp", "nan"], None, "temperature must be a finite number"),
    (["generate", "-p", "hi", "--temp", "1e400"], None, "temperature must be a finite number"),
    (["generate", "-p", "hi", "--top-p", "nan"], None, "top_p must be a number in (0, 1]"),
    (["generate", "-p", "hi", "--seed", "-1"], None, "seed must be an integer >= 0"),
    (["generate", "-p", "hi", "-c", str(10**30)], None, "context_length must be between 1 and 4096"),
    (["generate", "-p", "hi", "-t", "1000"], None, "threads must be an integer between 1 and"),
    (["generate", "-p", "hi", "-c", "8"], None, "prompt tokens do not fit the context length 8"),
    (["generate", "-p", "", "--raw"], None, "--raw needs a non-empty prompt"),
    (["generate", "-p", "-"], b"\xff\xfe", "standard input is not utf-8 text"),
    (["run", "-c", "8"], "Hi", "prompt tokens do not fit the context length 8"),
    (["run", "--temp", "nan"], "Hi", "temperature must be a finite number"),
    (["info", "--context", str(10**30)], None, "context must be between 1 and 4096"),
]


@pytest.mark.parametrize("args, stdin, message", BAD_VALUES)
def test_bad_values_are_one_error_line_with_exit_code_2(scripted_gguf, args, stdin, message):
    r = CliRunner().invoke(main, [args[0], str(scripted_gguf(ANSWER)), *args[1:]], input=stdin)
    assert r.exit_code == 2 and r.stdout == "", r.output
    assert r.stderr.startswith("error: ") and message in r.stderr and len(r.stderr.splitlines()) == 1


def test_missing_file_and_click_usage_errors_exit_2(tmp_path, scripted_gguf):
    r = run("generate", str(tmp_path / "missing.gguf"), "-p", "hi")
    assert r.exit_code == 2 and r.output.startswith("error: ") and "missing.gguf" in r.output
    assert len(r.output.strip().splitlines()) == 1
    for args in (["generate", str(scripted_gguf(ANSWER)), "-p", "hi", "--temp", "-1"],
                 ["run", str(scripted_gguf(ANSWER)), "-t", "0"], ["info", str(scripted_gguf(ANSWER)), "--context", "x"],
                 ["generate", str(scripted_gguf(ANSWER))]):
        r = run(*args)
        assert r.exit_code == 2 and "Error: " in r.stderr and r.stdout == "", args  # click's own usage message


def test_reasoning_only_with_show_reasoning(scripted_gguf, o200k_tokenizer):
    script = "<|channel|>analysis<|message|>Thinking hard.<|end|>"
    n = str(len(o200k_tokenizer.encode(script, allowed_special="all")))
    shown = run("generate", str(scripted_gguf(script)), "-p", "hi", "-n", n, "--show-reasoning")
    hidden = run("generate", str(scripted_gguf(script)), "-p", "hi", "-n", n)
    assert shown.exit_code == hidden.exit_code == 0
    assert "Thinking hard." in shown.output and "Thinking hard." not in hidden.output


def test_json_schema_file_constrains_the_answer(scripted_gguf, tmp_path):
    schema = {"type": "object", "properties": {"greeting": {"type": "string", "enum": ["hi", "hello"]}},
              "required": ["greeting"], "additionalProperties": False}
    path = tmp_path / "greeting.json"
    path.write_text(json.dumps(schema))
    r = run("generate", str(scripted_gguf(ANSWER)), "-p", "Hi", "-c", "512", "--temp", "0", "--json-schema",
            str(path))
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["greeting"] in ("hi", "hello")


@pytest.mark.parametrize(("content", "message"), [
    (None, "--json-schema: cannot read"),
    ("{nope", "is not JSON"),
    ('{"type": "objekt"}', "is not a usable JSON schema"),
    ('{"type": "object", "properties": {"a": {"type": "string", "format": "no-such"}}}', "no-such"),  # strict
])
def test_bad_json_schema_file_is_one_error_line(scripted_gguf, tmp_path, content, message):
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    r = CliRunner().invoke(main, ["generate", str(scripted_gguf(ANSWER)), "-p", "hi", "--json-schema", str(path)])
    assert r.exit_code == 2 and r.stdout == "", r.output
    assert r.stderr.startswith("error: ") and message in r.stderr and str(path) in r.stderr
    r = CliRunner().invoke(main, ["generate", str(scripted_gguf(ANSWER)), "-p", "hi", "--raw", "--json-schema",
                                  str(path)])
    assert r.exit_code == 2 and "cannot be used with --raw" in r.stderr
