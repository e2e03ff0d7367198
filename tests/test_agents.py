"""openai-agents (the OpenAI Agents SDK) against `ossrt serve`, with both of its model kinds: the Responses model
and the Chat Completions model, on scripted tiny models (real format, real forward pass)."""

import pytest

agents = pytest.importorskip("agents")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import ossrt  # noqa: E402
from server_support import servers_per_text  # noqa: E402

ID = "gpt-oss-20b"
ANSWER = "<|channel|>final<|message|>Hello there, friend!<|return|>"
TOOL_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Berlin"}<|call|>'
MODEL_KINDS = {"responses": agents.OpenAIResponsesModel, "chat_completions": agents.OpenAIChatCompletionsModel}


@pytest.fixture(scope="module")
def serving(scripted_gguf):
    """text -> the base URL of a live server whose model writes `text` (one server per text, for the module)."""
    with servers_per_text(lambda text: ossrt.load(scripted_gguf(text), context_length=1024), model_id=ID) as url:
        yield lambda text: url(text) + "/v1"


def agent_model(kind: str, url: str):
    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
    return MODEL_KINDS[kind](model=ID, openai_client=client)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_an_agent_answers(kind, serving):
    agent = agents.Agent(name="Greeter", instructions="Answer briefly.", model=agent_model(kind, serving(ANSWER)))
    result = agents.Runner.run_sync(agent, "Hi!", run_config=agents.RunConfig(tracing_disabled=True))
    assert result.final_output == "Hello there, friend!"


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_an_agent_calls_its_tool_and_sends_the_result_back(kind, serving):
    """The scripted model calls get_weather on every turn: the agent runs the tool, sends its result back (a second
    request that must be accepted), and stops at max_turns."""
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        calls.append(city)
        return f"Sunny in {city}"

    agent = agents.Agent(name="Weather", instructions="Use your tools.", tools=[get_weather],
                         model=agent_model(kind, serving(TOOL_CALL)))
    with pytest.raises(agents.MaxTurnsExceeded):
        agents.Runner.run_sync(agent, "Weather in Berlin?", max_turns=2,
                               run_config=agents.RunConfig(tracing_disabled=True))
    assert calls == ["Berlin", "Berlin"]
