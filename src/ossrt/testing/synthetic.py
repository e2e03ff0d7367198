"""Synthetic gpt-oss Hugging Face checkpoints: the real layouts with random but sane weights (spec §4, §6).

The real weights cannot be downloaded in CI, so tests and benchmarks convert checkpoints made here:

    python -m ossrt.testing.synthetic OUT --size tiny|20b|120b [--layout mxfp4|bf16] [--seed N] [--vocab PATH]
    python -m ossrt.testing.synthetic OUT.gguf --gguf q8_0 --size 120b     # the GGUF directly, no checkpoint

The vocabulary is OpenAI's o200k_base, shipped in the package (`data/o200k_base.tiktoken.xz`, checked against its
published sha256 when read), so nothing is downloaded and no file outside the package is needed.

Weights: each tensor has its own RNG seeded by (seed, its name), so a file is the same whatever the sharding.
Dense matrices are N(0, gain/sqrt(fan_in)) in bf16 so every projection keeps the RMS of its input; output
projections (o_proj, down) use gain 0.5 so the residual stream grows slowly through the layers; norms ≈ 1;
sinks and biases small. MXFP4 experts are drawn as random nibble bytes directly (fast: no float quantization) with
one block scale per 32 values set so the values' RMS matches the same fan-in rule; a uniform nibble has
amax 6·2^(e-127), so the scales are what llama.cpp's quantizer would pick for such blocks. The bf16 layout holds
exactly the dequantized values of the mxfp4 layout of the same seed, transposed as fine-tunes store them.

Files are streamed tensor by tensor into ~4 GB shards, so the full 120b needs no more RAM than its largest chunk.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import lzma
import math
import os
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..format import mxfp4
from ..format.checkpoint import Checkpoint, read_json
from ..format.config import ModelConfig
from ..format.convert import convert_checkpoint
from ..format.safetensors import DTYPES, SourceTensor
from ..tokenizer import N_VOCAB, O200K_PATTERN, SPECIAL_TOKENS, bytes_to_unicode_token, load_tiktoken_ranks

O200K_BASE_RESOURCE = "data/o200k_base.tiktoken.xz"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # of the uncompressed file

# The release's config.json ids: bos <|startoftext|>, eos <|return|>, pad <|endoftext|>.
BOS_ID, EOS_ID, PAD_ID = 199998, 200002, 199999

# A Harmony chat template in the HF style: system, developer instructions, user/assistant turns, tool calls and
# results, past assistant turns as `final` only (spec §7). It is stored verbatim in `tokenizer.chat_template`.
CHAT_TEMPLATE = """\
{%- set reasoning = reasoning_effort | default('medium') -%}
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
{%- if model_identity is not defined %}{% endif %}
{%- if current_date is defined %}
Current date: {{ current_date }}{% endif %}

Reasoning: {{ reasoning }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.
{%- if tools %}
Calls to these tools must go to the commentary channel: 'functions'.{% endif %}<|end|>
{%- set sys = messages[0].content if messages and messages[0].role in ['system', 'developer'] else none -%}
{%- if sys or tools %}<|start|>developer<|message|>
{%- if sys %}# Instructions

{{ sys }}{% endif %}
{%- if tools %}{% if sys %}

{% endif %}# Tools

## functions

namespace functions {
{% for t in tools %}{% set f = t.function if t.function is defined else t %}
// {{ f.description }}
type {{ f.name }} = (_: {{ f.parameters | tojson }}) => any;
{% endfor %}
} // namespace functions{% endif %}<|end|>{% endif %}
{%- for m in messages %}
{%- if m.role == 'user' %}<|start|>user<|message|>{{ m.content }}<|end|>
{%- elif m.role == 'assistant' %}
{%- if m.tool_calls %}{% for c in m.tool_calls %}{% set f = c.function if c.function is defined else c %}\
<|start|>assistant to=functions.{{ f.name }}<|channel|>commentary json<|message|>\
{{ f.arguments if f.arguments is string else f.arguments | tojson }}<|call|>{% endfor %}
{%- else %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>{% endif %}
{%- elif m.role == 'tool' %}<|start|>functions.{{ m.name }} to=assistant<|channel|>commentary<|message|>\
{{ m.content }}<|end|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start|>assistant{% endif %}"""


# --- configurations ------------------------------------------------------------------------------------------
def _base_config() -> dict:
    """config.json of the release checkpoints (spec §4.1), 20b sizes."""
    return {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": EOS_ID, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
        "intermediate_size": 2880, "max_position_embeddings": 131072, "model_type": "gpt_oss",
        "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
        "num_local_experts": 32, "output_router_logits": False, "pad_token_id": PAD_ID, "rms_norm_eps": 1e-05,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "original_max_position_embeddings": 4096, "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "use_cache": True, "vocab_size": N_VOCAB,
    }


def hf_config(size: str = "tiny", **overrides) -> dict:
    """The HF config.json dict for `tiny`, `20b` or `120b`, with keyword overrides (HF key names).

    tiny: 4 layers (2 sliding + 2 full), hidden 64, 8 experts top-4, 4 query / 2 KV heads of 16, window 8 (short
    prompts cross it), context 4096, the full 201,088-token vocabulary so tokenizer and chat tests work on it.
    YaRN keeps the real constants: for head_dim 16 they give low ≈ 2.02, high ≈ 4.35, inside (0, d_half - 1 = 7)
    as the reference asserts.
    """
    cfg = _base_config()
    if size == "tiny":
        cfg.update(hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, num_local_experts=8, sliding_window=8,
                   max_position_embeddings=4096)
    elif size == "120b":
        cfg.update(num_hidden_layers=36, num_local_experts=128)
    elif size != "20b":
        raise ValueError(f"unknown size {size!r}: expected tiny, 20b or 120b")
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"unknown config field {key!r}")
        cfg[key] = value
    # Keep the aliases consistent with the primary keys.
    cfg["experts_per_token"] = cfg["num_experts_per_tok"]
    cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                          for i in range(cfg["num_hidden_layers"])]
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return cfg


# --- tokenizer files ---------------------------------------------------------------------------------------------
def o200k_base() -> bytes:
    """The bytes of OpenAI's o200k_base.tiktoken as published, from the copy shipped in the package."""
    resource = resources.files(__package__).joinpath(O200K_BASE_RESOURCE)
    data = lzma.decompress(resource.read_bytes())
    if hashlib.sha256(data).hexdigest() != O200K_BASE_SHA256:
        raise ValueError(f"{resource}: sha256 differs from o200k_base.tiktoken's {O200K_BASE_SHA256}; "
                         "the package is damaged, reinstall it")
    return data


def load_ranks(vocab_path: str | os.PathLike | None = None) -> list[bytes]:
    """A `.tiktoken` file (default: the shipped o200k_base) -> token bytes by rank; the ranks must run 0, 1, 2...
    in file order, as the merges are derived from that order."""
    ranks = load_tiktoken_ranks(o200k_base() if vocab_path is None else vocab_path)
    for n, (token, rank) in enumerate(ranks.items()):
        if rank != n:
            raise ValueError(f"{vocab_path or O200K_BASE_RESOURCE}: token {n} of the file ({token!r}) has rank "
                             f"{rank}, expected {n}")
    return list(ranks)


def bpe_merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Merges for a rank-ordered BPE vocabulary, the way HF converts tiktoken files (transformers
    `TikTokenConverter`): for each token in rank order, every split into two tokens of the vocabulary, ordered by
    the pieces' ranks. For o200k_base this gives exactly the 446,189 merges of the published tokenizer.json."""
    rank = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[bytes, bytes]] = []
    for t in tokens:
        local = []
        for k in range(1, len(t)):
            ra, rb = rank.get(t[:k]), rank.get(t[k:])
            if ra is not None and rb is not None:
                local.append((ra, rb, t[:k], t[k:]))
        local.sort()
        merges.extend((a, b) for _, _, a, b in local)
    return merges


def write_tokenizer(out_dir: Path, vocab_path: str | os.PathLike | None, n_vocab: int, max_length: int) -> None:
    """tokenizer.json (byte-level BPE + the 21 specials) and tokenizer_config.json (with the chat template)."""
    for name, text in _tokenizer_files(None if vocab_path is None else str(vocab_path), n_vocab, max_length):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)


# Building tokenizer.json takes seconds (446,189 merges); test sessions write many checkpoints with one vocabulary.
@functools.lru_cache(maxsize=2)
def _tokenizer_files(vocab_path: str | None, n_vocab: int, max_length: int) -> tuple[tuple[str, str], ...]:
    tokens = load_ranks(vocab_path)
    u = bytes_to_unicode_token
    vocab = {u(t): i for i, t in enumerate(tokens)}
    merges = [[u(a), u(b)] for a, b in bpe_merges(tokens)]
    specials = {i: s for i, s in SPECIAL_TOKENS.items() if i < n_vocab}
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in sorted(specials.items())]
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    cfg = {
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID], "pad_token": SPECIAL_TOKENS[PAD_ID],
        "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_length, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    return (("tokenizer.json", json.dumps(tok, ensure_ascii=False)),
            ("tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False)))


# --- weights -------------------------------------------------------------------------------------------------------
@dataclass
class _Planned:
    name: str
    dtype: str  # safetensors dtype: "BF16" or "U8"
    shape: tuple[int, ...]
    chunks: Callable[[np.random.Generator], Iterator[np.ndarray]]  # yields the data in C order

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (2 if self.dtype == "BF16" else 1)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even like torch/ggml."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


_CHUNK = 1 << 22  # values per generated chunk of a dense tensor (16 MB of float32)


def _dense(shape: tuple[int, ...], std: float, mean: float = 0.0) -> Callable[[np.random.Generator], Iterator]:
    def gen(rng: np.random.Generator) -> Iterator[np.ndarray]:
        n = math.prod(shape)
        for start in range(0, n, _CHUNK):
            x = rng.standard_normal(min(_CHUNK, n - start), dtype=np.float32)
            x *= np.float32(std)
            x += np.float32(mean)
            yield to_bf16_bits(x)
    return gen


def _uniform_rms_exponent(std: float) -> int:
    """Scale exponent (biased, E8M0) whose uniform-nibble blocks have RMS ≈ std."""
    rms_codes = float(np.sqrt(np.mean(mxfp4.FP4_VALUES.astype(np.float64) ** 2)))  # 2.93
    return 127 + round(math.log2(std / rms_codes))


def _expert_blocks(rng: np.random.Generator, rows: int, g: int, std: float) -> tuple[np.ndarray, np.ndarray]:
    """One expert's MXFP4 weight in HF layout: blocks [rows, g, 16], scales [rows, g]."""
    blocks = np.frombuffer(rng.bytes(rows * g * mxfp4.CODE_BYTES), dtype=np.uint8).reshape(rows, g, mxfp4.CODE_BYTES)
    # Jitter the block exponents by ±1 so scales vary like a real checkpoint's.
    scales = (_uniform_rms_exponent(std) + rng.integers(-1, 2, size=(rows, g), dtype=np.int16)).astype(np.uint8)
    return blocks, scales


def _experts(kind: str, n_exp: int, rows: int, cols: int, std: float) -> Callable:
    """Expert tensors of one layer, streamed expert by expert. kind: "blocks", "scales" (mxfp4 layout) or
    "dense" (bf16 layout: the dequantized blocks transposed to [in, out]). All three draw the same RNG stream,
    so the layouts hold the same values for a seed."""
    g = cols // mxfp4.BLOCK_VALUES

    def gen(rng: np.random.Generator) -> Iterator[np.ndarray]:
        for _ in range(n_exp):
            blocks, scales = _expert_blocks(rng, rows, g, std)
            if kind == "blocks":
                yield blocks
            elif kind == "scales":
                yield scales
            else:
                yield to_bf16_bits(mxfp4.dequantize_hf(blocks, scales).T)
    return gen


def plan_tensors(cfg: dict, layout: str) -> list[_Planned]:
    """Every tensor of the checkpoint, in the release order, with its generator."""
    if layout not in ("mxfp4", "bf16"):
        raise ValueError(f"unknown layout {layout!r}: expected mxfp4 or bf16")
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    E, L, hd = cfg["num_local_experts"], cfg["num_hidden_layers"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    nh, QK = cfg["num_attention_heads"], mxfp4.BLOCK_VALUES
    t = [_Planned("model.embed_tokens.weight", "BF16", (V, H), _dense((V, H), 1.0))]
    for i in range(L):
        p = f"model.layers.{i}."
        t += [
            _Planned(p + "input_layernorm.weight", "BF16", (H,), _dense((H,), 0.05, 1.0)),
            _Planned(p + "self_attn.q_proj.weight", "BF16", (q, H), _dense((q, H), H ** -0.5)),
            _Planned(p + "self_attn.q_proj.bias", "BF16", (q,), _dense((q,), 0.02)),
            _Planned(p + "self_attn.k_proj.weight", "BF16", (kv, H), _dense((kv, H), H ** -0.5)),
            _Planned(p + "self_attn.k_proj.bias", "BF16", (kv,), _dense((kv,), 0.02)),
            _Planned(p + "self_attn.v_proj.weight", "BF16", (kv, H), _dense((kv, H), H ** -0.5)),
            _Planned(p + "self_attn.v_proj.bias", "BF16", (kv,), _dense((kv,), 0.02)),
            _Planned(p + "self_attn.o_proj.weight", "BF16", (H, q), _dense((H, q), 0.5 * q ** -0.5)),
            _Planned(p + "self_attn.o_proj.bias", "BF16", (H,), _dense((H,), 0.02)),
            _Planned(p + "self_attn.sinks", "BF16", (nh,), _dense((nh,), 0.5)),
            _Planned(p + "post_attention_layernorm.weight", "BF16", (H,), _dense((H,), 0.05, 1.0)),
            _Planned(p + "mlp.router.weight", "BF16", (E, H), _dense((E, H), H ** -0.5)),
            _Planned(p + "mlp.router.bias", "BF16", (E,), _dense((E,), 0.02)),
        ]
        x = p + "mlp.experts."
        gu_std, dn_std = H ** -0.5, 0.5 * I ** -0.5
        if layout == "mxfp4":
            t += [
                _Planned(x + "gate_up_proj_blocks", "U8", (E, 2 * I, H // QK, mxfp4.CODE_BYTES),
                         _experts("blocks", E, 2 * I, H, gu_std)),
                _Planned(x + "gate_up_proj_scales", "U8", (E, 2 * I, H // QK),
                         _experts("scales", E, 2 * I, H, gu_std)),
            ]
        else:
            t.append(_Planned(x + "gate_up_proj", "BF16", (E, H, 2 * I), _experts("dense", E, 2 * I, H, gu_std)))
        t.append(_Planned(x + "gate_up_proj_bias", "BF16", (E, 2 * I), _dense((E, 2 * I), 0.02)))
        if layout == "mxfp4":
            t += [
                _Planned(x + "down_proj_blocks", "U8", (E, H, I // QK, mxfp4.CODE_BYTES),
                         _experts("blocks", E, H, I, dn_std)),
                _Planned(x + "down_proj_scales", "U8", (E, H, I // QK), _experts("scales", E, H, I, dn_std)),
            ]
        else:
            t.append(_Planned(x + "down_proj", "BF16", (E, I, H), _experts("dense", E, H, I, dn_std)))
        t.append(_Planned(x + "down_proj_bias", "BF16", (E, H), _dense((E, H), 0.02)))
    t += [
        _Planned("model.norm.weight", "BF16", (H,), _dense((H,), 0.05, 1.0)),
        _Planned("lm_head.weight", "BF16", (V, H), _dense((V, H), H ** -0.5)),
    ]
    return t


def _rng_key(name: str) -> int:
    """A stable per-tensor RNG key. Blocks and scales of one weight share it so they come from one stream,
    and the bf16 layout's dense expert tensor shares it too."""
    base = name.removesuffix("_blocks").removesuffix("_scales")
    return int.from_bytes(hashlib.sha256(base.encode()).digest()[:8], "little")


def _raw_chunks(t: _Planned, seed: int) -> Iterator[np.ndarray]:
    """t's data as contiguous bytes, chunk by chunk, from its own RNG (seed, its name); checked to add up to its
    size."""
    made = 0
    for chunk in t.chunks(np.random.default_rng([seed, _rng_key(t.name)])):
        chunk = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
        made += chunk.size
        yield chunk
    assert made == t.nbytes, (t.name, made, t.nbytes)


def write_safetensors(path: Path, tensors: list[_Planned], seed: int) -> None:
    """Stream tensors into one safetensors file (header, then each tensor's chunks), atomically."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for t in tensors:
                for chunk in _raw_chunks(t, seed):
                    f.write(chunk.data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_checkpoint(out_dir: str | os.PathLike, hf_config: dict, *, layout: str = "mxfp4", seed: int = 0,
                     vocab_path: str | os.PathLike | None = None, shard_bytes: int = 4 << 30,
                     progress: bool = False) -> Path:
    """Write a gpt-oss HF checkpoint directory: config.json, sharded safetensors with their index, tokenizer
    files. `layout` "mxfp4" is the release layout (spec §4.1), "bf16" the fine-tune layout (§4.2). `vocab_path`: a
    `.tiktoken` file, by default the shipped o200k_base."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(hf_config)
    if layout == "bf16":
        cfg.pop("quantization_config", None)
    plan = plan_tensors(cfg, layout)
    shards: list[list[_Planned]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    # The release converter's quirk: zero-based shard numbers "of" n-1 (spec §4.1); readers must use the index.
    names = [f"model-{i:05d}-of-{len(shards) - 1:05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        if progress:
            print(f"writing {out / name} ({sum(t.nbytes for t in shard) / 1e9:.2f} GB)", file=sys.stderr)
        write_safetensors(out / name, shard, seed)
        weight_map.update({t.name: name for t in shard})
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map})
    _write_metadata(out, cfg, vocab_path)
    return out


def _write_metadata(out: Path, cfg: dict, vocab_path: str | os.PathLike | None) -> None:
    """A checkpoint's files besides the weights: config, generation config, tokenizer."""
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json",
                {"bos_token_id": BOS_ID, "eos_token_id": [200002, 199999, 200012], "pad_token_id": PAD_ID})
    write_tokenizer(out, vocab_path, cfg["vocab_size"], cfg["max_position_embeddings"])


# --- a GGUF file directly -------------------------------------------------------------------------------------------
# Generated tensors are kept while the converter still reads them (gate and up come from one HF tensor, read twice),
# up to this many bytes: a 120b layer's gate_up blocks are 1.06 GB.
GENERATED_BYTES = 5 << 28


class _Generated:
    """The generated tensors the converter is reading, within a byte budget: the least recently used are dropped
    first and made again if read again (the same values: each tensor's RNG starts from (seed, its name))."""

    def __init__(self, seed: int, budget: int):
        self.seed, self.budget = seed, budget
        self.arrays: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, t: _Planned, dtype: type) -> np.ndarray:
        if t.name in self.arrays:
            self.arrays.move_to_end(t.name)
            return self.arrays[t.name]
        while self.arrays and sum(a.nbytes for a in self.arrays.values()) + t.nbytes > self.budget:
            self.arrays.popitem(last=False)
        raw = np.empty(t.nbytes, dtype=np.uint8)
        at = 0
        for chunk in _raw_chunks(t, self.seed):
            raw[at:at + chunk.size] = chunk
            at += chunk.size
        array = raw.view(dtype).reshape(t.shape)
        self.arrays[t.name] = array
        return array


class _GeneratedTensor:
    """A checkpoint tensor (`SourceTensor`'s fields) whose data is made when read."""

    file = Path("<synthetic>")

    def __init__(self, planned: _Planned, generated: _Generated):
        self.name, self.dtype, self.shape = planned.name, planned.dtype, planned.shape
        self._planned, self._generated = planned, generated

    @property
    def data(self) -> np.ndarray:
        return self._generated.get(self._planned, DTYPES[self.dtype])

    f32 = SourceTensor.f32


class SyntheticCheckpoint(Checkpoint):
    """A release-layout checkpoint whose weights are never on disk: each tensor is made when the converter reads
    it, the same values `write_checkpoint` writes. `meta_dir` holds the other files (`_write_metadata`)."""

    def __init__(self, meta_dir: Path, seed: int = 0, budget: int = GENERATED_BYTES):
        self.dir = Path(meta_dir)
        self.hf_config = read_json(self.dir / "config.json")
        self.config = ModelConfig.from_hf_config(self.hf_config, str(self.dir / "config.json"))
        self._maps = []
        generated = _Generated(seed, budget)
        self.tensors = {t.name: _GeneratedTensor(t, generated) for t in plan_tensors(self.hf_config, "mxfp4")}
        self.layout = "mxfp4"

    def release(self) -> None:
        """Nothing mapped to drop."""


def write_gguf(out_path: str | os.PathLike, hf_config: dict, *, outtype: str = "q8_0", seed: int = 0,
               vocab_path: str | os.PathLike | None = None, name: str | None = None, progress: bool = False,
               budget: int = GENERATED_BYTES) -> Path:
    """A GGUF file of a synthetic model written directly, byte for byte what converting `write_checkpoint`'s
    release-layout checkpoint of the same config and seed gives, with no checkpoint on disk (the 120b's would not
    fit beside its GGUF). Streamed: the RAM it takes is `budget` plus the converter's. `name` defaults to the file's
    stem."""
    out = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="ossrt-synthetic-") as meta:
        _write_metadata(Path(meta), dict(hf_config), vocab_path)
        ckpt = SyntheticCheckpoint(Path(meta), seed, budget)
        return convert_checkpoint(ckpt, out, outtype=outtype, progress=progress, name=name or out.stem)


def _write_json(path: Path, obj: object, indent: int | None = 2) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ossrt.testing.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output checkpoint directory (with --gguf: output GGUF file)")
    ap.add_argument("--size", choices=["tiny", "20b", "120b"], default="tiny")
    ap.add_argument("--layout", choices=["mxfp4", "bf16"], default="mxfp4")
    ap.add_argument("--gguf", metavar="OUTTYPE", choices=["q8_0", "bf16", "f16", "f32"],
                    help="write a GGUF file directly (dense matrices as OUTTYPE), the release-layout checkpoint "
                         "converted, without writing the checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", default=None, help="a .tiktoken vocabulary [default: the shipped o200k_base]")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a config.json field, e.g. --set num_hidden_layers=2")
    args = ap.parse_args(argv)
    if args.gguf and args.layout != "mxfp4":
        ap.error("--gguf writes the release (mxfp4) layout's conversion")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    cfg = hf_config(args.size, **overrides)
    if args.gguf:
        write_gguf(args.out, cfg, outtype=args.gguf, seed=args.seed, vocab_path=args.vocab, progress=True)
    else:
        write_checkpoint(args.out, cfg, layout=args.layout, seed=args.seed, vocab_path=args.vocab, progress=True)


if __name__ == "__main__":
    main()
