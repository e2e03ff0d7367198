"""ossrt: run OpenAI's gpt-oss models from Python."""

__version__ = "0.1.0"
