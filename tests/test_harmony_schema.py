"""JSON schema → Harmony's TypeScript-like tool types (ossrt.harmony.schema): exact layouts from the spec and
openai-harmony's test data, and serde_json's number text. The hypothesis differential against openai-harmony,
which covers the rest, renders whole prompts: it is in test_harmony_render.py."""

from ossrt.harmony import json_text, schema_to_typescript


def test_render_functions_with_parameters_layout():
    """Spec §7.5 example (openai/harmony test-data/test_render_functions_with_parameters.txt)."""
    params = {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
        "required": ["location"]}
    assert schema_to_typescript(params) == (
        '{\n// The city and state, e.g. San Francisco, CA\nlocation: string,\n'
        'format?: "celsius" | "fahrenheit", // default: celsius\n}')
    assert schema_to_typescript({"type": "object", "properties": {"o": {"type": "object", "properties": {
        "i": {"type": "integer", "nullable": True}}}}}) == "{\no?: {\n    i?: number | null,\n    },\n}"


def test_json_text_matches_serde_json():
    assert json_text({"a": [1, 2.5, 1e20, 1.5e-7, -0.0, 1e16, 1e15, None, True], "é": "x\n\"y\""}) == (
        '{"a":[1,2.5,1e20,1.5e-7,-0.0,1e16,1000000000000000.0,null,true],"é":"x\\n\\"y\\""}')

