"""Reading a gpt-oss GGUF model file: metadata, tokenizer arrays and memory-mapped tensors.

The layout is GGUF v3 as llama.cpp writes it (`gguf-py/gguf/gguf_reader.py`, `ggml/include/gguf.h`). We parse the
header ourselves instead of using `gguf.GGUFReader`: that reader builds a NumPy view for every array element,
which for the 201,088-token vocabulary and 446,189 merges costs ~13 s and ~1 GB of RAM on every start. The `gguf`
package still supplies the type constants and block sizes, and writes our files.

Tensor data is never copied: each `Tensor.data` is a view into one read-only memory map of the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .config import ModelConfig
from .errors import ConfigError, ModelFileError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format (gguf.h `enum gguf_type`).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# Tensor types accepted for each kind of tensor in ModelConfig.tensor_specs().
DENSE_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
               GGMLQuantizationType.Q8_0)
ALLOWED_TYPES = {
    "vector": (GGMLQuantizationType.F32,),
    "matrix": DENSE_TYPES,
    "router": DENSE_TYPES,
    "experts": (GGMLQuantizationType.MXFP4,),
}
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.BF16: np.uint16,  # bit patterns; bf16 -> f32 is a 16-bit left shift
}


@dataclass(frozen=True)
class Tensor:
    """A tensor of the model file. `shape` is NumPy order; `data` is the raw memory-mapped data:
    F32 → float32 of `shape`, F16 → float16, BF16 → uint16, block types (Q8_0, MXFP4) → uint8 of
    `shape[:-1] + (row_bytes,)`."""

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int


class _Cursor:
    """Sequential little-endian reads over the mapped header, with truncation reported as a file error."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise ModelFileError(f"{self.path}: file is truncated (header ends at byte {len(self.buf)})")
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        raw = self.string_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(f"{self.path}: invalid UTF-8 in a header string at byte {self.pos}") from None

    def string_bytes(self) -> bytes:
        n = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise ModelFileError(f"{self.path}: file is truncated (string of {n} bytes at byte {self.pos})")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw


class _LazyArray:
    """A metadata array whose elements are decoded only when asked for (the vocabulary is large)."""

    def __init__(self, buf: mmap.mmap, start: int, elem_type: int, count: int):
        self.buf, self.start, self.elem_type, self.count = buf, start, elem_type, count

    def __len__(self) -> int:
        return self.count

    def decode(self, path: Path) -> list:
        cur = _Cursor(self.buf, path)
        cur.pos = self.start
        if self.elem_type == _STRING:
            return [cur.string_bytes().decode("utf-8", errors="surrogateescape") for _ in range(self.count)]
        fmt = _SCALAR_FORMATS[self.elem_type]
        size = struct.calcsize("<" + fmt)
        end = self.start + size * self.count
        if end > len(self.buf):
            raise ModelFileError(f"{path}: file is truncated (array of {self.count} values at byte {self.start})")
        return list(struct.unpack_from(f"<{self.count}{fmt}", self.buf, self.start))


class ModelFile:
    """An open, validated gpt-oss GGUF file. Use `ModelFile.open(path)`; close it (or use `with`) when done."""

    def __init__(self, path: Path, buf: mmap.mmap, fields: dict[str, Any], infos: list[_TensorInfo],
                 data_start: int):
        self.path = path
        self._buf = buf
        self._fields = fields
        self.version: int = fields["GGUF.version"]
        self.file_size = len(buf)
        self.config = self._read_config()
        self.tensors = self._map_tensors(infos, data_start)
        self._validate_tensors()

    # --- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "ModelFile":
        path = Path(path)
        if not path.exists():
            raise ModelFileError(f"{path}: no such file")
        if not path.is_file():
            raise ModelFileError(f"{path}: not a file")
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:
                raise ModelFileError(f"{path}: not a GGUF file (only {os.fstat(f.fileno()).st_size} bytes)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            fields, infos, data_start = _parse_header(buf, path)
            return cls(path, buf, fields, infos, data_start)
        except BaseException:
            try:
                buf.close()
            except BufferError:  # tensor views made before the failure still hold it; GC releases the map
                pass
            raise

    def close(self) -> None:
        # Views into the map may still be alive in callers; the map is released when they are.
        self.tensors = {}

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- metadata ----------------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value as plain Python (str, int, float, bool or list), or `default`."""
        value = self._fields.get(key, default)
        if isinstance(value, _LazyArray):
            value = value.decode(self.path)
            self._fields[key] = value
        return value

    def keys(self) -> list[str]:
        return list(self._fields)

    @property
    def tokenizer_tokens(self) -> list[str]:
        return self._need_list("tokenizer.ggml.tokens")

    @property
    def tokenizer_token_types(self) -> list[int]:
        return self._need_list("tokenizer.ggml.token_type")

    @property
    def tokenizer_merges(self) -> list[str]:
        return self.get("tokenizer.ggml.merges", [])

    @property
    def chat_template(self) -> str | None:
        return self.get("tokenizer.chat_template")

    def _need_list(self, key: str) -> list:
        value = self.get(key)
        if not isinstance(value, list):
            raise ModelFileError(f"{self.path}: metadata key {key!r} is missing or not an array")
        return value

    # --- tensors -----------------------------------------------------------------------------------------
    def _read_config(self) -> ModelConfig:
        try:  # from_gguf needs only len() of the token array, so lazy arrays stay undecoded
            return ModelConfig.from_gguf(self._fields.get, str(self.path))
        except ConfigError as e:
            raise ModelFileError(str(e)) from None

    def _map_tensors(self, infos: list[_TensorInfo], data_start: int) -> dict[str, Tensor]:
        whole = np.frombuffer(self._buf, dtype=np.uint8)
        tensors: dict[str, Tensor] = {}
        for info in infos:
            try:
                qtype = GGMLQuantizationType(info.type_id)
            except ValueError:
                raise ModelFileError(f"{self.path}: tensor {info.name!r} has unknown ggml type {info.type_id}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            if not info.shape or info.shape[-1] % block:
                raise ModelFileError(f"{self.path}: tensor {info.name!r} shape {info.shape} does not fit "
                                     f"{qtype.name} blocks of {block}")
            row_bytes = info.shape[-1] // block * type_size
            n_rows = int(np.prod(info.shape[:-1], dtype=np.int64))
            nbytes = n_rows * row_bytes
            start = data_start + info.offset
            if start + nbytes > self.file_size:
                raise ModelFileError(f"{self.path}: file is truncated: tensor {info.name!r} needs bytes "
                                     f"{start}..{start + nbytes}, file has {self.file_size}")
            raw = whole[start:start + nbytes]
            if qtype in _PLAIN_DTYPES:
                data = raw.view(_PLAIN_DTYPES[qtype]).reshape(info.shape)
            else:
                data = raw.reshape(info.shape[:-1] + (row_bytes,))
            tensors[info.name] = Tensor(info.name, qtype, info.shape, data)
        return tensors

    def _validate_tensors(self) -> None:
        for spec in self.config.tensor_specs():
            t = self.tensors.get(spec.name)
            if t is None:
                raise ModelFileError(f"{self.path}: missing tensor {spec.name!r}")
            if t.shape != spec.shape:
                raise ModelFileError(f"{self.path}: tensor {spec.name!r} has shape {t.shape}, expected {spec.shape}")
            allowed = ALLOWED_TYPES[spec.kind]
            if t.type not in allowed:
                names = ", ".join(a.name for a in allowed)
                raise ModelFileError(f"{self.path}: tensor {spec.name!r} has type {t.type.name}, expected {names}")


def _parse_header(buf: mmap.mmap, path: Path) -> tuple[dict[str, Any], list[_TensorInfo], int]:
    cur = _Cursor(buf, path)
    if buf[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
    cur.pos = 4
    version = cur.unpack("I")
    if version not in (2, 3):
        hint = " (big-endian file?)" if version > 0xFFFF else ""
        raise ModelFileError(f"{path}: unsupported GGUF version {version}{hint}; expected 3")
    n_tensors, n_kv = cur.unpack("QQ")
    # Bounds that a well-formed header cannot exceed: each tensor info and each KV takes >= 8 bytes.
    if n_tensors > len(buf) // 8 or n_kv > len(buf) // 8:
        raise ModelFileError(f"{path}: corrupt header ({n_tensors} tensors, {n_kv} metadata keys)")

    fields: dict[str, Any] = {"GGUF.version": version}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.unpack("I")
        fields[key] = _read_value(cur, vtype, key)

    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("I")
        if not 1 <= n_dims <= 4:
            raise ModelFileError(f"{path}: tensor {name!r} has {n_dims} dimensions")
        ne = cur.unpack(f"{n_dims}Q")
        ne = (ne,) if n_dims == 1 else ne
        type_id, offset = cur.unpack("IQ")
        infos.append(_TensorInfo(name, tuple(int(n) for n in reversed(ne)), type_id, offset))

    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{path}: general.alignment is {alignment!r}, expected a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    return fields, infos, data_start


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype == _STRING:
        return cur.string()
    if vtype == 6:  # f32: the shortest decimal that round-trips, so 1e-5 reads back as 1e-5, not 9.9999997e-06
        return float(str(np.float32(cur.unpack("f"))))
    if vtype in _SCALAR_FORMATS:
        return cur.unpack(_SCALAR_FORMATS[vtype])
    if vtype == _ARRAY:
        elem_type, count = cur.unpack("IQ")
        if elem_type == _STRING:
            start = pos = cur.pos
            buf, end, unpack = cur.buf, len(cur.buf) - 8, struct.Struct("<Q").unpack_from
            for _ in range(count):  # skip over the strings; they are decoded on demand
                if pos > end:
                    break
                pos += 8 + unpack(buf, pos)[0]
            else:
                if pos <= len(buf):
                    cur.pos = pos
                    return _LazyArray(buf, start, elem_type, count)
            raise ModelFileError(f"{cur.path}: file is truncated inside metadata array {key!r}")
        if elem_type in _SCALAR_FORMATS:
            start = cur.pos
            cur.pos += struct.calcsize("<" + _SCALAR_FORMATS[elem_type]) * count
            if cur.pos > len(cur.buf):
                raise ModelFileError(f"{cur.path}: file is truncated inside metadata array {key!r}")
            return _LazyArray(cur.buf, start, elem_type, count)
        raise ModelFileError(f"{cur.path}: metadata array {key!r} has unsupported element type {elem_type}")
    raise ModelFileError(f"{cur.path}: metadata key {key!r} has unknown value type {vtype}")
