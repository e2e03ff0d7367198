"""The fast forward pass against the float64 NumPy reference written from the spec, and the KV cache."""

import platform
import subprocess
import sys

import numpy as np
import pytest

from ossrt.engine import reference
from ossrt.engine.cpu import CpuOps
from ossrt.engine.kv_cache import CHUNK, KVCache, cache_bytes
from ossrt.engine.model import Transformer, yarn_frequencies
from ossrt.errors import ContextLengthError, ParameterError
from ossrt.format.modelfile import ModelFile

# (outtype, source layout, HF config overrides): more than one shape, more experts than top-k, prompts that cross
# the sliding window.
SHAPES = {
    "tiny-q8_0": ("q8_0", "mxfp4", {}),
    "odd-bf16": ("bf16", "mxfp4", dict(hidden_size=96, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                        num_local_experts=5, num_experts_per_tok=2, sliding_window=5)),
    "fine-tune-f32": ("f32", "bf16", dict(num_attention_heads=8, num_key_value_heads=1, sliding_window=16)),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def tiny(request, tiny_gguf):
    outtype, layout, overrides = SHAPES[request.param]
    mf = ModelFile.open(tiny_gguf(outtype, layout, **overrides))
    yield mf, Transformer(mf, CpuOps(int8_activations=False)), reference.load_weights(mf)
    mf.close()


def prompt(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 201088, n)


def assert_close(got: np.ndarray, expect: np.ndarray) -> None:
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())


def small_rings(mf: ModelFile, context_length: int, kv_type: str = "f32", chunk: int = 3) -> KVCache:
    """A cache whose forward steps are at most `chunk` positions, so the sliding layers' rings are window + 2 slots
    and wrap around within a few tokens (at the default chunk of 512 a tiny model's ring is its whole context)."""
    cache = KVCache(mf.config, context_length, kv_type, chunk=chunk)
    assert any(layer.capacity < context_length for layer in cache.layers)
    return cache


def test_logits_match_reference_at_every_position(tiny):
    mf, model, weights = tiny
    tokens = prompt(40)
    expect = reference.forward(mf.config, weights, tokens)
    got = model.forward(tokens, model.new_cache(64, "f32"), all_logits=True)
    assert got.shape == (40, mf.config.n_vocab) and got.dtype == np.float32
    assert_close(got, expect)


@pytest.mark.parametrize("chunks", [[1] * 24, [3, 5, 1, 1, 9, 2, 3], [17, 1, 1, 1, 4]])
def test_incremental_decode_equals_recomputing(tiny, chunks):
    """Chunked prefill and single-token decode, across window and chunk boundaries and around the rings (inputs
    longer than the cache's step of 3 are split), equal one pass."""
    mf, model, weights = tiny
    tokens = prompt(sum(chunks), seed=1)
    cache = small_rings(mf, 32)
    pieces, start = [], 0
    for n in chunks:
        pieces.append(model.forward(tokens[start:start + n], cache, all_logits=True))
        start += n
    assert cache.length == len(tokens)
    assert_close(np.concatenate(pieces), reference.forward(mf.config, weights, tokens))


def test_greedy_continuation_equals_reference(tiny):
    """32 greedy decode steps: each token is the reference's argmax after the tokens before it. One reference pass
    over prompt + continuation gives all of those, since position p's logits depend only on tokens 0..p."""
    mf, model, weights = tiny
    tokens = list(prompt(12, seed=2))
    cache = model.new_cache(64, "f32")
    logits = model.forward(tokens, cache)[-1]
    for _ in range(32):
        tokens.append(int(np.argmax(logits)))
        logits = model.forward(tokens[-1:], cache)[-1]
    expect = reference.forward(mf.config, weights, tokens[:-1])  # the last token's logits predict nothing here
    assert tokens[12:] == np.argmax(expect[11:], axis=1).tolist()


@pytest.mark.parametrize("chunks", [[1] * 24, [17, 1, 1, 1, 4]])
def test_f16_cache_stays_close_to_the_reference(tiny, chunks):
    """The default f16 cache rounds keys and values to 11 significant bits: logits move by well under 1%."""
    mf, model, weights = tiny
    tokens = prompt(sum(chunks), seed=3)
    cache = small_rings(mf, 32, "f16")
    assert cache.layers[0].keys.dtype == np.uint16
    pieces, start = [], 0
    for n in chunks:
        pieces.append(model.forward(tokens[start:start + n], cache, all_logits=True))
        start += n
    expect = reference.forward(mf.config, weights, tokens)
    got = np.concatenate(pieces)
    np.testing.assert_allclose(got, expect, atol=5e-3 * np.abs(expect).max())
    assert np.abs(got - expect).max() > 0  # the cache really is f16


def test_forward_rejects_bad_tokens_and_full_context(tiny):
    mf, model, _ = tiny
    cache = model.new_cache(8)
    with pytest.raises(ParameterError, match="201088"):
        model.forward([1, 201088], cache)
    with pytest.raises(ParameterError, match="non-empty"):
        model.forward([], cache)
    model.forward(prompt(6), cache)
    with pytest.raises(ContextLengthError, match="6 \\+ 3 tokens pass the context length 8"):
        model.forward(prompt(3), cache)
    assert cache.length == 6
    model.forward(prompt(2), cache)
    with pytest.raises(ContextLengthError):
        model.forward([5], cache)


def test_yarn_constants_of_the_spec():
    """Spec §2.3 for gpt-oss-20b: low 8.0928, high 17.398 (not rounded), concentration 1.34657."""
    from ossrt.testing import synthetic
    from ossrt.format.config import ModelConfig

    cfg = ModelConfig.from_hf_config(synthetic.hf_config("20b"))
    inv_freq, concentration = yarn_frequencies(cfg)
    freq = 150000.0 ** (np.arange(0, 64, 2) / 64)
    assert concentration == pytest.approx(1.3465735902799727, rel=1e-15)
    np.testing.assert_allclose(inv_freq[:9], 1 / freq[:9], rtol=1e-15)  # i <= 8 unscaled
    np.testing.assert_allclose(inv_freq[18:], 1 / (32 * freq[18:]), rtol=1e-15)  # i >= 18 divided by 32
    ramp = (9 - 8.092779115512402) / (17.39802450158856 - 8.092779115512402)
    assert inv_freq[9] == pytest.approx((1 - ramp) / freq[9] + ramp / (32 * freq[9]), rel=1e-12)


def test_kv_cache_size_and_ring(tiny):
    mf, model, _ = tiny
    cfg = mf.config
    cache = KVCache(cfg, 1000)
    assert cache.kv_type == "f16" and cache.chunk == CHUNK
    assert [layer.capacity for layer in cache.layers] == [
        min(cfg.sliding_window + CHUNK - 1, 1000) if cfg.is_sliding(i) else 1000 for i in range(cfg.n_layer)]
    kv_dim_bytes = 2 * cfg.n_head_kv * cfg.head_dim  # keys and values of one position, one byte a value
    full = sum(1 for i in range(cfg.n_layer) if not cfg.is_sliding(i))
    assert cache.nbytes == cache_bytes(cfg, 1000, "f16") == 2 * kv_dim_bytes * (
        full * 1000 + (cfg.n_layer - full) * (cfg.sliding_window + CHUNK - 1))
    assert KVCache(cfg, 100, "f32").nbytes == cache_bytes(cfg, 100, "f32") == 4 * kv_dim_bytes * cfg.n_layer * 100
    with pytest.raises(ValueError, match="kv_type"):
        KVCache(cfg, 100, "q4")
    cache = small_rings(mf, 100, chunk=2)  # rings of window + 1
    model.forward(prompt(30), cache)
    with pytest.raises(ValueError, match="no longer holds"):
        cache.truncate(20)  # the sliding rings have moved on
    cache.truncate(30)
    assert cache.length == 30


def test_truncate_within_the_rings_equals_a_fresh_pass(tiny):
    """A ring of window + chunk - 1 slots can step back up to `chunk` positions and go on from there."""
    mf, model, weights = tiny
    tokens, other = prompt(30, seed=6), prompt(8, seed=7)
    cache = small_rings(mf, 64, chunk=4)
    model.forward(tokens, cache)
    assert cache.can_truncate(26) and not cache.can_truncate(25)
    cache.truncate(26)
    got = model.forward(other, cache, all_logits=True)
    assert_close(got, reference.forward(mf.config, weights, np.concatenate([tokens[:26], other]))[26:])


@pytest.fixture(scope="module")
def head_dim_32(tiny_gguf):
    """q8_0 caches quantize head vectors in blocks of 32, so they need a head dimension of 32 or more."""
    mf = ModelFile.open(tiny_gguf("q8_0", head_dim=32))
    yield mf, Transformer(mf, CpuOps(int8_activations=False)), reference.load_weights(mf)
    mf.close()


@pytest.mark.parametrize("kv_type, bound", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_compact_caches_stay_close_to_the_reference(head_dim_32, kv_type, bound):
    mf, model, weights = head_dim_32
    tokens = prompt(30, seed=4)
    cache = small_rings(mf, 64, kv_type, chunk=4)
    got = np.concatenate([model.forward(tokens[:10], cache, all_logits=True)] +
                         [model.forward([t], cache) for t in tokens[10:]])
    expect = reference.forward(mf.config, weights, tokens)
    error = np.abs(got - expect).max() / np.abs(expect).max()
    assert 0 < error < bound
    assert cache.nbytes == cache_bytes(mf.config, 64, kv_type, chunk=4)


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
def test_snapshot_restores_the_rings(head_dim_32, kv_type):
    """Back to a snapshot after more positions overwrote the rings: the same continuation gives the same logits."""
    mf, model, _ = head_dim_32
    tokens = prompt(40, seed=5)
    cache = small_rings(mf, 64, kv_type, chunk=4)
    model.forward(tokens[:20], cache)
    snap = cache.snapshot()
    first = model.forward(tokens[20:], cache, all_logits=True)
    assert not cache.can_truncate(20)
    cache.restore(snap)
    np.testing.assert_array_equal(model.forward(tokens[20:], cache, all_logits=True), first)
    cache.length = 5  # rewritten below the snapshot: it is stale now
    assert not cache.can_restore(snap)


def test_q8_0_cache_needs_head_dim_multiple_of_32(tiny):
    mf, model, _ = tiny  # head dims 16, 8, 16
    with pytest.raises(ValueError, match="multiple of 32"):
        model.new_cache(16, "q8_0")


RSS_AFTER_FREE = """
import sys
import numpy as np
from ossrt.engine import cpu
if sys.argv[1] == "keep":
    assert cpu.keep_freed_memory()
def rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) << 10
before = rss()
a = np.ones(24 << 17)  # 24 MiB, touched
held = rss() - before
del a
print(held, rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_cpu_backend_keeps_freed_memory_for_the_next_pass():
    """With keep_freed_memory (CpuOps calls it) a freed 24 MiB array stays in the process for the next pass's
    arrays; without, glibc gives it back to the OS at once."""
    runs = {how: [int(v) for v in subprocess.run([sys.executable, "-c", RSS_AFTER_FREE, how], check=True,
                                                  capture_output=True, text=True).stdout.split()]
            for how in ("keep", "default")}
    assert runs["keep"][0] > 20 << 20 and runs["default"][0] > 20 << 20  # the array was in RSS in both
    assert runs["keep"][1] > 20 << 20  # still held after del
    assert runs["default"][1] < 4 << 20  # given back
