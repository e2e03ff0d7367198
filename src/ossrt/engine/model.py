"""The gpt-oss forward pass over the packed weights of a model file, with a KV cache (spec §2).

Weights are used where they lie in the memory-mapped file: `kernels` does the weight math (Numba kernels that decode
the file's blocks as they go) and `attention` the attention over the cache. Activations and accumulation are
float32. The small ops here are plain array expressions, so the same code can run on another array module later.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import numpy as np

from . import kernels
from ..defaults import DEFAULT_KV_TYPE
from ..errors import ContextLengthError, ParameterError
from ..format.config import ModelConfig
from ..format.modelfile import ModelFile
from .attention import attend
from .kv_cache import KVCache, LayerKV


class Cancelled(Exception):
    """A forward pass was stopped by its `should_stop` callback."""


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


def rms_norm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    """Spec §2.1: the gain used as stored (no +1)."""
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))) * gain


def apply_rope(v: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Half-split rotation (spec §2.3) of v [T, heads, d] by cos/sin [T, d/2]."""
    half = v.shape[-1] // 2
    a, b = v[..., :half], v[..., half:]
    c, s = cos[:, None], sin[:, None]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def softmax_top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Router (spec §2.5): the k largest logits per row and the softmax over just those."""
    ids = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    sel = np.take_along_axis(logits, ids, axis=1)
    w = np.exp(sel - sel.max(axis=1, keepdims=True))
    return ids, (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def linear(w: dict, name: str, x: np.ndarray) -> np.ndarray:
    """x @ W.T + b for the layer's `name.weight` and `name.bias`."""
    return kernels.linear(w[name + ".weight"], x) + w[name + ".bias"].data


class Transformer:
    """gpt-oss over a `ModelFile`: `forward(tokens, cache)` runs the next positions of the cache's sequence."""

    def __init__(self, model_file: ModelFile, threads: int | None = None):
        """`threads`: Numba threads for the kernels (None: all cores), applied in whichever thread runs a forward
        pass, since Numba's setting is per thread (a server's request threads, an app's worker threads)."""
        self.threads = kernels.set_num_threads(threads)
        self.config = cfg = model_file.config
        t = model_file.tensors
        self.token_embd = t["token_embd.weight"]
        self.output_norm = t["output_norm.weight"].data
        self.output = t["output.weight"]
        self.layers = [{name[len(f"blk.{i}."):]: tensor for name, tensor in t.items() if name.startswith(f"blk.{i}.")}
                       for i in range(cfg.n_layer)]
        self.inv_freq, self.concentration = yarn_frequencies(cfg)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        # One forward pass at a time: Numba's parallel kernels must not be entered from two threads at once.
        self._lock = threading.Lock()

    def new_cache(self, context_length: int, kv_type: str = DEFAULT_KV_TYPE) -> KVCache:
        return KVCache(self.config, context_length, kv_type)

    def rope_tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        angles = positions[:, None].astype(np.float64) * self.inv_freq[None, :]
        return ((np.cos(angles) * self.concentration).astype(np.float32),
                (np.sin(angles) * self.concentration).astype(np.float32))

    def forward(self, tokens, cache: KVCache, *, all_logits: bool = False,
                should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """Run `tokens` at the cache's next positions and append them to it, in steps of at most `cache.chunk`.
        Returns float32 logits [len(tokens), vocab] if `all_logits`, else [1, vocab] for the last position.
        `should_stop` is asked between layers; if it says yes, `Cancelled` is raised. If anything fails midway the
        cache is emptied, since its layers may already hold some of the new positions."""
        cfg = self.config
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ParameterError(f"tokens must be a non-empty 1-D sequence of ids, got shape {tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= cfg.n_vocab:
            bad = tokens[(tokens < 0) | (tokens >= cfg.n_vocab)][0]
            raise ParameterError(f"token id {bad} is outside the vocabulary of {cfg.n_vocab}")
        if cache.length + len(tokens) > cache.context_length:
            raise ContextLengthError(f"{cache.length} + {len(tokens)} tokens pass the context length "
                                     f"{cache.context_length}")
        with self._lock:
            kernels.set_num_threads(self.threads)
            hidden = []  # the final residual stream of the positions whose logits are asked for
            try:
                # A sliding-window ring holds its window and at most one chunk of new positions.
                for i in range(0, len(tokens), cache.chunk):
                    x = self._step(tokens[i:i + cache.chunk], cache, should_stop)
                    hidden.append(x if all_logits else x[-1:])
            except BaseException:
                cache.length = 0
                raise
            x = np.concatenate(hidden) if all_logits else hidden[-1]
            return kernels.linear(self.output, rms_norm(x, self.output_norm, cfg.rms_norm_eps))  # spec §2.7

    def _step(self, tokens: np.ndarray, cache: KVCache, should_stop: Callable[[], bool] | None) -> np.ndarray:
        """The residual stream [T, n_embd] after the last block, for `tokens` appended to the cache."""
        eps = self.config.rms_norm_eps
        start = cache.length
        rope = self.rope_tables(start + np.arange(len(tokens)))
        x = kernels.dequantize(self.token_embd, rows=tokens)
        for w, kv in zip(self.layers, cache.layers):
            if should_stop is not None and should_stop():
                raise Cancelled
            x = x + self._attention(w, rms_norm(x, w["attn_norm.weight"].data, eps), rope, kv, start)
            x = x + self._moe(w, rms_norm(x, w["post_attention_norm.weight"].data, eps))
        cache.length = start + len(tokens)
        return x

    def _attention(self, w: dict, h: np.ndarray, rope: tuple[np.ndarray, np.ndarray], kv: LayerKV,
                   start: int) -> np.ndarray:
        """Spec §2.2-2.4: q/k/v projections, RoPE on q and k, attention with sinks over the cache, output
        projection."""
        cfg = self.config
        T = h.shape[0]
        q = linear(w, "attn_q", h).reshape(T, cfg.n_head, cfg.head_dim)
        k = linear(w, "attn_k", h).reshape(T, cfg.n_head_kv, cfg.head_dim)
        v = linear(w, "attn_v", h).reshape(T, cfg.n_head_kv, cfg.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # Stored first, then attended over: the new positions see their own keys as the cache holds them, the same
        # values later queries will see.
        kv.store(start, k, v)
        out = attend(q, kv, start, w["attn_sinks.weight"].data, self.scale)
        return linear(w, "attn_output", out.reshape(T, cfg.n_head * cfg.head_dim))

    def _moe(self, w: dict, h: np.ndarray) -> np.ndarray:
        """Spec §2.5-2.6: the router's top-k experts weighted by a softmax over their logits, each a clamped
        SwiGLU MLP."""
        cfg = self.config
        experts, weights = softmax_top_k(linear(w, "ffn_gate_inp", h), cfg.n_expert_used)
        return kernels.moe(w["ffn_gate_exps.weight"], w["ffn_up_exps.weight"], w["ffn_down_exps.weight"],
                           w["ffn_gate_exps.bias"].data, w["ffn_up_exps.bias"].data, w["ffn_down_exps.bias"].data,
                           h, experts, weights, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
