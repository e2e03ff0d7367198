import gguf
import numpy as np
import pytest

from ossrt.errors import ConfigError
from ossrt.format.config import ARCH, FLOAT32_MAX, FLOAT32_TINY, MAX_LAYERS, MAX_SIZE, ModelConfig

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


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"hidden_size": None}, "missing field 'hidden_size'"),
    ({"rope_scaling": None}, "missing field 'rope_scaling'"),
    ({"num_experts_per_tok": 64, "experts_per_token": 64},
     r"num_experts_per_tok \(64\) exceeds the expert count, num_local_experts \(32\)"),
    ({"hidden_size": 100}, "hidden_size must be a multiple of 32"),
    ({"rope_theta": "abc"}, "rope_theta must be a finite number greater than 1, got 'abc'"),
    ({"rope_theta": "150000"}, "rope_theta must be a finite number greater than 1, got '150000'"),
    ({"rope_theta": 1}, "rope_theta must be a finite number greater than 1, got 1"),
    ({"rope_theta": 0.5}, "rope_theta must be a finite number greater than 1, got 0.5"),
    ({"rope_theta": True}, "rope_theta must be a finite number greater than 1, got True"),
    ({"rope_theta": 10**400}, "rope_theta must be a finite number greater than 1, got 1000"),
    ({"rope_theta": None, "rope_scaling": {**HF_20B["rope_scaling"], "rope_theta": -1.0}},
     "rope_scaling.rope_theta must be a finite number greater than 1, got -1.0"),
    ({"num_attention_heads": 0}, "num_attention_heads must be between 1 and 2147483647, got 0"),
    ({"num_attention_heads": "4"}, "num_attention_heads must be an integer, got '4'"),
    ({"num_attention_heads": 4.0}, "num_attention_heads must be an integer, got 4.0"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be an integer, got True"),
    ({"num_hidden_layers": 2**31}, "num_hidden_layers must be between 1 and 4096, got 2147483648"),
    ({"head_dim": None, "num_attention_heads": 0}, "num_attention_heads must be between 1 and 2147483647, got 0"),
    ({"head_dim": None, "num_attention_heads": 4096},
     r"head_dim \(hidden_size / num_attention_heads\) must be between 1 and 2147483647, got 0"),
    ({"head_dim": 0}, "head_dim must be between 1 and 2147483647, got 0"),
    ({"max_position_embeddings": 1e30}, r"max_position_embeddings must be an integer, got 1e\+30"),
    ({"max_position_embeddings": 2**31}, "max_position_embeddings must be between 1 and 2147483647"),
    ({"sliding_window": 2**63}, "sliding_window must be between 1 and 2147483647"),
    ({"vocab_size": [201088]}, r"vocab_size must be an integer, got \[201088\]"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a finite number below 1 and at least 2\\^-126, got 0"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be a finite number below 1 and at least 2\\^-126, got -1e-05"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number below 1 and at least 2\\^-126, got nan"),
    ({"swiglu_limit": -7.0}, "swiglu_limit must be a finite number above 0, got -7.0"),
    ({"rope_scaling": {**HF_20B["rope_scaling"], "factor": float("inf")}},
     "rope_scaling.factor must be a finite number at least 1, got inf"),
    ({"rope_scaling": {**HF_20B["rope_scaling"], "factor": "32"}},
     "rope_scaling.factor must be a finite number at least 1, got '32'"),
    ({"rope_scaling": {**HF_20B["rope_scaling"], "original_max_position_embeddings": 4096.5}},
     "rope_scaling.original_max_position_embeddings must be an integer, got 4096.5"),
    ({"rope_scaling": {**HF_20B["rope_scaling"], "beta_fast": 1.0}},
     r"rope_scaling.beta_fast \(1.0\) must be greater than rope_scaling.beta_slow \(1.0\)"),
    ({"rope_scaling": {**HF_20B["rope_scaling"], "beta_slow": 0.0}},
     "rope_scaling.beta_slow must be a finite number above 0, got 0.0"),
    ({"rope_theta": 1e39}, r"rope_theta must be at most 3.4028235e\+38, the largest float32 \(GGUF stores it as "
                           r"one\), got 1e\+39"),
    ({"rope_theta": -1e39}, "rope_theta must be a finite number greater than 1, got -1e\\+39"),
    ({"rope_theta": float("nan")}, "rope_theta must be a finite number greater than 1, got nan"),
    ({"rope_scaling": {**HF_20B["rope_scaling"], "factor": 4 * 10**38}},
     "rope_scaling.factor must be at most 3.4028235e\\+38, the largest float32"),
    ({"max_position_embeddings": 1 << 32}, "max_position_embeddings must be between 1 and 2147483647"),
    ({"max_position_embeddings": -1}, "max_position_embeddings must be between 1 and 2147483647"),
    ({"max_position_embeddings": 4096.0}, "max_position_embeddings must be an integer, got 4096.0"),
])
def test_bad_hf_config(change, message):
    with pytest.raises(ConfigError, match="^x/config.json: " + message):
        ModelConfig.from_hf_config({**HF_20B, **change}, source="x/config.json")


def test_hf_config_not_an_object():
    with pytest.raises(ConfigError, match=r"x/config.json: expected a JSON object, got \[1, 2\]"):
        ModelConfig.from_hf_config([1, 2], source="x/config.json")


@pytest.mark.parametrize("field, value", [("rope_freq_base", 1.0), ("rope_freq_base", float("nan")),
                                          ("rope_scaling_factor", 0.9), ("rms_norm_eps", 0.0),
                                          ("sliding_window", 2**63), ("n_layer", 0)])
def test_model_config_itself_refuses_bad_values(field, value):
    """Whatever builds a ModelConfig, YaRN (model.yarn_frequencies) and the kernels never see these."""
    good = ModelConfig.from_hf_config(HF_20B)
    with pytest.raises(ConfigError, match=f"^{field} must be"):
        ModelConfig(**{**vars(good), field: value})


@pytest.mark.parametrize("size", ["20b", "120b"])
def test_real_configs_pass_and_count_their_tensors(size):
    from ossrt.testing import synthetic

    c = ModelConfig.from_hf_config(synthetic.hf_config(size))
    assert (c.n_ctx_train, c.sliding_window, c.rope_orig_ctx, c.n_vocab) == (131072, 128, 4096, 201088)
    assert c.n_tensors == len(c.tensor_specs()) == {"20b": 459, "120b": 687}[size]


def test_every_config_accepted_fits_its_gguf_types(tmp_path):
    """ModelConfig's bounds lie within the GGUF types its metadata is written as (the converter does not check the
    values again): a config at every bound is written by gguf's writer and read back unchanged."""
    widest = ModelConfig(n_layer=MAX_LAYERS, n_embd=MAX_SIZE // 32 * 32, n_ff_exp=MAX_SIZE // 32 * 32,
                         n_head=MAX_SIZE, n_head_kv=MAX_SIZE, head_dim=MAX_SIZE - 1, n_expert=MAX_SIZE,
                         n_expert_used=MAX_SIZE, n_vocab=MAX_SIZE, n_ctx_train=MAX_SIZE, sliding_window=MAX_SIZE,
                         rope_freq_base=FLOAT32_MAX, rope_scaling_factor=FLOAT32_MAX, rope_orig_ctx=MAX_SIZE,
                         rms_norm_eps=FLOAT32_TINY)
    metadata = widest.gguf_metadata()
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", ARCH)
    for key, (vtype, value) in metadata.items():
        writer.add_key_value(key, value, vtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    for key, (vtype, value) in metadata.items():
        assert fields[key].types == [vtype]
        read = fields[key].contents()
        assert read == (np.float32(value) if vtype == gguf.GGUFValueType.FLOAT32 else value), key
        assert vtype != gguf.GGUFValueType.FLOAT32 or 0 < read < np.inf
