"""Reading one safetensors shard: its header, validated, and its tensors memory-mapped (never copied).

The format: an 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}` (offsets
relative to the end of the header), then the data. We parse the header ourselves, which lets us name a truncated
shard and refuse overlapping or mis-sized entries before any tensor is used.
"""

from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import describe_value, is_int
from ..errors import ConvertError

# safetensors dtypes gpt-oss checkpoints use, as stored (BF16 as its uint16 bit patterns).
DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "U8": np.uint8}
# A larger header is corrupt: real ones take kilobytes (the safetensors library's own limit is 100 MB too).
_MAX_HEADER_BYTES = 100 << 20


@dataclass
class SourceTensor:
    """A tensor of a checkpoint shard."""

    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: Path
    data: np.ndarray  # memory-mapped, raw dtype (BF16 as uint16)

    def f32(self, index: Any = ...) -> np.ndarray:
        """float32 copy of data[index]."""
        x = self.data[index]
        if self.dtype == "BF16":  # bf16 is the top half of a float32
            return (x.astype(np.uint32) << 16).view(np.float32)
        return x.astype(np.float32)


def read_shard(path: Path) -> tuple[mmap.mmap, dict[str, SourceTensor]]:
    """The shard's memory map (close it when done) and its tensors by name, each checked against the header and
    the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path}: not a safetensors file (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER_BYTES):
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
        tensors[name] = SourceTensor(name, dtype, shape, path, raw.view(DTYPES[dtype]).reshape(shape))
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ConvertError(f"{path}: corrupt safetensors header: the data of tensors {describe_value(a)} and "
                               f"{describe_value(b)} overlap")
    return buf, tensors


def _header_entry(path: Path, name: str, info: Any, data_start: int,
                  size: int) -> tuple[str, tuple[int, ...], list[int]]:
    """dtype, shape and data_offsets (relative to `data_start`, the end of the header) of one safetensors header
    entry, checked against each other and the file's `size`."""
    where = f"{path}: tensor {describe_value(name)}"
    if not isinstance(info, dict):
        raise ConvertError(f"{where}: header entry is {describe_value(info)}, expected an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ConvertError(f"{where} has dtype {describe_value(dtype)}, expected one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise ConvertError(f"{where}: field 'shape' is {describe_value(shape)}, expected a list of non-negative "
                           "integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        raise ConvertError(f"{where}: field 'data_offsets' is {describe_value(offsets)}, expected two integers "
                           "[begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ConvertError(f"{where}: field 'data_offsets' is {offsets}, expected 0 <= begin <= end")
    if data_start + end > size:
        raise ConvertError(f"{path}: file is truncated: tensor {describe_value(name)} needs bytes up to "
                           f"{data_start + end}, file has {size}")
    nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if end - begin != nbytes:
        raise ConvertError(f"{where}: data_offsets {offsets} hold {end - begin} bytes, shape {shape} {dtype} needs "
                           f"{nbytes}")
    return dtype, tuple(shape), offsets
