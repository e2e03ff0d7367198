"""`ossrt info`: figures computed from the file and ModelConfig."""

from ossrt.engine.kv_cache import cache_bytes
from ossrt.format.modelfile import ModelFile
from ossrt.engine import cuda
from ossrt.info import report


def test_report_figures(tiny_gguf):
    path = tiny_gguf()
    text = report(path, context=2048)
    with ModelFile.open(path) as m:
        c = m.config
        size = m.file_size
    assert f"({size} bytes)" in text
    assert "layers             4 (2 sliding window 8, 2 full)" in text
    assert "experts            8, 4 per token, feed-forward 64" in text
    assert "heads              4 query, 2 key/value, head dim 16" in text
    assert "tensor types       49 F32, 18 Q8_0, 12 MXFP4" in text
    assert f"{c.n_params / 1e6:.2f} M total, {c.n_params_active / 1e6:.2f} M active" in text
    kv = {t: cache_bytes(c, 2048, t) for t in ("f16", "f32", "q8_0")}
    # K and V, kv_dim 32, 2 bytes; full layers 2048 positions, sliding rings of window 8 + a step of 512 - 1
    assert kv["f16"] == 2 * 32 * 2 * (2 * 2048 + 2 * (8 + 511))
    assert (f"KV cache (f16)              {kv['f16'] / 2**20:.1f} MiB  (f32: {kv['f32'] / 2**20:.1f} MiB, "
            f"q8_0: {kv['q8_0'] / 2**20:.1f} MiB)") in text


def test_vram_figures_for_a_cuda_device(tiny_gguf):
    path = tiny_gguf()
    text = report(path, context=2048, device="cuda")
    with ModelFile.open(path) as m:
        c = m.config
        weights = sum(t.data.nbytes for t in m.tensors.values())
    kv, work = cache_bytes(c, 2048, "f16"), cuda.workspace_bytes(c, 512)
    assert "\nRAM at context" not in text
    assert f"VRAM at context 2048 (CUDA):\n  weights as stored           {weights / 2**20:.1f} MiB" in text
    assert f"  total                       {(weights + kv + work) / 2**20:.1f} MiB" in text
    # The workspace holds at least one expert's three matrices in float32 and a prefill chunk's activations.
    assert work > 4 * 3 * c.n_ff_exp * c.n_embd + 512 * 4 * c.n_embd
