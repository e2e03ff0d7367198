"""`ossrt info`: figures computed from the file and ModelConfig."""

from ossrt.info import report
from ossrt.format.modelfile import ModelFile


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
    kv = c.kv_cache_bytes(2048)
    assert kv == 2 * 32 * 4 * (2 * 2048 + 2 * 8)  # K and V, kv_dim 32, f32; full layers 2048, sliding 8
    assert (f"KV cache (f16)              {kv / 2 / 2**20:.1f} MiB  (f32: {kv / 2**20:.1f} MiB, "
            f"q8_0: {kv * 1.125 / 4 / 2**20:.1f} MiB)") in text
