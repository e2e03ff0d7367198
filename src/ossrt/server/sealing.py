"""Reasoning that survives a stateless round trip: a Responses client that stores nothing (`store: false`) asks for
`include: ["reasoning.encrypted_content"]` and sends earlier reasoning back only in that opaque form. Harmony needs a
turn's analysis kept between its tool calls, so the server hands the analysis out sealed — encrypted and
authenticated (Fernet: AES-128-CBC + HMAC-SHA256, from the `cryptography` package) — and opens it on the way back.
Nobody without the server's key can read or forge it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

KEY_FILE = "reasoning.key"


class Sealer:
    """Seals and opens reasoning text with one key: a fresh one by default (valid while the server runs), or the
    key in a file (`from_key_file`) so that a restarted server still opens what it sealed before."""

    def __init__(self, key: bytes | None = None):
        self.key = key or Fernet.generate_key()  # for other processes serving the same clients (a cluster's replicas)
        self._fernet = Fernet(self.key)

    @classmethod
    def from_key_file(cls, path: str | os.PathLike) -> Sealer:
        """The key stored at `path`, created there (readable by this user only) if there is none."""
        path = Path(path)
        try:
            return cls(path.read_bytes().strip())
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Fernet.generate_key()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.chmod(tmp, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            try:
                os.link(tmp, path)  # never replaces a key another server process created meanwhile
            except FileExistsError:
                key = path.read_bytes().strip()
        finally:
            os.unlink(tmp)
        return cls(key)

    def seal(self, text: str) -> str:
        return self._fernet.encrypt(text.encode("utf-8")).decode("ascii")

    def open(self, sealed: str) -> str | None:
        """The text `sealed` holds, or None when it was not sealed with this key (or was altered)."""
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            return None
