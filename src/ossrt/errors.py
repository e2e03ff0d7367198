"""Expected, user-facing failures. Front-ends print the message and exit 2; nothing else is caught."""


class OssrtError(Exception):
    """A mistake in the user's input or environment, with a message that says what and where."""


class ConfigError(OssrtError):
    """A model configuration (config.json or GGUF metadata) is missing a field or has a bad value."""


class ModelFileError(OssrtError):
    """A model file is missing, truncated, or does not hold the tensors and keys gpt-oss needs."""


class ConvertError(OssrtError):
    """A checkpoint cannot be converted, or the output cannot be written."""


class ChatFormatError(OssrtError):
    """A chat conversation cannot be rendered in the Harmony format."""


class ContextLengthError(OssrtError):
    """A sequence would pass the context length the model was loaded with."""


class ParameterError(OssrtError, ValueError):
    """A generation or API parameter is out of range (e.g. a negative temperature or top_p above 1)."""


class ModelNotFoundError(OssrtError):
    """A model name cannot be resolved to a file: unknown, not downloadable, or not cached while offline."""


class ModelOutputError(OssrtError):
    """The model produced non-finite values (NaN or infinity): the model file is probably corrupt. Not the
    request's fault: the server answers it with a 500 that says so."""


class DeviceError(OssrtError):
    """A requested compute device cannot be used: CuPy or numba-cuda is not installed, or no CUDA device is found."""
