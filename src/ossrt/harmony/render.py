"""The Harmony renderer (spec §7): OpenAI-style chat messages and function tools → the prompt ids, ending in
`<|start|>assistant`.

It reproduces OpenAI's `openai-harmony` token for token (`render_conversation_for_completion` with its default
config); tests check that differentially. Mapping of OpenAI messages to Harmony messages:

- leading `system` / `developer` messages → the developer message's `# Instructions` (joined by a blank line);
  `tools` → its `functions` namespace; a `{"type": "namespace", "name", "description", "tools": [functions]}`
  tool → a namespace of its own after it. Later `system` / `developer` messages → developer messages with plain
  text.
- `user` → user message.
- `assistant` → `reasoning` (or `reasoning_content`) on `analysis`; `content` on `final`, or on `commentary` (a
  preamble) when the message also has `tool_calls`; each tool call →
  `assistant to=functions.NAME<|channel|>commentary <|constrain|>json<|message|>ARGS<|call|>` (a dotted name,
  NAMESPACE.NAME, calls into that namespace: `to=NAMESPACE.NAME`; function names have no dots).
- `tool` → `functions.NAME to=assistant<|channel|>commentary<|message|>CONTENT`, NAME found from `tool_call_id`.
- Chain of thought (§7.7): `reasoning` of a turn that ended with a final answer and was followed by a user message
  is dropped (OpenAI's docs rule); then openai-harmony's own rule runs on the result (if the last assistant message
  is `final`, drop `analysis` messages before the first `final` one).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..errors import ChatFormatError
from ..tokenizer import Tokenizer
from .constants import CHANNELS, CONSTRAIN, DEFAULT_REASONING_EFFORT, REASONING_EFFORTS, ROLES
from .schema import schema_to_typescript

MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"


@dataclass
class HarmonyMessage:
    """One Harmony message. `name` is the author name: the tool name for role `tool`."""

    role: str
    content: str
    name: str | None = None
    recipient: str | None = None
    channel: str | None = None
    content_type: str | None = None


def render_conversation(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *,
                        tools: Sequence[Mapping[str, Any]] | None = None,
                        reasoning_effort: str = DEFAULT_REASONING_EFFORT, current_date: str | _dt.date | None = None,
                        response_format: ResponseFormat | None = None,
                        model_identity: str = MODEL_IDENTITY) -> list[int]:
    """Render OpenAI-style chat `messages` (and function `tools`) as a Harmony prompt ending in `<|start|>assistant`.

    `reasoning_effort` is low / medium / high; `current_date` (a `date` or "YYYY-MM-DD") adds a "Current date"
    line to the system message; `response_format` a "# Response Formats" section to the developer message. Bad
    input raises `ChatFormatError` naming the message and field."""
    msgs = to_harmony_messages(messages, tools=tools, reasoning_effort=reasoning_effort, current_date=current_date,
                               response_format=response_format, model_identity=model_identity)
    out: list[int] = []
    for m in msgs:
        _render_message(tokenizer, m, out)
    out.append(tokenizer.start)
    out += tokenizer.encode("assistant")
    return out


def render_tool_result(tokenizer: Tokenizer, recipient: str, content: str) -> list[int]:
    """What follows a call the model made to `recipient` (its `<|call|>` not included): the tool's message with
    `content`, then `<|start|>assistant` for the model to go on."""
    out: list[int] = []
    _render_message(tokenizer, HarmonyMessage("tool", content, name=recipient, recipient="assistant",
                                              channel="commentary"), out)
    out.append(tokenizer.start)
    out += tokenizer.encode("assistant")
    return out


def to_harmony_messages(messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
                        reasoning_effort: str = DEFAULT_REASONING_EFFORT, current_date: str | _dt.date | None = None,
                        response_format: ResponseFormat | None = None,
                        model_identity: str = MODEL_IDENTITY) -> list[HarmonyMessage]:
    """The Harmony messages `render_conversation` renders, system message first, chain of thought dropped."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatFormatError(f"messages must be a list of message objects, got {type(messages).__name__}")
    namespaces = _tool_namespaces(tools)
    effort = _reasoning_effort(reasoning_effort)
    date = _date_text(current_date)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"messages[{i}] must be an object with 'role' and 'content', got {m!r:.80}")
        if m.get("role") not in ROLES:
            raise ChatFormatError(f"messages[{i}]: unknown role {m.get('role')!r}; expected one of "
                                  f"{', '.join(ROLES)}")
    n_lead = 0
    while n_lead < len(messages) and messages[n_lead]["role"] in ("system", "developer"):
        n_lead += 1
    instructions = "\n\n".join(_text(messages[i], i) for i in range(n_lead)) if n_lead else None

    calls_functions = any(ns.name == FUNCTIONS for ns in namespaces)
    out = [_system_message(model_identity, date, effort, calls_functions=calls_functions)]
    if instructions is not None or namespaces or response_format is not None:
        out.append(_developer_message(instructions, namespaces, response_format))
    out += _turns(messages, n_lead)
    return _drop_analysis(out)


def _reasoning_effort(value: Any) -> str:
    effort = value.lower() if isinstance(value, str) else value
    if effort not in REASONING_EFFORTS:
        raise ChatFormatError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}; got {value!r}")
    return effort


def _date_text(value: Any) -> str | None:
    if isinstance(value, _dt.date):
        return value.strftime("%Y-%m-%d")
    if value is not None and not isinstance(value, str):
        raise ChatFormatError(f"current_date must be a date or a 'YYYY-MM-DD' string, got {value!r}")
    return value


def _system_message(model_identity: str, date: str | None, effort: str, *, calls_functions: bool) -> HarmonyMessage:
    identity = [model_identity, f"Knowledge cutoff: {KNOWLEDGE_CUTOFF}"]
    if date is not None:
        identity.append(f"Current date: {date}")
    channels = f"# Valid channels: {', '.join(CHANNELS)}. Channel must be included for every message."
    if calls_functions:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    return HarmonyMessage("system", "\n\n".join(["\n".join(identity), f"Reasoning: {effort}", channels]))


def _developer_message(instructions: str | None, namespaces: list[ToolNamespace],
                       response_format: ResponseFormat | None) -> HarmonyMessage:
    sections = ["# Instructions", instructions] if instructions is not None else []
    if namespaces:
        sections.append("# Tools\n\n" + "\n\n".join(_namespace_section(ns) for ns in namespaces))
    if response_format is not None:
        sections.append(_response_format_section(response_format))
    return HarmonyMessage("developer", "\n\n".join(sections))


class ResponseFormat(NamedTuple):
    """A structured-output format the developer message describes (OpenAI's `json_schema` format)."""

    name: str
    description: str | None
    schema: Mapping[str, Any]


def _response_format_section(fmt: ResponseFormat) -> str:
    """OpenAI's harmony guide: "# Response Formats", "## {name}", "// {description}" lines, the schema as compact JSON
    (openai-harmony's renderer has no such section, so there is nothing to compare it with token for token)."""
    lines = [f"// {line}" for line in _lines(fmt.description or "")]
    schema = json.dumps(fmt.schema, ensure_ascii=False, separators=(",", ":"))
    return f"# Response Formats\n\n## {fmt.name}\n\n" + "\n".join(lines + [schema])


def _turns(messages: Sequence[Mapping[str, Any]], start: int) -> list[HarmonyMessage]:
    """The messages from `start` on (after the leading instructions), in order."""
    keep_reasoning = _reasoning_to_keep(messages)
    calls: dict[str, str] = {}  # tool_call_id -> function name, of the assistant calls seen so far
    called: set[str] = set()
    out = []
    for i in range(start, len(messages)):
        m = messages[i]
        role = m["role"]
        if role in ("system", "developer", "user"):
            out.append(HarmonyMessage("user" if role == "user" else "developer", _text(m, i)))
        elif role == "assistant":
            out += _assistant(m, i, i in keep_reasoning, calls, called)
        else:
            out.append(_tool_result(m, i, calls, called))
    return out


def _text(m: Mapping[str, Any], i: int, *, required: bool = True) -> str | None:
    """A message's text content: a string, or a list of `{"type": "text", "text": ...}` parts (concatenated)."""
    c = m.get("content")
    if c is None:
        if required:
            raise ChatFormatError(f"messages[{i}] ({m['role']}): missing 'content'")
        return None
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, p in enumerate(c):
            if not (isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise ChatFormatError(f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) "
                                      f"are supported, got {p!r:.80}")
            parts.append(p["text"])
        return "".join(parts)
    raise ChatFormatError(f"messages[{i}] ({m['role']}): 'content' must be a string or a list of text parts, "
                          f"got {type(c).__name__}")


def _reasoning_to_keep(messages: Sequence[Mapping[str, Any]]) -> set[int]:
    """Indices of assistant messages whose reasoning is rendered: all except those of a turn that ended with a
    final answer (the turn's last assistant message has content and no tool calls) and was followed by a user
    message."""
    drop: set[int] = set()
    turn: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] == "user":
            if turn and messages[turn[-1]].get("content") and not messages[turn[-1]].get("tool_calls"):
                drop.update(turn)
            turn = []
        elif m["role"] == "assistant":
            turn.append(i)
    return {i for i, m in enumerate(messages) if m["role"] == "assistant" and i not in drop}


def _assistant(m: Mapping[str, Any], i: int, keep_reasoning: bool, calls: dict[str, str],
               called: set[str]) -> list[HarmonyMessage]:
    out = []
    reasoning = m.get("reasoning")
    if reasoning is None:
        reasoning = m.get("reasoning_content")
    elif m.get("reasoning_content") not in (None, reasoning):
        raise ChatFormatError(f"messages[{i}] (assistant): 'reasoning' and 'reasoning_content' differ")
    if reasoning is not None and not isinstance(reasoning, str):
        raise ChatFormatError(f"messages[{i}] (assistant): 'reasoning' must be a string, got "
                              f"{type(reasoning).__name__}")
    content = _text(m, i, required=False)
    tool_calls = m.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise ChatFormatError(f"messages[{i}] (assistant): 'tool_calls' must be a list")
    if not content and not tool_calls and not reasoning:
        raise ChatFormatError(f"messages[{i}] (assistant): needs 'content', 'tool_calls' or 'reasoning'")
    if reasoning and keep_reasoning:
        out.append(HarmonyMessage("assistant", reasoning, channel="analysis"))
    if content:
        out.append(HarmonyMessage("assistant", content, channel="commentary" if tool_calls else "final"))
    for j, call in enumerate(tool_calls):
        where = f"messages[{i}].tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping):
            raise ChatFormatError(f"{where}: missing 'function' ({{'name': ..., 'arguments': ...}})")
        name = _tool_name(fn.get("name"), where)
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            try:
                args = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
            except (TypeError, ValueError):
                raise ChatFormatError(f"{where}.function.arguments must be a JSON string, got {args!r:.80}") from None
        if call.get("id") is not None:
            calls[str(call["id"])] = name
        called.add(name)
        out.append(HarmonyMessage("assistant", args, recipient=tool_recipient(name), channel="commentary",
                                  content_type=f"{CONSTRAIN}json"))
    return out


def _tool_result(m: Mapping[str, Any], i: int, calls: dict[str, str], called: set[str]) -> HarmonyMessage:
    call_id, name = m.get("tool_call_id"), m.get("name")
    if name is not None and not isinstance(name, str):
        raise ChatFormatError(f"messages[{i}] (tool): 'name' must be a string, got {type(name).__name__}")
    if call_id is not None:
        if str(call_id) not in calls:
            raise ChatFormatError(f"messages[{i}] (tool): no earlier assistant tool call has id {call_id!r}")
        found = calls[str(call_id)]
        if name is not None and name != found:
            raise ChatFormatError(f"messages[{i}] (tool): name {name!r} does not match call {call_id!r} "
                                  f"to {found!r}")
        name = found
    elif name is None:
        raise ChatFormatError(f"messages[{i}] (tool): needs 'tool_call_id' (or 'name')")
    elif name not in called:
        raise ChatFormatError(f"messages[{i}] (tool): no earlier assistant tool call to {name!r}")
    return HarmonyMessage("tool", _text(m, i), name=tool_recipient(name), recipient="assistant", channel="commentary")


def _drop_analysis(msgs: list[HarmonyMessage]) -> list[HarmonyMessage]:
    """openai-harmony's `auto_drop_analysis`: if the last assistant message is on `final`, drop every `analysis`
    message before the first `final` message."""
    last = next((m for m in reversed(msgs) if m.role == "assistant"), None)
    first_final = next((k for k, m in enumerate(msgs) if m.channel == "final"), None)
    if last is None or last.channel != "final" or first_final is None:
        return msgs
    return [m for k, m in enumerate(msgs) if not (k < first_final and m.channel == "analysis")]


def _render_message(tok: Tokenizer, m: HarmonyMessage, out: list[int]) -> None:
    """One message, piece by piece as openai-harmony encodes it (each text piece encoded on its own)."""
    out.append(tok.start)
    if m.role == "tool":
        out += tok.encode(m.name)
    else:
        out += tok.encode(m.role)
        if m.name is not None:
            out += tok.encode(f":{m.name}")
    if m.recipient is not None and m.recipient != "all":
        out += tok.encode(f" to={m.recipient}")
    if m.channel is not None:
        out.append(tok.channel)
        out += tok.encode(m.channel)
    if m.content_type is not None:
        if m.content_type.startswith(CONSTRAIN):
            out += tok.encode(" ")
            out.append(tok.constrain)
            out += tok.encode(m.content_type[len(CONSTRAIN):])
        else:
            out += tok.encode(f" {m.content_type}")
    out.append(tok.message)
    out += tok.encode(m.content)
    out.append(tok.call if m.role == "assistant" and m.recipient is not None else tok.end)


# --- tools -------------------------------------------------------------------------------------------------------
class FunctionTool(NamedTuple):
    """A function tool as the tools section shows it, and where the request declared it (`function`, at `where`)."""

    name: str
    description: str
    parameters: Mapping[str, Any] | None  # a JSON schema
    where: str
    function: Mapping[str, Any]


_BAD_NAME = re.compile(r"[\s<]")


def _tool_name(name: Any, where: str) -> str:
    # Whitespace or "<" in a name would make the rendered header unparseable (spec §7.9).
    if not isinstance(name, str) or not name or _BAD_NAME.search(name):
        raise ChatFormatError(f"{where}: tool name must be a non-empty string without spaces or '<', got {name!r}")
    return name


FUNCTIONS = "functions"  # the namespace of the request's function tools


class ToolNamespace(NamedTuple):
    """A namespace of the tools section: `functions`, or one a namespace tool declares."""

    name: str
    description: str | None
    functions: list[FunctionTool]


def tool_recipient(name: str) -> str:
    """Where a call to tool `name` goes: NAMESPACE.NAME as it is, a plain name into `functions`."""
    return name if "." in name else f"{FUNCTIONS}.{name}"


def _tool_namespaces(tools: Sequence[Mapping[str, Any]] | None) -> list[ToolNamespace]:
    """The request's function tools (`{"type": "function", "function": {...}}`, or the flat Responses form) as the
    `functions` namespace, then each namespace tool's own, checked."""
    if tools is None:
        return []
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ChatFormatError(f"tools must be a list of tool objects, got {type(tools).__name__}")
    functions, namespaces, seen = [], [], {FUNCTIONS}
    for j, t in enumerate(tools):
        where = f"tools[{j}]"
        if not isinstance(t, Mapping):
            raise ChatFormatError(f"{where} must be an object, got {t!r:.80}")
        kind = t.get("type", "function")
        if kind == "function":
            functions.append(_function_tool(t, where, {f.name for f in functions}))
        elif kind == "namespace":
            name = _tool_name(t.get("name"), f"{where}.name")
            if "." in name or name in seen:
                raise ChatFormatError(f"{where}.name: {name!r} is taken or has a dot")
            seen.add(name)
            description = t.get("description")
            if description is not None and not isinstance(description, str):
                raise ChatFormatError(f"{where}.description must be a string")
            members = t.get("tools")
            if not isinstance(members, Sequence) or isinstance(members, (str, bytes)) or not members:
                raise ChatFormatError(f"{where}.tools must be a non-empty list of function tools")
            inner: list[FunctionTool] = []
            for k, f in enumerate(members):
                if not isinstance(f, Mapping) or f.get("type", "function") != "function":
                    raise ChatFormatError(f"{where}.tools[{k}] must be a function tool")
                inner.append(_function_tool(f, f"{where}.tools[{k}]", {g.name for g in inner}))
            namespaces.append(ToolNamespace(name, description, inner))
        else:
            raise ChatFormatError(f"{where}: type {kind!r} is not supported; only 'function' and 'namespace' tools")
    return ([ToolNamespace(FUNCTIONS, None, functions)] if functions else []) + namespaces


def _function_tool(t: Mapping[str, Any], where: str, taken: set[str]) -> FunctionTool:
    fn = t.get("function", t)
    if not isinstance(fn, Mapping):
        raise ChatFormatError(f"{where}.function must be an object")
    fn_where = f"{where}.function" if "function" in t else where
    name = _tool_name(fn.get("name"), f"{where}.function.name")
    if name in taken:
        raise ChatFormatError(f"{where}: a second tool named {name!r}")
    desc = fn.get("description") or ""
    if not isinstance(desc, str):
        raise ChatFormatError(f"{where}.function.description must be a string")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, Mapping):
        raise ChatFormatError(f"{where}.function.parameters must be a JSON-schema object")
    return FunctionTool(name, desc, params, fn_where, fn)


def tool_functions(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, FunctionTool]:
    """The functions `tools` declare, by the recipient a call to each names ("functions.NAME", "NAMESPACE.NAME");
    checked as for rendering (ChatFormatError)."""
    return {f"{ns.name}.{f.name}": f for ns in _tool_namespaces(tools) for f in ns.functions}


def _lines(s: str) -> list[str]:
    """Rust's `str::lines`: split at "\\n" (a preceding "\\r" goes too); no empty line after a final newline."""
    pieces = s.split("\n")
    last = pieces.pop()
    out = [p[:-1] if p.endswith("\r") else p for p in pieces]
    if last:
        out.append(last)
    return out


def _namespace_section(ns: ToolNamespace) -> str:
    block = [f"## {ns.name}\n"]
    if ns.description:
        block += [f"// {line}" for line in _lines(ns.description)]
    block.append(f"namespace {ns.name} {{\n")
    for f in ns.functions:
        block += [f"// {line}" for line in _lines(f.description)]
        if f.parameters is None:
            block.append(f"type {f.name} = () => any;\n")
        else:
            block.append(f"type {f.name} = (_: {schema_to_typescript(f.parameters)}) => any;\n")
    block.append(f"}} // namespace {ns.name}")
    return "\n".join(block)

