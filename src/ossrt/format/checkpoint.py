"""A local Hugging Face gpt-oss checkpoint directory (spec §4): config.json, the safetensors shards named by
`model.safetensors.index.json` (or one `model.safetensors`), and the tokenizer files read into GGUF's vocabulary
arrays. Every file is checked as it is read; a bad one is a ConvertError naming the file and field.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import TokenType

from .config import ModelConfig, describe_value, is_int
from .safetensors import SourceTensor, read_shard
from ..errors import ConfigError, ConvertError


class Checkpoint:
    """A checkpoint directory: its config, its tensors (memory-mapped; `close()` when done), its layout."""

    def __init__(self, src: str | os.PathLike):
        self.dir = Path(src)
        try:
            is_dir = self.dir.is_dir()
        except OSError as e:  # e.g. a name longer than the file system allows
            raise ConvertError(f"{self.dir}: {e.strerror or e}") from None
        if not is_dir:
            raise ConvertError(f"{self.dir}: no such checkpoint directory")
        cfg_path = self.dir / "config.json"
        self.hf_config = read_json(cfg_path)
        try:
            self.config = ModelConfig.from_hf_config(self.hf_config, str(cfg_path))
        except ConfigError as e:
            raise ConvertError(str(e)) from None
        self._maps: list[mmap.mmap] = []
        self.tensors: dict[str, SourceTensor] = {}
        try:
            for shard in self._shards():
                buf, tensors = read_shard(shard)
                self._maps.append(buf)
                for name, t in tensors.items():
                    if name in self.tensors:
                        raise ConvertError(f"{shard}: tensor {describe_value(name)} also appears in "
                                           f"{self.tensors[name].file}")
                    self.tensors[name] = t
        except BaseException:
            self.close()
            raise
        # The release stores experts as MXFP4 `*_blocks`/`*_scales`; fine-tunes as plain bf16 (spec §4).
        self.layout = "mxfp4" if any(n.endswith("_blocks") for n in self.tensors) else "bf16"

    def _shards(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if weight_map is None:
                raise ConvertError(f"{index}: missing field 'weight_map'")
            if not isinstance(weight_map, dict):
                raise ConvertError(f"{index}: field 'weight_map' is {describe_value(weight_map)}, expected an object "
                                   "mapping tensor names to shard files")
            for tensor, shard in weight_map.items():
                # A plain file name: the index must not point outside the checkpoint directory.
                if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
                    raise ConvertError(f"{index}: weight_map[{describe_value(tensor)}] is {describe_value(shard)}, "
                                       "expected the file name of a shard in the checkpoint directory")
            shards = [self.dir / f for f in dict.fromkeys(weight_map.values())]
            for s in shards:
                try:
                    present = s.is_file()
                except OSError as e:
                    raise ConvertError(f"{index}: shard {describe_value(s.name)}: {e.strerror or e}") from None
                if not present:
                    raise ConvertError(f"{index}: shard {s.name} is missing")
            return shards
        single = self.dir / "model.safetensors"
        if single.is_file():
            return [single]
        raise ConvertError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")

    def release(self) -> None:
        """Drop the source pages read so far from our RSS (they stay in the page cache): touched pages of a
        file mapping count as resident, which would otherwise grow to the checkpoint's size."""
        for m in self._maps:
            m.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        # Views into the maps may still be referenced by the caller; closing is then deferred to the GC.
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass
        self._maps = []


def read_json(path: Path) -> dict:
    """A JSON object from `path`; anything else is a ConvertError naming the file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConvertError(f"{path}: file not found") from None
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an integer of 4,300+ digits, deep nesting
        raise ConvertError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return obj


# --- the vocabulary ------------------------------------------------------------------------------------------------
@dataclass
class Vocab:
    """The `tokenizer.ggml.*` arrays and special ids of a GGUF file."""

    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    merges: list[str]
    bos: int
    eos: int
    pad: int
    chat_template: str | None


def read_vocab(ckpt: Checkpoint) -> Vocab:
    """tokenizer.json + tokenizer_config.json -> the `tokenizer.ggml.*` arrays, like llama.cpp's `_set_vocab_gpt2`:
    ids without a string become `[PAD{id}]` (UNUSED), special added tokens CONTROL, the rest NORMAL."""
    path = ckpt.dir / "tokenizer.json"
    tok = read_json(path)
    model = tok.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConvertError(f"{path}: expected a byte-level BPE model with a 'vocab'")
    if not model["vocab"]:
        raise ConvertError(f"{path}: field 'model.vocab' is empty")
    n = ckpt.config.n_vocab
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TokenType.UNUSED] * n

    def put(field: str, text: str, i: Any, ttype: int) -> None:
        if not is_int(i) or not 0 <= i < n:
            raise ConvertError(f"{path}: {field}: token {describe_value(text)} has id {describe_value(i)}, outside "
                               f"the vocabulary of {n} (config.json vocab_size)")
        if types[i] != TokenType.UNUSED and tokens[i] != text:
            raise ConvertError(f"{path}: {field}: token {describe_value(text)} has id {i}, which "
                               f"{describe_value(tokens[i])} has too")
        tokens[i], types[i] = text, ttype

    for text, i in model["vocab"].items():
        put("model.vocab", text, i, TokenType.NORMAL)
    added = tok.get("added_tokens") or []
    if not isinstance(added, list):
        raise ConvertError(f"{path}: field 'added_tokens' is {describe_value(added)}, expected a list")
    for k, entry in enumerate(added):
        field = f"added_tokens[{k}]"
        if not isinstance(entry, dict):
            raise ConvertError(f"{path}: {field} is {describe_value(entry)}, expected an object with 'id' and "
                               "'content'")
        content, special = entry.get("content"), entry.get("special", False)
        if not isinstance(content, str) or not content:
            raise ConvertError(f"{path}: {field}.content is {describe_value(content)}, expected the token's text")
        if "id" not in entry:
            raise ConvertError(f"{path}: {field} ({describe_value(content)}) has no 'id'")
        if not isinstance(special, bool):
            raise ConvertError(f"{path}: {field}.special is {describe_value(special)}, expected true or false")
        put(field, content, entry["id"], TokenType.CONTROL if special else TokenType.NORMAL)
    merges = _read_merges(path, model.get("merges") or [])
    _check_utf8(path, "model.vocab/added_tokens", tokens)
    _check_utf8(path, "model.merges", merges)
    ids = {t: i for i, t in enumerate(tokens) if types[i] != TokenType.UNUSED}
    cfg_path = ckpt.dir / "tokenizer_config.json"
    tcfg = read_json(cfg_path) if cfg_path.is_file() else {}

    def special(key: str) -> int:
        field = f"{key}_token"
        value = tcfg.get(field)
        if isinstance(value, dict):  # a serialized AddedToken
            value, field = value.get("content"), field + ".content"
        if value is not None:
            if not isinstance(value, str):
                raise ConvertError(f"{cfg_path}: {field} is {describe_value(value)}, expected the token's text")
            if value not in ids:
                raise ConvertError(f"{cfg_path}: {field} is {describe_value(value)}, which is not a token of "
                                   f"{path.name}")
            return ids[value]
        fallback = ckpt.hf_config.get(f"{key}_token_id")
        if isinstance(fallback, list) and fallback:
            fallback = fallback[0]
        if fallback is None:
            raise ConvertError(f"{cfg_path}: missing field '{key}_token' (and config.json has no {key}_token_id)")
        if not is_int(fallback) or not 0 <= fallback < n:
            raise ConvertError(f"{ckpt.dir / 'config.json'}: {key}_token_id is {describe_value(fallback)}, expected "
                               f"a token id below {n}")
        return fallback

    template = _read_chat_template(ckpt.dir, cfg_path, tcfg)
    return Vocab(tokens, types, merges, special("bos"), special("eos"), special("pad"), template)


def _read_merges(path: Path, merges: Any) -> list[str]:
    """tokenizer.json's `model.merges` as GGUF stores them: `"a b"` strings."""
    if not isinstance(merges, list):
        raise ConvertError(f"{path}: field 'model.merges' is {describe_value(merges)}, expected a list")
    out = []
    for k, m in enumerate(merges):
        # "a b" (older files) or ["a", "b"]; byte-level tokens hold no spaces, so the pair splits one way only.
        pair = m.split(" ") if isinstance(m, str) else m
        a, b = pair if isinstance(pair, list) and len(pair) == 2 else (None, None)
        if not (isinstance(a, str) and isinstance(b, str) and a and b and " " not in a and " " not in b):
            raise ConvertError(f"{path}: model.merges[{k}] is {describe_value(m)}, expected two tokens, \"a b\" or "
                               "[\"a\", \"b\"]")
        out.append(f"{a} {b}")
    return out


def _read_chat_template(directory: Path, cfg_path: Path, tcfg: dict) -> str | None:
    """The chat template: `chat_template.jinja` (newer transformers keep it there, and it wins), else
    tokenizer_config.json's `chat_template` (a string, or older transformers' list of named ones)."""
    template, template_file = tcfg.get("chat_template"), cfg_path
    if isinstance(template, list):  # older transformers: [{"name": ..., "template": ...}]
        named, template = template, None
        for k, t in enumerate(named):
            if not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)):
                raise ConvertError(f"{cfg_path}: chat_template[{k}] is {describe_value(t)}, expected "
                                   '{"name": ..., "template": ...}')
            if t["name"] == "default":
                template = t["template"]
    if template is not None and not isinstance(template, str):
        raise ConvertError(f"{cfg_path}: field 'chat_template' is {describe_value(template)}, expected a string (a "
                           "Jinja template) or a list of named ones")
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            template, template_file = jinja.read_text(encoding="utf-8"), jinja
        except UnicodeDecodeError as e:
            raise ConvertError(f"{jinja}: not UTF-8 text: {e}") from None
        except OSError as e:
            raise ConvertError(f"{jinja}: cannot read: {e.strerror or e}") from None
    if template is not None:
        _check_utf8(template_file, "chat_template", [template])
    return template


def _check_utf8(path: Path, field: str, texts: list[str]) -> None:
    """GGUF strings are UTF-8: JSON can still hold lone surrogates (\\ud800) that have no encoding."""
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        bad = next(t for t in texts if not _encodable(t))
        raise ConvertError(f"{path}: {field}: {describe_value(bad)} is not valid Unicode (a lone surrogate)") from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
