"""The Harmony chat format of gpt-oss (spec §7): a renderer from OpenAI-style chat messages to prompt ids, and a
streaming parser from generated ids back to reasoning, preambles, the final answer and tool calls.

The renderer reproduces OpenAI's `openai-harmony` token for token (`render_conversation_for_completion` with its
default config); tests check that differentially. Mapping of OpenAI messages to Harmony messages:

- leading `system` / `developer` messages → the developer message's `# Instructions` (joined by a blank line);
  `tools` → its `functions` namespace. Later `system` / `developer` messages → developer messages with plain text.
- `user` → user message.
- `assistant` → `reasoning` (or `reasoning_content`) on `analysis`; `content` on `final`, or on `commentary` (a
  preamble) when the message also has `tool_calls`; each tool call →
  `assistant to=functions.NAME<|channel|>commentary <|constrain|>json<|message|>ARGS<|call|>`.
- `tool` → `functions.NAME to=assistant<|channel|>commentary<|message|>CONTENT`, NAME found from `tool_call_id`.
- Chain of thought (§7.7): `reasoning` of a turn that ended with a final answer and was followed by a user message
  is dropped (OpenAI's docs rule); then openai-harmony's own rule runs on the result (if the last assistant message
  is `final`, drop `analysis` messages before the first `final` one).
"""

from __future__ import annotations

import codecs
import datetime as _dt
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Union

from ..errors import ChatFormatError
from ..tokenizer import Tokenizer

MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
CHANNELS = ("analysis", "commentary", "final")
REASONING_EFFORTS = ("low", "medium", "high")
ROLES = ("system", "developer", "user", "assistant", "tool")
CONSTRAIN = "<|constrain|>"


# === renderer =====================================================================================================
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
                        tools: Sequence[Mapping[str, Any]] | None = None, reasoning_effort: str = "medium",
                        current_date: str | _dt.date | None = None,
                        model_identity: str = MODEL_IDENTITY) -> list[int]:
    """Render OpenAI-style chat `messages` (and function `tools`) as a Harmony prompt ending in `<|start|>assistant`.

    `reasoning_effort` is low / medium / high; `current_date` (a `date` or "YYYY-MM-DD") adds a "Current date"
    line to the system message. Bad input raises `ChatFormatError` naming the message and field."""
    msgs = to_harmony_messages(messages, tools=tools, reasoning_effort=reasoning_effort, current_date=current_date,
                               model_identity=model_identity)
    out: list[int] = []
    for m in msgs:
        _render_message(tokenizer, m, out)
    out.append(tokenizer.start)
    out += tokenizer.encode("assistant")
    return out


def to_harmony_messages(messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
                        reasoning_effort: str = "medium", current_date: str | _dt.date | None = None,
                        model_identity: str = MODEL_IDENTITY) -> list[HarmonyMessage]:
    """The Harmony messages `render_conversation` renders, system message first, chain of thought dropped."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatFormatError(f"messages must be a list of message objects, got {type(messages).__name__}")
    functions = _function_tools(tools)
    effort = reasoning_effort.lower() if isinstance(reasoning_effort, str) else reasoning_effort
    if effort not in REASONING_EFFORTS:
        raise ChatFormatError(f"reasoning_effort must be one of low, medium, high; got {reasoning_effort!r}")
    if isinstance(current_date, _dt.date):
        current_date = current_date.strftime("%Y-%m-%d")
    elif current_date is not None and not isinstance(current_date, str):
        raise ChatFormatError(f"current_date must be a date or a 'YYYY-MM-DD' string, got {current_date!r}")

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
    keep_reasoning = _reasoning_to_keep(messages)

    system = [model_identity, f"Knowledge cutoff: {KNOWLEDGE_CUTOFF}"]
    if current_date is not None:
        system.append(f"Current date: {current_date}")
    channels = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    if functions:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    out = [HarmonyMessage("system", "\n\n".join(["\n".join(system), f"Reasoning: {effort}", channels]))]
    if instructions is not None or functions:
        sections = ["# Instructions", instructions] if instructions is not None else []
        if functions:
            sections.append(_tools_section("functions", functions))
        out.append(HarmonyMessage("developer", "\n\n".join(sections)))

    calls: dict[str, str] = {}  # tool_call_id -> function name, of the assistant calls seen so far
    called: set[str] = set()
    for i in range(n_lead, len(messages)):
        m = messages[i]
        role = m["role"]
        if role in ("system", "developer", "user"):
            out.append(HarmonyMessage("user" if role == "user" else "developer", _text(m, i)))
        elif role == "assistant":
            out += _assistant(m, i, i in keep_reasoning, calls, called)
        else:
            out.append(_tool_result(m, i, calls, called))
    return _drop_analysis(out)


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
        out.append(HarmonyMessage("assistant", args, recipient=f"functions.{name}", channel="commentary",
                        content_type=f"{CONSTRAIN}json"))
    return out


def _tool_result(m: Mapping[str, Any], i: int, calls: dict[str, str], called: set[str]) -> HarmonyMessage:
    call_id, name = m.get("tool_call_id"), m.get("name")
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
    return HarmonyMessage("tool", _text(m, i), name=f"functions.{name}", recipient="assistant", channel="commentary")


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
_BAD_NAME = re.compile(r"[\s<]")


def _tool_name(name: Any, where: str) -> str:
    # Whitespace or "<" in a name would make the rendered header unparseable (spec §7.9).
    if not isinstance(name, str) or not name or _BAD_NAME.search(name):
        raise ChatFormatError(f"{where}: tool name must be a non-empty string without spaces or '<', got {name!r}")
    return name


def _function_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[tuple[str, str, Any]]:
    """OpenAI function tools (`{"type": "function", "function": {...}}`, or the flat Responses form) ->
    (name, description, parameters-or-None)."""
    if tools is None:
        return []
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ChatFormatError(f"tools must be a list of tool objects, got {type(tools).__name__}")
    out, seen = [], set()
    for j, t in enumerate(tools):
        where = f"tools[{j}]"
        if not isinstance(t, Mapping):
            raise ChatFormatError(f"{where} must be an object, got {t!r:.80}")
        if t.get("type", "function") != "function":
            raise ChatFormatError(f"{where}: type {t.get('type')!r} is not supported; only 'function' tools")
        fn = t.get("function", t)
        if not isinstance(fn, Mapping):
            raise ChatFormatError(f"{where}.function must be an object")
        name = _tool_name(fn.get("name"), f"{where}.function.name")
        if name in seen:
            raise ChatFormatError(f"{where}: a second tool named {name!r}")
        seen.add(name)
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise ChatFormatError(f"{where}.function.description must be a string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise ChatFormatError(f"{where}.function.parameters must be a JSON-schema object")
        out.append((name, desc, params))
    return out


def _lines(s: str) -> list[str]:
    """Rust's `str::lines`: split at "\\n" (a preceding "\\r" goes too); no empty line after a final newline."""
    pieces = s.split("\n")
    last = pieces.pop()
    out = [p[:-1] if p.endswith("\r") else p for p in pieces]
    if last:
        out.append(last)
    return out


def _tools_section(namespace: str, functions: list[tuple[str, str, Any]]) -> str:
    block = [f"## {namespace}\n", f"namespace {namespace} {{\n"]
    for name, desc, params in functions:
        block += [f"// {line}" for line in _lines(desc)]
        if params is None:
            block.append(f"type {name} = () => any;\n")
        else:
            block.append(f"type {name} = (_: {schema_to_typescript(params)}) => any;\n")
    block.append(f"}} // namespace {namespace}")
    return "# Tools\n\n" + "\n".join(block)


_MISSING = object()


def _get(v: Any, key: str) -> Any:
    """`serde_json::Value::get`: the member, `_MISSING` if absent or `v` is not an object."""
    return v.get(key, _MISSING) if isinstance(v, Mapping) else _MISSING


def _str(v: Any, key: str) -> str | None:
    x = _get(v, key)
    return x if isinstance(x, str) else None


def _is_enum(v: Any) -> bool:
    e = _get(v, "enum")
    return isinstance(e, list) and len(e) > 0


def _nullable(v: Any) -> bool:
    return _get(v, "nullable") is True


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """A JSON schema as Harmony's TypeScript-like type (spec §7.5), exactly as openai-harmony renders it."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        out = ""
        for variant in one_of:
            out += f"\n{indent} | " + _variant_type(variant, indent)
            trailing = [d] if (d := _str(variant, "description")) is not None else []
            default = _get(variant, "default")
            if default is not _MISSING:
                quoted = isinstance(default, str) and not _is_enum(variant)
                trailing.append(f'default: "{default}"' if quoted else f"default: {json_text(default)}")
            if trailing:
                out += " // " + " ".join(trailing)
        return out
    ty = _get(schema, "type")
    if isinstance(ty, list):
        names = ["number" if t == "integer" else t for t in ty if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(ty, str):
        return "any"
    if ty == "object":
        return _object_type(schema, indent)
    if ty == "string":
        enum = _get(schema, "enum")
        values = [f'"{v}"' for v in enum if isinstance(v, str)] if isinstance(enum, list) else []
        return " | ".join(values) if values else "string"
    if ty in ("number", "integer"):
        return "number"
    if ty == "boolean":
        return "boolean"
    if ty == "array":
        items = _get(schema, "items")
        return "Array<any>" if items is _MISSING else schema_to_typescript(items, indent) + "[]"
    return "any"


def _variant_type(variant: Any, indent: str) -> str:
    t = schema_to_typescript(variant, indent + "   ")
    return t + " | null" if _nullable(variant) and "null" not in t else t


def _default_text(default: Any, schema: Any) -> str:
    """A property default as a comment shows it: strings unquoted on enums, quoted (raw) otherwise, JSON else."""
    if isinstance(default, str):
        return default if _is_enum(schema) else f'"{default}"'
    return json_text(default)


def _object_type(schema: Any, indent: str) -> str:
    out = f"{indent}// {d}\n" if (d := _str(schema, "description")) is not None else ""
    out += "{\n"
    props = _get(schema, "properties")
    if isinstance(props, Mapping):
        req = _get(schema, "required")
        required = {r for r in req if isinstance(r, str)} if isinstance(req, list) else set()
        for key, val in props.items():
            opt = "" if key in required else "?"
            if (title := _str(val, "title")) is not None:
                out += f"{indent}// {title}\n{indent}//\n"
            one_of = _get(val, "oneOf")
            if one_of is _MISSING and (d := _str(val, "description")) is not None:
                out += f"{indent}// {d}\n"
            examples = _get(val, "examples")
            if isinstance(examples, list) and examples:
                out += f"{indent}// Examples:\n"
                out += "".join(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
            if isinstance(one_of, list):
                out += _one_of_property(key, opt, val, one_of, indent)
                continue
            t = schema_to_typescript(val, indent + "    ")
            if _nullable(val) and "null" not in t:
                t += " | null"
            out += f"{indent}{key}{opt}: {t},"
            default = _get(val, "default")
            if one_of is _MISSING and default is not _MISSING:
                out += f" // default: {_default_text(default, val)}"
            out += "\n"
    return out + f"{indent}}}"


def _one_of_property(key: str, opt: str, val: Any, variants: list, indent: str) -> str:
    out = ""
    desc = _str(val, "description")
    # The property description is written above unless the first variant repeats it.
    above = desc is not None and not (variants and _str(variants[0], "description") == desc)
    if above:
        out += f"{indent}// {desc}\n"
    default = _get(val, "default")
    if default is not _MISSING:
        out += f"{indent}// default: {_default_text(default, val)}\n"
    out += f"{indent}{key}{opt}:\n"
    for k, variant in enumerate(variants):
        out += f"{indent} | " + _variant_type(variant, indent)
        trailing = []
        vdesc = _str(variant, "description")
        if not (k == 0 and above) and vdesc is not None and vdesc != desc:
            trailing.append(vdesc)
        vdefault = _get(variant, "default")
        if vdefault is not _MISSING:
            trailing.append(f"default: {_default_text(vdefault, variant)}")
        if trailing:
            out += " // " + " ".join(trailing)
        out += "\n"
    return out + f"{indent},\n"


def json_text(v: Any) -> str:
    """Compact JSON as openai-harmony prints a default: Python's JSON text read by serde_json, shown by its
    `Display` (non-ASCII kept, numbers as serde_json holds and formats them)."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, int):
        return str(v) if -2**63 <= v < 2**64 else _rust_float(_serde_f64(str(v)))
    if isinstance(v, float):
        return _rust_float(_serde_f64(repr(v))) if math.isfinite(v) else "null"
    if isinstance(v, Mapping):
        return "{" + ",".join(json.dumps(str(k), ensure_ascii=False) + ":" + json_text(x) for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(json_text(x) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False)


_POW10 = [float(f"1e{k}") for k in range(309)]  # correctly rounded literals, like serde_json's table
_NUMBER = re.compile(r"(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?")


def _serde_f64(text: str) -> float:
    """serde_json's default (not round-trip exact) parse of a JSON number to f64: the digits that fit in a u64
    as the significand, then one multiplication or division by an exact power of ten. It can be 1 ULP off the
    correctly rounded value for long mantissas, and openai-harmony prints what it gets."""
    sign, whole, frac, exp = _NUMBER.fullmatch(text).groups()
    significand, exponent = 0, int(exp or 0)
    digits = whole + (frac or "")
    for k, d in enumerate(digits):
        if significand * 10 + int(d) > 2**64 - 1:
            # Digits that do not fit are dropped; only those before the decimal point still count as powers of 10.
            exponent += max(len(whole) - k, 0)
            break
        significand = significand * 10 + int(d)
        if k >= len(whole):
            exponent -= 1
    f = float(significand)
    while True:
        if abs(exponent) <= 308:
            f = f * _POW10[exponent] if exponent >= 0 else f / _POW10[-exponent]
            break
        if f == 0.0 or exponent > 0:
            break
        f /= 1e308
        exponent += 308
    return -f if sign else f


def _rust_float(f: float) -> str:
    """`ryu`'s formatting of an f64, which serde_json uses: shortest round-trip digits, plain notation while the
    decimal exponent fits (up to 16 integer digits, down to 0.0000d), else `d.ddde-x` / `de+x` without a "+"."""
    if not math.isfinite(f):
        return "null"
    sign = "-" if math.copysign(1.0, f) < 0 else ""
    if f == 0:
        return sign + "0.0"
    _, digits, e = Decimal(repr(abs(f))).normalize().as_tuple()  # shortest digits, as ryu finds them
    ds, n = "".join(map(str, digits)), len(digits)
    kk = n + e  # 10^(kk-1) <= |f| < 10^kk
    if e >= 0 and kk <= 16:
        return f"{sign}{ds}{'0' * e}.0"
    if 0 < kk <= 16:
        return f"{sign}{ds[:kk]}.{ds[kk:]}"
    if -5 < kk <= 0:
        return f"{sign}0.{'0' * -kk}{ds}"
    return f"{sign}{ds if n == 1 else ds[0] + '.' + ds[1:]}e{kk - 1}"


# === parser =======================================================================================================
@dataclass(frozen=True)
class ReasoningDelta:
    """Chain-of-thought text (`analysis` channel, no recipient). Not for the end user."""

    text: str


@dataclass(frozen=True)
class PreambleDelta:
    """User-visible commentary before tool calls (`commentary` channel, no recipient)."""

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """Final-answer text (`final` channel)."""

    text: str


@dataclass(frozen=True)
class ToolCallBegin:
    """A tool call's header has arrived; its arguments follow as `ToolCallDelta`s."""

    name: str
    recipient: str
    channel: str | None
    content_type: str | None


@dataclass(frozen=True)
class ToolCallDelta:
    """Arguments text of the tool call in progress."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """A whole tool call. `name` is the recipient without the `functions.` prefix; `arguments` the message text
    (JSON for function tools). `complete` is False when the output was cut off inside the call."""

    name: str
    arguments: str
    recipient: str
    channel: str | None
    content_type: str | None
    complete: bool = True


Event = Union[ReasoningDelta, PreambleDelta, ContentDelta, ToolCallBegin, ToolCallDelta, ToolCall]


@dataclass
class ParsedMessage:
    """One message of a completion. `end` is the token that closed it: "end", "return", "call", "endoftext", or
    None if the output stopped (or a new message began) before its end token."""

    role: str
    content: str = ""
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    end: str | None = None


_EXPECT_START, _HEADER, _CONTENT = "expect_start", "header", "content"
_ASCII_WS = re.compile(r"[ \t\n\x0c\r]+")  # Rust's split_ascii_whitespace
_MAX_HEADER_TOKENS = 64  # a header is a few tokens; beyond this the model is writing text without one


@dataclass
class _Route:
    kind: str  # "reasoning" | "preamble" | "final" | "tool" | "other"
    tool_name: str | None = None


class HarmonyParser:
    """Streaming parser of generated ids (spec §7.9). `feed(id)` returns the events that id completes; `finish()`
    closes a message cut off by the end of generation. It never raises on model output: whatever is malformed
    is surfaced as well as possible and described in `problems`.

    Start it with `role="assistant"` (the default) when the prompt ended in `<|start|>assistant`, as
    `render_conversation` prompts do; `role=None` expects a `<|start|>` first. `stop_reason` is "return", "call"
    or "endoftext" once a stop token (spec §6) has been seen."""

    def __init__(self, tokenizer: Tokenizer, role: str | None = "assistant"):
        self.tok = tokenizer
        self.messages: list[ParsedMessage] = []
        self.problems: list[str] = []
        self.stop_reason: str | None = None
        self._stops = {tokenizer.end: "end", tokenizer.return_: "return", tokenizer.call: "call",
                       tokenizer.endoftext: "endoftext"}
        self._n = 0  # ids fed, for problem messages
        self._role = role
        self._state = _HEADER if role is not None else _EXPECT_START
        self._header: list[int] = []
        self._msg: ParsedMessage | None = None
        self._route: _Route | None = None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []

    # --- public ---
    @property
    def state(self) -> str:
        """"expect_start", "header" or "content"."""
        return self._state

    @property
    def current(self) -> ParsedMessage | None:
        """The message whose content is arriving (its header is known), else None."""
        return self._msg

    def feed_many(self, ids: Iterable[int]) -> list[Event]:
        events: list[Event] = []
        for i in ids:
            events += self.feed(i)
        return events

    def feed(self, token_id: int) -> list[Event]:
        events: list[Event] = []
        self._n += 1
        try:
            token_id = self.tok.check_id(token_id)
        except ValueError:
            self._problem(f"token {token_id!r} is not a vocabulary id; skipped")
            return events
        stop = self._stops.get(token_id)
        if stop in ("return", "call", "endoftext"):
            self.stop_reason = stop
        if self._state == _EXPECT_START:
            self._expect_start(token_id, stop, events)
        elif self._state == _HEADER:
            self._in_header(token_id, stop, events)
        else:
            self._in_content(token_id, stop, events)
        return events

    def finish(self) -> list[Event]:
        """The end of generation: close a message that is still open (its end token never came)."""
        events: list[Event] = []
        if self._state == _HEADER and self._header:
            self._problem("output ended inside a message header")
            self._header_without_message(None, events)
        elif self._state == _CONTENT:
            self._problem("output ended inside a message (no end token)")
            self._close(None, events)
        self._state = _EXPECT_START
        self._role = None
        return events

    # --- states ---
    def _expect_start(self, t: int, stop: str | None, events: list[Event]) -> None:
        if t == self.tok.start:
            self._state, self._role, self._header = _HEADER, None, []
        elif stop is not None:
            self._problem(f"{self._name(t)} where <|start|> was expected; ignored")
        else:
            # The model skipped "<|start|>assistant" (typically it went straight on with "<|channel|>…").
            self._problem(f"{self._name(t)} where <|start|> was expected; assuming an assistant message")
            self._state, self._role, self._header = _HEADER, "assistant", []
            self._in_header(t, stop, events)

    def _in_header(self, t: int, stop: str | None, events: list[Event]) -> None:
        if t == self.tok.message:
            self._open(self._parse_header(self.tok.decode(self._header), self._role), events)
        elif stop is not None:
            self._problem(f"{self._name(t)} inside a message header (no <|message|>)")
            self._header_without_message(stop, events)
            self._state, self._role = _EXPECT_START, None
        elif t == self.tok.start:
            if self._header:
                self._problem(f"<|start|> inside a message header; dropped {self.tok.decode(self._header)!r}")
            self._role, self._header = None, []
        elif not self.tok.has_string(t):
            self._problem(f"token {t} has no string; skipped")
        else:
            self._header.append(t)
            if len(self._header) > _MAX_HEADER_TOKENS:
                self._problem(f"no <|message|> after {_MAX_HEADER_TOKENS} header tokens; reading them as content")
                self._header_without_message(None, events, keep_open=True)

    def _in_content(self, t: int, stop: str | None, events: list[Event]) -> None:
        if stop is not None:
            if stop == "call" and self._msg.recipient is None:
                self._problem("<|call|> ends a message without a recipient")
            self._close(stop, events)
            self._state, self._role = _EXPECT_START, None
        elif t == self.tok.start:
            self._problem("<|start|> inside a message: the previous message had no end token")
            self._close(None, events)
            self._state, self._role, self._header = _HEADER, None, []
        elif t == self.tok.channel:
            self._problem("<|channel|> inside a message: reading it as a new assistant message")
            self._close(None, events)
            self._state, self._role, self._header = _HEADER, "assistant", [t]
        elif self.tok.is_special(t) or not self.tok.has_string(t):
            self._problem(f"{self._name(t)} inside message content; skipped")
        else:
            self._emit(self._utf8.decode(self.tok.token_bytes(t)), events)

    # --- messages ---
    def _parse_header(self, text: str, role: str | None) -> ParsedMessage:
        """openai-harmony's header rules (spec §7.9), with what it rejects recorded instead."""
        channel, text = self._split_channel(text)
        if CONSTRAIN in text:
            text = text.replace(CONSTRAIN, " " + CONSTRAIN).strip()
        parts = [p for p in _ASCII_WS.split(text) if p]
        name = None
        if role is None:
            first = parts[0] if parts else ""
            if first in ROLES:
                role = first
            elif len(parts) > 1 or first.startswith("to="):
                role, name = "tool", parts.pop(0)
            elif first in CHANNELS and channel is None:
                self._problem(f"header {first!r} lacks <|channel|>; reading it as the channel")
                role, channel = "assistant", parts.pop(0)
            else:
                self._problem(f"message header without a role ({first!r}); assuming assistant")
                role = "assistant"
                if parts:
                    parts.pop(0)
        if parts and parts[0] == role:
            parts.pop(0)
        recipient = content_type = None
        to = [k for k, part in enumerate(parts) if part.startswith("to=")]
        if to:
            # "to=X" names the recipient wherever it stands; what follows it is the content type.
            recipient = parts.pop(to[-1])[3:]
            if parts:
                content_type = parts.pop()
        elif len(parts) == 1:
            # A lone word is a bare recipient (openai-harmony's rule), unless it is a constrained format.
            if parts[0].startswith(CONSTRAIN):
                content_type = parts.pop()
            else:
                recipient = parts.pop()
        elif parts:
            content_type, recipient = parts.pop(), parts.pop()
        if parts:
            self._problem(f"unexpected text in message header ignored: {' '.join(parts)!r}")
        return ParsedMessage(role=role, name=name, channel=channel, recipient=recipient, content_type=content_type)

    def _split_channel(self, text: str) -> tuple[str | None, str]:
        """The channel named after `<|channel|>` (up to whitespace or "<"), and the header text without it."""
        at = text.find("<|channel|>")
        if at < 0:
            return None, text.strip()
        after = text[at + len("<|channel|>"):]
        value = re.match(r"[^\s<]*", after).group()
        if not value:
            self._problem("<|channel|> without a channel name")
        return value or None, (text[:at] + after[len(value):]).strip()

    def _header_without_message(self, stop: str | None, events: list[Event], keep_open: bool = False) -> None:
        """A header that never reached <|message|>: its channel is used, the rest of its text becomes content."""
        channel, text = self._split_channel(self.tok.decode(self._header))
        role = self._role or "assistant"
        if text.split(maxsplit=1)[:1] == [role]:
            text = text[len(role):].lstrip()
        self._header = []
        if not text and not keep_open:
            return
        self._open(ParsedMessage(role=role, channel=channel), events)
        self._emit(text, events)
        if not keep_open:
            self._close(stop, events)

    def _open(self, msg: ParsedMessage, events: list[Event]) -> None:
        self._msg, self._parts, self._header = msg, [], []
        self._state = _CONTENT
        self._utf8.reset()
        recipient = msg.recipient if msg.recipient != "all" else None
        if msg.role != "assistant":
            self._problem(f"the model wrote a message as {msg.name or msg.role!r}; its text is not surfaced")
            self._route = _Route("other")
        elif recipient is not None:
            name = recipient[len("functions."):] if recipient.startswith("functions.") else recipient
            if recipient.startswith("functions.") and msg.channel != "commentary":
                self._problem(f"function call {name!r} on channel {msg.channel!r} (expected commentary); accepted")
            self._route = _Route("tool", name)
            events.append(ToolCallBegin(name, recipient, msg.channel, msg.content_type))
        elif msg.channel == "analysis":
            self._route = _Route("reasoning")
        elif msg.channel == "commentary":
            self._route = _Route("preamble")
        elif msg.channel == "final":
            self._route = _Route("final")
        elif msg.channel is None:
            self._problem("assistant message without a channel; treated as final")
            self._route = _Route("final")
        else:
            self._problem(f"unknown channel {msg.channel!r}; treated as reasoning")
            self._route = _Route("reasoning")

    def _emit(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        self._parts.append(text)
        kind = self._route.kind
        if kind == "reasoning":
            events.append(ReasoningDelta(text))
        elif kind == "preamble":
            events.append(PreambleDelta(text))
        elif kind == "final":
            events.append(ContentDelta(text))
        elif kind == "tool":
            events.append(ToolCallDelta(text))

    def _close(self, end: str | None, events: list[Event]) -> None:
        self._emit(self._utf8.decode(b"", final=True), events)
        self._utf8.reset()
        msg = self._msg
        msg.content, msg.end = "".join(self._parts), end
        self.messages.append(msg)
        if self._route.kind == "tool":
            events.append(ToolCall(self._route.tool_name, msg.content, msg.recipient, msg.channel,
                                   msg.content_type, complete=end is not None))
        self._msg, self._route, self._parts = None, None, []

    def _name(self, t: int) -> str:
        return self.tok.decode([t]) if self.tok.is_special(t) else f"token {t}"

    def _problem(self, text: str) -> None:
        self.problems.append(f"at token {self._n}: {text}")


def parse_completion(tokenizer: Tokenizer, ids: Iterable[int], role: str | None = "assistant"
                     ) -> tuple[list[ParsedMessage], list[Event], HarmonyParser]:
    """Parse a whole completion: its messages, all events, and the parser (for `problems`, `stop_reason`)."""
    p = HarmonyParser(tokenizer, role)
    events = p.feed_many(ids)
    events += p.finish()
    return p.messages, events, p


def completion_to_message(messages: Sequence[ParsedMessage], *,
                          make_id: Callable[[], str] = lambda: f"call_{uuid.uuid4().hex[:24]}") -> dict[str, Any]:
    """The assistant message (OpenAI style) for chat history: `content` (final answer, or the preamble when the
    completion calls tools), `reasoning` (analysis text), `tool_calls` with fresh ids. `render_conversation`
    renders it back in Harmony form."""
    reasoning, final, preamble, calls = [], [], [], []
    for m in messages:
        if m.role != "assistant":
            continue
        if m.recipient is not None and m.recipient != "all":
            name = m.recipient[len("functions."):] if m.recipient.startswith("functions.") else m.recipient
            calls.append({"id": make_id(), "type": "function", "function": {"name": name, "arguments": m.content}})
        elif m.channel == "analysis":
            reasoning.append(m.content)
        elif m.channel == "commentary":
            preamble.append(m.content)
        elif m.channel in ("final", None):
            final.append(m.content)
        else:
            reasoning.append(m.content)
    content = "\n".join(final) if final else ("\n".join(preamble) if preamble else None)
    out: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        out["reasoning"] = "\n".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out
