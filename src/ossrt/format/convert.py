"""Hugging Face gpt-oss checkpoint -> one GGUF file in llama.cpp's conventions (spec §4, §5).

Layouts (spec §4): the release layout with MXFP4 experts as `*_blocks`/`*_scales` (repacked bit-exactly, never
requantized), and the plain bf16 layout fine-tunes use (experts quantized with llama.cpp's MXFP4 rule).
Non-expert matrices go to `outtype` (q8_0 by default, like the published GGUFs; bf16 is lossless for bf16
sources); norms, biases, sinks and the router stay F32 as llama.cpp writes them.

Streaming: safetensors shards are memory-mapped (we parse their 8-byte-length JSON header ourselves, which also
lets us name a truncated shard), and each output tensor is produced and written in chunks (rows, or one expert),
so the peak RSS is a few hundred MB plus the tokenizer, whatever the model size. The output is written to a
temporary file beside OUT and renamed at the end; on any failure or Ctrl-C it is removed.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from . import config

from . import mxfp4
from .config import ARCH, ModelConfig
from ..errors import ConfigError, ConvertError

OUTTYPES = {"q8_0": QT.Q8_0, "bf16": QT.BF16, "f16": QT.F16, "f32": QT.F32}
FILE_TYPE_MXFP4_MOE = 38  # llama_ftype LLAMA_FTYPE_MOSTLY_MXFP4_MOE, as llama.cpp writes for gpt-oss
QUANTIZATION_VERSION = 2
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5

_ST_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "U8": np.uint8}
_DENSE_SRC = ("BF16", "F16", "F32")
_CHUNK_VALUES = 1 << 22  # values per chunk of a dense tensor: 16 MB as float32


# --- reading safetensors --------------------------------------------------------------------------------------
@dataclass
class SourceTensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: Path
    data: np.ndarray  # memory-mapped, raw dtype (BF16 as uint16)

    def f32(self, index: Any = ...) -> np.ndarray:
        """float32 copy of data[index]."""
        x = self.data[index]
        if self.dtype == "BF16":
            return (x.astype(np.uint32) << 16).view(np.float32)
        return x.astype(np.float32)


def _brief(value: Any) -> str:
    """A user's value for an error message: its repr, cut short (a header can hold megabytes in one field)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_shard(path: Path) -> tuple[mmap.mmap, dict[str, SourceTensor]]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path}: not a safetensors file (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 << 20):
                raise ConvertError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8 and JSON
                raise ConvertError(f"{path}: corrupt safetensors header: {e}") from None
            if not isinstance(header, dict):
                raise ConvertError(f"{path}: corrupt safetensors header: not a JSON object")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror or e}") from None
    whole = np.frombuffer(buf, dtype=np.uint8)
    tensors, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = _header_entry(path, name, info, 8 + n, size)
        raw = whole[8 + n + begin:8 + n + end]
        tensors[name] = SourceTensor(name, dtype, shape, path, raw.view(_ST_DTYPES[dtype]).reshape(shape))
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ConvertError(f"{path}: corrupt safetensors header: the data of tensors {_brief(a)} and {_brief(b)} "
                               "overlap")
    return buf, tensors


def _header_entry(path: Path, name: str, info: Any, data_start: int,
                  size: int) -> tuple[str, tuple[int, ...], list[int]]:
    """dtype, shape and data_offsets (relative to `data_start`, the end of the header) of one safetensors header
    entry, checked against each other and the file's `size`."""
    where = f"{path}: tensor {_brief(name)}"
    if not isinstance(info, dict):
        raise ConvertError(f"{where}: header entry is {_brief(info)}, expected an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise ConvertError(f"{where} has dtype {_brief(dtype)}, expected one of {', '.join(_ST_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ConvertError(f"{where}: field 'shape' is {_brief(shape)}, expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise ConvertError(f"{where}: field 'data_offsets' is {_brief(offsets)}, expected two integers [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ConvertError(f"{where}: field 'data_offsets' is {offsets}, expected 0 <= begin <= end")
    if data_start + end > size:
        raise ConvertError(f"{path}: file is truncated: tensor {_brief(name)} needs bytes up to {data_start + end}, "
                           f"file has {size}")
    nbytes = math.prod(shape) * np.dtype(_ST_DTYPES[dtype]).itemsize
    if end - begin != nbytes:
        raise ConvertError(f"{where}: data_offsets {offsets} hold {end - begin} bytes, shape {shape} {dtype} needs "
                           f"{nbytes}")
    return dtype, tuple(shape), offsets


class Checkpoint:
    """A local HF gpt-oss checkpoint directory: config, memory-mapped tensors, tokenizer files."""

    def __init__(self, src: str | os.PathLike):
        self.dir = Path(src)
        try:
            is_dir = self.dir.is_dir()
        except OSError as e:  # e.g. a name longer than the file system allows
            raise ConvertError(f"{self.dir}: {e.strerror or e}") from None
        if not is_dir:
            raise ConvertError(f"{self.dir}: no such checkpoint directory")
        cfg_path = self.dir / "config.json"
        self.hf_config = _read_json(cfg_path)
        try:
            self.config = ModelConfig.from_hf_config(self.hf_config, str(cfg_path))
        except ConfigError as e:
            raise ConvertError(str(e)) from None
        self._maps: list[mmap.mmap] = []
        self.tensors: dict[str, SourceTensor] = {}
        try:
            for shard in self._shards():
                buf, tensors = _read_shard(shard)
                self._maps.append(buf)
                for name, t in tensors.items():
                    if name in self.tensors:
                        raise ConvertError(f"{shard}: tensor {_brief(name)} also appears in {self.tensors[name].file}")
                    self.tensors[name] = t
        except BaseException:
            self.close()
            raise
        self.layout = "mxfp4" if any(n.endswith("_blocks") for n in self.tensors) else "bf16"

    def _shards(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if weight_map is None:
                raise ConvertError(f"{index}: missing field 'weight_map'")
            if not isinstance(weight_map, dict):
                raise ConvertError(f"{index}: field 'weight_map' is {_brief(weight_map)}, expected an object mapping "
                                   "tensor names to shard files")
            for tensor, shard in weight_map.items():
                # A plain file name: the index must not point outside the checkpoint directory.
                if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
                    raise ConvertError(f"{index}: weight_map[{_brief(tensor)}] is {_brief(shard)}, expected the file "
                                       "name of a shard in the checkpoint directory")
            shards = [self.dir / f for f in dict.fromkeys(weight_map.values())]
            for s in shards:
                try:
                    present = s.is_file()
                except OSError as e:
                    raise ConvertError(f"{index}: shard {_brief(s.name)}: {e.strerror or e}") from None
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


def _read_json(path: Path) -> dict:
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


# --- the plan: every output tensor with its producer --------------------------------------------------------------
@dataclass
class OutTensor:
    name: str
    qtype: QT
    shape: tuple[int, ...]  # NumPy order, logical
    chunks: Callable[[], Iterator[np.ndarray]]  # the raw data, in order

    @property
    def np_dtype(self) -> type:
        """How GGUFWriter.add_tensor_info wants the data described: plain types by dtype, block types as uint8."""
        return {QT.F32: np.float32, QT.F16: np.float16, QT.BF16: np.uint16}.get(self.qtype, np.uint8)

    @property
    def raw_shape(self) -> tuple[int, ...]:
        """The shape add_tensor_info expects: logical for plain types, rows of bytes for block types."""
        if self.np_dtype is not np.uint8:
            return self.shape
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[:-1] + (self.shape[-1] // block * size,)

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * size


def _encode(x: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.F32:
        return x
    if qtype == QT.F16:
        return x.astype(np.float16)
    return gguf.quants.quantize(x, qtype)


def _dense(src: SourceTensor, qtype: QT) -> Callable[[], Iterator[np.ndarray]]:
    """A dense 2-D source matrix, in row chunks, encoded as `qtype`. BF16 -> BF16 copies the bits."""

    def gen() -> Iterator[np.ndarray]:
        rows = src.shape[0]
        step = max(1, _CHUNK_VALUES // src.shape[1])
        for r in range(0, rows, step):
            if qtype == QT.BF16 and src.dtype == "BF16":
                yield np.array(src.data[r:r + step])
            else:
                yield _encode(src.f32(slice(r, r + step)), qtype)
    return gen


def _experts_mxfp4(blocks: SourceTensor, scales: SourceTensor, rows: slice) -> Callable[[], Iterator[np.ndarray]]:
    """HF MXFP4 expert weight -> GGUF block_mxfp4 rows, one expert at a time; `rows` picks gate (0::2),
    up (1::2) or all (down)."""

    def gen() -> Iterator[np.ndarray]:
        for e in range(blocks.shape[0]):
            yield mxfp4.hf_to_gguf(np.ascontiguousarray(blocks.data[e, rows]), np.ascontiguousarray(scales.data[e, rows]))
    return gen


def _experts_dense(src: SourceTensor, cols: slice) -> Callable[[], Iterator[np.ndarray]]:
    """bf16-layout expert weight `[E, in, out]` -> GGUF MXFP4 rows `[out, in]`, one expert at a time; `cols`
    picks gate (0::2), up (1::2) or all (down) output features."""

    def gen() -> Iterator[np.ndarray]:
        for e in range(src.shape[0]):
            w = src.f32((e, slice(None), cols))  # [in, out]
            yield mxfp4.quantize_gguf(np.ascontiguousarray(w.T))
    return gen


def plan(ckpt: Checkpoint, outtype: QT) -> list[OutTensor]:
    """Check every source tensor (present, shape, dtype, nothing unexpected) and list the output tensors in
    `ModelConfig.tensor_specs()` order."""
    c = ckpt.config
    H, I, E, V = c.n_embd, c.n_ff_exp, c.n_expert, c.n_vocab
    used: set[str] = set()

    def need(name: str, shape: tuple[int, ...], dtypes: tuple[str, ...] = _DENSE_SRC) -> SourceTensor:
        t = ckpt.tensors.get(name)
        if t is None:
            raise ConvertError(f"{ckpt.dir}: missing tensor {name!r}")
        if t.shape != shape:
            raise ConvertError(f"{t.file}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        if t.dtype not in dtypes:
            raise ConvertError(f"{t.file}: tensor {name!r} has dtype {t.dtype}, expected {' or '.join(dtypes)}")
        used.add(name)
        return t

    def vec(name: str, shape: tuple[int, ...], index: Any = None) -> Callable[[], Iterator[np.ndarray]]:
        t = need(name, shape)
        return lambda: iter([np.ascontiguousarray(t.f32() if index is None else t.f32()[index])])

    out = [
        OutTensor("token_embd.weight", outtype, (V, H), _dense(need("model.embed_tokens.weight", (V, H)), outtype)),
        OutTensor("output_norm.weight", QT.F32, (H,), vec("model.norm.weight", (H,))),
        OutTensor("output.weight", outtype, (V, H), _dense(need("lm_head.weight", (V, H)), outtype)),
    ]
    even, odd, every = slice(0, None, 2), slice(1, None, 2), slice(None)
    for i in range(c.n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        a = p + "self_attn."
        m = p + "mlp."
        x = m + "experts."
        out += [
            OutTensor(b + "attn_norm.weight", QT.F32, (H,), vec(p + "input_layernorm.weight", (H,))),
            OutTensor(b + "attn_q.weight", outtype, (c.q_dim, H), _dense(need(a + "q_proj.weight", (c.q_dim, H)), outtype)),
            OutTensor(b + "attn_q.bias", QT.F32, (c.q_dim,), vec(a + "q_proj.bias", (c.q_dim,))),
            OutTensor(b + "attn_k.weight", outtype, (c.kv_dim, H), _dense(need(a + "k_proj.weight", (c.kv_dim, H)), outtype)),
            OutTensor(b + "attn_k.bias", QT.F32, (c.kv_dim,), vec(a + "k_proj.bias", (c.kv_dim,))),
            OutTensor(b + "attn_v.weight", outtype, (c.kv_dim, H), _dense(need(a + "v_proj.weight", (c.kv_dim, H)), outtype)),
            OutTensor(b + "attn_v.bias", QT.F32, (c.kv_dim,), vec(a + "v_proj.bias", (c.kv_dim,))),
            OutTensor(b + "attn_output.weight", outtype, (H, c.q_dim), _dense(need(a + "o_proj.weight", (H, c.q_dim)), outtype)),
            OutTensor(b + "attn_output.bias", QT.F32, (H,), vec(a + "o_proj.bias", (H,))),
            OutTensor(b + "attn_sinks.weight", QT.F32, (c.n_head,), vec(a + "sinks", (c.n_head,))),
            OutTensor(b + "post_attention_norm.weight", QT.F32, (H,), vec(p + "post_attention_layernorm.weight", (H,))),
            # llama.cpp keeps the router F32 whatever the outtype.
            OutTensor(b + "ffn_gate_inp.weight", QT.F32, (E, H), vec(m + "router.weight", (E, H))),
            OutTensor(b + "ffn_gate_inp.bias", QT.F32, (E,), vec(m + "router.bias", (E,))),
        ]
        gu_bias = x + "gate_up_proj_bias"
        if ckpt.layout == "mxfp4":
            gub = need(x + "gate_up_proj_blocks", (E, 2 * I, H // 32, 16), ("U8",))
            gus = need(x + "gate_up_proj_scales", (E, 2 * I, H // 32), ("U8",))
            dnb = need(x + "down_proj_blocks", (E, H, I // 32, 16), ("U8",))
            dns = need(x + "down_proj_scales", (E, H, I // 32), ("U8",))
            gate, up, down = (_experts_mxfp4(gub, gus, even), _experts_mxfp4(gub, gus, odd),
                              _experts_mxfp4(dnb, dns, every))
        else:
            gu = need(x + "gate_up_proj", (E, H, 2 * I))
            dn = need(x + "down_proj", (E, I, H))
            gate, up, down = _experts_dense(gu, even), _experts_dense(gu, odd), _experts_dense(dn, every)
        out += [
            OutTensor(b + "ffn_gate_exps.weight", QT.MXFP4, (E, I, H), gate),
            OutTensor(b + "ffn_gate_exps.bias", QT.F32, (E, I), vec(gu_bias, (E, 2 * I), (slice(None), even))),
            OutTensor(b + "ffn_up_exps.weight", QT.MXFP4, (E, I, H), up),
            OutTensor(b + "ffn_up_exps.bias", QT.F32, (E, I), vec(gu_bias, (E, 2 * I), (slice(None), odd))),
            OutTensor(b + "ffn_down_exps.weight", QT.MXFP4, (E, H, I), down),
            OutTensor(b + "ffn_down_exps.bias", QT.F32, (E, H), vec(x + "down_proj_bias", (E, H))),
        ]
    extra = sorted(set(ckpt.tensors) - used)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise ConvertError(f"{ckpt.tensors[extra[0]].file}: unexpected tensor {extra[0]!r}{more}")
    names = [s.name for s in c.tensor_specs()]
    assert [t.name for t in out] == names  # the order llama.cpp writes, from the one table
    return out


# --- tokenizer ---------------------------------------------------------------------------------------------------
@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos: int
    eos: int
    pad: int
    chat_template: str | None


def read_vocab(ckpt: Checkpoint) -> Vocab:
    """tokenizer.json + tokenizer_config.json -> the `tokenizer.ggml.*` arrays, like llama.cpp's `_set_vocab_gpt2`:
    ids without a string become `[PAD{id}]` (UNUSED), special added tokens CONTROL, the rest NORMAL."""
    path = ckpt.dir / "tokenizer.json"
    tok = _read_json(path)
    model = tok.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConvertError(f"{path}: expected a byte-level BPE model with a 'vocab'")
    if not model["vocab"]:
        raise ConvertError(f"{path}: field 'model.vocab' is empty")
    n = ckpt.config.n_vocab
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TOKEN_UNUSED] * n

    def put(field: str, text: str, i: Any, ttype: int) -> None:
        if not _is_int(i) or not 0 <= i < n:
            raise ConvertError(f"{path}: {field}: token {_brief(text)} has id {_brief(i)}, outside the vocabulary of "
                               f"{n} (config.json vocab_size)")
        if types[i] != TOKEN_UNUSED and tokens[i] != text:
            raise ConvertError(f"{path}: {field}: token {_brief(text)} has id {i}, which {_brief(tokens[i])} has too")
        tokens[i], types[i] = text, ttype

    for text, i in model["vocab"].items():
        put("model.vocab", text, i, TOKEN_NORMAL)
    added = tok.get("added_tokens") or []
    if not isinstance(added, list):
        raise ConvertError(f"{path}: field 'added_tokens' is {_brief(added)}, expected a list")
    for k, entry in enumerate(added):
        field = f"added_tokens[{k}]"
        if not isinstance(entry, dict):
            raise ConvertError(f"{path}: {field} is {_brief(entry)}, expected an object with 'id' and 'content'")
        content, special = entry.get("content"), entry.get("special", False)
        if not isinstance(content, str) or not content:
            raise ConvertError(f"{path}: {field}.content is {_brief(content)}, expected the token's text")
        if "id" not in entry:
            raise ConvertError(f"{path}: {field} ({_brief(content)}) has no 'id'")
        if not isinstance(special, bool):
            raise ConvertError(f"{path}: {field}.special is {_brief(special)}, expected true or false")
        put(field, content, entry["id"], TOKEN_CONTROL if special else TOKEN_NORMAL)
    merges_in = model.get("merges") or []
    if not isinstance(merges_in, list):
        raise ConvertError(f"{path}: field 'model.merges' is {_brief(merges_in)}, expected a list")
    merges = []
    for k, m in enumerate(merges_in):
        # "a b" (older files) or ["a", "b"]; byte-level tokens hold no spaces, so the pair splits one way only.
        pair = m.split(" ") if isinstance(m, str) else m
        a, b = pair if isinstance(pair, list) and len(pair) == 2 else (None, None)
        if not (isinstance(a, str) and isinstance(b, str) and a and b and " " not in a and " " not in b):
            raise ConvertError(f"{path}: model.merges[{k}] is {_brief(m)}, expected two tokens, \"a b\" or "
                               "[\"a\", \"b\"]")
        merges.append(f"{a} {b}")
    _check_utf8(path, "model.vocab/added_tokens", tokens)
    _check_utf8(path, "model.merges", merges)
    ids = {t: i for i, t in enumerate(tokens) if types[i] != TOKEN_UNUSED}

    cfg_path = ckpt.dir / "tokenizer_config.json"
    tcfg = _read_json(cfg_path) if cfg_path.is_file() else {}

    def special(key: str) -> int:
        field = f"{key}_token"
        value = tcfg.get(field)
        if isinstance(value, dict):  # a serialized AddedToken
            value, field = value.get("content"), field + ".content"
        if value is not None:
            if not isinstance(value, str):
                raise ConvertError(f"{cfg_path}: {field} is {_brief(value)}, expected the token's text")
            if value not in ids:
                raise ConvertError(f"{cfg_path}: {field} is {_brief(value)}, which is not a token of {path.name}")
            return ids[value]
        fallback = ckpt.hf_config.get(f"{key}_token_id")
        if isinstance(fallback, list) and fallback:
            fallback = fallback[0]
        if fallback is None:
            raise ConvertError(f"{cfg_path}: missing field '{key}_token' (and config.json has no {key}_token_id)")
        if not _is_int(fallback) or not 0 <= fallback < n:
            raise ConvertError(f"{ckpt.dir / 'config.json'}: {key}_token_id is {_brief(fallback)}, expected a token "
                               f"id below {n}")
        return fallback

    template, template_file = tcfg.get("chat_template"), cfg_path
    if isinstance(template, list):  # older transformers: [{"name": ..., "template": ...}]
        named, template = template, None
        for k, t in enumerate(named):
            if not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)):
                raise ConvertError(f"{cfg_path}: chat_template[{k}] is {_brief(t)}, expected "
                                   '{"name": ..., "template": ...}')
            if t["name"] == "default":
                template = t["template"]
    if template is not None and not isinstance(template, str):
        raise ConvertError(f"{cfg_path}: field 'chat_template' is {_brief(template)}, expected a string (a Jinja "
                           "template) or a list of named ones")
    jinja = ckpt.dir / "chat_template.jinja"
    if jinja.is_file():  # newer transformers keep it here, and it wins
        try:
            template, template_file = jinja.read_text(encoding="utf-8"), jinja
        except UnicodeDecodeError as e:
            raise ConvertError(f"{jinja}: not UTF-8 text: {e}") from None
        except OSError as e:
            raise ConvertError(f"{jinja}: cannot read: {e.strerror or e}") from None
    if template is not None:
        _check_utf8(template_file, "chat_template", [template])
    return Vocab(tokens, types, merges, special("bos"), special("eos"), special("pad"), template)


def _check_utf8(path: Path, field: str, texts: list[str]) -> None:
    """GGUF strings are UTF-8: JSON can still hold lone surrogates (\\ud800) that have no encoding."""
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        bad = next(t for t in texts if not _encodable(t))
        raise ConvertError(f"{path}: {field}: {_brief(bad)} is not valid Unicode (a lone surrogate)") from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- writing -------------------------------------------------------------------------------------------------------
class _Streamed:
    """What `GGUFWriter.write_tensor_data` needs from an array (`nbytes`, `tofile`), filled chunk by chunk."""

    def __init__(self, t: OutTensor, on_bytes: Callable[[int], None]):
        self.t, self.nbytes, self.on_bytes = t, t.nbytes, on_bytes

    def tofile(self, f) -> None:
        written = 0
        for chunk in self.t.chunks():
            raw = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
            f.write(raw.data)
            written += raw.nbytes
            self.on_bytes(raw.nbytes)
        if written != self.nbytes:
            raise AssertionError(f"{self.t.name}: produced {written} bytes, expected {self.nbytes}")


def convert(src_dir: str | os.PathLike, out_path: str | os.PathLike, *, outtype: str = "q8_0",
            progress: bool | None = None, name: str | None = None) -> Path:
    """Convert the HF checkpoint at `src_dir` to a GGUF file at `out_path`; returns the path.

    `progress`: a byte-counting bar on stderr; None shows it only when stderr is a terminal.
    Raises ConvertError (naming the file, field or tensor) for any bad input or unwritable output; on any failure
    neither OUT nor a temporary file is left behind.
    """
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    qtype = OUTTYPES[outtype]
    out = Path(out_path)
    _check_output(out)
    ckpt = Checkpoint(src_dir)
    try:
        tensors = plan(ckpt, qtype)
        vocab = read_vocab(ckpt)
        metadata = _metadata(ckpt)
        for t in tensors:  # row length must hold whole blocks of the output type
            block = GGML_QUANT_SIZES[t.qtype][0]
            if t.shape[-1] % block:
                raise ConvertError(f"{t.name}: row length {t.shape[-1]} is not a multiple of {block} ({t.qtype.name})")
        data_bytes = sum(t.nbytes + 32 for t in tensors)
        header_bytes = sum(len(s.encode()) + 16 for s in vocab.tokens + vocab.merges) + 8 * len(vocab.types) + (1 << 20)
        need = data_bytes + header_bytes
        free = shutil.disk_usage(out.parent).free
        if free < need:
            raise ConvertError(f"{out}: not enough free disk space in {out.parent}: need {need / 1e9:.2f} GB, "
                               f"have {free / 1e9:.2f} GB")
        # A directory name that is not UTF-8 (surrogate escapes) must not break the GGUF string.
        name = (name or ckpt.dir.resolve().name).encode("utf-8", "replace").decode("utf-8")
        _write(out, ckpt, tensors, vocab, metadata, name, progress)
    finally:
        ckpt.close()
    return out


def _check_output(out: Path) -> None:
    """Refuse an output path that cannot be written before any work is done."""
    parent = out.parent
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(out.name)) > name_max:
        raise ConvertError(f"{out}: the file name is {len(os.fsencode(out.name))} bytes long, the file system "
                           f"allows {name_max}")
    try:
        if not parent.is_dir():
            problem = f"{parent} is not a directory" if parent.exists() else f"directory {parent} does not exist"
            raise ConvertError(f"{out}: {problem}")
        if out.is_dir():
            raise ConvertError(f"{out}: is a directory")
    except OSError as e:  # e.g. a directory name longer than the file system allows
        raise ConvertError(f"{out}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK):
        raise ConvertError(f"{out}: directory {parent} is not writable")


# config.json's field behind each GGUF key the config fills, to name it when its value does not fit.
_HF_FIELDS = {
    config.KEY_BLOCK_COUNT: "num_hidden_layers", config.KEY_CONTEXT_LENGTH: "max_position_embeddings",
    config.KEY_EMBEDDING_LENGTH: "hidden_size", config.KEY_FEED_FORWARD_LENGTH: "intermediate_size",
    config.KEY_EXPERT_FEED_FORWARD_LENGTH: "intermediate_size", config.KEY_HEAD_COUNT: "num_attention_heads",
    config.KEY_HEAD_COUNT_KV: "num_key_value_heads", config.KEY_KEY_LENGTH: "head_dim",
    config.KEY_VALUE_LENGTH: "head_dim", config.KEY_RMS_EPS: "rms_norm_eps",
    config.KEY_SLIDING_WINDOW: "sliding_window", config.KEY_EXPERT_COUNT: "num_local_experts",
    config.KEY_EXPERT_USED_COUNT: "num_experts_per_tok", config.KEY_ROPE_FREQ_BASE: "rope_theta",
    config.KEY_ROPE_SCALING_FACTOR: "rope_scaling.factor",
    config.KEY_ROPE_SCALING_ORIG_CTX: "rope_scaling.original_max_position_embeddings",
}


def _metadata(ckpt: Checkpoint) -> dict[str, tuple[str, Any]]:
    """The config's GGUF keys, each checked to fit its GGUF type (the writer would fail with struct.error, or
    store a float that rounds to infinity or zero)."""
    metadata = ckpt.config.gguf_metadata()
    for key, (vtype, value) in metadata.items():
        if vtype == "uint32":
            fits = _is_int(value) and 0 <= value < 1 << 32
        elif vtype == "float32":
            fits = _fits_float32(value)
        else:
            fits = isinstance(value, str)
        if not fits:
            raise ConvertError(f"{ckpt.dir / 'config.json'}: {_HF_FIELDS.get(key, key)} is {_brief(value)}, which "
                               f"does not fit GGUF {key} ({vtype})")
    return metadata


def _fits_float32(value: Any) -> bool:
    """A number that stays finite as a float32, and non-zero unless it is zero."""
    if not (_is_int(value) or isinstance(value, float)):
        return False
    try:
        x = float(value)
    except OverflowError:  # an int beyond float64
        return False
    with np.errstate(over="ignore"):
        single = np.float32(x)
    return bool(np.isfinite(single)) and (single != 0 or x == 0)


def _temp_beside(out: Path) -> Path:
    """A new empty file in OUT's directory with a short name, so it fits wherever OUT's name does; created with
    the usual permissions (umask), which os.replace then gives OUT."""
    while True:
        tmp = out.with_name(f".ossrt-{secrets.token_hex(4)}.part")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _write(out: Path, ckpt: Checkpoint, tensors: list[OutTensor], vocab: Vocab,
           metadata: dict[str, tuple[str, Any]], name: str, progress: bool | None) -> None:
    from tqdm import tqdm

    w = gguf.GGUFWriter(None, ARCH)
    try:
        tmp = _temp_beside(out)
    except OSError as e:
        raise ConvertError(f"{out}: cannot write in {out.parent}: {e.strerror or e}") from None
    try:
        w.add_type("model")
        w.add_name(name)
        w.add_file_type(FILE_TYPE_MXFP4_MOE)
        w.add_quantization_version(QUANTIZATION_VERSION)
        adders = {"uint32": w.add_uint32, "float32": w.add_float32, "string": w.add_string}
        for key, (vtype, value) in metadata.items():
            adders[vtype](key, value)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-4o")
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        w.add_token_merges(vocab.merges)
        w.add_bos_token_id(vocab.bos)
        w.add_eos_token_id(vocab.eos)
        w.add_pad_token_id(vocab.pad)
        if vocab.chat_template:
            w.add_chat_template(vocab.chat_template)
        for t in tensors:
            w.add_tensor_info(t.name, t.raw_shape, t.np_dtype, t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        show = sys.stderr.isatty() if progress is None else progress
        total = sum(t.nbytes for t in tensors)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not show,
                  desc=out.name, file=sys.stderr, dynamic_ncols=True) as bar:
            for t in tensors:
                w.write_tensor_data(_Streamed(t, bar.update))
                ckpt.release()
        w.close()
        os.replace(tmp, out)
    except OSError as e:
        raise ConvertError(f"{out}: write failed: {e.strerror or e}") from None
    finally:
        # Cleanup must not raise over the error that got us here (a full disk can fail the close too).
        try:
            w.close()
        except OSError:
            pass
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
