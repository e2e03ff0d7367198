"""The names the Harmony format defines (spec §7), shared by the renderer and the parser."""

ROLES = ("system", "developer", "user", "assistant", "tool")
CHANNELS = ("analysis", "commentary", "final")
REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_REASONING_EFFORT = "medium"  # what the model card and openai-harmony use when none is given
# Written before a content type that constrains the message's text, as in "<|constrain|>json".
CONSTRAIN = "<|constrain|>"
