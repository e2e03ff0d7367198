"""o200k_harmony, the gpt-oss tokenizer (spec §6), on tiktoken.

The vocabulary comes from the model file (GGUF `tokenizer.ggml.tokens` / `token_type`) or from an
`o200k_base.tiktoken` file; it is handed to `tiktoken.Encoding` directly, so nothing is downloaded or cached.
Encoding is tiktoken's byte-level BPE: rank = token id, so the GGUF merges list is not needed.

Ids without a string (200019..201087: the embedding has rows for them, the vocabulary does not) decode to
nothing; ids outside the vocabulary raise `ValueError`.
"""

from __future__ import annotations

import base64
import codecs
import operator
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import AbstractSet, Literal

import tiktoken
from gguf import Keys, TokenType

from .errors import ModelFileError
from .format.config import TOKENIZER_MODEL, TOKENIZER_PRE

N_VOCAB = 201088

# tiktoken's o200k_base split pattern (= o200k_harmony), spec §6.
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

# The 21 special tokens HF tokenizer.json (and so the GGUF) defines for gpt-oss, spec §6.
SPECIAL_TOKENS: dict[int, str] = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200000: "<|reserved_200000|>",
    200001: "<|reserved_200001|>", 200002: "<|return|>", 200003: "<|constrain|>", 200004: "<|reserved_200004|>",
    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>",
    200009: "<|reserved_200009|>", 200010: "<|reserved_200010|>", 200011: "<|reserved_200011|>",
    200012: "<|call|>", 200013: "<|reserved_200013|>", 200014: "<|reserved_200014|>",
    200015: "<|reserved_200015|>", 200016: "<|reserved_200016|>", 200017: "<|reserved_200017|>",
    200018: "<|endofprompt|>",
}


# --- GPT-2 byte-to-unicode ---------------------------------------------------------------------------------------
def _byte_to_char() -> list[str]:
    """GPT-2's map of the 256 byte values to printable characters, as byte-level BPE vocabularies store them:
    printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


_BYTE_TO_CHAR = _byte_to_char()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}


def bytes_to_unicode_token(b: bytes) -> str:
    """Token bytes -> the GPT-2 byte-to-unicode string stored in tokenizer.json / GGUF `tokenizer.ggml.tokens`."""
    return "".join(_BYTE_TO_CHAR[x] for x in b)


def unicode_token_to_bytes(s: str) -> bytes:
    """Inverse of `bytes_to_unicode_token`; `ValueError` names a character outside the byte alphabet."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in s)
    except KeyError as e:
        raise ValueError(f"token {s!r}: character {e.args[0]!r} is not a GPT-2 byte-to-unicode character") from None


def load_tiktoken_ranks(source: str | os.PathLike | bytes) -> dict[bytes, int]:
    """A `.tiktoken` vocabulary (`base64(token) rank` per line) -> {token bytes: rank}, without tiktoken's
    download/cache layer. `source` is a path, or the file's contents (such as `ossrt.testing.synthetic.o200k_base()`,
    the copy the package ships)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    where = "the .tiktoken data" if isinstance(source, bytes) else os.fspath(source)
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            b64, rank = line.split()
            ranks[base64.b64decode(b64, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{where}: line {n} is not 'base64-token rank'") from None
    return ranks


# --- tokenizer ---------------------------------------------------------------------------------------------------
class Tokenizer:
    """o200k_harmony: byte-level BPE ranks + the o200k split pattern + the gpt-oss special tokens.

    `encode(text)` is ordinary encoding (special-token strings in the text stay text, as Harmony renders user
    content); `encode(text, allowed_special="all" | {...})` turns the allowed special strings into their ids.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int], n_vocab: int = N_VOCAB):
        ids = list(mergeable_ranks.values()) + list(special_tokens.values())
        if len(set(ids)) != len(ids):
            raise ValueError("tokenizer: a token id is used twice")
        if ids and (min(ids) < 0 or max(ids) >= n_vocab):
            raise ValueError(f"tokenizer: token ids must lie in [0, {n_vocab}), got {min(ids)}..{max(ids)}")
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise ValueError(f"tokenizer: byte-level BPE needs all 256 single bytes; missing {missing[:8]}")
        self.n_vocab = n_vocab
        self._enc = tiktoken.Encoding(name="o200k_harmony", pat_str=O200K_PATTERN,
                                      mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        self._special = dict(special_tokens)
        self._special_by_id = {i: s for s, i in special_tokens.items()}
        self._assigned = bytearray(n_vocab)  # 1 where an id has a string
        for i in ids:
            self._assigned[i] = 1

    # --- constructors ---
    @classmethod
    def from_tiktoken_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """o200k_base ranks from `path` plus the gpt-oss special table (spec §6)."""
        ranks = load_tiktoken_ranks(path)
        return cls(ranks, {s: i for i, s in SPECIAL_TOKENS.items()})

    @classmethod
    def from_gguf_vocab(cls, tokens: Sequence[str], token_types: Sequence[int]) -> "Tokenizer":
        """From GGUF `tokenizer.ggml.tokens` / `token_type` (DEVELOPERS.md): NORMAL entries are GPT-2
        byte-to-unicode strings with rank = id; CONTROL (and USER_DEFINED) entries are special tokens with their
        literal text; UNUSED entries (`[PAD{id}]`) have no string."""
        tokens_key, types_key = Keys.Tokenizer.LIST, Keys.Tokenizer.TOKEN_TYPE
        if len(tokens) != len(token_types):
            raise ModelFileError(f"{tokens_key} has {len(tokens)} entries but {types_key} has {len(token_types)}")
        ranks: dict[bytes, int] = {}
        specials: dict[str, int] = {}
        for i, (text, ttype) in enumerate(zip(tokens, token_types)):
            if not isinstance(text, str):
                raise ModelFileError(f"{tokens_key}[{i}] is {text!r}, not a string")
            if type(ttype) is not int:  # True == 1 would pass as NORMAL
                raise ModelFileError(f"{types_key}[{i}] is {ttype!r}, not an integer")
            if ttype == TokenType.NORMAL:
                try:
                    b = unicode_token_to_bytes(text)
                except ValueError as e:
                    raise ModelFileError(f"{tokens_key}[{i}]: {e}") from None
                if b in ranks:
                    raise ModelFileError(f"{tokens_key}[{i}] {text!r} repeats token {ranks[b]}")
                ranks[b] = i
            elif ttype in (TokenType.CONTROL, TokenType.USER_DEFINED):
                if text in specials:
                    raise ModelFileError(f"{tokens_key}[{i}] {text!r} repeats token {specials[text]}")
                specials[text] = i
            elif ttype != TokenType.UNUSED:
                kinds = ", ".join(f"{t.name} ({t.value})" for t in (TokenType.NORMAL, TokenType.CONTROL,
                                                                     TokenType.USER_DEFINED, TokenType.UNUSED))
                raise ModelFileError(f"{types_key}[{i}] = {ttype!r}: a gpt2 (byte-level BPE) vocabulary has only "
                                     f"{kinds}")
        try:
            return cls(ranks, specials, n_vocab=len(tokens))
        except ValueError as e:
            raise ModelFileError(str(e)) from None

    @classmethod
    def from_model_file(cls, mf) -> "Tokenizer":
        """From an open `ossrt.format.modelfile.ModelFile`; checks that the vocabulary is the o200k kind."""
        model, pre = mf.get(Keys.Tokenizer.MODEL), mf.get(Keys.Tokenizer.PRE)
        if model != TOKENIZER_MODEL or pre not in (TOKENIZER_PRE, None):
            raise ModelFileError(f"{mf.path}: {Keys.Tokenizer.MODEL}/pre = {model!r}/{pre!r}; gpt-oss uses "
                                 f"{TOKENIZER_MODEL!r}/{TOKENIZER_PRE!r} (o200k)")
        tokens, types = mf.tokenizer_tokens, mf.tokenizer_token_types
        try:
            tokenizer = cls.from_gguf_vocab(tokens, types)
        except ModelFileError as e:
            raise ModelFileError(f"{mf.path}: {e}") from None
        # Harmony needs every gpt-oss special token at its id; a missing one would surface only mid-chat.
        for i, text in SPECIAL_TOKENS.items():
            if tokenizer._special_by_id.get(i) != text:
                found = f"{tokens[i]!r} of type {types[i]}" if i < len(tokens) else "nothing"
                raise ModelFileError(f"{mf.path}: {Keys.Tokenizer.LIST}[{i}] must be the special token {text!r} "
                                     f"(token_type CONTROL = {TokenType.CONTROL.value}), found {found}")
        return tokenizer

    # --- encoding ---
    def encode(self, text: str, allowed_special: Literal["all"] | AbstractSet[str] = frozenset()) -> list[int]:
        """Text -> ids. By default every special-token string in `text` is ordinary text."""
        if not allowed_special:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special=allowed_special, disallowed_special=())

    # --- decoding ---
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids (ints or NumPy integers) -> bytes; special tokens give their literal text, ids without a string
        give nothing."""
        ids = [self.check_id(i) for i in ids]
        try:
            return self._enc.decode_bytes(ids)
        except KeyError:  # an id without a string
            return self._enc.decode_bytes([i for i in ids if self._assigned[i]])

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Ids -> text; invalid UTF-8 becomes U+FFFD (`errors="strict"` raises instead)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (b"" for an id without a string)."""
        return self.decode_bytes([token_id])

    def check_id(self, i: object) -> int:
        """An id as a Python int (NumPy integers accepted); `ValueError` if it is not in the vocabulary."""
        try:
            k = operator.index(i)
        except TypeError:
            k = -1
        if not 0 <= k < self.n_vocab:
            raise ValueError(f"token id {i!r} is outside the vocabulary [0, {self.n_vocab})")
        return k

    def has_string(self, token_id: int) -> bool:
        """False for ids the vocabulary leaves empty (200019..201087 in gpt-oss)."""
        return bool(self._assigned[self.check_id(token_id)])

    # --- special tokens ---
    def special_id(self, text: str) -> int:
        """The id of a special token by its literal text, e.g. `"<|start|>"`."""
        try:
            return self._special[text]
        except KeyError:
            raise ValueError(f"the vocabulary has no special token {text!r}") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_by_id

    @property
    def tiktoken_encoding(self) -> tiktoken.Encoding:
        """The tiktoken Encoding underneath, for libraries that read a vocabulary from one (llguidance)."""
        return self._enc

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def startoftext(self) -> int:
        return self.special_id("<|startoftext|>")

    @property
    def endoftext(self) -> int:
        return self.special_id("<|endoftext|>")

    @property
    def return_(self) -> int:
        return self.special_id("<|return|>")

    @property
    def constrain(self) -> int:
        return self.special_id("<|constrain|>")

    @property
    def channel(self) -> int:
        return self.special_id("<|channel|>")

    @property
    def start(self) -> int:
        return self.special_id("<|start|>")

    @property
    def end(self) -> int:
        return self.special_id("<|end|>")

    @property
    def message(self) -> int:
        return self.special_id("<|message|>")

    @property
    def call(self) -> int:
        return self.special_id("<|call|>")

    @property
    def stop_tokens_for_assistant(self) -> frozenset[int]:
        """Where generation of an assistant turn stops (spec §6): `<|return|>`, `<|call|>`, `<|endoftext|>`.
        Not `<|end|>`: the model continues after it with its next message."""
        return frozenset((self.return_, self.call, self.endoftext))

    def incremental_decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Streaming detokenizer: `feed(id)` returns the text that is complete so far, never half a UTF-8 character.
    An invalid byte sequence becomes U+FFFD as soon as it is provably invalid; `flush()` turns an incomplete
    trailing sequence into U+FFFD and resets the decoder."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        # CPython's incremental UTF-8 decoder holds back incomplete sequences and replaces maximal invalid
        # subparts, the same rule as Rust's from_utf8_lossy that openai-harmony uses.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def feed_many(self, ids: Iterable[int]) -> str:
        return self._utf8.decode(self._tok.decode_bytes(ids))

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete character are held back."""
        return bool(self._utf8.getstate()[0])
