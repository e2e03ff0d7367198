"""The CUDA backend (engine/cuda: CudaOps, the device KV cache, the decode step) against the CPU path, on a micro model
under numba's CUDA simulator (NumPy stands in for CuPy; every CUDA thread is a Python thread, so the model is tiny
and the token sequences short). The kernels themselves are tested one by one in test_cuda_kernels.py."""

import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before anything imports numba.cuda

import contextlib
import json
import sys
import types

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from ossrt.engine import cuda
from ossrt.engine.cpu import CpuOps
from ossrt.engine.cuda import CudaOps
from ossrt.engine.cuda import device as cuda_device
from ossrt.engine.cuda.graph import DecodeStep
from ossrt.engine.engine import Engine
from ossrt.engine.generate import Generation
from ossrt.engine.model import Cancelled, Transformer
from ossrt.engine.sampling import Sampler
from ossrt.errors import DeviceError
from ossrt.format.modelfile import ModelFile

VOCAB = 256  # 224 byte tokens, then the 21 specials (the tokenizer is not needed here)
# Two layers (sliding, full), hidden 64, 2 query heads of 32 on 1 KV head (q8_0 caches need 32), 4 experts top-2,
# a window of 4: with forward steps of at most 3 positions the sliding layer's ring has 6 slots.
MICRO = dict(num_hidden_layers=2, vocab_size=VOCAB, intermediate_size=32, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)
CHUNK = 3


def micro_checkpoint(out):
    """A synthetic checkpoint of MICRO's shape whose tokenizer fits the small vocabulary."""
    from ossrt.testing import synthetic
    from ossrt.tokenizer import SPECIAL_TOKENS

    d = synthetic.write_checkpoint(out, synthetic.hf_config("tiny", **MICRO))
    n_plain = VOCAB - 32
    tok = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    tok["model"]["vocab"] = dict(list(tok["model"]["vocab"].items())[:n_plain])
    tok["model"]["merges"] = []
    specials = sorted(SPECIAL_TOKENS.items())
    tok["added_tokens"] = [{"id": n_plain + i, "content": text, "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False, "special": True}
                           for i, (_, text) in enumerate(specials)]
    (d / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    new_id = {old: n_plain + i for i, (old, _) in enumerate(specials)}
    cfg.update(eos_token_id=new_id[cfg["eos_token_id"]], pad_token_id=new_id[cfg["pad_token_id"]])
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return d


@pytest.fixture(autouse=True, scope="module")
def _free_running():
    with cuda_device.switch_interval(cuda_device.FREE_RUNNING_SWITCH_INTERVAL):
        yield


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """outtype -> (ModelFile, CPU Transformer, CUDA Transformer) of the micro model with that matrix type."""
    from ossrt.format.convert import convert

    src = micro_checkpoint(tmp_path_factory.mktemp("micro-ckpt"))
    made, files = {}, []

    def make(outtype: str):
        if outtype not in made:
            path = convert(src, tmp_path_factory.mktemp("micro") / f"micro-{outtype}.gguf", outtype=outtype,
                           progress=False)
            mf = ModelFile.open(path)
            files.append(mf)
            made[outtype] = mf, Transformer(mf, CpuOps(1, int8_activations=False)), Transformer(mf, CudaOps())
        return made[outtype]

    yield make
    for mf in files:
        mf.close()


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


def run(model: Transformer, cache, ids: np.ndarray, pieces: list[int], all_logits: bool) -> np.ndarray:
    """Logits of `ids` fed in pieces of these lengths: every position's, or each piece's last."""
    out, start = [], 0
    for n in pieces:
        out.append(model.forward(ids[start:start + n], cache, all_logits=all_logits))
        start += n
    return np.concatenate(out)


def test_logits_equal_the_cpu_path_through_prefill_decode_and_a_wrapping_ring(micro):
    """f32 weights and cache: a prompt in steps of 3 and 2, decode steps around the sliding layer's ring of 6, then a
    block of 3 over the wrapped ring; every position's logits within 1e-4 of the CPU's."""
    mf, cpu, gpu = micro("f32")
    ids, pieces = tokens(12), [5, 1, 1, 1, 1, 3]
    caches = [model.ops.new_cache(mf.config, 16, "f32", chunk=CHUNK) for model in (cpu, gpu)]
    assert [layer.capacity for layer in caches[1].layers] == [4 + CHUNK - 1, 16]
    expect = run(cpu, caches[0], ids, pieces, all_logits=True)
    got = run(gpu, caches[1], ids, pieces, all_logits=True)
    assert got.shape == (12, VOCAB) and got.dtype == np.float32 and caches[1].length == 12
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-4)
    assert np.abs(expect).max() > 1  # logits of a real size, so 1e-4 means something
    step = caches[1].decode_step  # one recorded step per cache, fed through its device buffers
    assert step is not None and step.positions.tolist() == [8] and step.tokens.tolist() == [ids[8]]


@pytest.mark.parametrize("outtype, kv_type", [("q8_0", "q8_0"), ("bf16", "f16"), ("f16", "f32")])
def test_other_weight_and_cache_types_equal_the_cpu_path(micro, outtype, kv_type):
    """The compact caches store exactly as the CPU's (f16 rounding, llama.cpp's q8_0 rule), so the logits stay as
    close; the ring wraps in the decode steps."""
    mf, cpu, gpu = micro(outtype)
    ids, pieces = tokens(7, seed=1), [3, 1, 1, 1, 1]
    expect, got = (run(model, model.ops.new_cache(mf.config, 16, kv_type, chunk=CHUNK), ids, pieces, False)
                   for model in (cpu, gpu))
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-4)


def test_weights_are_on_the_device_as_stored(micro):
    mf, _, gpu = micro("q8_0")
    experts = gpu.layers[0]["ffn_gate_exps.weight"]
    stored = mf.tensors["blk.0.ffn_gate_exps.weight"]
    assert experts.type == GGMLQuantizationType.MXFP4 and experts.shape == stored.shape
    assert experts.data.dtype == np.uint8 and experts.data.shape == stored.data.shape  # 4-bit blocks, not expanded
    assert gpu.layers[0]["attn_q.weight"].data.dtype == np.uint8  # Q8_0 blocks
    assert cuda_device.is_device_array(gpu.output.data) and gpu.output.data is not mf.tensors["output.weight"].data
    np.testing.assert_array_equal(experts.data, stored.data)


def test_device_cache_snapshot_restore_and_truncate(micro):
    """Back to a snapshot after the decode steps overwrote the ring: the same steps give the same logits; a
    truncated cache continues as a fresh one would."""
    mf, _, gpu = micro("f32")
    ids = tokens(8, seed=2)
    cache = gpu.ops.new_cache(mf.config, 16, "f32", chunk=CHUNK)
    gpu.forward(ids[:3], cache)
    snap = cache.snapshot()
    first = run(gpu, cache, ids[3:], [1] * 4, all_logits=False)
    assert not cache.can_truncate(3)
    cache.restore(snap)
    np.testing.assert_array_equal(run(gpu, cache, ids[3:], [1] * 4, all_logits=False), first)
    cache.truncate(6)
    np.testing.assert_array_equal(gpu.forward(ids[6:7], cache), first[3:4])


def test_generation_through_the_engine_gives_the_cpu_tokens(micro):
    mf, cpu, gpu = micro("f32")
    runs = []
    for model in (cpu, gpu):
        engine = Engine(model, lambda: None, context_length=16, kv_type="f16")
        generation = Generation(engine, engine.new_cache(), tokens(4, seed=3), Sampler(temperature=0),
                                max_tokens=5, stop_tokens=frozenset())
        runs.append(list(generation))
    assert len(runs[0]) == 5 and runs[1] == runs[0]


@pytest.mark.parametrize("n", [1, 3])
def test_should_stop_cancels_and_empties_the_cache(micro, n):
    mf, _, gpu = micro("f32")
    cache = gpu.new_cache(16, "f32")
    gpu.forward(tokens(2), cache)
    with pytest.raises(Cancelled):
        gpu.forward(tokens(n), cache, should_stop=lambda: True)
    assert cache.length == 0


# --- what a machine without CUDA gets --------------------------------------------------------------------------------
@pytest.fixture
def no_simulator(monkeypatch):
    """The checks as on a real machine: CuPy and a device are needed."""
    monkeypatch.setattr(cuda_device, "SIMULATOR", False)


def test_without_cupy_cuda_names_the_extra(no_simulator, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(DeviceError, match=r"CuPy is not installed: pip install 'ossrt\[cuda12\]'"):
        CudaOps()
    assert cuda.available() is False


def fake_cupy(get_device_count):
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=get_device_count)))


def test_without_a_device_cuda_says_so(no_simulator, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(lambda: 0))
    with pytest.raises(DeviceError, match="no CUDA device found"):
        CudaOps()

    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(no_driver))
    with pytest.raises(DeviceError, match="no CUDA device found.*insufficient"):
        CudaOps()
    assert cuda.available() is False
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(lambda: 2))
    with pytest.raises(DeviceError, match="CUDA device 2 not found: devices are numbered 0..1"):
        CudaOps(2)


def test_without_numba_cuda_the_backend_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba.cuda", None)
    with pytest.raises(DeviceError, match="numba-cuda is not installed"):
        cuda.check()
    assert cuda.available() is False


def test_the_simulator_is_not_a_device():
    """`available()` drives device="auto": the simulator (tests) never counts as a GPU."""
    assert cuda_device.SIMULATOR and cuda.available() is False


# --- the decode step's recording, with CuPy's graph API faked (a GPU is needed to replay a real graph) ---------------
class FakeStream:
    def __init__(self):
        self.capturing, self.launches = False, 0

    def begin_capture(self):
        assert not self.capturing
        self.capturing = True

    def end_capture(self):
        assert self.capturing
        self.capturing = False
        return types.SimpleNamespace(launch=self.launch)

    def launch(self, stream):
        assert stream is self
        self.launches += 1


def fake_graph_cupy(stream: FakeStream):
    pools = []

    class MemoryPool:
        def __init__(self):
            pools.append(self)

        def malloc(self, nbytes):
            raise AssertionError("not called: the fake step allocates nothing")

    @contextlib.contextmanager
    def using_allocator(malloc):
        assert malloc.__self__ is pools[-1]
        yield

    return types.SimpleNamespace(cuda=types.SimpleNamespace(
        get_current_stream=lambda: stream, MemoryPool=MemoryPool, using_allocator=using_allocator))


def test_decode_step_runs_eagerly_then_records_then_replays(monkeypatch):
    """The first step of a cache runs eagerly (kernels compile, cached arrays are made outside the graph's pool),
    the second is captured and launched, later ones are only launched, from the inputs written to the buffers."""
    stream, calls = FakeStream(), []

    def blocks(tokens, positions, cache, should_stop):
        calls.append((int(tokens[0]), int(positions[0]), stream.capturing))
        return f"output of call {len(calls)}"

    step = DecodeStep(blocks, cache=None)
    monkeypatch.setattr(cuda_device, "SIMULATOR", False)
    monkeypatch.setattr(cuda_device, "xp", fake_graph_cupy(stream), raising=False)
    assert step(5, 0) == "output of call 1" and calls == [(5, 0, False)] and stream.launches == 0
    assert step(6, 1) == "output of call 2" and calls[1:] == [(6, 1, True)] and stream.launches == 1
    assert step(7, 2) == "output of call 2" and len(calls) == 2 and stream.launches == 2
    assert (step.tokens.tolist(), step.positions.tolist()) == ([7], [2])


def test_a_step_that_fails_while_recorded_ends_the_capture(monkeypatch):
    stream = FakeStream()

    def blocks(tokens, positions, cache, should_stop):
        if stream.capturing:
            raise ValueError("a kernel's check failed")
        return "eager"

    step = DecodeStep(blocks, cache=None)
    monkeypatch.setattr(cuda_device, "SIMULATOR", False)
    monkeypatch.setattr(cuda_device, "xp", fake_graph_cupy(stream), raising=False)
    assert step(1, 0) == "eager"
    with pytest.raises(ValueError, match="check failed"):
        step(2, 1)
    assert not stream.capturing and stream.launches == 0
