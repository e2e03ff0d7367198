"""Bad GGUF files (issue 11): every corrupt header, mistyped or out-of-range metadata value and bad tensor layout is
a ModelFileError naming the key or tensor, before anything is allocated or any weight is used.

The files are written byte by byte here (GGUFWriter refuses duplicate keys and cannot mistype values), from a
tiny valid gpt-oss layout that each test breaks in one place."""

import math
import struct

import pytest
from click.testing import CliRunner
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ossrt.testing import synthetic
from ossrt.cli import main
from ossrt.format.config import KEY_VOCAB_SIZE, ModelConfig
from ossrt.errors import ModelFileError, ParameterError
from ossrt.info import report
from ossrt.format.modelfile import ModelFile

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FORMATS = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q",
            F64: "d"}
ALIGN = 32

CFG = ModelConfig(n_layer=2, n_embd=64, n_ff_exp=32, n_head=4, n_head_kv=2, head_dim=16, n_expert=4,
                  n_expert_used=2, n_vocab=96, n_ctx_train=4096, sliding_window=8, rope_freq_base=150000.0,
                  rope_scaling_factor=32.0, rope_orig_ctx=4096)
KIND_TYPE = {"vector": GGMLQuantizationType.F32, "router": GGMLQuantizationType.F32,
             "matrix": GGMLQuantizationType.Q8_0, "experts": GGMLQuantizationType.MXFP4}
INT_KEYS = [k for k, (t, _) in CFG.gguf_metadata().items() if t == U32]
FLOAT_KEYS = [k for k, (t, _) in CFG.gguf_metadata().items() if t == F32]


def encode(vtype: int, value) -> bytes:
    if vtype == STR:
        raw = value.encode()
        return struct.pack("<Q", len(raw)) + raw
    if vtype == ARR:
        elem_type, items = value
        return struct.pack("<IQ", elem_type, len(items)) + b"".join(encode(elem_type, x) for x in items)
    return struct.pack("<" + _FORMATS[vtype], value)


def metadata(cfg: ModelConfig = CFG, tokens: bool = True) -> list[list]:
    """[key, value type, value] of a valid file, as llama.cpp's converter types them."""
    kv = [["general.architecture", STR, "gpt-oss"], ["general.alignment", U32, ALIGN]]
    kv += [[key, t, value] for key, (t, value) in cfg.gguf_metadata().items()]
    kv += [["tokenizer.ggml.model", STR, "gpt2"], ["tokenizer.ggml.pre", STR, "gpt-4o"]]
    if tokens:
        kv += [["tokenizer.ggml.tokens", ARR, (STR, [f"t{i}" for i in range(cfg.n_vocab)])],
               ["tokenizer.ggml.token_type", ARR, (I32, [1] * cfg.n_vocab)],
               ["tokenizer.ggml.merges", ARR, (STR, ["t 1", "t1 0"])]]
    return kv


def nbytes(shape, qtype) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def tensor_table(cfg: ModelConfig = CFG) -> list[list]:
    """[name, shape (NumPy order), type, offset] of a valid file: contiguous, each start aligned."""
    rows, offset = [], 0
    for spec in cfg.tensor_specs():
        qtype = KIND_TYPE[spec.kind]
        rows.append([spec.name, spec.shape, qtype, offset])
        offset += -(-nbytes(spec.shape, qtype) // ALIGN) * ALIGN
    return rows


DATA_BYTES = tensor_table()[-1][3] + nbytes(*tensor_table()[-1][1:3])


def gguf_bytes(kv: list[list], tensors: list[list], *, n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
    """The file: header, padding, then the data of the valid table (whatever `tensors` claims)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                len(kv) if n_kv is None else n_kv)
    for key, vtype, value in kv:
        out += encode(STR, key) + struct.pack("<I", vtype) + encode(vtype, value)
    for name, shape, qtype, offset in tensors:
        ne = shape[::-1]
        out += encode(STR, name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, qtype, offset)
    out += bytes(-len(out) % ALIGN)
    # Distinct bytes everywhere, so a view of the wrong place cannot compare equal by chance.
    return out + bytes(i * 7 % 251 for i in range(DATA_BYTES)) if tensors else out


def write(tmp_path, kv=None, tensors=None, name="m.gguf", **kwargs):
    path = tmp_path / name
    path.write_bytes(gguf_bytes(metadata() if kv is None else kv, tensor_table() if tensors is None else tensors,
                                **kwargs))
    return path


def with_kv(key: str, vtype: int, value, kv=None) -> list[list]:
    """The valid metadata with `key` set (or added) to a value of type `vtype`."""
    kv = metadata() if kv is None else kv
    for entry in kv:
        if entry[0] == key:
            entry[1:] = [vtype, value]
            return kv
    return kv + [[key, vtype, value]]


def with_tensor(name: str, **change) -> list[list]:
    rows = tensor_table()
    row = next(r for r in rows if r[0] == name)
    for field, value in change.items():
        row[["name", "shape", "type", "offset"].index(field)] = value
    return rows


def fails(path, *fragments: str) -> str:
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(path)
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- the valid file -------------------------------------------------------------------------------------------
def test_valid_file_loads_with_the_bytes_written(tmp_path):
    path = write(tmp_path)
    data = path.read_bytes()
    rows = tensor_table()
    data_start = len(data) - (rows[-1][3] + nbytes(rows[-1][1], rows[-1][2]))
    with ModelFile.open(path) as mf:
        assert mf.config == CFG
        assert len(mf.tensors) == CFG.n_tensors == len(CFG.tensor_specs()) == 41
        for name, shape, qtype, offset in rows:
            start = data_start + offset
            assert mf.tensors[name].data.tobytes() == data[start:start + nbytes(shape, qtype)], name
        assert mf.tokenizer_token_types == [1] * 96 and mf.tokenizer_merges == ["t 1", "t1 0"]


@pytest.mark.parametrize("vtype", [U8, U16, I16, I32, U64, I64])
def test_any_integer_type_holds_an_integer_key(tmp_path, vtype):
    path = write(tmp_path, with_kv("gpt-oss.attention.sliding_window", vtype, 8))
    with ModelFile.open(path) as mf:
        assert mf.config.sliding_window == 8


def test_float64_holds_a_float_key(tmp_path):
    with ModelFile.open(write(tmp_path, with_kv("gpt-oss.rope.freq_base", F64, 150000.0))) as mf:
        assert mf.config.rope_freq_base == 150000.0


@pytest.mark.parametrize("size", ["20b", "120b"])
def test_real_model_metadata_passes(tmp_path, size):
    cfg = ModelConfig.from_hf_config(synthetic.hf_config(size))
    assert (cfg.n_ctx_train, cfg.sliding_window, cfg.n_vocab) == (131072, 128, 201088)
    values = {key: value for key, (_, value) in cfg.gguf_metadata().items()}
    values |= {"general.architecture": "gpt-oss", KEY_VOCAB_SIZE: cfg.n_vocab}
    assert ModelConfig.from_gguf(values.get, "x.gguf") == cfg
    # The metadata of the real file (as float32, without tensors) gets as far as the tensor table.
    kv = with_kv(KEY_VOCAB_SIZE, U32, cfg.n_vocab, metadata(cfg, tokens=False))
    fails(write(tmp_path, kv, []), "missing tensor 'token_embd.weight'",
          f"gpt-oss.block_count is {cfg.n_layer}: {cfg.n_tensors} tensors expected, the file has 0")


# --- metadata values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("vtype, value", [(STR, "4"), (BOOL, True), (F32, 4.5), (F32, 4.0), (F32, math.inf),
                                          (ARR, (U32, [4]))], ids=["str", "bool", "4.5", "4.0", "inf", "array"])
def test_integer_key_of_another_type(tmp_path, key, vtype, value):
    fails(write(tmp_path, with_kv(key, vtype, value)), f"'{key}' must be an integer")


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("vtype, value", [(STR, "10.0"), (BOOL, True), (U32, 10), (ARR, (F32, [10.0]))],
                         ids=["str", "bool", "int", "array"])
def test_float_key_of_another_type(tmp_path, key, vtype, value):
    fails(write(tmp_path, with_kv(key, vtype, value)), f"'{key}' must be a float")


@pytest.mark.parametrize("key, vtype, value, expected", [
    ("gpt-oss.embedding_length", U64, 2**63, "between 1 and 2147483647"),
    ("gpt-oss.context_length", U32, 2**31, "between 1 and 2147483647"),
    ("gpt-oss.attention.sliding_window", U64, 2**63, "between 1 and 2147483647"),
    ("gpt-oss.attention.sliding_window", I32, -8, "between 1 and 2147483647"),
    ("gpt-oss.attention.head_count", U32, 0, "between 1 and 2147483647"),
    ("gpt-oss.block_count", U32, 2**31, "between 1 and 4096"),
    ("gpt-oss.embedding_length", U32, 80, "multiple of 32"),
    ("gpt-oss.attention.key_length", U32, 15, "must be even"),
    ("gpt-oss.attention.head_count_kv", U32, 3, "not a multiple of metadata key 'gpt-oss.attention.head_count_kv'"),
    ("gpt-oss.expert_used_count", U32, 5, "exceeds the expert count, metadata key 'gpt-oss.expert_count'"),
    ("gpt-oss.rope.freq_base", F32, math.nan, "greater than 1"),
    ("gpt-oss.rope.freq_base", F32, math.inf, "greater than 1"),
    ("gpt-oss.rope.freq_base", F32, 0.0, "greater than 1"),
    ("gpt-oss.rope.freq_base", F32, 1.0, "greater than 1"),
    ("gpt-oss.rope.freq_base", F32, -150000.0, "greater than 1"),
    ("gpt-oss.attention.layer_norm_rms_epsilon", F32, 0.0, "below 1 and at least 2^-126"),
    ("gpt-oss.attention.layer_norm_rms_epsilon", F32, -1e-5, "below 1 and at least 2^-126"),
    ("gpt-oss.attention.layer_norm_rms_epsilon", F32, 2.0, "below 1 and at least 2^-126"),
    ("gpt-oss.attention.layer_norm_rms_epsilon", F64, 1e-300, "below 1 and at least 2^-126"),
    ("gpt-oss.rope.scaling.factor", F32, 0.5, "at least 1"),
    ("gpt-oss.rope.scaling.factor", F32, -math.inf, "at least 1"),
])
def test_value_out_of_range(tmp_path, key, vtype, value, expected):
    fails(write(tmp_path, with_kv(key, vtype, value)), f"metadata key '{key}'", expected)


def test_value_length_must_equal_key_length(tmp_path):
    fails(write(tmp_path, with_kv("gpt-oss.attention.value_length", U32, 32)),
          "gpt-oss.attention.value_length is 32 but gpt-oss.attention.key_length is 16")


@pytest.mark.parametrize("key", ["general.architecture", "general.name", "gpt-oss.rope.scaling.type",
                                 "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"])
@pytest.mark.parametrize("vtype, value", [(U32, 5), (ARR, (STR, ["gpt-oss"]))], ids=["int", "array"])
def test_string_key_of_another_type(tmp_path, key, vtype, value):
    fails(write(tmp_path, with_kv(key, vtype, value)), f"'{key}' must be a string")


@pytest.mark.parametrize("key, vtype, value, expected", [
    ("tokenizer.ggml.tokens", ARR, (U32, list(range(96))),
     "an array of string values, got an array of 96 uint32 values"),
    ("tokenizer.ggml.tokens", STR, "t0", "an array of string values, got 't0'"),
    ("tokenizer.ggml.token_type", ARR, (U8, [1] * 96), "an array of int32 values, got an array of 96 uint8 values"),
    ("tokenizer.ggml.token_type", ARR, (BOOL, [True] * 96), "an array of int32 values, got an array of 96 bool values"),
    ("tokenizer.ggml.token_type", ARR, (F32, [1.0] * 96),
     "an array of int32 values, got an array of 96 float32 values"),
    ("tokenizer.ggml.token_type", ARR, (U32, [1] * 96), "an array of int32 values, got an array of 96 uint32 values"),
    ("tokenizer.ggml.merges", ARR, (I32, [1, 2]), "an array of string values, got an array of 2 int32 values"),
])
def test_tokenizer_array_of_another_type(tmp_path, key, vtype, value, expected):
    fails(write(tmp_path, with_kv(key, vtype, value)), f"'{key}' must be {expected}")


def test_token_counts_must_agree(tmp_path):
    fails(write(tmp_path, with_kv(KEY_VOCAB_SIZE, U32, 95)),
          "gpt-oss.vocab_size is 95 but tokenizer.ggml.tokens has 96 entries")
    fails(write(tmp_path, with_kv("tokenizer.ggml.token_type", ARR, (I32, [1] * 95))),
          "tokenizer.ggml.tokens has 96 entries but tokenizer.ggml.token_type has 95")


def test_duplicate_metadata_key(tmp_path):
    kv = metadata() + [["gpt-oss.block_count", U32, 1]]
    fails(write(tmp_path, kv), "metadata key 'gpt-oss.block_count' appears twice")


@pytest.mark.parametrize("vtype, value", [(U32, 48), (U32, 0), (BOOL, True), (F32, 32.0)])
def test_bad_alignment(tmp_path, vtype, value):
    fails(write(tmp_path, with_kv("general.alignment", vtype, value)), "general.alignment is", "power of two")


# --- tensor table ---------------------------------------------------------------------------------------------
def test_duplicate_tensor_name(tmp_path):
    rows = tensor_table()
    rows.append(["output.weight", rows[0][1], rows[0][2], 0])  # a second output.weight over token_embd's data
    fails(write(tmp_path, tensors=rows), "tensor 'output.weight' appears twice")


def test_tensor_pointing_at_another_tensors_data(tmp_path):
    fails(write(tmp_path, tensors=with_tensor("output.weight", offset=0)),
          "tensors 'token_embd.weight' (bytes", "and 'output.weight' (bytes", "overlap")


def test_tensor_overlapping_the_next_one(tmp_path):
    rows = tensor_table()
    index = next(i for i, r in enumerate(rows) if r[0] == "blk.0.attn_q.weight")
    rows[index][3] = rows[index + 1][3] - ALIGN  # runs into blk.0.attn_q.bias
    fails(write(tmp_path, tensors=rows), "'blk.0.attn_q.weight'", "'blk.0.attn_q.bias'", "overlap")


def test_misaligned_tensor_offset(tmp_path):
    row = next(r for r in tensor_table() if r[0] == "blk.1.attn_sinks.weight")
    fails(write(tmp_path, tensors=with_tensor("blk.1.attn_sinks.weight", offset=row[3] + 4)),
          f"tensor 'blk.1.attn_sinks.weight' has offset {row[3] + 4}, not a multiple of the alignment 32")


@pytest.mark.parametrize("offset", [2**20, 2**64 - 32])
def test_tensor_outside_the_file(tmp_path, offset):
    fails(write(tmp_path, tensors=with_tensor("output_norm.weight", offset=offset)),
          "tensor 'output_norm.weight'", "the file has")


def test_huge_dimension(tmp_path):
    fails(write(tmp_path, tensors=with_tensor("output_norm.weight", shape=(2**62,))),
          f"tensor 'output_norm.weight' has dimension {2**62}")


def test_dimensions_whose_product_overflows_int64(tmp_path):
    fails(write(tmp_path, tensors=with_tensor("token_embd.weight", shape=(2**40, 2**40, 2**40, 64))),
          "tensor 'token_embd.weight'", "truncated or corrupt")


def test_unknown_tensor_type(tmp_path):
    fails(write(tmp_path, tensors=with_tensor("output_norm.weight", type=99)),
          "tensor 'output_norm.weight' has unknown ggml type 99")


# --- counts ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("counts", [{"n_kv": 2**40}, {"n_tensors": 2**40}, {"n_kv": 2**64 - 1}])
def test_counts_beyond_the_file(tmp_path, counts):
    fails(write(tmp_path, **counts), "corrupt header")


@pytest.mark.parametrize("elem_type", [STR, U32])
def test_array_count_beyond_the_file(tmp_path, elem_type):
    data = bytearray(gguf_bytes(metadata(), tensor_table()))
    at = data.index(encode(STR, "tokenizer.ggml.merges")) + len(encode(STR, "tokenizer.ggml.merges")) + 4
    data[at:at + 12] = struct.pack("<IQ", elem_type, 2**61)
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(data))
    fails(path, "file is truncated inside metadata array 'tokenizer.ggml.merges'")


def test_block_count_larger_than_the_tensors_present(tmp_path):
    # 4096 layers are within range, but the file has 2: the error names the first absent tensor without
    # building the 4096-layer table.
    fails(write(tmp_path, with_kv("gpt-oss.block_count", U32, 4096)), "missing tensor 'blk.2.attn_norm.weight'",
          "gpt-oss.block_count is 4096: 77827 tensors expected, the file has 41")


# --- opening ----------------------------------------------------------------------------------------------------
def test_path_too_long(tmp_path):
    path = tmp_path / ("m" * 300 + ".gguf")
    message = fails(path, "cannot open")
    assert message.startswith(str(path))


def test_info_reports_a_bad_file_in_one_line(tmp_path):
    path = write(tmp_path, with_kv("gpt-oss.attention.sliding_window", U64, 2**63))
    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "'gpt-oss.attention.sliding_window' must be between 1 and 2147483647" in r.stderr


def test_info_context_beyond_the_model(tmp_path):
    path = write(tmp_path)
    assert "RAM at context 4096:" in report(path)
    with pytest.raises(ParameterError, match="context must be between 1 and 4096"):
        report(path, context=4097)
