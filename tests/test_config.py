import pytest

from ossrt.config import ModelConfig
from ossrt.errors import ConfigError

HF_20B = dict(
    model_type="gpt_oss", num_hidden_layers=24, hidden_size=2880, intermediate_size=2880,
    num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
    experts_per_token=4, vocab_size=201088, max_position_embeddings=131072, sliding_window=128,
    rope_theta=150000,
    rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                      original_max_position_embeddings=4096, truncate=False),
    rms_norm_eps=1e-5, swiglu_limit=7.0, initial_context_length=4096,
)


def test_parameter_counts_match_spec():
    c20 = ModelConfig.from_hf_config(HF_20B)
    assert (c20.n_params, c20.n_params_active) == (20_914_757_184, 3_608_307_264)
    c120 = ModelConfig.from_hf_config({**HF_20B, "num_hidden_layers": 36, "num_local_experts": 128})
    assert (c120.n_params, c120.n_params_active) == (116_829_156_672, 5_132_849_472)
    assert len(c20.tensor_specs()) == 459


def test_rope_parameters_spelling_accepted():
    cfg = {k: v for k, v in HF_20B.items() if k != "rope_scaling"}
    cfg["rope_parameters"] = HF_20B["rope_scaling"]
    assert ModelConfig.from_hf_config(cfg).rope_scaling_factor == 32.0


def test_kv_cache_bytes_counts_window_for_sliding_layers():
    c = ModelConfig.from_hf_config(HF_20B)
    # 12 full layers x 8192 positions + 12 sliding layers x 128 positions, K and V, 8x64 f32 each
    assert c.kv_cache_bytes(8192) == 2 * 512 * 4 * (12 * 8192 + 12 * 128)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"hidden_size": None}, "missing field 'hidden_size'"),
    ({"rope_scaling": None}, "rope_scaling"),
    ({"num_experts_per_tok": 64, "experts_per_token": 64},
     r"num_experts_per_tok \(64\) exceeds the expert count, num_local_experts \(32\)"),
    ({"hidden_size": 100}, "multiple of 32"),
])
def test_bad_hf_config(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_config({**HF_20B, **change}, source="x/config.json")
