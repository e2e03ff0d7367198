"""ModelFile: GGUF header parsing, memory-mapped tensors, validation errors naming the key or tensor."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from ossrt.format.config import ModelConfig
from ossrt.errors import ModelFileError
from ossrt.format.modelfile import ModelFile

CFG = ModelConfig(n_layer=2, n_embd=64, n_ff_exp=32, n_head=4, n_head_kv=2, head_dim=16, n_expert=4,
                  n_expert_used=2, n_vocab=96, n_ctx_train=4096, sliding_window=8, rope_freq_base=150000.0,
                  rope_scaling_factor=32.0, rope_orig_ctx=4096)
KIND_TYPE = {"vector": GGMLQuantizationType.F32, "router": GGMLQuantizationType.F32,
             "matrix": GGMLQuantizationType.Q8_0, "experts": GGMLQuantizationType.MXFP4}


def write_gguf(path, *, cfg=CFG, skip_key=None, drop=None, reshape=None, retype=None, extra_kv=None):
    """A structurally valid gpt-oss GGUF with random contents; the keyword arguments break one thing."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "gpt-oss")
    for key, (vtype, value) in cfg.gguf_metadata().items():
        if key != skip_key:
            w.add_key_value(key, value, vtype)
    tokens = [f"t{i}" for i in range(cfg.n_vocab)]
    w.add_token_list(tokens)
    w.add_token_types([1] * cfg.n_vocab)
    w.add_token_merges(["t 1", "t1 0"])
    for key, value in (extra_kv or {}).items():
        w.add_string(key, value)
    for spec in cfg.tensor_specs():
        if spec.name == drop:
            continue
        shape = reshape[1] if reshape and reshape[0] == spec.name else spec.shape
        qtype = retype[1] if retype and retype[0] == spec.name else KIND_TYPE[spec.kind]
        if qtype == GGMLQuantizationType.F32:
            w.add_tensor(spec.name, rng.standard_normal(shape).astype(np.float32))
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, size=shape[:-1] + (shape[-1] // block * size,), dtype=np.uint8)
            if qtype == GGMLQuantizationType.Q8_0:  # keep the f16 scales finite
                raw.reshape(-1, 34)[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            w.add_tensor(spec.name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("mf") / "good.gguf")


def test_reads_config_metadata_and_tensors(good_file):
    with ModelFile.open(good_file) as mf:
        assert mf.config == CFG
        assert mf.version == 3
        assert mf.get("general.architecture") == "gpt-oss"
        assert mf.tokenizer_tokens[:3] == ["t0", "t1", "t2"] and len(mf.tokenizer_tokens) == 96
        assert mf.tokenizer_token_types == [1] * 96
        assert mf.tokenizer_merges == ["t 1", "t1 0"]
        assert set(mf.tensors) == {s.name for s in CFG.tensor_specs()}
        gate = mf.tensors["blk.1.ffn_gate_exps.weight"]
        assert gate.type == GGMLQuantizationType.MXFP4
        assert gate.shape == (4, 32, 64) and gate.data.shape == (4, 32, 2 * 17) and gate.data.dtype == np.uint8
        norm = mf.tensors["output_norm.weight"]
        assert norm.data.dtype == np.float32 and norm.data.shape == (64,)
        # Memory-mapped, not copied: the array's base is the file map.
        assert not gate.data.flags.owndata and not gate.data.flags.writeable


def test_tensor_bytes_match_what_was_written(tmp_path):
    path = write_gguf(tmp_path / "a.gguf")
    import gguf
    reader = gguf.GGUFReader(str(path))
    with ModelFile.open(path) as mf:
        for t in reader.tensors:
            ours = mf.tensors[t.name].data
            assert np.array_equal(ours.view(np.uint8).ravel(), np.asarray(t.data).view(np.uint8).ravel()), t.name


@pytest.mark.parametrize("kwargs, message", [
    ({"drop": "blk.1.attn_sinks.weight"}, "missing tensor 'blk.1.attn_sinks.weight'"),
    ({"reshape": ("blk.0.attn_q.bias", (32,))}, r"tensor 'blk.0.attn_q.bias' has shape \(32,\), expected \(64,\)"),
    ({"retype": ("blk.0.ffn_down_exps.weight", GGMLQuantizationType.Q8_0)},
     "tensor 'blk.0.ffn_down_exps.weight' has type Q8_0, expected MXFP4"),
    ({"skip_key": "gpt-oss.expert_count"}, "missing metadata key 'gpt-oss.expert_count'"),
])
def test_invalid_files_name_the_problem(tmp_path, kwargs, message):
    path = write_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(ModelFileError, match=message):
        ModelFile.open(path)


def test_wrong_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    w = GGUFWriter(str(path), "llama")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ModelFileError, match="general.architecture is 'llama', expected 'gpt-oss'"):
        ModelFile.open(path)


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01])
def test_truncated_file(good_file, tmp_path, keep):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFileError, match="truncated|not a GGUF"):
        ModelFile.open(cut)


def test_not_gguf_and_missing(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        ModelFile.open(junk)
    with pytest.raises(ModelFileError, match="no such file"):
        ModelFile.open(tmp_path / "absent.gguf")
    with pytest.raises(ModelFileError, match="not a file"):
        ModelFile.open(tmp_path)


def test_corrupt_counts(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    data[8:16] = (2**62).to_bytes(8, "little")  # tensor count
    bad = tmp_path / "counts.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt header"):
        ModelFile.open(bad)
