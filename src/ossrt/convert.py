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
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from . import mxfp4
from .config import ARCH, ModelConfig
from .errors import ConfigError, ConvertError

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


def _read_shard(path: Path) -> tuple[mmap.mmap, dict[str, SourceTensor]]:
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
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"{path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise ConvertError(f"{path}: corrupt safetensors header: not a JSON object")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    whole = np.frombuffer(buf, dtype=np.uint8)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in _ST_DTYPES:
            raise ConvertError(f"{path}: tensor {name!r} has dtype {dtype}, expected one of "
                               f"{', '.join(_ST_DTYPES)}")
        itemsize = np.dtype(_ST_DTYPES[dtype]).itemsize
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise ConvertError(f"{path}: corrupt safetensors header: tensor {name!r} has {end - begin} bytes "
                               f"for shape {list(shape)} {dtype}")
        start = 8 + n + begin
        if 8 + n + end > size:
            raise ConvertError(f"{path}: file is truncated: tensor {name!r} needs bytes up to {8 + n + end}, "
                               f"file has {size}")
        raw = whole[start:start + end - begin]
        tensors[name] = SourceTensor(name, dtype, shape, path, raw.view(_ST_DTYPES[dtype]).reshape(shape))
    return buf, tensors


class Checkpoint:
    """A local HF gpt-oss checkpoint directory: config, memory-mapped tensors, tokenizer files."""

    def __init__(self, src: str | os.PathLike):
        self.dir = Path(src)
        if not self.dir.is_dir():
            raise ConvertError(f"{self.dir}: no such checkpoint directory")
        cfg_path = self.dir / "config.json"
        self.hf_config = _read_json(cfg_path)
        try:
            self.config = ModelConfig.from_hf_config(self.hf_config, str(cfg_path))
        except ConfigError as e:
            raise ConvertError(str(e)) from None
        self._maps: list[mmap.mmap] = []
        self.tensors: dict[str, SourceTensor] = {}
        for shard in self._shards():
            buf, tensors = _read_shard(shard)
            self._maps.append(buf)
            for name, t in tensors.items():
                if name in self.tensors:
                    raise ConvertError(f"{shard}: tensor {name!r} also appears in {self.tensors[name].file}")
                self.tensors[name] = t
        self.layout = "mxfp4" if any(n.endswith("_blocks") for n in self.tensors) else "bf16"

    def _shards(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConvertError(f"{index}: missing field 'weight_map'")
            shards = [self.dir / f for f in dict.fromkeys(weight_map.values())]
            for s in shards:
                if not s.is_file():
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
    if not path.is_file():
        raise ConvertError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
    n = ckpt.config.n_vocab
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TOKEN_UNUSED] * n

    def put(text: str, i: Any, ttype: int) -> None:
        if not isinstance(i, int) or not 0 <= i < n:
            raise ConvertError(f"{path}: token {text!r} has id {i!r}, outside the vocabulary of {n}")
        tokens[i], types[i] = text, ttype

    for text, i in model["vocab"].items():
        put(text, i, TOKEN_NORMAL)
    for added in tok.get("added_tokens") or []:
        put(added["content"], added["id"], TOKEN_CONTROL if added.get("special") else TOKEN_NORMAL)
    merges = []
    for m in model.get("merges") or []:
        merges.append(m if isinstance(m, str) else " ".join(m))
    ids = {t: i for i, t in enumerate(tokens) if types[i] != TOKEN_UNUSED}

    cfg_path = ckpt.dir / "tokenizer_config.json"
    tcfg = _read_json(cfg_path) if cfg_path.is_file() else {}

    def special(key: str) -> int:
        value = tcfg.get(f"{key}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in ids:
            return ids[value]
        fallback = ckpt.hf_config.get(f"{key}_token_id")
        if isinstance(fallback, list) and fallback:
            fallback = fallback[0]
        if isinstance(fallback, int):
            return fallback
        raise ConvertError(f"{cfg_path}: missing field '{key}_token' (and config.json has no {key}_token_id)")

    template = tcfg.get("chat_template")
    jinja = ckpt.dir / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # older transformers: [{"name": ..., "template": ...}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return Vocab(tokens, types, merges, special("bos"), special("eos"), special("pad"), template)


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
    Raises ConvertError (naming the file, field or tensor) for any bad input or unwritable output.
    """
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    qtype = OUTTYPES[outtype]
    out = Path(out_path)
    ckpt = Checkpoint(src_dir)
    try:
        tensors = plan(ckpt, qtype)
        vocab = read_vocab(ckpt)
        for t in tensors:  # row length must hold whole blocks of the output type
            block = GGML_QUANT_SIZES[t.qtype][0]
            if t.shape[-1] % block:
                raise ConvertError(f"{t.name}: row length {t.shape[-1]} is not a multiple of {block} ({t.qtype.name})")
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise ConvertError(f"{out}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise ConvertError(f"{out}: directory {parent} is not writable")
        data_bytes = sum(t.nbytes + 32 for t in tensors)
        header_bytes = sum(len(s.encode()) + 16 for s in vocab.tokens + vocab.merges) + 8 * len(vocab.types) + (1 << 20)
        need = data_bytes + header_bytes
        free = shutil.disk_usage(parent).free
        if free < need:
            raise ConvertError(f"{out}: not enough free disk space in {parent}: need {need / 1e9:.2f} GB, "
                               f"have {free / 1e9:.2f} GB")
        _write(out, ckpt, tensors, vocab, name or ckpt.dir.resolve().name, progress)
    finally:
        ckpt.close()
    return out


def _write(out: Path, ckpt: Checkpoint, tensors: list[OutTensor], vocab: Vocab, name: str,
           progress: bool | None) -> None:
    from tqdm import tqdm

    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    w = gguf.GGUFWriter(tmp, ARCH)
    try:
        w.add_type("model")
        w.add_name(name)
        w.add_file_type(FILE_TYPE_MXFP4_MOE)
        w.add_quantization_version(QUANTIZATION_VERSION)
        adders = {"uint32": w.add_uint32, "float32": w.add_float32, "string": w.add_string}
        for key, (vtype, value) in ckpt.config.gguf_metadata().items():
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
        try:
            w.write_header_to_file()
        except OSError as e:
            raise ConvertError(f"{out}: cannot write: {e.strerror or e}") from None
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
        w.close()
        tmp.unlink(missing_ok=True)
