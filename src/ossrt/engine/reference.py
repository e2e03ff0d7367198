"""The gpt-oss forward pass in plain NumPy, line by line from the spec (§2): the yardstick for the fast path.

Every weight is dequantized in full (by gguf's NumPy code) and all math runs in float64, so this is only for tiny
models and tests. It shares nothing with the fast path but the file reader.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import quants

from ..format.config import ModelConfig
from ..format.modelfile import ModelFile, Tensor


def weight(t: Tensor) -> np.ndarray:
    """A tensor of the file as float64 of its logical shape, by gguf's own dequantizer."""
    values = quants.dequantize(np.ascontiguousarray(t.data).view(np.uint8), t.type)
    return np.asarray(values, dtype=np.float64).reshape(t.shape)


def rms_norm(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """§2.1: x · rsqrt(mean(x²) + eps) · g, the gain used as stored."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def yarn_cos_sin(cfg: ModelConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """§2.3: cos and sin [T, head_dim/2] with YaRN frequencies, scaled by the concentration."""
    d = cfg.head_dim
    d_half = d // 2
    base, s, l0 = cfg.rope_freq_base, cfg.rope_scaling_factor, cfg.rope_orig_ctx
    freq = base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    low = d_half * math.log(l0 / (cfg.rope_beta_fast * 2 * math.pi)) / math.log(base)
    high = d_half * math.log(l0 / (cfg.rope_beta_slow * 2 * math.pi)) / math.log(base)
    assert 0 < low < high < d_half - 1
    ramp = np.clip((np.arange(d_half) - low) / (high - low), 0, 1)
    mask = 1 - ramp
    inv_freq = (1 / freq) * mask + (1 / (s * freq)) * (1 - mask)
    concentration = 0.1 * math.log(s) + 1.0
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
    return np.cos(angles) * concentration, np.sin(angles) * concentration


def rope(v: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """§2.3 half-split rotation of v [T, heads, head_dim]: pairs (v[i], v[i + d/2])."""
    half = v.shape[-1] // 2
    a, b = v[..., :half], v[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def attention(cfg: ModelConfig, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, sinks: np.ndarray,
              ) -> np.ndarray:
    """§2.4 for a whole sequence: q [T, n_head, d], k/v [T, n_head_kv, d] → [T, n_head·d]."""
    T = q.shape[0]
    t = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    allowed = j <= t
    if cfg.is_sliding(layer):
        allowed &= (t - j) < cfg.sliding_window
    per_kv = cfg.n_head // cfg.n_head_kv
    out = np.empty((T, cfg.n_head, cfg.head_dim))
    for h in range(cfg.n_head):
        g = h // per_kv
        a = (q[:, h] @ k[:, g].T) / math.sqrt(cfg.head_dim)  # 0.125 for head_dim 64
        a = np.where(allowed, a, -np.inf)
        full = np.concatenate([a, np.full((T, 1), sinks[h])], axis=1)  # the sink as an extra column
        p = np.exp(full - full.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[:, h] = p[:, :T] @ v[:, g]  # the sink's column is dropped: it has no value
    return out.reshape(T, -1)


def moe(cfg: ModelConfig, w: dict[str, np.ndarray], h: np.ndarray) -> np.ndarray:
    """§2.5 router (softmax over the top-k logits) and §2.6 clamped SwiGLU experts."""
    r = h @ w["ffn_gate_inp.weight"].T + w["ffn_gate_inp.bias"]
    out = np.zeros_like(h)
    limit, alpha = cfg.swiglu_limit, cfg.swiglu_alpha
    for t in range(h.shape[0]):
        idx = np.argsort(-r[t], kind="stable")[: cfg.n_expert_used]
        sel = np.exp(r[t, idx] - r[t, idx].max())
        weights = sel / sel.sum()
        for e, we in zip(idx, weights):
            g = w["ffn_gate_exps.weight"][e] @ h[t] + w["ffn_gate_exps.bias"][e]
            lin = w["ffn_up_exps.weight"][e] @ h[t] + w["ffn_up_exps.bias"][e]
            g = np.minimum(g, limit)
            lin = np.clip(lin, -limit, limit)
            a = g * (1 / (1 + np.exp(-alpha * g))) * (lin + 1)
            out[t] += we * (w["ffn_down_exps.weight"][e] @ a + w["ffn_down_exps.bias"][e])
    return out


def load_weights(mf: ModelFile) -> dict[str, np.ndarray]:
    """Every tensor of the file, dequantized to float64."""
    return {name: weight(t) for name, t in mf.tensors.items()}


def forward(cfg: ModelConfig, weights: dict[str, np.ndarray], tokens) -> np.ndarray:
    """Logits float32 [T, vocab] at every position of `tokens`, a fresh sequence starting at position 0."""
    tokens = np.asarray(tokens, dtype=np.int64)
    T = len(tokens)
    x = weights["token_embd.weight"][tokens]
    cos, sin = yarn_cos_sin(cfg, np.arange(T))
    for layer in range(cfg.n_layer):
        prefix = f"blk.{layer}."
        w = {name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)}
        h = rms_norm(x, w["attn_norm.weight"], cfg.rms_norm_eps)
        q = (h @ w["attn_q.weight"].T + w["attn_q.bias"]).reshape(T, cfg.n_head, cfg.head_dim)
        k = (h @ w["attn_k.weight"].T + w["attn_k.bias"]).reshape(T, cfg.n_head_kv, cfg.head_dim)
        v = (h @ w["attn_v.weight"].T + w["attn_v.bias"]).reshape(T, cfg.n_head_kv, cfg.head_dim)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        attn = attention(cfg, layer, q, k, v, w["attn_sinks.weight"])
        x = x + attn @ w["attn_output.weight"].T + w["attn_output.bias"]
        x = x + moe(cfg, w, rms_norm(x, w["post_attention_norm.weight"], cfg.rms_norm_eps))
    x = rms_norm(x, weights["output_norm.weight"], cfg.rms_norm_eps)
    return (x @ weights["output.weight"].T).astype(np.float32)
