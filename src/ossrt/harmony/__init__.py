"""The Harmony chat format of gpt-oss (spec §7).

- `render`: OpenAI-style chat messages and function tools → the prompt ids, token for token as openai-harmony.
- `schema`: JSON schema → the TypeScript-like tool signatures of the tools section.
- `parse`: the streaming parser from generated ids back to reasoning, preambles, the answer and tool calls.
- `constants`: roles, channels, reasoning efforts.
"""

from .constants import CHANNELS, CONSTRAIN, DEFAULT_REASONING_EFFORT, REASONING_EFFORTS, ROLES
from .parse import (
    ContentDelta,
    Event,
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
from .render import (KNOWLEDGE_CUTOFF, MODEL_IDENTITY, HarmonyMessage, ResponseFormat, render_conversation,
                     render_tool_result, to_harmony_messages, tool_functions,
                     tool_recipient)
from .schema import json_text, schema_to_typescript

__all__ = [
    "CHANNELS", "CONSTRAIN", "DEFAULT_REASONING_EFFORT", "REASONING_EFFORTS", "ROLES",
    "KNOWLEDGE_CUTOFF", "MODEL_IDENTITY", "HarmonyMessage", "ResponseFormat", "render_conversation", "render_tool_result",
    "to_harmony_messages", "tool_functions", "tool_recipient",
    "json_text", "schema_to_typescript",
    "ContentDelta", "Event", "HarmonyParser", "ParsedMessage", "PreambleDelta", "ReasoningDelta", "ToolCall",
    "ToolCallBegin", "ToolCallDelta", "completion_to_message", "parse_completion",
]
