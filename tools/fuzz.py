#!/usr/bin/env python3
"""Seeded fuzzing of what users hand ossrt: GGUF files, checkpoint directories, HTTP requests, API arguments and
command lines.

    python tools/fuzz.py --count 1000 [--seed 0] [--surface gguf,convert,server,api,cli] [--show other]

Every case ends as one of:
  clean     refused as expected: an OssrtError from the library, exit 2 with an error line from the CLI, a 4xx
            with OpenAI's error body from the server;
  same      accepted with the unmutated input's result (the same logits for a GGUF mutation);
  accepted  accepted where a different result is legitimate (a flipped header byte may still make a valid file);
  other     anything else: a traceback, a 500, an exception that is not an OssrtError, a file left behind, a
            mutation that must be refused (a duplicate key, overlapping tensors) accepted, or a mutation that
            must not change the model giving other logits. Every `other` is a bug.

tests/test_fuzz.py runs a few hundred cases of each surface with fixed seeds; this script is for long runs by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

OUTCOMES = ("clean", "same", "accepted", "other")


@dataclass
class Result:
    surface: str
    case: str
    outcome: str
    detail: str = ""


@dataclass
class Tally:
    results: list[Result] = field(default_factory=list)

    def add(self, r: Result) -> Result:
        self.results.append(r)
        return r

    def counts(self, surface: str | None = None) -> Counter:
        return Counter(r.outcome for r in self.results if surface in (None, r.surface))

    def others(self) -> list[Result]:
        return [r for r in self.results if r.outcome == "other"]


# Values that break naive code: wrong JSON types, edge numbers, odd strings.
NASTY: list[Any] = [None, True, False, 0, -1, 1, 2, 0.5, -0.0, 1e30, -1e30, 2 ** 31, 2 ** 63, 2 ** 70, -2 ** 63,
                    "", "4", "abc", "\ud800", "\x00", "é" * 3, "x" * 5000, [], [1], ["a"], [None], {}, {"a": 1},
                    {"type": 5}, [[[[]]]]]


def _nasty(rng: random.Random) -> Any:
    return rng.choice(NASTY)


# --- GGUF: a raw codec that can write what no valid writer would ------------------------------------------------------
_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)


def _str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _scalar(vtype: int, value: Any) -> bytes:
    return _str(value) if vtype == _STRING else struct.pack("<" + _FMT[vtype], value)


def _array(elem: int, values: list) -> bytes:
    return struct.pack("<IQ", elem, len(values)) + b"".join(_scalar(elem, v) for v in values)


@dataclass(frozen=True)
class KV:
    key: bytes
    vtype: int
    payload: bytes  # the encoded value after the type field

    @property
    def value(self) -> Any:
        if self.vtype == _STRING:
            return self.payload[8:]
        return struct.unpack("<" + _FMT[self.vtype], self.payload)[0] if self.vtype in _FMT else None


@dataclass(frozen=True)
class TensorInfo:
    name: bytes
    dims: tuple[int, ...]  # ggml order (fastest first)
    type_id: int
    offset: int


@dataclass
class GGUF:
    magic: bytes
    version: int
    kvs: list[KV]
    infos: list[TensorInfo]
    data: bytes
    n_kv: int | None = None  # counts written instead of the real ones
    n_tensors: int | None = None

    def copy(self) -> "GGUF":
        return dataclasses.replace(self, kvs=list(self.kvs), infos=list(self.infos))

    def alignment(self) -> int:
        kv = next((kv for kv in self.kvs if kv.key == b"general.alignment" and kv.vtype in _INT_TYPES), None)
        a = kv.value if kv else 32
        return a if a > 0 and a & (a - 1) == 0 and a <= 1 << 16 else 32

    def to_bytes(self) -> bytes:
        n_t = len(self.infos) if self.n_tensors is None else self.n_tensors
        n_kv = len(self.kvs) if self.n_kv is None else self.n_kv
        out = bytearray(self.magic + struct.pack("<IQQ", self.version, n_t, n_kv))
        for kv in self.kvs:
            out += _str(kv.key) + struct.pack("<I", kv.vtype) + kv.payload
        for t in self.infos:
            out += _str(t.name) + struct.pack(f"<I{len(t.dims)}QIQ", len(t.dims), *t.dims, t.type_id, t.offset)
        out += bytes(-len(out) % self.alignment())
        return bytes(out) + self.data

    @classmethod
    def parse(cls, buf: bytes) -> "GGUF":
        version, n_t, n_kv = struct.unpack_from("<IQQ", buf, 4)
        pos = 24

        def string(pos: int) -> tuple[bytes, int]:
            n = struct.unpack_from("<Q", buf, pos)[0]
            return buf[pos + 8:pos + 8 + n], pos + 8 + n

        def skip(vtype: int, pos: int) -> int:
            if vtype == _STRING:
                return string(pos)[1]
            if vtype == _ARRAY:
                elem, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if elem == _STRING:
                    for _ in range(count):
                        pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                    return pos
                return pos + struct.calcsize("<" + _FMT[elem]) * count
            return pos + struct.calcsize("<" + _FMT[vtype])

        kvs = []
        for _ in range(n_kv):
            key, pos = string(pos)
            vtype = struct.unpack_from("<I", buf, pos)[0]
            end = skip(vtype, pos + 4)
            kvs.append(KV(key, vtype, buf[pos + 4:end]))
            pos = end
        infos = []
        for _ in range(n_t):
            name, pos = string(pos)
            n_dims = struct.unpack_from("<I", buf, pos)[0]
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            type_id, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            infos.append(TensorInfo(name, dims, type_id, offset))
            pos += 4 + 8 * n_dims + 12
        g = cls(buf[:4], version, kvs, infos, b"")
        g.data = buf[pos + (-pos % g.alignment()):]
        return g


# Keys whose other valid values legitimately change the logits (YaRN's range, the norm epsilon, RoPE base).
_SEMANTIC_KEYS = (b"gpt-oss.rope.scaling.original_context_length", b"gpt-oss.rope.freq_base",
                  b"gpt-oss.rope.scaling.factor", b"gpt-oss.attention.layer_norm_rms_epsilon")


def _gguf_mutation(rng: random.Random, g: GGUF) -> tuple[str, str]:
    """Mutate `g` in place; return (what was done, expectation): "fail" must be refused, "strict" refused or
    giving the same logits, "loose" anything but a crash."""
    arch = [i for i, kv in enumerate(g.kvs) if kv.key.startswith(b"gpt-oss.")]
    ints = [i for i in arch if g.kvs[i].vtype in _INT_TYPES]
    floats = [i for i in arch if g.kvs[i].vtype in (6, 12)]
    strings = [i for i, kv in enumerate(g.kvs) if kv.vtype == _STRING]
    t = rng.randrange(len(g.infos))
    info = g.infos[t]
    kind = rng.choice(["retype_int", "retype_float", "bad_int", "bad_float", "dup_key", "drop_key", "counts",
                       "version", "magic", "dim", "ndims", "ttype", "offset", "dup_tensor", "rename_tensor",
                       "drop_tensor", "extra_tensor", "token_arrays", "string_value", "alignment", "truncate",
                       "flip", "flip", "flip"])
    if kind == "retype_int":
        i = rng.choice(ints)
        kv, v = g.kvs[i], g.kvs[i].value
        vtype, payload = rng.choice([(10, _scalar(10, v)), (11, _scalar(11, v)), (5, _scalar(5, v)),
                                     (6, _scalar(6, v + 0.5)), (12, _scalar(12, float(v))),
                                     (_STRING, _str(str(v).encode())), (7, _scalar(7, True)),
                                     (_ARRAY, _array(4, [v]))])
        g.kvs[i] = KV(kv.key, vtype, payload)
        return f"{kind} {kv.key.decode()} -> type {vtype}", "strict"
    if kind == "retype_float":
        i = rng.choice(floats)
        kv, v = g.kvs[i], g.kvs[i].value
        vtype, payload = rng.choice([(12, _scalar(12, v)), (_STRING, _str(repr(v).encode())), (4, _scalar(4, int(v))),
                                     (6, _scalar(6, float("nan"))), (6, _scalar(6, float("inf"))),
                                     (12, _scalar(12, float("-inf"))), (_ARRAY, _array(6, [v])), (7, _scalar(7, True))])
        g.kvs[i] = KV(kv.key, vtype, payload)
        loose = vtype == 4 and kv.key in _SEMANTIC_KEYS and int(v) != v
        return f"{kind} {kv.key.decode()} -> type {vtype}", "loose" if loose else "strict"
    if kind == "bad_int":
        i = rng.choice(ints)
        kv = g.kvs[i]
        vtype, v = rng.choice([(4, 0), (4, 2 ** 31), (4, 2 ** 32 - 1), (10, 2 ** 62), (10, 2 ** 63), (10, 2 ** 64 - 1),
                               (11, -1), (11, -2 ** 63), (5, -5)])
        g.kvs[i] = KV(kv.key, vtype, _scalar(vtype, v))
        return f"{kind} {kv.key.decode()} = {v}", "loose" if kv.key in _SEMANTIC_KEYS and v > 0 else "strict"
    if kind == "bad_float":
        i = rng.choice(floats)
        kv = g.kvs[i]
        v = rng.choice([0.0, -1.0, 1.0, float("nan"), float("inf"), -float("inf"), 1e30, 1e-30, 3e38])
        g.kvs[i] = KV(kv.key, kv.vtype, _scalar(kv.vtype, v))
        return f"{kind} {kv.key.decode()} = {v}", "loose" if v > 0 and v != float("inf") else "strict"
    if kind == "dup_key":
        i = rng.randrange(len(g.kvs))
        g.kvs.insert(rng.randrange(len(g.kvs) + 1), g.kvs[i])
        return f"{kind} {g.kvs[i].key[:60]!r}", "fail"
    if kind == "drop_key":
        kv = g.kvs.pop(rng.randrange(len(g.kvs)))
        return f"{kind} {kv.key.decode()}", "strict"
    if kind == "counts":
        which = rng.choice(["n_kv", "n_tensors"])
        real = len(g.kvs) if which == "n_kv" else len(g.infos)
        value = rng.choice([real + 1, real - 1, 0, 2 ** 32, 2 ** 63, 2 ** 64 - 1])
        setattr(g, which, value)
        return f"{kind} {which} = {value}", "strict"
    if kind == "version":
        g.version = rng.choice([0, 1, 2, 4, 0x03000000, 2 ** 32 - 1])
        return f"{kind} {g.version}", "strict"
    if kind == "magic":
        g.magic = rng.choice([b"GGUG", b"FUGG", b"\0\0\0\0", b"ggjt"])
        return f"{kind} {g.magic!r}", "fail"
    if kind == "dim":
        d = rng.randrange(len(info.dims))
        n = info.dims[d]
        new = rng.choice([n + 1, max(n - 1, 0), 0, 2 * n, 2 ** 31, 2 ** 62, 2 ** 63, 2 ** 64 - 1])
        g.infos[t] = dataclasses.replace(info, dims=info.dims[:d] + (new,) + info.dims[d + 1:])
        return f"{kind} {info.name.decode()}[{d}] = {new}", "fail"
    if kind == "ndims":
        dims = info.dims + (1,) if rng.random() < 0.5 or len(info.dims) == 1 else info.dims[:-1]
        dims = rng.choice([dims, ()]) if rng.random() < 0.2 else dims
        g.infos[t] = dataclasses.replace(info, dims=dims)
        return f"{kind} {info.name.decode()} dims {dims}", "fail"
    if kind == "ttype":
        new = rng.choice([0, 1, 2, 8, 30, 39, 99, 2 ** 31, 2 ** 32 - 1])
        if new == info.type_id:
            new = 99
        g.infos[t] = dataclasses.replace(info, type_id=new)
        return f"{kind} {info.name.decode()} = {new}", "fail"
    if kind == "offset":
        other = rng.choice([o for o in g.infos if o is not info] or [info])
        new = rng.choice([info.offset + 1, info.offset + 32, max(info.offset - 32, 0) if info.offset else 1,
                          other.offset, len(g.data), 2 ** 63, 2 ** 64 - 32])
        if new == info.offset:
            new += 1
        g.infos[t] = dataclasses.replace(info, offset=new)
        return f"{kind} {info.name.decode()} = {new}", "fail"
    if kind == "dup_tensor":
        other = g.infos[rng.randrange(len(g.infos))]
        if rng.random() < 0.5 and other is not info:
            g.infos[t] = dataclasses.replace(info, name=other.name)
        else:
            g.infos.insert(rng.randrange(len(g.infos) + 1), other)
        return f"{kind} {other.name.decode()}", "fail"
    if kind == "rename_tensor":
        name = rng.choice([b"", b"\xff\xfe", info.name + b"x", b"blk.99." + info.name.split(b".", 2)[-1]])
        g.infos[t] = dataclasses.replace(info, name=name)
        return f"{kind} {info.name.decode()} -> {name!r}", "fail"
    if kind == "drop_tensor":
        g.infos.pop(t)
        return f"{kind} {info.name.decode()}", "fail"
    if kind == "extra_tensor":
        g.infos.insert(rng.randrange(len(g.infos) + 1), dataclasses.replace(info, name=b"extra." + info.name))
        return f"{kind} aliasing {info.name.decode()}", "fail"
    if kind == "token_arrays":
        key = rng.choice([b"tokenizer.ggml.tokens", b"tokenizer.ggml.token_type", b"tokenizer.ggml.merges"])
        i = next(i for i, kv in enumerate(g.kvs) if kv.key == key)
        count = struct.unpack_from("<Q", g.kvs[i].payload, 4)[0]
        elem, n = rng.choice([(4, count), (0, count), (7, count), (6, count), (11, count), (_STRING, 3), (5, count - 1),
                              (5, count + 1)])
        values = {4: [1] * n, 0: [1] * n, 7: [True] * n, 6: [1.0] * n, 11: [1] * n, _STRING: [b"a"] * n, 5: [1] * n}[elem]
        if key == b"tokenizer.ggml.tokens" and elem == _STRING:
            values = [b"a"] * n
        g.kvs[i] = KV(key, _ARRAY, _array(elem, values))
        # merges are not used by ossrt (tiktoken ranks come from the token list), token types only for specials.
        return f"{kind} {key.decode()} as {n} of type {elem}", "loose" if key != b"tokenizer.ggml.tokens" else "strict"
    if kind == "string_value":
        i = rng.choice(strings)
        kv = g.kvs[i]
        g.kvs[i] = KV(kv.key, _STRING, _str(rng.choice([b"", b"\xff\xfe\xfd", b"llama", b"x" * 300, b"\0"])))
        return f"{kind} {kv.key.decode()}", "loose"
    if kind == "alignment":
        vtype, v = rng.choice([(4, 0), (4, 3), (4, 16), (4, 64), (4, 2 ** 31), (10, 32), (_STRING, b"32")])
        g.kvs.insert(0, KV(b"general.alignment", vtype, _scalar(vtype, v)))
        return f"{kind} {v!r} (type {vtype})", "strict"
    if kind == "truncate":
        # Structural mutations are applied by to_bytes; truncation is marked here and done by the caller.
        return "truncate", "strict"
    return "flip", "loose"


def gguf_cases(base: bytes, rng: random.Random) -> Iterator[tuple[str, str, bytes]]:
    g0 = GGUF.parse(base)
    header_end = len(base) - len(g0.data)
    while True:
        g = g0.copy()
        what, expect = _gguf_mutation(rng, g)
        data = g.to_bytes()
        if what == "truncate":
            cut = rng.choice([rng.randrange(header_end), rng.randrange(header_end, len(data))])
            data, what = data[:cut], f"truncate at {cut} of {len(data)}"
        elif what == "flip":
            raw = bytearray(data)
            spots = [rng.randrange(header_end) for _ in range(rng.choice([1, 1, 2, 8]))]
            for p in spots:
                raw[p] ^= rng.randrange(1, 256)
            data, what = bytes(raw), f"flip header bytes {spots}"
        yield what, expect, data


PROMPT = [13225, 11, 2375, 0, 220]  # "Hello, world! "


def run_model(path: Path) -> np.ndarray:
    """What a user does with a file: load, logits, generate, chat. Returns the prompt's logits."""
    import ossrt

    with ossrt.load(path, context_length=128, threads=1) as m:
        prompt = [t % m.config.n_vocab for t in PROMPT]
        logits = m.logits(prompt)
        tokens = list(m.generate(prompt, max_tokens=2, temperature=0))
        m.tokenizer.decode(tokens)
        m.chat([{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0, reasoning_effort="low")
    return logits


def fuzz_gguf(base_path: Path, count: int, seed: int, work: Path, tally: Tally,
              log: Callable[[Result], None] = lambda r: None) -> None:
    from ossrt.errors import OssrtError

    base = base_path.read_bytes()
    reference = run_model(base_path)
    rng = random.Random(seed)
    path = work / "mutated.gguf"
    for _, (what, expect, data) in zip(range(count), gguf_cases(base, rng)):
        path.write_bytes(data)
        try:
            logits = run_model(path)
        except OssrtError as e:
            outcome, detail = "clean", f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - any other exception is the finding
            outcome, detail = "other", "".join(traceback.format_exception(e))
        else:
            if expect == "fail":
                outcome, detail = "other", "accepted a file that must be refused"
            elif np.array_equal(logits, reference):
                outcome, detail = "same", ""
            elif expect == "loose":
                outcome, detail = "accepted", ""
            else:
                outcome, detail = "other", f"logits differ by {np.nanmax(np.abs(logits - reference)):.3g}"
        log(tally.add(Result("gguf", what, outcome, detail)))
    path.unlink(missing_ok=True)


# --- converter inputs -------------------------------------------------------------------------------------------------
def _json_paths(obj: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):  # the first few elements of long lists (the vocabulary, the merges)
            yield from _json_paths(v, prefix + (i,))


def _mutate_json(rng: random.Random, obj: Any) -> tuple[Any, str]:
    """One random change to a JSON document: a node replaced by a nasty value, or a key deleted."""
    paths = [p for p in _json_paths(obj) if p]
    if not paths:
        return _nasty(rng), "root"
    path = rng.choice(paths)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and rng.random() < 0.3:
        del parent[path[-1]]
        return obj, f"del {'.'.join(map(str, path))}"
    value = _nasty(rng)
    parent[path[-1]] = value
    return obj, f"{'.'.join(map(str, path))} = {value!r:.40}"


def _safetensors_mutation(rng: random.Random, path: Path) -> str:
    raw = path.read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    t = header[name]
    kind = rng.choice(["offsets", "overlap", "shape", "dtype", "node", "length", "truncate", "not_json"])
    if kind == "offsets":
        t["data_offsets"] = rng.choice([[0.5, 8], [-8, 8], [t["data_offsets"][1], t["data_offsets"][0]],
                                        [0, len(body) + 1], [2 ** 63, 2 ** 64], "0-8", [0], None])
    elif kind == "overlap":
        other = header[rng.choice(names)]
        size = t["data_offsets"][1] - t["data_offsets"][0]
        start = other["data_offsets"][0] + rng.choice([0, 1, 2])
        t["data_offsets"] = [start, start + size]
    elif kind == "shape":
        t["shape"] = rng.choice([[-1] + t["shape"][1:], t["shape"][::-1], [], [0], [2 ** 62, 2 ** 62], ["4"], None])
    elif kind == "dtype":
        t["dtype"] = rng.choice(["F64", "I8", "Q4", "", 5, None, "bf16"])
    elif kind == "node":
        header[name] = _nasty(rng)
    if kind == "length":
        raw = struct.pack("<Q", rng.choice([0, 2, n + 1, 2 ** 40, 2 ** 64 - 1])) + raw[8:]
    elif kind == "truncate":
        raw = raw[:rng.randrange(len(raw))]
    elif kind == "not_json":
        text = rng.choice([b"[]", b"{", b"\xff\xfe", b"null", b'{"a": NaN}'])
        raw = struct.pack("<Q", len(text)) + text + body
    else:
        text = json.dumps(header).encode()
        raw = struct.pack("<Q", len(text)) + text + body
    path.write_bytes(raw)
    return f"{path.name}: {kind} {name}"


def _checkpoint_mutation(rng: random.Random, d: Path) -> str:
    """Mutate the checkpoint copy in `d` (its files are hard links: replace, never write in place)."""
    files = ["config.json"] * 4 + ["model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                                   "safetensors", "safetensors", "delete", "bad_json"]
    which = rng.choice(files)
    if which == "safetensors":
        shard = rng.choice(sorted(d.glob("*.safetensors")))
        data = shard.read_bytes()
        shard.unlink()
        shard.write_bytes(data)
        return _safetensors_mutation(rng, shard)
    if which == "delete":
        victim = rng.choice(sorted(p for p in d.iterdir()))
        victim.unlink()
        return f"delete {victim.name}"
    if which == "bad_json":
        victim = d / rng.choice(["config.json", "model.safetensors.index.json", "tokenizer.json",
                                 "tokenizer_config.json"])
        victim.unlink()
        victim.write_bytes(rng.choice([b"", b"[]", b"{", b"\xff", b"null", b"{\"a\": NaN}", b"[" * 100000]))
        return f"bad json {victim.name}"
    path = d / which
    obj = json.loads(path.read_text(encoding="utf-8"))
    for _ in range(rng.choice([1, 1, 2])):
        obj, what = _mutate_json(rng, obj)
    path.unlink()
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8", errors="surrogatepass")
    return f"{which}: {what}"


def small_checkpoint(out: Path) -> Path:
    """A tiny checkpoint with a 1,024-token vocabulary (the specials moved to ids 1000-1020): the converter's time
    goes mostly into the 201,088-token vocabulary, which its input checks do not need."""
    from ossrt.testing import synthetic
    from ossrt.tokenizer import SPECIAL_TOKENS

    n_vocab = 1024
    d = synthetic.write_checkpoint(out, synthetic.hf_config("tiny", num_hidden_layers=2, vocab_size=n_vocab))
    tok = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    tok["model"]["vocab"] = dict(list(tok["model"]["vocab"].items())[:1000])
    tok["model"]["merges"] = tok["model"]["merges"][:100]
    tok["added_tokens"] = [{"id": 1000 + i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True}
                           for i, (_, text) in enumerate(sorted(SPECIAL_TOKENS.items()))]
    (d / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    cfg.update(eos_token_id=1002, pad_token_id=1001)
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return d


def fuzz_convert(src: Path, count: int, seed: int, work: Path, tally: Tally,
                 log: Callable[[Result], None] = lambda r: None) -> None:
    from ossrt.format.convert import convert
    from ossrt.errors import OssrtError

    rng = random.Random(seed)
    for n in range(count):
        case = work / f"case{n}"
        ckpt, out = case / "ckpt", case / "out"
        ckpt.mkdir(parents=True)
        out.mkdir()
        for f in src.iterdir():
            os.link(f, ckpt / f.name)
        what = _checkpoint_mutation(rng, ckpt)
        target = out / "model.gguf"
        try:
            convert(ckpt, target, outtype=rng.choice(["q8_0", "f32"]), progress=False)
        except OssrtError as e:
            outcome, detail = "clean", f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001
            outcome, detail = "other", "".join(traceback.format_exception(e))
        else:
            outcome, detail = "accepted", ""
            try:
                run_model(target)
            except OssrtError:
                pass
            except Exception as e:  # noqa: BLE001
                outcome, detail = "other", "converted, then: " + "".join(traceback.format_exception(e))
        left = sorted(p.name for p in out.iterdir() if p != target or outcome != "accepted")
        if left and outcome != "other":
            outcome, detail = "other", f"left behind: {left}"
        log(tally.add(Result("convert", what, outcome, detail)))
        shutil.rmtree(case)


# --- HTTP requests ----------------------------------------------------------------------------------------------------
KEY = "fuzz-key"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "default": "Paris"}},
                   "required": ["city"]}}}
CHAT = {
    "model": "fuzz",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning_content": "Call the tool.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": [{"type": "text", "text": "And Berlin?"}]},
    ],
    "tools": [WEATHER], "tool_choice": "auto", "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 1,
    "stop": ["zzz"], "stream": False, "reasoning_effort": "low",
}
RESPONSES = {
    "model": "fuzz",
    "instructions": "Be brief.",
    "input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Call the tool."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"role": "user", "content": [{"type": "input_text", "text": "And Berlin?"}]},
    ],
    "tools": [{"type": "function", **WEATHER["function"]}], "tool_choice": "auto", "max_output_tokens": 4,
    "reasoning": {"effort": "low"}, "temperature": 0.5, "stream": False,
}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    what: str


def request_cases(rng: random.Random) -> Iterator[Request]:
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    while True:
        path, base = rng.choice([("/v1/chat/completions", CHAT), ("/v1/responses", RESPONSES)])
        obj = json.loads(json.dumps(base))
        headers, method, whats = dict(auth), "POST", []
        if rng.random() < 0.3:
            obj["stream"] = True
            whats.append("stream")
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            obj, what = _mutate_json(rng, obj)
            whats.append(what)
        body = json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        r = rng.random()
        if r < 0.05:
            body = b"[" * 5000 + b"]" * 5000
            whats = ["nested 5000"]
        elif r < 0.08:
            body = json.dumps({**obj, "metadata": {"a": {"b": [[[[[[[[[[[[["deep"]]]]]]]]]]]]]}}}).encode()
            body = body.replace(b'"deep"', b"[" * 1200 + b"1" + b"]" * 1200)
            whats.append("nested 1200 inside")
        elif r < 0.12:
            body = body[:rng.randrange(len(body))]
            whats.append("truncated")
        elif r < 0.15:
            p = rng.randrange(len(body))
            body = body[:p] + bytes([rng.randrange(256)]) + body[p:]
            whats.append("stray byte")
        elif r < 0.18:
            body = body.replace(b'"Be brief."', rng.choice([b'"\\ud800"', b"NaN", b"-Infinity", b"1e999",
                                                             b'"\xff\xfe"', b'"a\\u0000b"']))
            whats.append("odd literal")
        elif r < 0.21:
            body = body.replace(b'"default": "Paris"', rng.choice([b'"default": NaN', b'"default": Infinity',
                                                                   b'"default": "\\udfff"']))
            whats.append("odd schema default")
        elif r < 0.24:
            body = body[:1] + b'"model": "other", ' + body[1:]
            whats.append("duplicate key")
        r = rng.random()
        if r < 0.08:
            headers["Content-Type"] = rng.choice(["text/plain", "application/x-www-form-urlencoded", "",
                                                  "application/json; charset=latin-1", "multipart/form-data",
                                                  "application/JSON"])
            whats.append(f"content-type {headers['Content-Type']!r}")
        elif r < 0.1:
            del headers["Content-Type"]
            whats.append("no content-type")
        elif r < 0.16:
            headers["Authorization"] = rng.choice(["", "Bearer", "Bearer wrong", f"bearer {KEY}", f"Bearer  {KEY}",
                                                   f"Basic {KEY}", KEY, f"Bearer {KEY} extra"])
            whats.append(f"authorization {headers['Authorization']!r}")
        elif r < 0.18:
            del headers["Authorization"]
            whats.append("no authorization")
        r = rng.random()
        if r < 0.04:
            method = rng.choice(["GET", "PUT", "DELETE", "PATCH"])
            whats.append(method)
        elif r < 0.07:
            path = rng.choice(["/v1/chat/completions/", "/v1/CHAT/completions", "/v1/models/../x", "/v1/models/%ff",
                               "/v1/models/fuzz", "/health?x=%00", "/v1/completions", "/v1/embeddings"])
            whats.append(path)
        yield Request(method, path, headers, body, f"{method} {path}: " + "; ".join(whats))


def _check_response(status: int, content_type: str, body: bytes, stream: bool) -> str | None:
    """None if the answer is a proper one, else what is wrong with it."""
    if status >= 500:
        return f"status {status}: {body[:300]!r}"
    if status >= 400:
        try:
            err = json.loads(body)["error"]
            assert isinstance(err["message"], str) and isinstance(err["type"], str) and "param" in err and "code" in err
        except Exception:  # noqa: BLE001
            return f"status {status} without OpenAI's error body: {body[:300]!r}"
        return None
    if "text/event-stream" in content_type:
        for raw in body.splitlines():  # bytes: split at CR/LF only, as SSE does (str.splitlines also splits at U+2028)
            line = raw.decode("utf-8")
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                error = event.get("error") or (event.get("response") or {}).get("error")
                if isinstance(error, dict) and error.get("type") == "server_error":
                    return f"stream error event: {line[:300]}"
        return None
    try:
        json.loads(body)
    except ValueError:
        return f"status {status} with a body that is not JSON: {body[:300]!r}"
    return None


@contextlib.contextmanager
def live_server(model: Path) -> Iterator[tuple[str, list[str]]]:
    """`ossrt serve MODEL` as users start it, with an API key; yields (base URL, its output lines so far)."""
    cmd = [sys.executable, "-m", "ossrt.cli", "serve", str(model), "--port", "0", "-c", "256", "-t", "1",
           "--name", "fuzz", "--api-key", KEY]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving ") and " at http://" in line:
                break
        else:
            raise RuntimeError("ossrt serve did not start:\n" + "".join(lines))
        url = re.search(r" at (http://\S+)/v1", lines[-1])[1]
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(12).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("ossrt serve did not answer /health within 60 s")
            time.sleep(0.1)
        yield url, lines
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def fuzz_server(model: Path, count: int, seed: int, tally: Tally,
                log: Callable[[Result], None] = lambda r: None) -> None:
    import httpx

    rng = random.Random(seed)
    with live_server(model) as (url, lines), httpx.Client(base_url=url, timeout=60) as client:
        for _, req in zip(range(count), request_cases(rng)):
            seen = len(lines)
            try:
                r = client.request(req.method, req.path, headers=req.headers, content=req.body)
                problem = _check_response(r.status_code, r.headers.get("content-type", ""), r.content,
                                          b'"stream": true' in req.body)
            except Exception as e:  # noqa: BLE001
                problem = f"{type(e).__name__}: {e}"
            time.sleep(0.01)  # the log line of a failure is written after the answer
            logged = "".join(lines[seen:])  # the server's log of this request
            if problem is None and "Traceback" in logged:
                problem = f"traceback in the server log:\n{logged[-2000:]}"
            if problem is None:
                outcome = "accepted" if r.status_code < 400 else "clean"
                log(tally.add(Result("server", f"{req.what} -> {r.status_code}", outcome)))
            else:
                log(tally.add(Result("server", req.what, "other", problem)))


# --- Python API and command line --------------------------------------------------------------------------------------
def api_cases(rng: random.Random, path: Path) -> Iterator[tuple[str, Callable[[], Any]]]:
    import ossrt

    model = ossrt.load(path, context_length=64, threads=1)
    load_args = {"path": path, "context_length": 32, "threads": 1, "kv_type": "f16"}
    gen_args = {"token_ids": PROMPT, "max_tokens": 2, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                "seed": 0, "stop_tokens": None}
    chat_args = {"messages": [{"role": "user", "content": "Hi"}], "tools": None, "reasoning_effort": "low",
                 "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_tokens": 2, "seed": 0,
                 "stream": False, "current_date": None}
    extra = [10 ** 400, float("nan"), float("inf"), b"path", [path], np.int64(3), np.float32(0.5), "8192", 2.5,
             [1.5], ["a"], [True], 5, [-1], [10 ** 9], str(path) + "x" * 300, Path("/"), "f8", object()]
    while True:
        target = rng.choice(["load", "generate", "chat", "logits"])
        args = {"load": load_args, "generate": gen_args, "chat": chat_args, "logits": {"token_ids": PROMPT}}[target]
        args = dict(args)
        key = rng.choice(list(args))
        args[key] = rng.choice(NASTY + extra)
        what = f"{target}({key}={args[key]!r:.60})"
        if target == "load":
            yield what, lambda a=args: ossrt.load(a.pop("path"), **a).close()
        elif target == "generate":
            yield what, lambda a=args: list(model.generate(a.pop("token_ids"), **a))
        elif target == "chat":
            yield what, lambda a=args: model.chat(a.pop("messages"), **a)
        else:
            yield what, lambda a=args: model.logits(a["token_ids"])


def fuzz_api(path: Path, count: int, seed: int, tally: Tally, log: Callable[[Result], None] = lambda r: None) -> None:
    from ossrt.errors import OssrtError

    rng = random.Random(seed)
    for _, (what, call) in zip(range(count), api_cases(rng, path)):
        try:
            call()
        except OssrtError as e:
            r = Result("api", what, "clean", f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001
            r = Result("api", what, "other", "".join(traceback.format_exception(e)))
        else:
            r = Result("api", what, "accepted")
        log(tally.add(r))


def cli_cases(rng: random.Random, path: Path, work: Path) -> Iterator[list[str]]:
    values = ["-1", "0", "abc", "", "1e400", "nan", "inf", "99999999999999999999", "0.5", "-0", str(work),
              str(work / "missing.gguf"), "x" * 300, str(path) + "x" * 300, "\udcff"]
    while True:
        cmd = rng.choice(["generate", "info"])
        if cmd == "generate":
            args = ["generate", str(path), "-p", "Hi", "-n", "2", "-t", "1", "-c", "128"]
            flags = ["-n", "-t", "-c", "--temp", "--top-p", "--seed", "--effort", "--kv-type", "-p"]
        else:
            args = ["info", str(path)]
            flags = ["--context"]
        for _ in range(rng.choice([1, 2])):
            flag, value = rng.choice(flags + ["MODEL"]), rng.choice(values)
            if flag == "MODEL":
                args[1] = value
            elif flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        yield args


def fuzz_cli(path: Path, count: int, seed: int, work: Path, tally: Tally,
             log: Callable[[Result], None] = lambda r: None) -> None:
    from click.testing import CliRunner

    from ossrt.cli import main

    rng = random.Random(seed)
    runner = CliRunner()
    for _, args in zip(range(count), cli_cases(rng, path, work)):
        res = runner.invoke(main, args)
        what = "ossrt " + " ".join(repr(a[:40]) if " " in a or not a else a[:40] for a in args)
        err = res.stderr.strip().splitlines()
        if res.exit_code == 0:
            r = Result("cli", what, "accepted")
        elif res.exit_code == 2 and err and err[-1].lower().startswith("error") and "Traceback" not in res.stderr:
            r = Result("cli", what, "clean", err[-1])
        else:
            crash = res.exception is not None and not isinstance(res.exception, SystemExit)
            detail = "".join(traceback.format_exception(res.exception)) if crash else res.stderr[-2000:]
            r = Result("cli", what, "other", f"exit {res.exit_code}: {detail}")
        log(tally.add(r))


# --- running ------------------------------------------------------------------------------------------------------------
SURFACES = ("gguf", "convert", "server", "api", "cli")


def tiny_model(work: Path) -> Path:
    from ossrt.testing import synthetic
    from ossrt.format.convert import convert

    src = synthetic.write_checkpoint(work / "tiny", synthetic.hf_config("tiny"))
    return convert(src, work / "tiny-q8_0.gguf", outtype="q8_0", progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=500, help="cases per surface")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--surface", default=",".join(SURFACES), help=f"comma-separated: {', '.join(SURFACES)}")
    ap.add_argument("--show", default="other", help="outcomes to print case by case (comma-separated, or 'none')")
    args = ap.parse_args()
    surfaces = args.surface.split(",")
    unknown = set(surfaces) - set(SURFACES)
    if unknown:
        ap.error(f"unknown surface(s): {', '.join(sorted(unknown))}")
    show = set(args.show.split(","))
    tally = Tally()

    def log(r: Result) -> None:
        if r.outcome in show:
            print(f"[{r.surface}] {r.outcome}: {r.case}" + (f"\n    {r.detail.strip()[:3000]}" if r.detail else ""),
                  flush=True)

    with tempfile.TemporaryDirectory(prefix="ossrt-fuzz-") as tmp:
        work = Path(tmp)
        model = tiny_model(work)
        for surface in surfaces:
            t0 = time.perf_counter()
            if surface == "gguf":
                fuzz_gguf(model, args.count, args.seed, work, tally, log)
            elif surface == "convert":
                fuzz_convert(small_checkpoint(work / "small"), args.count, args.seed, work, tally, log)
            elif surface == "server":
                fuzz_server(model, args.count, args.seed, tally, log)
            elif surface == "api":
                fuzz_api(model, args.count, args.seed, tally, log)
            else:
                fuzz_cli(model, args.count, args.seed, work, tally, log)
            c = tally.counts(surface)
            print(f"{surface:8} tried {sum(c.values()):6}  " + "  ".join(f"{o} {c[o]:5}" for o in OUTCOMES) +
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    c = tally.counts()
    print(f"{'all':8} tried {sum(c.values()):6}  " + "  ".join(f"{o} {c[o]:5}" for o in OUTCOMES))
    sys.exit(1 if c["other"] else 0)


if __name__ == "__main__":
    main()
