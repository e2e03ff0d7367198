"""The Codex CLI's requests (captured from @openai/codex 0.171 with tools/capture_http.py: tests/data/codex/) against
ossrt's Responses API: namespace tools, hosted tools, stateless reasoning, and calls into a namespace coming back
the way Codex routes them (`name` and `namespace` apart)."""

import json
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import ossrt  # noqa: E402
from ossrt.harmony import render_conversation  # noqa: E402
from ossrt.server.responses import parse_responses_request  # noqa: E402
from ossrt.server.sealing import Sealer  # noqa: E402
from server_support import live_server  # noqa: E402

CAPTURED = Path(__file__).parent / "data" / "codex"
ID = "gpt-oss-20b"
SEND_INPUT = ('<|channel|>commentary to=multi_agent_v1.send_input <|constrain|>json<|message|>{"target":"worker"}'
               '<|call|>')


def captured(name: str) -> dict:
    return json.loads((CAPTURED / f"{name}.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["responses_request", "second_request"])
def test_codex_requests_are_accepted_and_render_its_tools(name, o200k_tokenizer):
    body = captured(name)
    assert {"namespace", "web_search"} <= {t["type"] for t in body["tools"]}
    req = parse_responses_request(body, 131072, Sealer(), None)
    assert req.stream and req.sealed and not req.store and req.echo["reasoning"]["summary"] == "auto"
    text = o200k_tokenizer.decode(render_conversation(o200k_tokenizer, req.turn.messages, tools=req.turn.tools,
                                                      reasoning_effort=req.turn.reasoning_effort))
    assert "namespace functions {" in text and "type exec_command = " in text
    assert "// Tools for spawning and managing sub-agents.\nnamespace multi_agent_v1 {" in text
    assert "type close_agent = " in text and "web_search" not in text
    if name == "second_request":
        # the stub's reasoning came back with a summary and someone else's encrypted_content: the summary stands in
        assert "<|channel|>analysis<|message|>Calling the tool.<|end|>" in text
        assert '<|start|>assistant to=functions.exec_command<|channel|>commentary <|constrain|>json<|message|>' \
               '{"cmd":"echo hi"}<|call|>' in text
        assert "<|start|>functions.exec_command to=assistant<|channel|>commentary<|message|>Chunk ID:" in text


def test_a_call_into_a_namespace_comes_back_as_codex_routes_it(scripted_gguf):
    """Codex's first request (its long developer prompt left out: the tiny model's context is 4096) streamed
    against a model that calls multi_agent_v1.send_input: the function_call item has `name` and `namespace`
    apart, and the call goes back in as Codex sends it."""
    body = captured("responses_request")
    body["input"] = [item for item in body["input"] if item.get("role") != "developer"]
    extra = {"extra_body": {"client_metadata": body.pop("client_metadata")}}  # not in the openai client's signature
    with live_server(ossrt.load(scripted_gguf(SEND_INPUT), context_length=4096), model_id=ID) as live:
        c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)
        events = list(c.responses.create(**body, **extra))
        done = events[-1]
        assert done.type == "response.completed"
        call = done.response.output[-1]
        assert (call.type, call.name, call.namespace, call.arguments) == (
            "function_call", "send_input", "multi_agent_v1", '{"target":"worker"}')
        added = next(e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call")
        assert (added.item.name, added.item.namespace) == ("send_input", "multi_agent_v1")

        follow = dict(body, stream=False, input=body["input"] + [
            {"type": "function_call", "id": call.id, "status": "completed", "name": "send_input",
             "namespace": "multi_agent_v1", "arguments": call.arguments, "call_id": call.call_id},
            {"type": "function_call_output", "id": "fco_1", "call_id": call.call_id, "output": "closed"}])
        again = c.responses.create(**follow, **extra)
        assert again.status == "completed" and again.output[-1].namespace == "multi_agent_v1"
