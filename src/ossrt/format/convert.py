"""Hugging Face gpt-oss checkpoint -> one GGUF file in llama.cpp's conventions (spec §4, §5): the plan (which GGUF
tensor comes from which HF tensors, encoded how) and the writer.

Layouts (spec §4): the release layout with MXFP4 experts as `*_blocks`/`*_scales` (repacked bit-exactly, never
requantized), and the plain bf16 layout fine-tunes use (experts quantized with llama.cpp's MXFP4 rule).
Non-expert matrices go to `outtype` (q8_0 by default, like the published GGUFs; bf16 is lossless for bf16
sources); norms, biases, sinks and the router stay F32 as llama.cpp writes them.

Streaming: the shards are memory-mapped (`checkpoint`, `safetensors`) and each output tensor is produced and
written in chunks (rows, or one expert), so the peak RSS is a few hundred MB plus the tokenizer, whatever the model
size. The output is written to a temporary file beside OUT and renamed at the end; on any failure or Ctrl-C it is
removed.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType, Keys, LlamaFileType
from gguf.quants import quant_shape_to_byte_shape

from . import mxfp4
from .checkpoint import Checkpoint, Vocab, read_vocab
from .config import ARCH, TOKENIZER_MODEL, TOKENIZER_PRE
from .modelfile import PLAIN_DTYPES
from .safetensors import SourceTensor
from ..errors import ConvertError

OUTTYPES = {"q8_0": QT.Q8_0, "bf16": QT.BF16, "f16": QT.F16, "f32": QT.F32}

_DENSE_SRC = ("BF16", "F16", "F32")
_CHUNK_VALUES = 1 << 22  # values per chunk of a dense tensor: 16 MB as float32


# --- the plan: every output tensor with its producer --------------------------------------------------------------
@dataclass
class OutTensor:
    """A tensor of the GGUF file and what produces its data."""

    name: str
    qtype: QT
    shape: tuple[int, ...]  # NumPy order, logical
    chunks: Callable[[], Iterator[np.ndarray]]  # the raw data, in order

    @property
    def np_dtype(self) -> type:
        """How GGUFWriter.add_tensor_info wants the data described: plain types by dtype, block types as uint8."""
        return PLAIN_DTYPES.get(self.qtype, np.uint8)

    @property
    def raw_shape(self) -> tuple[int, ...]:
        """The shape add_tensor_info expects: logical for plain types, rows of bytes for block types."""
        return self.shape if self.qtype in PLAIN_DTYPES else quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def nbytes(self) -> int:
        return math.prod(quant_shape_to_byte_shape(self.shape, self.qtype))


def _dense(src: SourceTensor, qtype: QT) -> Callable[[], Iterator[np.ndarray]]:
    """A dense 2-D source matrix, in row chunks, encoded as `qtype`. BF16 -> BF16 copies the bits."""

    def gen() -> Iterator[np.ndarray]:
        rows = src.shape[0]
        step = max(1, _CHUNK_VALUES // src.shape[1])
        for r in range(0, rows, step):
            if qtype == QT.BF16 and src.dtype == "BF16":
                yield np.array(src.data[r:r + step])
            else:
                yield gguf.quants.quantize(src.f32(slice(r, r + step)), qtype)
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
    QK = mxfp4.BLOCK_VALUES
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
            gub = need(x + "gate_up_proj_blocks", (E, 2 * I, H // QK, mxfp4.CODE_BYTES), ("U8",))
            gus = need(x + "gate_up_proj_scales", (E, 2 * I, H // QK), ("U8",))
            dnb = need(x + "down_proj_blocks", (E, H, I // QK, mxfp4.CODE_BYTES), ("U8",))
            dns = need(x + "down_proj_scales", (E, H, I // QK), ("U8",))
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
    _check_output(Path(out_path))
    ckpt = Checkpoint(src_dir)
    try:
        return convert_checkpoint(ckpt, out_path, outtype=outtype, progress=progress, name=name)
    finally:
        ckpt.close()


def convert_checkpoint(ckpt: Checkpoint, out_path: str | os.PathLike, *, outtype: str = "q8_0",
                       progress: bool | None = None, name: str | None = None) -> Path:
    """`convert` from an open checkpoint (one read from shards, or one whose tensors are made as they are read);
    the caller closes it."""
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    qtype = OUTTYPES[outtype]
    out = Path(out_path)
    _check_output(out)
    tensors = plan(ckpt, qtype)
    vocab = read_vocab(ckpt)
    vocab_arrays = _vocab_arrays(vocab)
    for t in tensors:  # row length must hold whole blocks of the output type
        block = GGML_QUANT_SIZES[t.qtype][0]
        if t.shape[-1] % block:
            raise ConvertError(f"{t.name}: row length {t.shape[-1]} is not a multiple of {block} ({t.qtype.name})")
    data_bytes = sum(t.nbytes + gguf.GGUF_DEFAULT_ALIGNMENT for t in tensors)
    header_bytes = sum(len(a.raw) for a in vocab_arrays.values()) + (1 << 20)  # 1 MB: the rest, generously
    need = data_bytes + header_bytes
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise ConvertError(f"{out}: not enough free disk space in {out.parent}: need {need / 1e9:.2f} GB, "
                           f"have {free / 1e9:.2f} GB")
    # A directory name that is not UTF-8 (surrogate escapes) must not break the GGUF string.
    name = (name or ckpt.dir.resolve().name).encode("utf-8", "replace").decode("utf-8")
    _write(out, ckpt, tensors, vocab, vocab_arrays, name, progress)
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


@dataclass(frozen=True)
class _PackedArray:
    """A GGUF metadata array in its file form (element type, count, elements), packed in one pass: the gguf
    writer packs each element with a call and a type check of its own, ~1 s for o200k's 201,088 tokens and 446,189
    merges."""

    raw: bytes

    @classmethod
    def of_strings(cls, items: list[str]) -> "_PackedArray":
        length = struct.Struct("<Q").pack
        body = b"".join([length(len(b)) + b for b in (s.encode("utf-8") for s in items)])
        return cls(struct.pack("<IQ", GGUFValueType.STRING, len(items)) + body)

    @classmethod
    def of_int32(cls, items: list[int]) -> "_PackedArray":
        return cls(struct.pack("<IQ", GGUFValueType.INT32, len(items)) + np.asarray(items, dtype="<i4").tobytes())


class _Writer(gguf.GGUFWriter):
    """gguf's writer, taking `_PackedArray` values as they are (little-endian, the writer's default). The writer has
    no public way to add packed data; `_pack_val` is where it packs every value. Should gguf rename it, the base
    writer refuses a `_PackedArray` (not a sequence) loudly, and the sha256 tests of converted files fail."""

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None) -> bytes:
        if isinstance(val, _PackedArray):
            return (struct.pack("<I", vtype) if add_vtype else b"") + val.raw
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _vocab_arrays(vocab: Vocab) -> dict[str, _PackedArray]:
    """The vocabulary's `tokenizer.ggml.*` arrays, packed; an empty merges list is left out, as gguf's
    `add_token_merges` leaves it out."""
    arrays = {Keys.Tokenizer.LIST: _PackedArray.of_strings(vocab.tokens),
              Keys.Tokenizer.TOKEN_TYPE: _PackedArray.of_int32(vocab.types)}
    if vocab.merges:
        arrays[Keys.Tokenizer.MERGES] = _PackedArray.of_strings(vocab.merges)
    return arrays


def _write(out: Path, ckpt: Checkpoint, tensors: list[OutTensor], vocab: Vocab, vocab_arrays: dict[str, _PackedArray],
           name: str, progress: bool | None) -> None:
    from tqdm import tqdm

    w = _Writer(None, ARCH)
    try:
        tmp = _temp_beside(out)
    except OSError as e:
        raise ConvertError(f"{out}: cannot write in {out.parent}: {e.strerror or e}") from None
    try:
        w.add_type("model")
        w.add_name(name)
        w.add_file_type(LlamaFileType.MOSTLY_MXFP4_MOE)  # what llama.cpp writes for gpt-oss, whatever the outtype
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, (vtype, value) in ckpt.config.gguf_metadata().items():
            w.add_key_value(key, value, vtype)
        w.add_tokenizer_model(TOKENIZER_MODEL)
        w.add_tokenizer_pre(TOKENIZER_PRE)
        for key, array in vocab_arrays.items():  # in the order add_token_list/types/merges write them
            w.add_key_value(key, array, GGUFValueType.ARRAY)
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
