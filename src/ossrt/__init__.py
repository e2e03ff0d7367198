"""ossrt: run OpenAI's gpt-oss models from Python.

    import ossrt
    model = ossrt.load("gpt-oss-20b.gguf")
    for token in model.generate(prompt_ids, max_tokens=100):
        ...
"""

__version__ = "0.1.0"
__all__ = ["load", "Model"]


def __getattr__(name: str):
    # Lazy, so `import ossrt` (and the CLI's start) does not pay for NumPy kernels it may not use.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ossrt' has no attribute {name!r}")
