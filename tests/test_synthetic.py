"""Synthetic checkpoints: tokenizer files reproduce tiktoken, determinism, layouts agree, sane activations."""

import hashlib
import json
import math

import numpy as np
import pytest
import regex
import tiktoken

from ossrt.format import mxfp4

from ossrt.testing import synthetic
from ossrt.tokenizer import O200K_PATTERN, SPECIAL_TOKENS, unicode_token_to_bytes
from ossrt.format.config import ModelConfig
from ossrt.format.checkpoint import Checkpoint
from ossrt.format.convert import convert
from ossrt.format.safetensors import read_shard


def test_tiny_config_yarn_is_valid():
    c = ModelConfig.from_hf_config(synthetic.hf_config("tiny"))
    d_half = c.head_dim // 2

    def corr(beta):  # spec §2.3, no rounding
        return d_half * math.log(c.rope_orig_ctx / (beta * 2 * math.pi)) / math.log(c.rope_freq_base)

    low, high = corr(c.rope_beta_fast), corr(c.rope_beta_slow)
    assert 0 < low < high < d_half - 1
    assert (c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_expert, c.sliding_window) == (4, 64, 4, 2, 16, 8, 8)
    big = ModelConfig.from_hf_config(synthetic.hf_config("120b"))
    assert (big.n_layer, big.n_expert, big.n_embd) == (36, 128, 2880)


def test_shipped_vocabulary_is_o200k_base():
    data = synthetic.o200k_base()
    assert hashlib.sha256(data).hexdigest() == "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
    tokens = synthetic.load_ranks()
    assert len(tokens) == 199998 and tokens[:3] == [b"!", b'"', b"#"] and tokens[13225] == b"Hello"


def test_ranks_must_follow_file_order(tmp_path):
    """The merges are derived from the token order, so a vocabulary listing ranks out of order is refused."""
    path = tmp_path / "v.tiktoken"
    path.write_bytes(b"IQ== 1\nIg== 0\n")  # "!" then '"', ranks swapped
    with pytest.raises(ValueError, match=r"token 0 of the file \(b'!'\) has rank 1, expected 0$"):
        synthetic.load_ranks(path)
    path.write_bytes(b"IQ== 0\nIg== 1\n")
    assert synthetic.load_ranks(path) == [b"!", b'"']


def _bpe(piece: bytes, ranks: dict) -> list[bytes]:
    """HF BPE: repeatedly merge the adjacent pair with the lowest merge rank."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        pairs = [p for p in pairs if p[0] is not None]
        if not pairs:
            break
        _, i = min(pairs)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def test_tokenizer_json_reproduces_tiktoken(tiny_checkpoint, o200k_path):
    d = tiny_checkpoint()
    tok = json.loads((d / "tokenizer.json").read_text())
    u2b = unicode_token_to_bytes
    vocab = {u2b(s): i for s, i in tok["model"]["vocab"].items()}
    merges = tok["model"]["merges"]
    assert len(vocab) == 199998 and len(merges) == 446189
    ranks = {(u2b(a), u2b(b)): r for r, (a, b) in enumerate(merges)}
    added = {a["id"]: a["content"] for a in tok["added_tokens"]}
    assert added == SPECIAL_TOKENS and len(added) == 21
    enc = tiktoken.Encoding("o200k", pat_str=O200K_PATTERN,
                            mergeable_ranks=dict(zip(synthetic.load_ranks(o200k_path), range(199998))),
                            special_tokens={})
    text = "Hello, world! Ünïcödé 12345 tokens'll    split\n\n  déjà vu — 日本語のテキスト 🙂 x=y+1;"
    ours = [vocab[p] for piece in regex.findall(O200K_PATTERN, text) for p in _bpe(piece.encode(), ranks)]
    assert ours == enc.encode(text)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|startoftext|>", "<|return|>", "<|endoftext|>")
    assert "<|start|>assistant" in cfg["chat_template"]


def test_deterministic_for_a_seed(tiny_checkpoint, tmp_path, o200k_path):
    cfg = synthetic.hf_config("tiny")
    plan = synthetic.plan_tensors(cfg, "mxfp4")[:20]
    synthetic.write_safetensors(tmp_path / "a.safetensors", plan, seed=0)
    synthetic.write_safetensors(tmp_path / "b.safetensors", plan, seed=1)
    ck = Checkpoint(tiny_checkpoint())
    _, ta = read_shard(tmp_path / "a.safetensors")
    _, tb = read_shard(tmp_path / "b.safetensors")
    for t in plan:  # same seed: the same bytes, whatever the sharding
        np.testing.assert_array_equal(ta[t.name].data, ck.tensors[t.name].data)
    assert not np.array_equal(ta["model.embed_tokens.weight"].data, tb["model.embed_tokens.weight"].data)
    ck.close()


def test_bf16_layout_holds_the_mxfp4_values(tiny_checkpoint):
    a, b = Checkpoint(tiny_checkpoint()), Checkpoint(tiny_checkpoint("bf16"))
    assert a.layout == "mxfp4" and b.layout == "bf16"
    x = "model.layers.2.mlp.experts."
    deq = mxfp4.dequantize_hf(a.tensors[x + "gate_up_proj_blocks"].data, a.tensors[x + "gate_up_proj_scales"].data)
    np.testing.assert_array_equal(np.swapaxes(deq, 1, 2), b.tensors[x + "gate_up_proj"].f32())
    assert "quantization_config" not in b.hf_config and "quantization_config" in a.hf_config
    a.close()
    b.close()


def _rms(x):
    return float(np.sqrt(np.mean(x * x)))


def test_weights_are_sane(tiny_checkpoint):
    """A plain forward sketch over the synthetic weights (causal attention with sinks, no RoPE; top-4 MoE with
    clamped SwiGLU — enough to see the scales): the residual stream's RMS stays in 0.3..3 through every layer and
    each layer's router uses most experts on a 64-token prompt."""
    ck = Checkpoint(tiny_checkpoint())
    c = ck.config
    w = lambda n: ck.tensors[n].f32()  # noqa: E731
    rng = np.random.default_rng(0)
    h = w("model.embed_tokens.weight")[rng.integers(0, 199998, 64)]
    T = len(h)

    def norm(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * g

    for i in range(c.n_layer):
        p = f"model.layers.{i}."
        x = norm(h, w(p + "input_layernorm.weight"))
        q = (x @ w(p + "self_attn.q_proj.weight").T + w(p + "self_attn.q_proj.bias")).reshape(T, c.n_head, -1)
        k = (x @ w(p + "self_attn.k_proj.weight").T + w(p + "self_attn.k_proj.bias")).reshape(T, c.n_head_kv, -1)
        v = (x @ w(p + "self_attn.v_proj.weight").T + w(p + "self_attn.v_proj.bias")).reshape(T, c.n_head_kv, -1)
        rep = c.n_head // c.n_head_kv
        k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
        s = np.einsum("thd,jhd->htj", q, k) / math.sqrt(c.head_dim)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        sink = w(p + "self_attn.sinks")[:, None, None]
        m = np.maximum(s.max(-1, keepdims=True), sink)
        e = np.exp(s - m)
        a = e / (e.sum(-1, keepdims=True) + np.exp(sink - m))
        o = np.einsum("htj,jhd->thd", a, v).reshape(T, -1)
        h = h + o @ w(p + "self_attn.o_proj.weight").T + w(p + "self_attn.o_proj.bias")
        x = norm(h, w(p + "post_attention_layernorm.weight"))
        logits = x @ w(p + "mlp.router.weight").T + w(p + "mlp.router.bias")
        top = np.argsort(-logits, -1)[:, :c.n_expert_used]
        assert len(np.unique(top)) >= c.n_expert - 1, f"layer {i} uses {len(np.unique(top))} experts"
        gw = np.take_along_axis(logits, top, -1)
        gw = np.exp(gw - gw.max(-1, keepdims=True))
        gw /= gw.sum(-1, keepdims=True)
        X = p + "mlp.experts."
        gu = mxfp4.dequantize_hf(ck.tensors[X + "gate_up_proj_blocks"].data, ck.tensors[X + "gate_up_proj_scales"].data)
        dn = mxfp4.dequantize_hf(ck.tensors[X + "down_proj_blocks"].data, ck.tensors[X + "down_proj_scales"].data)
        gub, dnb = w(X + "gate_up_proj_bias"), w(X + "down_proj_bias")
        out = np.zeros_like(h)
        for t in range(T):
            for j, ex in enumerate(top[t]):
                y = gu[ex] @ x[t] + gub[ex]
                g, u = np.minimum(y[0::2], 7.0), np.clip(y[1::2], -7.0, 7.0)
                act = g / (1 + np.exp(-1.702 * g)) * (u + 1)
                out[t] += gw[t, j] * (dn[ex] @ act + dnb[ex])
        h = h + out
        assert 0.3 < _rms(h) < 3, f"layer {i}: residual RMS {_rms(h):.3f}"
    ck.close()


def test_gguf_written_directly_is_the_converted_checkpoint(tmp_path):
    """write_gguf makes each tensor as the converter reads it, never writing the checkpoint: the same bytes as
    converting write_checkpoint's, also when every tensor is dropped after each read and made again."""
    cfg = synthetic.hf_config("tiny")
    converted = convert(synthetic.write_checkpoint(tmp_path / "ckpt", cfg, seed=3), tmp_path / "a.gguf", name="m")
    direct = synthetic.write_gguf(tmp_path / "b.gguf", cfg, seed=3, name="m")
    remade = synthetic.write_gguf(tmp_path / "c.gguf", cfg, seed=3, name="m", budget=0)
    assert direct.read_bytes() == converted.read_bytes() == remade.read_bytes()
    assert synthetic.write_gguf(tmp_path / "d.gguf", cfg, seed=4, name="m").read_bytes() != direct.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf", "ckpt", "d.gguf"]
