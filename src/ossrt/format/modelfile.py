"""Reading a gpt-oss GGUF model file: metadata, tokenizer arrays and memory-mapped tensors.

The layout is GGUF v3 as llama.cpp writes it (`gguf-py/gguf/gguf_reader.py`, `ggml/include/gguf.h`). We parse the
header ourselves instead of using `gguf.GGUFReader`: that reader builds a NumPy view for every array element,
which for the 201,088-token vocabulary and 446,189 merges costs ~13 s and ~1 GB of RAM on every start. The `gguf`
package still supplies the type constants and block sizes, and writes our files.

Tensor data is never copied: each `Tensor.data` is a view into one read-only memory map of the file. Mapped pages
are read from disk on first touch, so a cold start's first forward pass would wait on page faults: `open` can bring
the tensor data into RAM in the background (`prefetch`), or lock the whole map in RAM (`mlock`, as llama.cpp's
`--mlock`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import math
import mmap
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType, Keys
from gguf.quants import quant_shape_to_byte_shape

from .config import KEY_BLOCK_COUNT, KEY_ROPE_SCALING_TYPE, TENSORS_PER_LAYER, ModelConfig, describe_value
from ..errors import ConfigError, ModelFileError, ParameterError

_MAGIC = GGUF_MAGIC.to_bytes(4, "little")  # b"GGUF"

# GGUF metadata value types -> struct format (gguf.h `enum gguf_type`).
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_INT32, _FLOAT32, _STRING, _ARRAY = (GGUFValueType.INT32, GGUFValueType.FLOAT32, GGUFValueType.STRING,
                                     GGUFValueType.ARRAY)
# The smallest a header entry can be: a metadata key (name length, type, a 1-byte value) and a tensor info
# (name length, n_dims, one dimension, type, offset). Counts are checked against these before anything is read.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
# No file is 2^62 bytes, so no dimension can be: larger values are corrupt (and do not fit NumPy's int64 shapes).
_MAX_DIM = 2**62 - 1

# Metadata that must be arrays of one element type: llama.cpp's types (it reads token_type as raw int32).
_ARRAY_KEYS = {Keys.Tokenizer.LIST: _STRING, Keys.Tokenizer.TOKEN_TYPE: _INT32, Keys.Tokenizer.MERGES: _STRING}
# Metadata that must be strings where present.
_STRING_KEYS = (Keys.General.ARCHITECTURE, Keys.General.NAME, KEY_ROPE_SCALING_TYPE, Keys.Tokenizer.MODEL,
                Keys.Tokenizer.PRE, Keys.Tokenizer.CHAT_TEMPLATE)

# Tensor types accepted for each kind of tensor in ModelConfig.tensor_specs().
DENSE_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
               GGMLQuantizationType.Q8_0)
ALLOWED_TYPES = {
    "vector": (GGMLQuantizationType.F32,),
    "matrix": DENSE_TYPES,
    "router": DENSE_TYPES,
    "experts": (GGMLQuantizationType.MXFP4,),
}
# How `Tensor.data` holds each plain (not block) type; block types are rows of bytes.
PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.BF16: np.uint16,  # bit patterns; bf16 -> f32 is a 16-bit left shift
}

# The prefetch thread populates (or reads) this much per call, and queues read-ahead this far beyond it.
_PREFETCH_CHUNK = 16 << 20
_PREFETCH_AHEAD = 256 << 20
_MADV_POPULATE_READ = 22  # Linux 5.14+ (linux/mman.h); not among Python 3.11's mmap constants


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
        return math.prod(self.shape)


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

    def __repr__(self) -> str:
        return f"an array of {self.count} {_type_name(self.elem_type)} values"

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
                 data_start: int, alignment: int):
        self.path = path
        self._buf = buf
        self._fields = fields
        self.version: int = fields["GGUF.version"]
        self.file_size = len(buf)
        self._check_metadata_types()
        self.config = self._read_config()
        self.tensors = self._map_tensors(infos, data_start, alignment)
        self._validate_tensors()
        self.prefetch_thread: threading.Thread | None = None  # see start_prefetch
        self._prefetch_stop = threading.Event()
        self.locked = False

    # --- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, prefetch: bool = False, mlock: bool = False) -> "ModelFile":
        """Open and validate `path`. `prefetch`: read the tensor data into the page cache in the background
        (`start_prefetch`). `mlock`: read it all now and lock it in RAM (`lock_in_ram`; ParameterError when the
        locked-memory limit is too low); prefetching is then moot."""
        model_file = cls._open(Path(path))
        if mlock:
            model_file.lock_in_ram()
        elif prefetch:
            model_file.start_prefetch()
        return model_file

    @classmethod
    def _open(cls, path: Path) -> "ModelFile":
        try:  # a name too long, a permission or an I/O error: the OS's words, naming the path
            if not path.exists():
                raise ModelFileError(f"{path}: no such file")
            if not path.is_file():
                raise ModelFileError(f"{path}: not a file")
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise ModelFileError(f"{path}: not a GGUF file (only {size} bytes)")
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelFileError(f"{path}: cannot open: {e.strerror or e}") from None
        try:
            fields, infos, data_start, alignment = _parse_header(buf, path)
            return cls(path, buf, fields, infos, data_start, alignment)
        except BaseException:
            try:
                buf.close()
            except BufferError:  # tensor views made before the failure still hold it; GC releases the map
                pass
            raise

    def close(self) -> None:
        # Views into the map may still be alive in callers; the map (and any lock on it) is released when they are.
        self.tensors = {}
        self._prefetch_stop.set()

    # --- keeping the map in RAM --------------------------------------------------------------------------
    def start_prefetch(self, skip: Callable[[str], bool] | None = None) -> threading.Thread | None:
        """Bring the tensor data into RAM in the background, in the order a forward pass first needs it
        (`_ranges_in_use_order`), so the first forward pass finds it there instead of waiting on a page fault per
        piece. A daemon thread does it: it neither blocks loading nor keeps the process alive, holds no GIL while
        waiting on the disk, and stops at `close()`. On Linux it maps the pages into this process (madvise
        MADV_POPULATE_READ, 16 MiB at a time) with MADV_WILLNEED queued 256 MiB ahead so the disk always has work;
        elsewhere, or on kernels before 5.14, it reads the file. Skipped, returning None, when the data does not
        fit in the available RAM: it would only push out pages read earlier. Tensors whose names `skip` accepts
        are left out (experts read through an expert cache). The thread is also kept in `prefetch_thread`.

        Measured on the 20b's 11.3 GiB file from a cold cache, with other page cache competing for RAM: populating
        took 9.8 s (the disk's speed) and all of the file stayed cached; reading it took 17 s and only 6.5 GiB
        stayed (pages read once and not mapped are the first reclaimed); touching each page from NumPy took 25 s;
        MADV_WILLNEED alone returned in 0.3 s, but the kernel dropped much of the read-ahead it queued. The first
        token of a 79-token chat prompt right after a cold load came after 7.9 s instead of 14.3 s (4.6 s warm;
        benchmarks/bench_cold_start.py)."""
        ranges = self._ranges_in_use_order(skip)
        available = available_ram()
        if available is None or sum(end - start for start, end in ranges) > available:
            return None
        whole = np.frombuffer(self._buf, dtype=np.uint8)  # the thread's reference keeps the map alive
        chunks = [(offset, min(_PREFETCH_CHUNK, end - offset))
                  for start, end in ranges for offset in range(start, end, _PREFETCH_CHUNK)]
        self.prefetch_thread = threading.Thread(target=_prefetch, name=f"prefetch {self.path.name}", daemon=True,
                                                args=(whole, self.path, chunks, self._prefetch_stop))
        self.prefetch_thread.start()
        return self.prefetch_thread

    def _ranges_in_use_order(self, skip: Callable[[str], bool] | None = None) -> list[tuple[int, int]]:
        """The tensor data as page-aligned byte ranges, in the order a forward pass first needs it: layer by layer,
        then the output head; the token embeddings last, as a prompt reads only its own rows of them (the file
        holds them and the head first)."""
        last = self.config.n_layer

        def rank(name: str) -> int:
            if name.startswith("blk."):
                return int(name.split(".")[1])
            return last if name.startswith("output") else last + 1

        ranges: list[list[int]] = []
        extents = [(rank(name), start, end) for start, end, name in self._extents if skip is None or not skip(name)]
        for _, start, end in sorted(extents):
            start -= start % mmap.PAGESIZE  # madvise takes page-aligned addresses
            if ranges and ranges[-1][0] <= start <= ranges[-1][1]:  # it goes on where the last range ends
                ranges[-1][1] = max(ranges[-1][1], end)
            else:
                ranges.append([start, end])
        return [(start, end) for start, end in ranges]

    def offset(self, name: str) -> int:
        """Where tensor `name`'s data starts in the file, for reading it without the map (`engine.expert_cache`)."""
        return next(start for start, _, tensor in self._extents if tensor == name)

    def lock_in_ram(self) -> None:
        """Read the whole file and lock it in RAM (mlock(2)), so no page of it is ever evicted or read again.
        ParameterError, naming RLIMIT_MEMLOCK and the fix, when the OS refuses."""
        libc = _libc()
        if libc is None:
            raise ParameterError("mlock: locking a model in RAM needs a POSIX system with mlock(2)")
        view = np.frombuffer(self._buf, dtype=np.uint8)  # for the map's address; released below
        address = view.ctypes.data
        del view
        if libc.mlock(address, self.file_size) != 0:
            raise ParameterError(_mlock_failure(self.path, self.file_size, ctypes.get_errno()))
        self.locked = True

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
        return self._need_list(Keys.Tokenizer.LIST)

    @property
    def tokenizer_token_types(self) -> list[int]:
        return self._need_list(Keys.Tokenizer.TOKEN_TYPE)

    @property
    def tokenizer_merges(self) -> list[str]:
        return self.get(Keys.Tokenizer.MERGES, [])

    @property
    def chat_template(self) -> str | None:
        return self.get(Keys.Tokenizer.CHAT_TEMPLATE)

    def _need_list(self, key: str) -> list:
        value = self.get(key)
        if not isinstance(value, list):
            raise ModelFileError(f"{self.path}: metadata key {key!r} is missing or not an array")
        return value

    def _check_metadata_types(self) -> None:
        """Element types of the tokenizer arrays and types of the string keys; from the header alone, so the
        vocabulary is not decoded here."""
        for key, elem_type in _ARRAY_KEYS.items():
            value = self._fields.get(key)
            if value is not None and not (isinstance(value, _LazyArray) and value.elem_type == elem_type):
                raise ModelFileError(f"{self.path}: metadata key {key!r} must be an array of "
                                     f"{_type_name(elem_type)} values, got {describe_value(value)}")
        for key in _STRING_KEYS:
            value = self._fields.get(key)
            if value is not None and not isinstance(value, str):
                raise ModelFileError(f"{self.path}: metadata key {key!r} must be a string, got {describe_value(value)}")
        tokens, types = self._fields.get(Keys.Tokenizer.LIST), self._fields.get(Keys.Tokenizer.TOKEN_TYPE)
        if tokens is not None and types is not None and len(tokens) != len(types):
            raise ModelFileError(f"{self.path}: {Keys.Tokenizer.LIST} has {len(tokens)} entries but "
                                 f"{Keys.Tokenizer.TOKEN_TYPE} has {len(types)}")

    # --- tensors -----------------------------------------------------------------------------------------
    def _read_config(self) -> ModelConfig:
        try:  # from_gguf needs only len() of the token array, so lazy arrays stay undecoded
            return ModelConfig.from_gguf(self._fields.get, str(self.path))
        except ConfigError as e:
            raise ModelFileError(str(e)) from None

    def _map_tensors(self, infos: list[_TensorInfo], data_start: int, alignment: int) -> dict[str, Tensor]:
        """Views of each tensor's data, after checking that it lies wholly in the file at an aligned offset and
        overlaps no other tensor (sizes in Python ints: a corrupt shape cannot overflow)."""
        whole = np.frombuffer(self._buf, dtype=np.uint8)
        tensors: dict[str, Tensor] = {}
        extents: list[tuple[int, int, str]] = []
        for info in infos:
            try:
                qtype = GGMLQuantizationType(info.type_id)
            except ValueError:
                raise ModelFileError(f"{self.path}: tensor {info.name!r} has unknown ggml type {info.type_id}") from None
            block = GGML_QUANT_SIZES[qtype][0]
            if not info.shape or info.shape[-1] % block:
                raise ModelFileError(f"{self.path}: tensor {info.name!r} shape {info.shape} does not fit "
                                     f"{qtype.name} blocks of {block}")
            if info.offset % alignment:
                raise ModelFileError(f"{self.path}: tensor {info.name!r} has offset {info.offset}, not a multiple of "
                                     f"the alignment {alignment}")
            byte_shape = quant_shape_to_byte_shape(info.shape, qtype)
            nbytes = math.prod(byte_shape)
            start = data_start + info.offset
            if start + nbytes > self.file_size:
                raise ModelFileError(f"{self.path}: file is truncated or corrupt: tensor {info.name!r} "
                                     f"({qtype.name} {info.shape}) needs bytes {start}..{start + nbytes}, the file "
                                     f"has {self.file_size}")
            if nbytes:
                extents.append((start, start + nbytes, info.name))
            raw = whole[start:start + nbytes]
            if qtype in PLAIN_DTYPES:
                data = raw.view(PLAIN_DTYPES[qtype]).reshape(info.shape)
            else:
                data = raw.reshape(byte_shape)
            tensors[info.name] = Tensor(info.name, qtype, info.shape, data)
        extents.sort(key=lambda extent: extent[0])  # stable: tensors at one offset stay in file order
        for (start_a, end_a, a), (start_b, end_b, b) in zip(extents, extents[1:]):
            if start_b < end_a:
                raise ModelFileError(f"{self.path}: tensors {a!r} (bytes {start_a}..{end_a}) and {b!r} (bytes "
                                     f"{start_b}..{end_b}) overlap")
        self._extents = extents
        return tensors

    def _validate_tensors(self) -> None:
        c = self.config
        if len(self.tensors) < c.n_tensors:
            # Some expected tensor is absent. A corrupt block_count must not build a huge table to say which:
            # the first layers that the file's tensors could fill already lack one.
            layers = min(c.n_layer, (len(self.tensors) - 3) // TENSORS_PER_LAYER + 1)
            partial = dataclasses.replace(c, n_layer=max(layers, 1))
            missing = next(s.name for s in partial.tensor_specs() if s.name not in self.tensors)
            raise ModelFileError(f"{self.path}: missing tensor {missing!r} ({KEY_BLOCK_COUNT} is {c.n_layer}: "
                                 f"{c.n_tensors} tensors expected, the file has {len(self.tensors)})")
        for spec in c.tensor_specs():
            t = self.tensors.get(spec.name)
            if t is None:
                raise ModelFileError(f"{self.path}: missing tensor {spec.name!r}")
            if t.shape != spec.shape:
                raise ModelFileError(f"{self.path}: tensor {spec.name!r} has shape {t.shape}, expected {spec.shape}")
            allowed = ALLOWED_TYPES[spec.kind]
            if t.type not in allowed:
                names = ", ".join(a.name for a in allowed)
                raise ModelFileError(f"{self.path}: tensor {spec.name!r} has type {t.type.name}, expected {names}")


def available_ram() -> int | None:
    """Bytes of RAM the kernel could give without swapping (Linux's MemAvailable, which counts reclaimable page
    cache), else the free pages sysconf reports; None where neither is known."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, for madvise and mlock (ctypes calls release the GIL); None off POSIX."""
    name = ctypes.util.find_library("c") if os.name == "posix" else None
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return libc


def _prefetch(whole: np.ndarray, path: Path, chunks: list[tuple[int, int]], stop: threading.Event) -> None:
    """The prefetch thread: bring the (offset, size) chunks of the mapped file `whole` into RAM in order, until
    done or `stop` is set."""
    try:
        _read(path, chunks[_populate(whole, chunks, stop):], stop)
    except OSError:  # only speed is lost: the map reads what it needs itself
        pass


def _populate(whole: np.ndarray, chunks: list[tuple[int, int]], stop: threading.Event) -> int:
    """Map the chunks into this process (Linux 5.14+), with read-ahead queued for those that follow. Returns how
    many it did: all, or up to the one the kernel refused (an older kernel, another OS)."""
    libc = _libc()
    if libc is None or not sys.platform.startswith("linux"):
        return 0
    address = whole.ctypes.data
    ahead = _PREFETCH_AHEAD // _PREFETCH_CHUNK
    for i, (offset, size) in enumerate(chunks):
        if stop.is_set():
            return len(chunks)
        for later, later_size in chunks[i:i + ahead] if i == 0 else chunks[i + ahead - 1:i + ahead]:
            libc.madvise(address + later, later_size, mmap.MADV_WILLNEED)
        if libc.madvise(address + offset, size, _MADV_POPULATE_READ) != 0:
            return i
    return len(chunks)


def _read(path: Path, chunks: list[tuple[int, int]], stop: threading.Event) -> None:
    """Read the (offset, size) chunks of `path` into the page cache and drop them, until done or `stop` is set."""
    buffer = memoryview(bytearray(_PREFETCH_CHUNK))
    with open(path, "rb", buffering=0) as f:
        for offset, size in chunks:
            if stop.is_set():
                return
            f.seek(offset)
            f.readinto(buffer[:size])


def _mlock_failure(path: Path, size: int, errno_value: int) -> str:
    """What went wrong, the limit, and how to raise it."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else _bytes_text(soft)
    available = available_ram()
    ram = f", {_bytes_text(available)} of RAM available" if available is not None else ""
    return (f"mlock: cannot lock {path} ({_bytes_text(size)}) in RAM: {os.strerror(errno_value)}; the locked-memory "
            f"limit (RLIMIT_MEMLOCK) is {limit}{ram}. Raise the limit with `ulimit -l unlimited` (systemd: "
            f"LimitMEMLOCK=infinity; or memlock in /etc/security/limits.conf), or load without mlock")


def _bytes_text(n: int) -> str:
    power = min(3, max(0, (n.bit_length() - 1) // 10))  # bytes, KiB, MiB or GiB
    return f"{n} bytes" if power == 0 else f"{n / 1024**power:.1f} {('KiB', 'MiB', 'GiB')[power - 1]}"


def _parse_header(buf: mmap.mmap, path: Path) -> tuple[dict[str, Any], list[_TensorInfo], int, int]:
    """Metadata, tensor infos, where the tensor data starts and the alignment."""
    cur = _Cursor(buf, path)
    if buf[:4] != _MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
    cur.pos = 4
    version = cur.unpack("I")
    if version not in (2, 3):
        hint = " (big-endian file?)" if version > 0xFFFF else ""
        raise ModelFileError(f"{path}: unsupported GGUF version {version}{hint}; expected 3")
    n_tensors, n_kv = cur.unpack("QQ")
    # Bounds that a well-formed header cannot exceed, checked before reading any entry.
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > len(buf) - cur.pos:
        raise ModelFileError(f"{path}: corrupt header ({n_tensors} tensors, {n_kv} metadata keys in a file of "
                             f"{len(buf)} bytes)")

    fields: dict[str, Any] = {"GGUF.version": version}
    for _ in range(n_kv):
        key = cur.string()
        if key in fields:
            raise ModelFileError(f"{path}: metadata key {key!r} appears twice")
        vtype = cur.unpack("I")
        fields[key] = _read_value(cur, vtype, key)

    infos: dict[str, _TensorInfo] = {}
    for _ in range(n_tensors):
        name = cur.string()
        if name in infos:
            raise ModelFileError(f"{path}: tensor {name!r} appears twice")
        n_dims = cur.unpack("I")
        if not 1 <= n_dims <= 4:
            raise ModelFileError(f"{path}: tensor {name!r} has {n_dims} dimensions")
        ne = cur.unpack(f"{n_dims}Q")
        ne = (ne,) if n_dims == 1 else ne
        if max(ne) > _MAX_DIM:
            raise ModelFileError(f"{path}: tensor {name!r} has dimension {max(ne)}, more than any file can hold")
        type_id, offset = cur.unpack("IQ")
        infos[name] = _TensorInfo(name, tuple(int(n) for n in reversed(ne)), type_id, offset)

    alignment = fields.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{path}: {Keys.General.ALIGNMENT} is {describe_value(alignment)}, expected a power "
                             "of two")
    data_start = -(-cur.pos // alignment) * alignment
    return fields, list(infos.values()), data_start, alignment


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype == _STRING:
        return cur.string()
    if vtype == _FLOAT32:  # f32: the shortest decimal that round-trips, so 1e-5 reads back as 1e-5, not 9.9999997e-06
        return float(str(np.float32(cur.unpack("f"))))
    if vtype in _SCALAR_FORMATS:
        return cur.unpack(_SCALAR_FORMATS[vtype])
    if vtype == _ARRAY:
        elem_type, count = cur.unpack("IQ")
        if elem_type == _STRING:
            if count > (len(cur.buf) - cur.pos) // 8:  # each string takes at least its 8-byte length
                raise ModelFileError(f"{cur.path}: file is truncated inside metadata array {key!r} "
                                     f"({count} strings)")
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


def _type_name(vtype: int) -> str:
    """A GGUF value type by name, as gguf.h spells it: "uint32", "string"."""
    return GGUFValueType(vtype).name.lower()
