"""`ossrt convert` refuses every malformed input with a ConvertError that names the file and the field or tensor,
and leaves nothing behind: bad safetensors headers and index, tokenizer files, config values that do not fit GGUF,
unusable output paths."""

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from ossrt.format import convert as conv
from ossrt.format.convert import convert
from ossrt.errors import ConvertError
from ossrt.format.modelfile import ModelFile

# A small tokenizer in place of the 201,088-token one: a failing conversion stops before any weight is written, and
# reading the full vocabulary for every case would cost seconds.
TOKENIZER = {
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3}, "merges": [["a", "b"]]},
    "added_tokens": [{"id": 199998, "content": "<|startoftext|>", "special": True},
                     {"id": 199999, "content": "<|endoftext|>", "special": True},
                     {"id": 200002, "content": "<|return|>", "special": True}],
}
TOKENIZER_CONFIG = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
                    "chat_template": "{{ messages }}"}
EXTRA = "extra.safetensors"


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    """A copy of the tiny checkpoint with the small tokenizer. Its shard is a link to the session's (the tests
    never write it: broken tensors go into a separate small shard the index names)."""
    src, dst = tiny_checkpoint(), tmp_path / "ckpt"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        elif f.name not in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f, dst / f.name)
    (dst / "tokenizer.json").write_text(json.dumps(TOKENIZER))
    (dst / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return dst


@pytest.fixture
def out_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))  # ASCII escapes: a lone surrogate survives as \ud800


def add_shard(ckpt: Path, header, data: bytes = bytes(16)) -> None:
    """A second shard holding `header` (as given, however malformed) and `data`, named by the index."""
    raw = json.dumps(header).encode()
    (ckpt / EXTRA).write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    names = header if isinstance(header, dict) else {"x": None}
    edit_json(ckpt / "model.safetensors.index.json", lambda ix: ix["weight_map"].update(dict.fromkeys(names, EXTRA)))


def refused(src: Path, out: Path, *fragments: str) -> str:
    """convert() raises a one-line ConvertError holding every fragment, and OUT's directory stays as it was."""
    before = sorted(out.parent.iterdir())
    with pytest.raises(ConvertError) as exc:
        convert(src, out, progress=False)
    message = str(exc.value)
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    assert sorted(out.parent.iterdir()) == before
    return message


def test_the_small_checkpoint_converts(ckpt, out_dir):
    """The baseline every case below breaks one thing of; a legal 255-byte output name works (the temporary
    file's name must fit too), and an older list of named chat templates gives the default one."""
    edit_json(ckpt / "tokenizer_config.json", lambda c: c.update(chat_template=[
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]))
    out = out_dir / ("m" * 250 + ".gguf")
    assert convert(ckpt, out, outtype="bf16", progress=False) == out
    assert list(out_dir.iterdir()) == [out]
    with ModelFile.open(out) as m:
        assert m.chat_template == "D"
        assert m.tokenizer_tokens[2] == "ab" and m.tokenizer_tokens[200002] == "<|return|>"
        assert m.tokenizer_merges == ["a b"]
        assert m.get("tokenizer.ggml.bos_token_id") == 199998


# --- safetensors shards ---------------------------------------------------------------------------------------------
def entry(dtype="BF16", shape=(4,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


@pytest.mark.parametrize("header,fragment", [
    ({"x": entry(offsets=(0.0, 8.0))}, "tensor 'x': field 'data_offsets' is [0.0, 8.0], expected two integers"),
    ({"x": entry(offsets=(-8, 0))}, "tensor 'x': field 'data_offsets' is [-8, 0], expected 0 <= begin <= end"),
    ({"x": entry(offsets=(8, 0))}, "tensor 'x': field 'data_offsets' is [8, 0], expected 0 <= begin <= end"),
    ({"x": entry(offsets=(0, 8, 16))}, "tensor 'x': field 'data_offsets' is [0, 8, 16]"),
    ({"x": entry(offsets="0:8")}, "tensor 'x': field 'data_offsets' is '0:8'"),
    ({"x": entry(offsets=(False, 8))}, "tensor 'x': field 'data_offsets' is [False, 8]"),
    ({"x": entry(offsets=(0, 1 << 40))}, "file is truncated: tensor 'x' needs bytes up to"),
    ({"x": entry(shape=(-2, -2))}, "tensor 'x': field 'shape' is [-2, -2], expected a list of non-negative"),
    ({"x": entry(shape=(2.0, 2))}, "tensor 'x': field 'shape' is [2.0, 2]"),
    ({"x": entry(shape="4")}, "tensor 'x': field 'shape' is '4'"),
    ({"x": entry(shape=(3,))}, "tensor 'x': data_offsets [0, 8] hold 8 bytes, shape [3] BF16 needs 6"),
    ({"x": entry(dtype="I64", shape=(1,))}, "tensor 'x' has dtype 'I64', expected one of BF16, F16, F32, U8"),
    ({"x": entry(dtype=["BF16"])}, "tensor 'x' has dtype ['BF16']"),
    ({"x": 5}, "tensor 'x': header entry is 5, expected an object"),
    ({"x": entry(offsets=(0, 8)), "y": entry(offsets=(4, 12))}, "the data of tensors 'x' and 'y' overlap"),
])
def test_bad_shard_headers(ckpt, out_dir, header, fragment):
    add_shard(ckpt, header)
    refused(ckpt, out_dir / "o.gguf", f"{ckpt / EXTRA}: ", fragment)


def test_tensors_may_share_an_offset_when_empty(ckpt, out_dir):
    """Not an overlap: a zero-size tensor holds no bytes. It is then refused as unexpected, by name."""
    add_shard(ckpt, {"x": entry(offsets=(0, 8)), "y": entry(shape=(0,), offsets=(4, 4))})
    refused(ckpt, out_dir / "o.gguf", "unexpected tensor 'x' and 1 more")


# --- the index ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit,fragment", [
    (lambda ix: ix["weight_map"].update({"model.norm.weight": 5}), "weight_map['model.norm.weight'] is 5, expected"),
    (lambda ix: ix["weight_map"].update({"model.norm.weight": None}), "weight_map['model.norm.weight'] is None"),
    (lambda ix: ix["weight_map"].update({"model.norm.weight": ["a"]}), "weight_map['model.norm.weight'] is ['a']"),
    (lambda ix: ix["weight_map"].update({"model.norm.weight": "../config.json"}), "is '../config.json', expected"),
    (lambda ix: ix["weight_map"].update({"model.norm.weight": "/etc/hostname"}), "is '/etc/hostname', expected"),
    (lambda ix: ix["weight_map"].update({"model.norm.weight": "s" * 300}), "shard 'sssss"),
    (lambda ix: ix.update(weight_map=["model.norm.weight"]), "field 'weight_map' is ['model.norm.weight']"),
    (lambda ix: ix.update(weight_map="x"), "field 'weight_map' is 'x', expected an object"),
    (lambda ix: ix.pop("weight_map"), "missing field 'weight_map'"),
])
def test_bad_index(ckpt, out_dir, edit, fragment):
    index = ckpt / "model.safetensors.index.json"
    edit_json(index, edit)
    message = refused(ckpt, out_dir / "o.gguf", f"{index}: ", fragment)
    if "s" * 300 in fragment + message:
        assert message.endswith("File name too long")


# --- tokenizer files ----------------------------------------------------------------------------------------------
def vocab(v):
    return lambda t: t["model"].update(vocab=v)


@pytest.mark.parametrize("edit,fragment", [
    (lambda t: t["added_tokens"][1].pop("id"), "added_tokens[1] ('<|endoftext|>') has no 'id'"),
    (lambda t: t["added_tokens"].__setitem__(0, "<|startoftext|>"),
     "added_tokens[0] is '<|startoftext|>', expected an object with 'id' and 'content'"),
    (lambda t: t.update(added_tokens={"<|startoftext|>": 199998}), "field 'added_tokens' is {'<|startoftext|>'"),
    (lambda t: t["added_tokens"][0].update(id="199998"), "added_tokens[0]: token '<|startoftext|>' has id '199998'"),
    (lambda t: t["added_tokens"][0].update(content=None), "added_tokens[0].content is None"),
    (lambda t: t["added_tokens"][0].update(special="yes"), "added_tokens[0].special is 'yes', expected true or false"),
    (lambda t: t["added_tokens"][0].update(id=2), "added_tokens[0]: token '<|startoftext|>' has id 2, which 'ab'"),
    (lambda t: t["model"].update(merges=[[1, 2]]), "model.merges[0] is [1, 2], expected two tokens"),
    (lambda t: t["model"].update(merges=[["a", "b"], 7]), "model.merges[1] is 7"),
    (lambda t: t["model"].update(merges=["ab"]), "model.merges[0] is 'ab'"),
    (lambda t: t["model"].update(merges=[["a", "b", "c"]]), "model.merges[0] is ['a', 'b', 'c']"),
    (lambda t: t["model"].update(merges={"a": "b"}), "field 'model.merges' is {'a': 'b'}, expected a list"),
    (vocab({}), "field 'model.vocab' is empty"),
    (vocab({"a": 0, "b": 0}), "model.vocab: token 'b' has id 0, which 'a' has too"),
    (vocab({"a": True}), "model.vocab: token 'a' has id True, outside the vocabulary of 201088"),
    (vocab({"a": 201088}), "model.vocab: token 'a' has id 201088, outside the vocabulary"),
    (vocab({"a": 0, "\ud800": 1}), "'\\ud800' is not valid Unicode"),
])
def test_bad_tokenizer_json(ckpt, out_dir, edit, fragment):
    edit_json(ckpt / "tokenizer.json", edit)
    refused(ckpt, out_dir / "o.gguf", f"{ckpt / 'tokenizer.json'}: ", fragment)


@pytest.mark.parametrize("template,fragment", [
    (["x"], "chat_template[0] is 'x', expected {\"name\": ..., \"template\": ...}"),
    ([{"name": "default", "template": 5}], "chat_template[0] is {'name': 'default', 'template': 5}"),
    (5, "field 'chat_template' is 5, expected a string"),
    ({"template": "x"}, "field 'chat_template' is {'template': 'x'}"),
    ("\udcff", "chat_template: '\\udcff' is not valid Unicode"),
])
def test_bad_chat_template(ckpt, out_dir, template, fragment):
    edit_json(ckpt / "tokenizer_config.json", lambda c: c.update(chat_template=template))
    refused(ckpt, out_dir / "o.gguf", f"{ckpt / 'tokenizer_config.json'}: ", fragment)


def test_chat_template_jinja_not_utf8(ckpt, out_dir):
    (ckpt / "chat_template.jinja").write_bytes(b"{{ \xff }}")
    refused(ckpt, out_dir / "o.gguf", f"{ckpt / 'chat_template.jinja'}: not UTF-8 text")


@pytest.mark.parametrize("value,fragment", [
    (5, "eos_token is 5, expected the token's text"),
    (["<|return|>"], "eos_token is ['<|return|>'], expected the token's text"),
    ({"content": 5}, "eos_token.content is 5, expected"),
    ("<|im_end|>", "eos_token is '<|im_end|>', which is not a token of tokenizer.json"),
])
def test_bad_special_token_in_tokenizer_config(ckpt, out_dir, value, fragment):
    edit_json(ckpt / "tokenizer_config.json", lambda c: c.update(eos_token=value))
    refused(ckpt, out_dir / "o.gguf", f"{ckpt / 'tokenizer_config.json'}: ", fragment)


@pytest.mark.parametrize("value", [-1, True, 201088, "199998"])
def test_bad_special_token_id_in_config(ckpt, out_dir, value):
    """Without bos_token in tokenizer_config.json, config.json's bos_token_id is used: a token id or refused."""
    edit_json(ckpt / "tokenizer_config.json", lambda c: c.pop("bos_token"))
    edit_json(ckpt / "config.json", lambda c: c.update(bos_token_id=value))
    refused(ckpt, out_dir / "o.gguf", f"{ckpt / 'config.json'}: bos_token_id is {value!r}, expected a token id below")


# --- config.json values ------------------------------------------------------------------------------------------
def no_head_dim_and_no_heads(c):
    c.pop("head_dim")
    c["num_attention_heads"] = 0


@pytest.mark.parametrize("edit,field,value", [
    (lambda c: c.update(max_position_embeddings=10**30), "max_position_embeddings", "1" + "0" * 30),
    (lambda c: c.update(max_position_embeddings=1e30), "max_position_embeddings", "1e+30"),
    (lambda c: c.update(sliding_window=1 << 32), "sliding_window", "4294967296"),
    (lambda c: c.update(rope_theta="abc"), "rope_theta", "'abc'"),
    (lambda c: c.update(rope_theta=1.0), "rope_theta", "1.0"),
    (lambda c: c.update(rope_theta=1e39), "rope_theta", "1e+39"),  # a float64, too large for GGUF's float32
    (lambda c: c.update(rms_norm_eps=0), "rms_norm_eps", "0"),
    (lambda c: c.update(rms_norm_eps=-1e-5), "rms_norm_eps", "-1e-05"),
    (lambda c: c.update(rms_norm_eps=1e-50), "rms_norm_eps", "1e-50"),  # would round to 0 as a float32
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads", "0"),
    (lambda c: c.update(num_attention_heads="4"), "num_attention_heads", "'4'"),
    (no_head_dim_and_no_heads, "num_attention_heads", "0"),
    (lambda c: c["rope_scaling"].update(factor=1e39), "rope_scaling.factor", "1e+39"),
])
def test_bad_config_values(ckpt, out_dir, edit, field, value):
    edit_json(ckpt / "config.json", edit)
    message = refused(ckpt, out_dir / "o.gguf", f"{ckpt / 'config.json'}: ", field)
    assert message.endswith(value) or f" {value}," in message


# --- the output path ----------------------------------------------------------------------------------------------
def test_output_name_too_long(ckpt, out_dir):
    out = out_dir / ("m" * 251 + ".gguf")
    refused(ckpt, out, f"{out}: the file name is 256 bytes long, the file system allows 255")


def test_output_in_a_directory_with_a_name_too_long(ckpt, out_dir):
    out = out_dir / ("d" * 300) / "o.gguf"
    with pytest.raises(ConvertError, match=f"^{re.escape(str(out))}: File name too long$"):
        convert(ckpt, out, progress=False)
    assert list(out_dir.iterdir()) == []


def test_output_is_a_directory(ckpt, out_dir):
    (out_dir / "o.gguf").mkdir()
    refused(ckpt, out_dir / "o.gguf", f"{out_dir / 'o.gguf'}: is a directory")


def test_read_only_output_directory(ckpt, out_dir, monkeypatch):
    """EROFS (or EACCES, which root never gets) when the temporary file is created: named, nothing left."""
    real_open = os.open

    def read_only(path, flags, *args):
        if Path(path).parent == out_dir:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(conv.os, "open", read_only)
    refused(ckpt, out_dir / "o.gguf", f"{out_dir / 'o.gguf'}: cannot write in {out_dir}: Read-only file system")


def test_cleanup_never_hides_the_error(ckpt, out_dir, monkeypatch):
    """The disk fills mid-write and the temporary file cannot be removed either: the error is still the disk's."""
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def stuck(self, missing_ok=False):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(conv.mxfp4, "hf_to_gguf", full)
    monkeypatch.setattr(Path, "unlink", stuck)
    with pytest.raises(ConvertError, match=r"o\.gguf: write failed: No space left on device$"):
        convert(ckpt, out_dir / "o.gguf", outtype="bf16", progress=False)
    monkeypatch.undo()
    [left] = out_dir.iterdir()  # the temporary file that could not be removed: short, hidden
    assert left.name.startswith(".ossrt-") and left.name.endswith(".part") and len(left.name) < 30
