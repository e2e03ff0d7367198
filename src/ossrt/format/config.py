"""The gpt-oss architecture: sizes and constants, read from HF config.json or GGUF metadata (spec §1, §5).

Every size in ossrt comes from here; nothing is hard-coded for 20b or 120b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFValueType, Keys

from . import mxfp4
from ..errors import ConfigError

ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.GPT_OSS]  # "gpt-oss"
ROPE_SCALING_TYPE = "yarn"  # the only RoPE scaling gpt-oss uses
# The vocabulary kind, as llama.cpp names it: byte-level BPE (`gpt2`) with o200k's pre-tokenizer (`gpt-4o`).
TOKENIZER_MODEL, TOKENIZER_PRE = "gpt2", "gpt-4o"


def _arch_key(template: str) -> str:
    """A GGUF architecture key: llama.cpp's `gguf.Keys` template with "{arch}" filled in."""
    return template.format(arch=ARCH)


# GGUF metadata keys (gguf.Keys: llama.cpp's own names, spec §5).
KEY_BLOCK_COUNT = _arch_key(Keys.LLM.BLOCK_COUNT)
KEY_CONTEXT_LENGTH = _arch_key(Keys.LLM.CONTEXT_LENGTH)
KEY_EMBEDDING_LENGTH = _arch_key(Keys.LLM.EMBEDDING_LENGTH)
KEY_FEED_FORWARD_LENGTH = _arch_key(Keys.LLM.FEED_FORWARD_LENGTH)
KEY_EXPERT_FEED_FORWARD_LENGTH = _arch_key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)
KEY_HEAD_COUNT = _arch_key(Keys.Attention.HEAD_COUNT)
KEY_HEAD_COUNT_KV = _arch_key(Keys.Attention.HEAD_COUNT_KV)
KEY_KEY_LENGTH = _arch_key(Keys.Attention.KEY_LENGTH)
KEY_VALUE_LENGTH = _arch_key(Keys.Attention.VALUE_LENGTH)
KEY_RMS_EPS = _arch_key(Keys.Attention.LAYERNORM_RMS_EPS)
KEY_SLIDING_WINDOW = _arch_key(Keys.Attention.SLIDING_WINDOW)
KEY_EXPERT_COUNT = _arch_key(Keys.LLM.EXPERT_COUNT)
KEY_EXPERT_USED_COUNT = _arch_key(Keys.LLM.EXPERT_USED_COUNT)
KEY_ROPE_FREQ_BASE = _arch_key(Keys.Rope.FREQ_BASE)
KEY_ROPE_SCALING_TYPE = _arch_key(Keys.Rope.SCALING_TYPE)
KEY_ROPE_SCALING_FACTOR = _arch_key(Keys.Rope.SCALING_FACTOR)
KEY_ROPE_SCALING_ORIG_CTX = _arch_key(Keys.Rope.SCALING_ORIG_CTX_LEN)
KEY_VOCAB_SIZE = _arch_key(Keys.LLM.VOCAB_SIZE)

_U32, _F32, _STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
# What a gpt-oss GGUF file says about the architecture, in the order llama.cpp's converter writes it: key, GGUF
# type, and the ModelConfig field it holds. The reader takes every field from its key here, except from
# _OPTIONAL_KEYS: llama.cpp writes them but does not need them for gpt-oss, so a reader checks them where present.
ARCH_METADATA: tuple[tuple[str, GGUFValueType, str], ...] = (
    (KEY_BLOCK_COUNT, _U32, "n_layer"),
    (KEY_CONTEXT_LENGTH, _U32, "n_ctx_train"),
    (KEY_EMBEDDING_LENGTH, _U32, "n_embd"),
    (KEY_FEED_FORWARD_LENGTH, _U32, "n_ff_exp"),
    (KEY_HEAD_COUNT, _U32, "n_head"),
    (KEY_HEAD_COUNT_KV, _U32, "n_head_kv"),
    (KEY_ROPE_FREQ_BASE, _F32, "rope_freq_base"),
    (KEY_RMS_EPS, _F32, "rms_norm_eps"),
    (KEY_EXPERT_COUNT, _U32, "n_expert"),
    (KEY_EXPERT_USED_COUNT, _U32, "n_expert_used"),
    (KEY_KEY_LENGTH, _U32, "head_dim"),
    (KEY_VALUE_LENGTH, _U32, "head_dim"),
    (KEY_SLIDING_WINDOW, _U32, "sliding_window"),
    (KEY_EXPERT_FEED_FORWARD_LENGTH, _U32, "n_ff_exp"),
    (KEY_ROPE_SCALING_TYPE, _STR, "rope_scaling_type"),
    (KEY_ROPE_SCALING_FACTOR, _F32, "rope_scaling_factor"),
    (KEY_ROPE_SCALING_ORIG_CTX, _U32, "rope_orig_ctx"),
)
_OPTIONAL_KEYS = (KEY_FEED_FORWARD_LENGTH, KEY_VALUE_LENGTH, KEY_ROPE_SCALING_TYPE)

# Bounds on sizes. llama.cpp holds every size, token id and position in a 32-bit integer, so no model it can run
# has a size of 2^31 or more (gpt-oss-20b/120b: context 131072, window 128, vocabulary 201088). Every size so fits
# GGUF's uint32 as well.
MAX_SIZE = 2**31 - 1
# The tensor table (19 entries a layer) is built in memory, so the layer count has a tighter bound; published
# transformers have at most a few hundred layers (gpt-oss: 24 and 36).
MAX_LAYERS = 4096
TENSORS_PER_LAYER = 19
# The kernels add rms_norm_eps in float32: below the smallest normal float32 it would vanish or lose precision.
FLOAT32_TINY = 2.0**-126
# GGUF stores the float fields in ARCH_METADATA as float32: a larger number would become infinity.
FLOAT32_MAX = float(np.finfo(np.float32).max)

_INT_FIELDS = ("n_layer", "n_embd", "n_ff_exp", "n_head", "n_head_kv", "head_dim", "n_expert", "n_expert_used",
               "n_vocab", "n_ctx_train", "sliding_window", "rope_orig_ctx")
# Float fields: the range each must lie in, and how to say it. rope_freq_base > 1 because YaRN divides by its
# logarithm; the betas bound YaRN's correction range, which must not be empty (spec §2.3).
_FLOAT_FIELDS: dict[str, tuple[Callable[[float], bool], str]] = {
    "rope_freq_base": (lambda v: v > 1, "greater than 1"),
    "rope_scaling_factor": (lambda v: v >= 1, "at least 1"),
    "rope_beta_fast": (lambda v: v > 0, "above 0"),
    "rope_beta_slow": (lambda v: v > 0, "above 0"),
    "rms_norm_eps": (lambda v: FLOAT32_TINY <= v < 1, "below 1 and at least 2^-126"),
    "swiglu_limit": (lambda v: v > 0, "above 0"),
    "swiglu_alpha": (lambda v: v > 0, "above 0"),
}
_FLOAT32_FIELDS = {field for _, vtype, field in ARCH_METADATA if vtype == _F32}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a gpt-oss GGUF file must hold. `shape` is NumPy order (reversed ggml ne).

    kind: "vector" (norms, biases, sinks: F32), "matrix" (dense weights: F32/F16/BF16/Q8_0),
    "router" (dense, F32 by llama.cpp's convention), "experts" (MXFP4).
    """

    name: str
    shape: tuple[int, ...]
    kind: str


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    n_embd: int  # hidden size H
    n_ff_exp: int  # expert intermediate size I
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    n_vocab: int
    n_ctx_train: int  # max_position_embeddings
    sliding_window: int
    rope_freq_base: float
    rope_scaling_factor: float
    rope_orig_ctx: int  # YaRN's original context length
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rope_scaling_type: ClassVar[str] = ROPE_SCALING_TYPE

    def __post_init__(self) -> None:
        _validate(vars(self), {})

    # --- structure -------------------------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        """Even layers use the sliding window, odd layers attend to everything (spec §1, layer 0 slides)."""
        return layer % 2 == 0

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def n_tensors(self) -> int:
        """How many tensors `tensor_specs()` lists, without building the list."""
        return 3 + TENSORS_PER_LAYER * self.n_layer

    def tensor_specs(self) -> list[TensorSpec]:
        """Every tensor of a gpt-oss GGUF file, in the order llama.cpp's converter writes them."""
        H, I, E, V = self.n_embd, self.n_ff_exp, self.n_expert, self.n_vocab
        specs = [
            TensorSpec("token_embd.weight", (V, H), "matrix"),
            TensorSpec("output_norm.weight", (H,), "vector"),
            TensorSpec("output.weight", (V, H), "matrix"),
        ]
        for i in range(self.n_layer):
            b = f"blk.{i}."
            specs += [
                TensorSpec(b + "attn_norm.weight", (H,), "vector"),
                TensorSpec(b + "attn_q.weight", (self.q_dim, H), "matrix"),
                TensorSpec(b + "attn_q.bias", (self.q_dim,), "vector"),
                TensorSpec(b + "attn_k.weight", (self.kv_dim, H), "matrix"),
                TensorSpec(b + "attn_k.bias", (self.kv_dim,), "vector"),
                TensorSpec(b + "attn_v.weight", (self.kv_dim, H), "matrix"),
                TensorSpec(b + "attn_v.bias", (self.kv_dim,), "vector"),
                TensorSpec(b + "attn_output.weight", (H, self.q_dim), "matrix"),
                TensorSpec(b + "attn_output.bias", (H,), "vector"),
                TensorSpec(b + "attn_sinks.weight", (self.n_head,), "vector"),
                TensorSpec(b + "post_attention_norm.weight", (H,), "vector"),
                TensorSpec(b + "ffn_gate_inp.weight", (E, H), "router"),
                TensorSpec(b + "ffn_gate_inp.bias", (E,), "vector"),
                TensorSpec(b + "ffn_gate_exps.weight", (E, I, H), "experts"),
                TensorSpec(b + "ffn_gate_exps.bias", (E, I), "vector"),
                TensorSpec(b + "ffn_up_exps.weight", (E, I, H), "experts"),
                TensorSpec(b + "ffn_up_exps.bias", (E, I), "vector"),
                TensorSpec(b + "ffn_down_exps.weight", (E, H, I), "experts"),
                TensorSpec(b + "ffn_down_exps.bias", (E, H), "vector"),
            ]
        return specs

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        return sum(math.prod(s.shape) for s in self.tensor_specs())

    @property
    def n_params_active(self) -> int:
        """Weights touched per token: everything but the input embedding and the unselected experts (spec §1.1)."""
        H, I, E = self.n_embd, self.n_ff_exp, self.n_expert
        expert = 2 * I * H + 2 * I + H * I + H  # gate+up rows and biases, down rows and bias
        unused = self.n_layer * (E - self.n_expert_used) * expert
        return self.n_params - unused - self.n_vocab * H

    # --- sources -----------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """From an HF `config.json` dict; `source` names the file in errors. Every value is type- and
        range-checked before use: a bad one is a ConfigError naming its field."""
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {describe_value(cfg)}")
        if cfg.get("model_type") != "gpt_oss":
            raise ConfigError(f"{source}: model_type is {describe_value(cfg.get('model_type'))}, expected 'gpt_oss'")

        # Newer transformers write `rope_parameters`; older `rope_scaling`. Dropping it would silently disable YaRN.
        rope_key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
        rope = cfg.get(rope_key)
        if not isinstance(rope, Mapping):
            raise ConfigError(f"{source}: missing field 'rope_scaling' (YaRN parameters)")
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type != ROPE_SCALING_TYPE:
            raise ConfigError(f"{source}: {rope_key}.rope_type is {describe_value(rope_type)}, expected "
                              f"{ROPE_SCALING_TYPE!r}")

        values: dict[str, Any] = {}
        labels: dict[str, str] = {}

        def take(field: str, *keys: str, where: Mapping[str, Any] = cfg, prefix: str = "",
                 default: Any = None) -> None:
            for key in keys:
                if where.get(key) is not None:
                    values[field], labels[field] = where[key], prefix + key
                    return
            if default is None:
                raise ConfigError(f"{source}: missing field {prefix + keys[0]!r}")
            values[field], labels[field] = default, prefix + keys[0]

        take("n_layer", "num_hidden_layers")
        take("n_embd", "hidden_size")
        take("n_ff_exp", "intermediate_size")
        take("n_head", "num_attention_heads")
        take("n_head_kv", "num_key_value_heads")
        take("n_expert", "num_local_experts", "num_experts")
        take("n_expert_used", "num_experts_per_tok", "experts_per_token")
        take("n_vocab", "vocab_size")
        take("n_ctx_train", "max_position_embeddings")
        take("sliding_window", "sliding_window")
        if cfg.get("rope_theta") is not None or rope.get("rope_theta") is None:
            take("rope_freq_base", "rope_theta")
        else:
            take("rope_freq_base", "rope_theta", where=rope, prefix=f"{rope_key}.")
        take("rope_scaling_factor", "factor", where=rope, prefix=f"{rope_key}.")
        if rope.get("original_max_position_embeddings") is not None:
            take("rope_orig_ctx", "original_max_position_embeddings", where=rope, prefix=f"{rope_key}.")
        else:
            take("rope_orig_ctx", "initial_context_length")
        take("rope_beta_fast", "beta_fast", where=rope, prefix=f"{rope_key}.", default=32.0)
        take("rope_beta_slow", "beta_slow", where=rope, prefix=f"{rope_key}.", default=1.0)
        take("rms_norm_eps", "rms_norm_eps", default=1e-5)
        take("swiglu_limit", "swiglu_limit", default=7.0)
        try:
            if cfg.get("head_dim") is not None:
                take("head_dim", "head_dim")
            else:  # older configs leave it implicit: hidden_size / num_attention_heads
                _validate({f: values[f] for f in ("n_embd", "n_head")}, labels)
                values["head_dim"] = values["n_embd"] // values["n_head"]
                labels["head_dim"] = "head_dim (hidden_size / num_attention_heads)"
            _validate(values, labels)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cls(**{f: float(v) if f in _FLOAT_FIELDS else v for f, v in values.items()})

    @classmethod
    def from_gguf(cls, get: Callable[[str], Any], source: str) -> "ModelConfig":
        """From GGUF metadata; `get(key)` returns the value or None. YaRN betas and SwiGLU constants are not
        stored in GGUF (llama.cpp hard-codes them), so the defaults apply. Integer keys must hold a GGUF integer
        type and float keys a GGUF float type (as llama.cpp requires); every value is range-checked before use."""

        def need(key: str) -> Any:
            value = get(key)
            if value is None:
                raise ConfigError(f"{source}: missing metadata key {key!r}")
            return value

        def typed(key: str, value: Any, want: type) -> Any:
            if type(value) is not want:  # not bool for int, not int for float
                kind = "an integer" if want is int else "a float"
                raise ConfigError(f"{source}: metadata key {key!r} must be {kind}, got {describe_value(value)}")
            return value

        arch = get(Keys.General.ARCHITECTURE)
        if arch != ARCH:
            raise ConfigError(f"{source}: {Keys.General.ARCHITECTURE} is {describe_value(arch)}, expected {ARCH!r}")
        scaling = get(KEY_ROPE_SCALING_TYPE)
        if scaling not in (None, ROPE_SCALING_TYPE):
            raise ConfigError(f"{source}: {KEY_ROPE_SCALING_TYPE} is {describe_value(scaling)}, expected "
                              f"{ROPE_SCALING_TYPE!r}")
        values: dict[str, Any] = {}
        labels: dict[str, str] = {}
        for key, vtype, field in ARCH_METADATA:
            if key not in _OPTIONAL_KEYS:
                values[field] = typed(key, need(key), float if vtype == _F32 else int)
                labels[field] = f"metadata key {key!r}"

        vocab_size, tokens = get(KEY_VOCAB_SIZE), get(Keys.Tokenizer.LIST)
        if tokens is not None and (isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__len__")):
            raise ConfigError(f"{source}: metadata key {Keys.Tokenizer.LIST!r} must be an array of strings, "
                              f"got {describe_value(tokens)}")
        if vocab_size is not None:
            values["n_vocab"] = typed(KEY_VOCAB_SIZE, vocab_size, int)
            labels["n_vocab"] = f"metadata key {KEY_VOCAB_SIZE!r}"
        elif tokens is not None:  # llama.cpp takes the vocab size from the token list
            values["n_vocab"], labels["n_vocab"] = len(tokens), f"the length of {Keys.Tokenizer.LIST!r}"
        else:
            raise ConfigError(f"{source}: neither {KEY_VOCAB_SIZE!r} nor {Keys.Tokenizer.LIST!r} is present")
        try:
            _validate(values, labels)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if vocab_size is not None and tokens is not None and len(tokens) != vocab_size:
            raise ConfigError(f"{source}: {KEY_VOCAB_SIZE} is {vocab_size} but {Keys.Tokenizer.LIST} has "
                              f"{len(tokens)} entries")
        # Written by llama.cpp's converter but not needed here; still checked, so no key holds nonsense.
        value_length = get(KEY_VALUE_LENGTH)
        if value_length is not None and typed(KEY_VALUE_LENGTH, value_length, int) != values["head_dim"]:
            raise ConfigError(f"{source}: {KEY_VALUE_LENGTH} is {value_length} but {KEY_KEY_LENGTH} is "
                              f"{values['head_dim']}; gpt-oss keys and values have one head size")
        ff_length = get(KEY_FEED_FORWARD_LENGTH)
        if ff_length is not None and not 1 <= typed(KEY_FEED_FORWARD_LENGTH, ff_length, int) <= MAX_SIZE:
            raise ConfigError(f"{source}: {KEY_FEED_FORWARD_LENGTH} must be between 1 and {MAX_SIZE}, "
                              f"got {ff_length}")
        return cls(**values)

    def gguf_metadata(self) -> dict[str, tuple[GGUFValueType, Any]]:
        """The architecture keys llama.cpp's converter writes, as {key: (GGUF value type, value)}."""
        return {key: (vtype, getattr(self, field)) for key, vtype, field in ARCH_METADATA}


def _validate(values: Mapping[str, Any], labels: Mapping[str, str]) -> None:
    """Type and range checks of the ModelConfig fields in `values`; errors name each field by `labels` (its key
    in the source file) or else by the field name."""

    def name(field: str) -> str:
        return labels.get(field, field)

    for field in _INT_FIELDS:
        if field not in values:
            continue
        value, high = values[field], MAX_LAYERS if field == "n_layer" else MAX_SIZE
        if not is_int(value):
            raise ConfigError(f"{name(field)} must be an integer, got {describe_value(value)}")
        if not 1 <= value <= high:
            raise ConfigError(f"{name(field)} must be between 1 and {high}, got {describe_value(value)}")
    for field, (in_range, description) in _FLOAT_FIELDS.items():
        if field not in values:
            continue
        value = values[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or not in_range(value):
            raise ConfigError(f"{name(field)} must be a finite number {description}, got {describe_value(value)}")
        if field in _FLOAT32_FIELDS and not value <= FLOAT32_MAX:
            raise ConfigError(f"{name(field)} must be at most {FLOAT32_MAX:.8g}, the largest float32 (GGUF stores "
                              f"it as one), got {describe_value(value)}")

    def get(field: str) -> Any:
        return values.get(field)

    if get("n_head") and get("n_head_kv") and get("n_head") % get("n_head_kv"):
        raise ConfigError(f"{name('n_head')} ({get('n_head')}) is not a multiple of {name('n_head_kv')} "
                          f"({get('n_head_kv')})")
    if get("n_expert_used") and get("n_expert") and get("n_expert_used") > get("n_expert"):
        raise ConfigError(f"{name('n_expert_used')} ({get('n_expert_used')}) exceeds the expert count, "
                          f"{name('n_expert')} ({get('n_expert')})")
    if get("head_dim") and get("head_dim") % 2:
        raise ConfigError(f"{name('head_dim')} must be even for RoPE, got {get('head_dim')}")
    # MXFP4 blocks run along the input axis of every expert matrix (H for gate/up, I for down).
    for field in ("n_embd", "n_ff_exp"):
        if get(field) and get(field) % mxfp4.BLOCK_VALUES:
            raise ConfigError(f"{name(field)} must be a multiple of {mxfp4.BLOCK_VALUES} (MXFP4 block size), "
                              f"got {get(field)}")
    if get("rope_beta_fast") and get("rope_beta_slow") and not get("rope_beta_fast") > get("rope_beta_slow"):
        raise ConfigError(f"{name('rope_beta_fast')} ({get('rope_beta_fast')}) must be greater than "
                          f"{name('rope_beta_slow')} ({get('rope_beta_slow')})")


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def is_int(value: Any) -> bool:
    """An integer, not a bool (JSON's true would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def describe_value(value: Any) -> str:
    """A value for an error message, shortened (a corrupt file or config may hold a long string)."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits
        return "a huge integer"
    return text if len(text) <= 80 else text[:77] + "..."
