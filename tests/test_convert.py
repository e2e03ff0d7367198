"""HF checkpoint -> GGUF: bit-exact experts, outtypes, llama.cpp metadata and names (spec §5), bad input."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants

from ossrt.format import convert as conv
from ossrt.format import mxfp4
from ossrt.testing import synthetic
from ossrt.format.checkpoint import Checkpoint
from ossrt.format.convert import convert
from ossrt.errors import ConvertError
from ossrt.format.modelfile import ModelFile


# sha256 of tiny conversions made by the converter before its split into safetensors/checkpoint/convert and the
# one-pass vocabulary packing (commit 3e4b13e): the output is the same, byte for byte.
@pytest.mark.parametrize("layout,outtype,sha256", [
    ("mxfp4", "q8_0", "40ecf04ca76b4873dd60de2e8eb8052e0b547c641fcb2a792e7b45c81437c01e"),
    ("bf16", "f16", "1b9f99198f86fd93c7b93f0dc31e9b4f94cbe07768407b62c7622318320c7e6b"),
])
def test_output_bytes_unchanged(tiny_checkpoint, tmp_path, layout, outtype, sha256):
    out = convert(tiny_checkpoint(layout), tmp_path / "tiny.gguf", outtype=outtype, progress=False, name="tiny")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha256


def test_mxfp4_experts_bit_exact(tiny_checkpoint, tiny_gguf):
    ck = Checkpoint(tiny_checkpoint())
    with ModelFile.open(tiny_gguf()) as m:
        for i in range(m.config.n_layer):
            x = f"model.layers.{i}.mlp.experts."
            gub, gus = ck.tensors[x + "gate_up_proj_blocks"].data, ck.tensors[x + "gate_up_proj_scales"].data
            dnb, dns = ck.tensors[x + "down_proj_blocks"].data, ck.tensors[x + "down_proj_scales"].data
            for name, b, s in [("ffn_gate_exps", gub[:, 0::2], gus[:, 0::2]), ("ffn_up_exps", gub[:, 1::2], gus[:, 1::2]),
                               ("ffn_down_exps", dnb, dns)]:
                t = m.tensors[f"blk.{i}.{name}.weight"]
                assert t.type == QT.MXFP4
                got = mxfp4.dequantize_gguf(np.asarray(t.data))
                want = mxfp4.dequantize_hf(b, s)
                np.testing.assert_array_equal(got, want)  # every expert value (±0 compare equal)
                np.testing.assert_array_equal(np.asarray(t.data), mxfp4.hf_to_gguf(b, s))
            gub_bias = ck.tensors[x + "gate_up_proj_bias"].f32()
            np.testing.assert_array_equal(m.tensors[f"blk.{i}.ffn_gate_exps.bias"].data, gub_bias[:, 0::2])
            np.testing.assert_array_equal(m.tensors[f"blk.{i}.ffn_up_exps.bias"].data, gub_bias[:, 1::2])
    ck.close()


DENSE = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
         "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
         "blk.2.attn_output.weight": "model.layers.2.self_attn.o_proj.weight"}
VECTORS = {"output_norm.weight": "model.norm.weight", "blk.0.attn_sinks.weight": "model.layers.0.self_attn.sinks",
           "blk.3.ffn_gate_inp.weight": "model.layers.3.mlp.router.weight",
           "blk.0.post_attention_norm.weight": "model.layers.0.post_attention_layernorm.weight",
           "blk.2.attn_k.bias": "model.layers.2.self_attn.k_proj.bias"}


def test_bf16_outtype_is_lossless(tiny_checkpoint, tiny_gguf):
    ck = Checkpoint(tiny_checkpoint())
    with ModelFile.open(tiny_gguf("bf16")) as m:
        for g, h in DENSE.items():
            assert m.tensors[g].type == QT.BF16
            np.testing.assert_array_equal(m.tensors[g].data, ck.tensors[h].data)
        for g, h in VECTORS.items():
            assert m.tensors[g].type == QT.F32
            np.testing.assert_array_equal(m.tensors[g].data, ck.tensors[h].f32())
    ck.close()


def test_q8_0_within_its_error(tiny_checkpoint, tiny_gguf):
    ck = Checkpoint(tiny_checkpoint())
    with ModelFile.open(tiny_gguf("q8_0")) as m:
        for g, h in DENSE.items():
            t = m.tensors[g]
            assert t.type == QT.Q8_0
            got = quants.dequantize(np.asarray(t.data), QT.Q8_0)
            x = ck.tensors[h].f32()
            amax = np.abs(x.reshape(x.shape[0], -1, 32)).max(-1, keepdims=True)
            # round to nearest of 255 levels (half a step) plus the f16 rounding of the scale
            bound = amax / 127 * 0.5 + amax * 2.0 ** -11 + 1e-12
            assert (np.abs(got - x).reshape(bound.shape[0], -1, 32) <= bound).all()
    ck.close()


@pytest.mark.parametrize("outtype,qtype,dtype", [("f16", QT.F16, np.float16), ("f32", QT.F32, np.float32)])
def test_f16_f32_outtypes(tiny_checkpoint, tiny_gguf, outtype, qtype, dtype):
    ck = Checkpoint(tiny_checkpoint())
    with ModelFile.open(tiny_gguf(outtype)) as m:
        for g, h in DENSE.items():
            assert m.tensors[g].type == qtype
            np.testing.assert_array_equal(m.tensors[g].data, ck.tensors[h].f32().astype(dtype))
    ck.close()


def test_bf16_layout_within_mxfp4_rounding(tiny_checkpoint, tiny_gguf):
    """Fine-tune layout: experts quantized with llama.cpp's rule; every value within the block bound of
    tests/test_mxfp4.py (4·2^(e-128)), and since the synthetic bf16 values are the mxfp4 layout's, most blocks
    come back with identical values to the release-layout conversion."""
    ck = Checkpoint(tiny_checkpoint("bf16"))
    same = total = 0
    with ModelFile.open(tiny_gguf(layout="bf16")) as m, ModelFile.open(tiny_gguf()) as ref:
        for i in range(m.config.n_layer):
            x = f"model.layers.{i}.mlp.experts."
            gu, dn = ck.tensors[x + "gate_up_proj"].f32(), ck.tensors[x + "down_proj"].f32()
            for name, src in [("ffn_gate_exps", gu[..., 0::2]), ("ffn_up_exps", gu[..., 1::2]), ("ffn_down_exps", dn)]:
                t = m.tensors[f"blk.{i}.{name}.weight"]
                want = np.swapaxes(src, 1, 2)  # [E, out, in]
                got = mxfp4.dequantize_gguf(np.asarray(t.data))
                e = np.asarray(t.data).reshape(want.shape[:2] + (-1, 17))[..., 0].astype(np.int32)
                d = np.ldexp(1.0, e - 128)[..., None]
                err = np.abs(got - want).reshape(d.shape[:-1] + (32,))
                assert (err <= 4 * d).all()
                # compare values, not bytes: the synthetic -0 codes come back as +0
                refv = mxfp4.dequantize_gguf(np.asarray(ref.tensors[t.name].data)).reshape(-1, 32)
                same += (got.reshape(-1, 32) == refv).all(1).sum()
                total += len(refv)
    assert same / total > 0.99
    ck.close()


def _expected_metadata(cfg):
    return {
        "general.architecture": "gpt-oss", "general.file_type": 38, "general.quantization_version": 2,
        "gpt-oss.block_count": cfg["num_hidden_layers"], "gpt-oss.context_length": cfg["max_position_embeddings"],
        "gpt-oss.embedding_length": cfg["hidden_size"], "gpt-oss.feed_forward_length": cfg["intermediate_size"],
        "gpt-oss.expert_feed_forward_length": cfg["intermediate_size"],
        "gpt-oss.attention.head_count": cfg["num_attention_heads"],
        "gpt-oss.attention.head_count_kv": cfg["num_key_value_heads"],
        "gpt-oss.attention.key_length": cfg["head_dim"], "gpt-oss.attention.value_length": cfg["head_dim"],
        "gpt-oss.attention.sliding_window": cfg["sliding_window"],
        "gpt-oss.expert_count": cfg["num_local_experts"], "gpt-oss.expert_used_count": 4,
        "gpt-oss.rope.freq_base": 150000.0, "gpt-oss.rope.scaling.type": "yarn",
        "gpt-oss.rope.scaling.factor": 32.0, "gpt-oss.rope.scaling.original_context_length": 4096,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-4o",
        "tokenizer.ggml.bos_token_id": 199998, "tokenizer.ggml.eos_token_id": 200002,
        "tokenizer.ggml.padding_token_id": 199999,
    }


@pytest.mark.parametrize("layers,experts", [(24, 32), (36, 128)], ids=["20b-shaped", "120b-shaped"])
def test_metadata_names_and_types_match_spec(tiny_gguf, layers, experts):
    path = tiny_gguf(num_hidden_layers=layers, num_local_experts=experts)
    cfg = synthetic.hf_config("tiny", num_hidden_layers=layers, num_local_experts=experts)
    with ModelFile.open(path) as m:
        for key, value in _expected_metadata(cfg).items():
            got = m.get(key)
            assert got == pytest.approx(value) if isinstance(value, float) else got == value, key
        assert m.get("gpt-oss.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
        assert "<|start|>" in m.chat_template and "<|channel|>" in m.chat_template
        tokens, types = m.tokenizer_tokens, m.tokenizer_token_types
        assert len(tokens) == len(types) == 201088
        assert len(m.tokenizer_merges) == 446189
        assert tokens[200006] == "<|start|>" and types[200006] == 3
        assert tokens[200019] == "[PAD200019]" and types[200019] == 5
        assert tokens[0] == "!" and types[0] == 1 and tokens[220] == "Ġ"  # id 220 is b" " (GPT-2 byte map)
        names = [s.name for s in m.config.tensor_specs()]
        assert list(m.tensors) == names and len(names) == 19 * layers + 3
        count = {}
        for t in m.tensors.values():
            count[t.type] = count.get(t.type, 0) + 1
        # spec §5 for 20b: 289 F32, 98 Q8_0, 72 MXFP4
        assert count == {QT.F32: 12 * layers + 1, QT.Q8_0: 4 * layers + 2, QT.MXFP4: 3 * layers}
        assert m.tensors["blk.0.ffn_gate_exps.weight"].shape == (experts, 64, 64)


# --- bad input -------------------------------------------------------------------------------------------------
def _write_st(path: Path, tensors: dict):
    """Minimal safetensors writer for hand-made broken checkpoints: {name: (dtype, shape, raw bytes)}."""
    header, off, blobs = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def _variant(tiny_checkpoint, tmp_path, edit=None, cfg_edit=None):
    """A copy of the tiny checkpoint with one edit to its tensors {name: (dtype, shape, bytes)} or config."""
    src = tiny_checkpoint()
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dst / f).symlink_to(src / f)
    cfg = json.loads((src / "config.json").read_text())
    if cfg_edit:
        cfg_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    ck = Checkpoint(src)
    tensors = {n: (t.dtype, t.shape, t.data.tobytes()) for n, t in ck.tensors.items()}
    ck.close()
    if edit:
        edit(tensors)
    _write_st(dst / "model.safetensors", tensors)
    return dst


NORM = "model.layers.1.input_layernorm.weight"


@pytest.mark.parametrize("edit,cfg_edit,message", [
    (None, lambda c: c.update(model_type="llama"), "model_type is 'llama'"),
    (None, lambda c: c.pop("num_hidden_layers"), "missing field 'num_hidden_layers'"),
    (None, lambda c: c.pop("rope_scaling"), "rope_scaling"),
    (lambda t: t.pop(NORM), None, f"missing tensor '{NORM}'"),
    (lambda t: t.update(extra=("BF16", (2,), b"\0" * 4)), None, "unexpected tensor 'extra'"),
    (lambda t: t.update({NORM: ("BF16", (32,), b"\0" * 64)}), None, f"tensor '{NORM}' has shape [32], expected [64]"),
    (lambda t: t.update({NORM: ("U8", (64,), b"\0" * 64)}), None, f"tensor '{NORM}' has dtype U8"),
    (lambda t: t.update({"model.layers.0.mlp.experts.down_proj_blocks":
                         ("BF16", (8, 64, 2, 16), b"\0" * 8 * 64 * 2 * 16 * 2)}), None, "has dtype BF16, expected U8"),
])
def test_bad_checkpoints(tiny_checkpoint, tmp_path, edit, cfg_edit, message):
    src = _variant(tiny_checkpoint, tmp_path, edit, cfg_edit)
    with pytest.raises(ConvertError, match=None) as exc:
        convert(src, tmp_path / "out.gguf", progress=False)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*part")) == []


def test_missing_src_and_config(tmp_path):
    with pytest.raises(ConvertError, match="no such checkpoint directory"):
        convert(tmp_path / "nope", tmp_path / "o.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match=r"config.json: file not found"):
        convert(tmp_path / "empty", tmp_path / "o.gguf")


def test_truncated_and_corrupt_shards(tiny_checkpoint, tmp_path):
    src = _variant(tiny_checkpoint, tmp_path)
    shard = src / "model.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-100])
    with pytest.raises(ConvertError, match=r"model.safetensors: file is truncated: tensor 'lm_head.weight'"):
        convert(src, tmp_path / "o.gguf")
    shard.write_bytes(raw[:8] + b"{not json" + raw[17:])
    with pytest.raises(ConvertError, match="model.safetensors: corrupt safetensors header"):
        convert(src, tmp_path / "o.gguf")
    shard.write_bytes(b"abc")
    with pytest.raises(ConvertError, match="not a safetensors file"):
        convert(src, tmp_path / "o.gguf")


def test_missing_shard_named_by_index(tiny_checkpoint, tmp_path):
    src = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint(), src, symlinks=True)
    next(src.glob("model-*.safetensors")).unlink()
    with pytest.raises(ConvertError, match=r"model.safetensors.index.json: shard model-00000-of-00000.safetensors is missing"):
        convert(src, tmp_path / "o.gguf")


def test_out_not_writable(tiny_checkpoint, tmp_path):
    with pytest.raises(ConvertError, match="does not exist"):
        convert(tiny_checkpoint(), tmp_path / "no" / "o.gguf")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConvertError, match="file is not a directory"):
        convert(tiny_checkpoint(), tmp_path / "file" / "o.gguf")


def test_not_enough_disk(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConvertError, match=r"not enough free disk space .* need 0\.0\d GB, have 0\.00 GB"):
        convert(tiny_checkpoint(), tmp_path / "o.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_interrupted_write_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch, exc):
    calls = []

    def boom(*a):
        calls.append(1)
        if len(calls) > 10:
            raise exc
        return mxfp4.hf_to_gguf(*a)

    monkeypatch.setattr(conv.mxfp4, "hf_to_gguf", boom)
    with pytest.raises(KeyboardInterrupt if exc is KeyboardInterrupt else ConvertError):
        convert(tiny_checkpoint(), tmp_path / "o.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []
