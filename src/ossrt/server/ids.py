"""Ids of the API objects the server makes (completions, responses, output items). Tool-call ids are not made
here: the Harmony parser gives each call its id, the same in the stream and in the final message."""

import secrets


def new_id(prefix: str) -> str:
    """`prefix` (e.g. "chatcmpl-", "resp_") and 24 random hex digits."""
    return prefix + secrets.token_hex(12)
