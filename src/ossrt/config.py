"""The gpt-oss architecture: sizes and constants, read from HF config.json or GGUF metadata (spec §1, §5).

Every size in ossrt comes from here; nothing is hard-coded for 20b or 120b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import ConfigError

ARCH = "gpt-oss"

# GGUF metadata keys (llama.cpp's names, spec §5); "{arch}" is filled with ARCH.
KEY_BLOCK_COUNT = f"{ARCH}.block_count"
KEY_CONTEXT_LENGTH = f"{ARCH}.context_length"
KEY_EMBEDDING_LENGTH = f"{ARCH}.embedding_length"
KEY_FEED_FORWARD_LENGTH = f"{ARCH}.feed_forward_length"
KEY_EXPERT_FEED_FORWARD_LENGTH = f"{ARCH}.expert_feed_forward_length"
KEY_HEAD_COUNT = f"{ARCH}.attention.head_count"
KEY_HEAD_COUNT_KV = f"{ARCH}.attention.head_count_kv"
KEY_KEY_LENGTH = f"{ARCH}.attention.key_length"
KEY_VALUE_LENGTH = f"{ARCH}.attention.value_length"
KEY_RMS_EPS = f"{ARCH}.attention.layer_norm_rms_epsilon"
KEY_SLIDING_WINDOW = f"{ARCH}.attention.sliding_window"
KEY_EXPERT_COUNT = f"{ARCH}.expert_count"
KEY_EXPERT_USED_COUNT = f"{ARCH}.expert_used_count"
KEY_ROPE_FREQ_BASE = f"{ARCH}.rope.freq_base"
KEY_ROPE_SCALING_TYPE = f"{ARCH}.rope.scaling.type"
KEY_ROPE_SCALING_FACTOR = f"{ARCH}.rope.scaling.factor"
KEY_ROPE_SCALING_ORIG_CTX = f"{ARCH}.rope.scaling.original_context_length"
KEY_VOCAB_SIZE = f"{ARCH}.vocab_size"


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

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_ff_exp", "n_head", "n_head_kv", "head_dim", "n_expert",
                     "n_expert_used", "n_vocab", "n_ctx_train", "sliding_window", "rope_orig_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_head % self.n_head_kv:
            raise ConfigError(f"n_head ({self.n_head}) is not a multiple of n_head_kv ({self.n_head_kv})")
        if self.n_expert_used > self.n_expert:
            raise ConfigError(f"experts per token ({self.n_expert_used}) exceeds expert count ({self.n_expert})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        # MXFP4 blocks run along the input axis of every expert matrix (H for gate/up, I for down).
        for name in ("n_embd", "n_ff_exp"):
            if getattr(self, name) % 32:
                raise ConfigError(f"{name} must be a multiple of 32 (MXFP4 block size), got {getattr(self, name)}")
        if not self.rope_scaling_factor >= 1.0:
            raise ConfigError(f"rope scaling factor must be >= 1, got {self.rope_scaling_factor}")

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

    def kv_cache_bytes(self, context_length: int, bytes_per_value: int = 4) -> int:
        """KV cache for one sequence: full layers hold `context_length` positions, sliding layers a window."""
        per_pos = 2 * self.kv_dim * bytes_per_value
        full = sum(1 for i in range(self.n_layer) if not self.is_sliding(i))
        sliding = self.n_layer - full
        return per_pos * (full * context_length + sliding * min(self.sliding_window, context_length))

    # --- sources -----------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """From an HF `config.json` dict; `source` names the file in errors."""
        if cfg.get("model_type") != "gpt_oss":
            raise ConfigError(f"{source}: model_type is {cfg.get('model_type')!r}, expected 'gpt_oss'")

        def need(*keys: str) -> Any:
            for key in keys:
                if key in cfg and cfg[key] is not None:
                    return cfg[key]
            raise ConfigError(f"{source}: missing field {keys[0]!r}")

        # Newer transformers write `rope_parameters`; older `rope_scaling`. Dropping it would silently disable YaRN.
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        if not isinstance(rope, Mapping):
            raise ConfigError(f"{source}: missing field 'rope_scaling' (YaRN parameters)")
        if rope.get("rope_type", rope.get("type")) != "yarn":
            raise ConfigError(f"{source}: rope_scaling.rope_type is {rope.get('rope_type')!r}, expected 'yarn'")
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta"))
        if rope_theta is None:
            raise ConfigError(f"{source}: missing field 'rope_theta'")
        n_head = need("num_attention_heads")
        try:
            return cls(
                n_layer=need("num_hidden_layers"),
                n_embd=need("hidden_size"),
                n_ff_exp=need("intermediate_size"),
                n_head=n_head,
                n_head_kv=need("num_key_value_heads"),
                head_dim=cfg.get("head_dim") or need("hidden_size") // n_head,
                n_expert=need("num_local_experts", "num_experts"),
                n_expert_used=need("num_experts_per_tok", "experts_per_token"),
                n_vocab=need("vocab_size"),
                n_ctx_train=need("max_position_embeddings"),
                sliding_window=need("sliding_window"),
                rope_freq_base=float(rope_theta),
                rope_scaling_factor=float(_field(rope, "factor", source, "rope_scaling")),
                rope_orig_ctx=int(rope.get("original_max_position_embeddings") or need("initial_context_length")),
                rope_beta_fast=float(rope.get("beta_fast", 32.0)),
                rope_beta_slow=float(rope.get("beta_slow", 1.0)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_gguf(cls, get: Callable[[str], Any], source: str) -> "ModelConfig":
        """From GGUF metadata; `get(key)` returns the value or None. YaRN betas and SwiGLU constants are not
        stored in GGUF (llama.cpp hard-codes them), so the defaults apply."""

        def need(key: str) -> Any:
            value = get(key)
            if value is None:
                raise ConfigError(f"{source}: missing metadata key {key!r}")
            return value

        arch = get("general.architecture")
        if arch != ARCH:
            raise ConfigError(f"{source}: general.architecture is {arch!r}, expected {ARCH!r}")
        scaling = get(KEY_ROPE_SCALING_TYPE)
        if scaling not in (None, "yarn"):
            raise ConfigError(f"{source}: {KEY_ROPE_SCALING_TYPE} is {scaling!r}, expected 'yarn'")
        n_vocab = get(KEY_VOCAB_SIZE)
        if n_vocab is None:  # llama.cpp takes the vocab size from the token list
            tokens = get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ConfigError(f"{source}: neither {KEY_VOCAB_SIZE!r} nor 'tokenizer.ggml.tokens' is present")
            n_vocab = len(tokens)
        try:
            return cls(
                n_layer=int(need(KEY_BLOCK_COUNT)),
                n_embd=int(need(KEY_EMBEDDING_LENGTH)),
                n_ff_exp=int(need(KEY_EXPERT_FEED_FORWARD_LENGTH)),
                n_head=int(need(KEY_HEAD_COUNT)),
                n_head_kv=int(need(KEY_HEAD_COUNT_KV)),
                head_dim=int(need(KEY_KEY_LENGTH)),
                n_expert=int(need(KEY_EXPERT_COUNT)),
                n_expert_used=int(need(KEY_EXPERT_USED_COUNT)),
                n_vocab=int(n_vocab),
                n_ctx_train=int(need(KEY_CONTEXT_LENGTH)),
                sliding_window=int(need(KEY_SLIDING_WINDOW)),
                rope_freq_base=float(need(KEY_ROPE_FREQ_BASE)),
                rope_scaling_factor=float(need(KEY_ROPE_SCALING_FACTOR)),
                rope_orig_ctx=int(need(KEY_ROPE_SCALING_ORIG_CTX)),
                rms_norm_eps=float(need(KEY_RMS_EPS)),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def gguf_metadata(self) -> dict[str, tuple[str, Any]]:
        """The architecture keys llama.cpp's converter writes, as {key: (gguf value type, value)}."""
        return {
            KEY_BLOCK_COUNT: ("uint32", self.n_layer),
            KEY_CONTEXT_LENGTH: ("uint32", self.n_ctx_train),
            KEY_EMBEDDING_LENGTH: ("uint32", self.n_embd),
            KEY_FEED_FORWARD_LENGTH: ("uint32", self.n_ff_exp),
            KEY_HEAD_COUNT: ("uint32", self.n_head),
            KEY_HEAD_COUNT_KV: ("uint32", self.n_head_kv),
            KEY_ROPE_FREQ_BASE: ("float32", self.rope_freq_base),
            KEY_RMS_EPS: ("float32", self.rms_norm_eps),
            KEY_EXPERT_COUNT: ("uint32", self.n_expert),
            KEY_EXPERT_USED_COUNT: ("uint32", self.n_expert_used),
            KEY_KEY_LENGTH: ("uint32", self.head_dim),
            KEY_VALUE_LENGTH: ("uint32", self.head_dim),
            KEY_SLIDING_WINDOW: ("uint32", self.sliding_window),
            KEY_EXPERT_FEED_FORWARD_LENGTH: ("uint32", self.n_ff_exp),
            KEY_ROPE_SCALING_TYPE: ("string", "yarn"),
            KEY_ROPE_SCALING_FACTOR: ("float32", self.rope_scaling_factor),
            KEY_ROPE_SCALING_ORIG_CTX: ("uint32", self.rope_orig_ctx),
        }


def _field(mapping: Mapping[str, Any], key: str, source: str, where: str) -> Any:
    if mapping.get(key) is None:
        raise ConfigError(f"{source}: missing field '{where}.{key}'")
    return mapping[key]
