"""Defaults every layer and front-end shares, defined once. A leaf module (like `errors`): importing it loads
nothing else, so the CLI can show them without loading the engine."""

DEFAULT_MODEL = "openai/gpt-oss-20b"  # what `ossrt run` / `serve` / `ossrt.load(None)` use without a MODEL
DEFAULT_CONTEXT_LENGTH = 8192  # tokens, or the model's training context if that is smaller
KV_TYPES = ("f16", "q8_0", "f32")  # KV cache precisions: llama.cpp's default f16, its 8-bit q8_0, exact f32
DEFAULT_KV_TYPE = "f16"
DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA when CuPy finds a device, else the CPU
DEFAULT_DEVICE = "auto"
