"""The Vercel AI SDK 6 (npm `ai` with @ai-sdk/openai's Responses and Chat Completions models and
@ai-sdk/openai-compatible, pinned in tests/js/package.json) against live `ossrt serve` apps on scripted tiny models:
each scenario is a small script in tests/js that prints what it found as JSON. Skipped when node or the installed
packages are missing (.ci/run installs them with `npm ci --prefix tests/js`)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

import ossrt  # noqa: E402
from server_support import servers_per_text  # noqa: E402

JS = Path(__file__).parent / "js"
NODE = shutil.which("node")
if NODE is None or not (JS / "node_modules" / "ai").is_dir():
    pytest.skip("the AI SDK is not installed: needs node and `npm ci --prefix tests/js`", allow_module_level=True)

ID = "gpt-oss-20b"
KINDS = ["responses", "chat", "compatible"]  # see tests/js/models.mjs
ANSWER = "<|channel|>final<|message|>Hello there, friend!<|return|>"
TOOL_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Berlin"}<|call|>'
# Reasoning alone: a scripted token has one successor, so `<|channel|>` cannot open an analysis and a final message
REASONING = "<|channel|>analysis<|message|>Thinking it over.<|return|>"
RUN_TIMEOUT = 120  # seconds: a bound for a failing script on a loaded machine, not a measurement


@pytest.fixture(scope="module")
def serving(scripted_gguf):
    """text -> the URL of a live server whose model writes `text` (one server per text, for the module)."""
    with servers_per_text(lambda text: ossrt.load(scripted_gguf(text), context_length=1024), model_id=ID) as url:
        yield url


def run_script(script: str, url: str, *args: str) -> dict:
    """tests/js/`script` with `args` against the server at `url`: the JSON object it prints."""
    env = {**os.environ, "OSSRT_URL": url, "OSSRT_MODEL": ID}
    done = subprocess.run([NODE, str(JS / script), *args], cwd=JS, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, f"{script} {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_text_answers(kind, serving):
    result = run_script("generate_text.mjs", serving(ANSWER), kind)
    assert result["text"] == "Hello there, friend!"
    assert result["finishReason"] == "stop"


@pytest.mark.parametrize("kind", KINDS)
def test_stream_text_streams_the_answer(kind, serving):
    result = run_script("stream_text.mjs", serving(ANSWER), kind)
    assert result["errors"] == []
    assert result["text"] == "Hello there, friend!" == "".join(result["deltas"])
    assert len(result["deltas"]) > 1  # token by token, not one piece at the end
    assert result["finishReason"] == "stop"


@pytest.mark.parametrize("kind", KINDS)
def test_a_declared_tool_is_called_and_its_result_sent_back(kind, serving):
    """The scripted model calls get_weather on every turn: the SDK runs the tool, sends its result back (a second
    request that must be accepted) and stops at its step limit of 2."""
    result = run_script("tool_call.mjs", serving(TOOL_CALL), kind)
    assert result["calls"] == ["Berlin", "Berlin"]
    for step in result["steps"]:
        assert step == {"finishReason": "tool-calls", "toolCalls": [{"toolName": "get_weather",
                                                                      "input": {"city": "Berlin"}}],
                        "toolResults": ["Sunny in Berlin"]}


@pytest.mark.parametrize("kind", ["responses", "compatible"])  # @ai-sdk/openai's chat model reads no reasoning
def test_reasoning_is_shown(kind, serving):
    """The Responses model shows reasoning from its summary (asked for with reasoningSummary "auto"), the
    compatible model from reasoning_content; both generated and streamed."""
    result = run_script("reasoning.mjs", serving(REASONING), kind)
    assert result["generate"] == {"reasoningText": "Thinking it over.", "text": "", "warnings": []}
    assert result["stream"]["reasoningText"] == "Thinking it over." == "".join(result["stream"]["deltas"])
    assert len(result["stream"]["deltas"]) > 1


# --- structured output, forced tool calls, undeclared calls ---------------------------------------------------------
PROSE = "<|channel|>final<|message|>It is Paris, of course.<|return|>"
TIME_CALL = '<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{"tz":"UTC"}<|call|>'
CITIES = ("Berlin", "Paris")  # the enum of tests/js/structured_output.mjs and forced_tool.mjs


@pytest.mark.parametrize("kind", KINDS)
def test_structured_output_turns_prose_into_the_schema(kind, serving):
    result = run_script("structured_output.mjs", serving(PROSE), kind)
    assert set(result["output"]) == {"city"} and result["output"]["city"] in CITIES
    assert result["finishReason"] == "stop" and result["warnings"] == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("choice", ["required", "get_weather"])
def test_tool_choice_steers_an_undeclared_call_to_a_declared_tool(kind, choice, serving):
    """The script calls get_time, which the request does not declare: "required" (get_weather, strict with an enum
    city, the only tool) or the name get_weather (get_date declared too) turns it into a valid get_weather call."""
    result = run_script("forced_tool.mjs", serving(TIME_CALL), kind, choice)
    (call,) = result["toolCalls"]
    assert call["toolName"] == "get_weather" and set(call["input"]) == {"city"} and call["input"]["city"] in CITIES
    assert not call["invalid"] and result["finishReason"] == "tool-calls" and result["warnings"] == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("declared", ["none", "other"])
def test_an_undeclared_call_ends_the_turn_as_text(kind, declared, serving):
    """Issue 14's failure: the model calls get_weather though the request declares no tools ("none") or only
    get_date ("other"). The server answers such calls with an error until the turn ends: generated and streamed,
    the SDK sees no tool call, an empty text and finishReason "stop" instead of "Model tried to call unavailable
    tool"."""
    result = run_script("undeclared_call.mjs", serving(TOOL_CALL), kind, declared)
    assert result["stream"].pop("errors") == []
    for run in ("generate", "stream"):
        assert result[run] == {"text": "", "finishReason": "stop", "toolCalls": []}, run
