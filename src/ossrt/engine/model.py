"""The gpt-oss forward pass (spec §2) over a model file's tensors and a KV cache, on a backend's `Ops`.

The model is written once, here; a backend supplies the operations on its arrays: `engine.cpu.CpuOps` (NumPy, Numba
kernels over the memory-mapped weights) or `engine.cuda.CudaOps` (device arrays, numba.cuda kernels). Activations
and accumulation are float32; logits come back to the host as NumPy.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, ContextManager, Protocol

import numpy as np

from ..defaults import DEFAULT_KV_TYPE
from ..errors import ContextLengthError, ParameterError
from ..format.config import ModelConfig
from ..format.modelfile import ModelFile


class Cancelled(Exception):
    """A forward pass was stopped by its `should_stop` callback."""


class Ops(Protocol):
    """What the forward pass needs of a backend. Arrays are the backend's (NumPy on the CPU, device arrays on CUDA);
    `w` is a weight tensor as `upload` returned it (`.name`, `.type`, NumPy-order `.shape`, the raw stored `.data`);
    `positions` are consecutive."""

    threads: int | None  # CPU threads for the kernels (None where that does not apply)
    # The most tokens a pass takes with each token's numbers bit for bit those of a pass of it alone (1: a backend
    # with no such passes): drafted tokens are checked in such passes.
    few_tokens: int

    def context(self) -> ContextManager:
        """The calling thread's settings for work on the backend, made while inside (they are per thread)."""

    def array(self, a: np.ndarray) -> Any:
        """A host array where the backend computes."""

    def upload(self, tensor: Any) -> Any:
        """A model file's tensor where the backend computes with it, as stored."""

    def new_cache(self, config: ModelConfig, context_length: int, kv_type: str, chunk: int = ...) -> Any:
        """An empty KV cache (engine.kv_cache.KVCache's semantics) whose layers `store` and `attend` take."""

    def step(self, blocks: Callable, tokens: np.ndarray, start: int, cache: Any,
             should_stop: Callable[[], bool] | None) -> Any:
        """`blocks(tokens, positions, cache, should_stop)` for host `tokens` at positions start, start + 1, ...,
        given as backend arrays (a backend may replay a recorded step instead)."""

    def embed(self, w: Any, tokens: Any) -> Any:
        """float32 [T, n_embd]: the embedding rows of `tokens`."""

    def linear(self, w: Any, x: Any, bias: Any = None) -> Any:
        """float32 [T, out] = x @ W.T (+ bias)."""

    def linear_many(self, ws: list, x: Any, biases: list) -> list:
        """[`linear`(w, x, b) for each w, b]: one input through several matrices (a backend may fuse them)."""

    def rms_norm(self, x: Any, gain: Any, eps: float) -> Any:
        """Spec §2.1: the gain used as stored (no +1)."""

    def rotation(self, positions: Any, inv_freq: Any, concentration: float) -> Any:
        """What `rope` needs to rotate vectors at `positions` (spec §2.3: angles in float64, cos and sin times the
        concentration)."""

    def rope(self, q: Any, k: Any, rotation: Any) -> tuple[Any, Any]:
        """Half-split rotation (spec §2.3) of q [T, n_head, d] and k [T, n_head_kv, d] (a backend may rotate them
        in place)."""

    def router(self, logits: Any, k: int) -> tuple[Any, Any]:
        """Spec §2.5: per row the ids of the k largest logits and the softmax over just those."""

    def moe(self, gate: Any, up: Any, down: Any, gate_b: Any, up_b: Any, down_b: Any, x: Any, ids: Any,
            weights: Any, alpha: float, limit: float) -> Any:
        """Spec §2.6: Σ over each row's experts of weight · clamped SwiGLU MLP, float32 [T, n_embd]."""

    def store(self, kv: Any, positions: Any, k: Any, v: Any) -> None:
        """Write keys/values [T, n_head_kv, d] of `positions` into a cache layer."""

    def attend(self, q: Any, kv: Any, positions: Any, sinks: Any, scale: float) -> Any:
        """Spec §2.4: attention with sinks of q [T, n_head, d] at `positions` over the cache layer, which holds
        these positions and the window before them. float32 [T, n_head, d]."""

    def to_host(self, x: Any) -> np.ndarray:
        """x as a NumPy array."""


def yarn_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """RoPE inverse frequencies with YaRN blending, and the concentration that scales cos and sin (spec §2.3).
    The correction range is not rounded (llama.cpp rounds it; the reference does not)."""
    d, d_half = cfg.head_dim, cfg.head_dim // 2
    base, factor = cfg.rope_freq_base, cfg.rope_scaling_factor
    freq = base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    low = d_half * math.log(cfg.rope_orig_ctx / (cfg.rope_beta_fast * 2 * math.pi)) / math.log(base)
    high = d_half * math.log(cfg.rope_orig_ctx / (cfg.rope_beta_slow * 2 * math.pi)) / math.log(base)
    extrapolate = 1 - np.clip((np.arange(d_half) - low) / (high - low), 0, 1)  # 1 = keep the original frequency
    inv_freq = extrapolate / freq + (1 - extrapolate) / (factor * freq)
    return inv_freq, 0.1 * math.log(factor) + 1.0


class Transformer:
    """gpt-oss over a `ModelFile`: `forward(tokens, cache)` runs the next positions of the cache's sequence."""

    def __init__(self, model_file: ModelFile, ops: Ops):
        self.ops = ops
        self.config = cfg = model_file.config
        t = {name: ops.upload(tensor) for name, tensor in model_file.tensors.items()}
        self.token_embd = t["token_embd.weight"]
        self.output_norm = t["output_norm.weight"].data
        self.output = t["output.weight"]
        self.layers = [{name[len(f"blk.{i}."):]: tensor for name, tensor in t.items() if name.startswith(f"blk.{i}.")}
                       for i in range(cfg.n_layer)]
        inv_freq, self.concentration = yarn_frequencies(cfg)
        self.inv_freq = ops.array(inv_freq)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        # One forward pass at a time: a backend's kernels and buffers are not for two passes at once.
        self._lock = threading.Lock()

    @property
    def threads(self) -> int | None:
        return self.ops.threads

    @property
    def few_tokens(self) -> int:
        return self.ops.few_tokens

    def new_cache(self, context_length: int, kv_type: str = DEFAULT_KV_TYPE) -> Any:
        return self.ops.new_cache(self.config, context_length, kv_type)

    def forward(self, tokens, cache, *, all_logits: bool = False,
                should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """Run `tokens` at the cache's next positions and append them to it, in steps of at most `cache.chunk`.
        Returns float32 logits [len(tokens), vocab] if `all_logits`, else [1, vocab] for the last position.
        `should_stop` is asked between layers; if it says yes, `Cancelled` is raised. If anything fails midway the
        cache is emptied, since its layers may already hold some of the new positions."""
        cfg, ops = self.config, self.ops
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ParameterError(f"tokens must be a non-empty 1-D sequence of ids, got shape {tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= cfg.n_vocab:
            bad = tokens[(tokens < 0) | (tokens >= cfg.n_vocab)][0]
            raise ParameterError(f"token id {bad} is outside the vocabulary of {cfg.n_vocab}")
        if cache.length + len(tokens) > cache.context_length:
            raise ContextLengthError(f"{cache.length} + {len(tokens)} tokens pass the context length "
                                     f"{cache.context_length}")
        with self._lock, ops.context():
            logits = []
            try:
                # A sliding-window ring holds its window and at most one chunk of new positions.
                for i in range(0, len(tokens), cache.chunk):
                    piece = tokens[i:i + cache.chunk]
                    x = ops.step(self._blocks, piece, cache.length, cache, should_stop)
                    cache.length += len(piece)
                    if all_logits or i + cache.chunk >= len(tokens):
                        logits.append(self._logits(x if all_logits else x[-1:]))
            except BaseException:
                cache.length = 0
                raise
            return logits[0] if len(logits) == 1 else np.concatenate(logits)

    def _blocks(self, tokens, positions, cache, should_stop: Callable[[], bool] | None):
        """The residual stream [T, n_embd] after the last block, for `tokens` at `positions`, which are stored in
        the cache's layers on the way."""
        ops, eps = self.ops, self.config.rms_norm_eps
        rotation = ops.rotation(positions, self.inv_freq, self.concentration)
        x = ops.embed(self.token_embd, tokens)
        for w, kv in zip(self.layers, cache.layers):
            if should_stop is not None and should_stop():
                raise Cancelled
            x = x + self._attention(w, ops.rms_norm(x, w["attn_norm.weight"].data, eps), rotation, kv, positions)
            x = x + self._moe(w, ops.rms_norm(x, w["post_attention_norm.weight"].data, eps))
        return x

    def _logits(self, x) -> np.ndarray:
        """Spec §2.7: the unembedding of the final norm of x [T, n_embd], as NumPy."""
        ops = self.ops
        return ops.to_host(ops.linear(self.output, ops.rms_norm(x, self.output_norm, self.config.rms_norm_eps)))

    def _linear(self, w: dict, name: str, x):
        """x @ W.T + b for the layer's `name.weight` and `name.bias`."""
        return self.ops.linear(w[name + ".weight"], x, w[name + ".bias"].data)

    def _attention(self, w: dict, h, rotation, kv, positions):
        """Spec §2.2-2.4: q/k/v projections, RoPE on q and k, attention with sinks over the cache, output
        projection."""
        cfg, ops = self.config, self.ops
        T = h.shape[0]
        names = ("attn_q", "attn_k", "attn_v")
        q, k, v = ops.linear_many([w[n + ".weight"] for n in names], h, [w[n + ".bias"].data for n in names])
        q = q.reshape(T, cfg.n_head, cfg.head_dim)
        k, v = k.reshape(T, cfg.n_head_kv, cfg.head_dim), v.reshape(T, cfg.n_head_kv, cfg.head_dim)
        q, k = ops.rope(q, k, rotation)
        # Stored first, then attended over: the new positions see their own keys as the cache holds them, the same
        # values later queries will see.
        ops.store(kv, positions, k, v)
        out = ops.attend(q, kv, positions, w["attn_sinks.weight"].data, self.scale)
        return self._linear(w, "attn_output", out.reshape(T, cfg.n_head * cfg.head_dim))

    def _moe(self, w: dict, h):
        """Spec §2.5-2.6: the router's top-k experts weighted by a softmax over their logits, each a clamped
        SwiGLU MLP."""
        cfg = self.config
        experts, weights = self.ops.router(self._linear(w, "ffn_gate_inp", h), cfg.n_expert_used)
        return self.ops.moe(w["ffn_gate_exps.weight"], w["ffn_up_exps.weight"], w["ffn_down_exps.weight"],
                            w["ffn_gate_exps.bias"].data, w["ffn_up_exps.bias"].data, w["ffn_down_exps.bias"].data,
                            h, experts, weights, cfg.swiglu_alpha, cfg.swiglu_limit)
