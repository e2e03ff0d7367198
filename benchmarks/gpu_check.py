"""The device check for a GPU machine (issue 13): the CUDA backend's logits against the CPU path on tiny synthetic
models, then the full-size synthetic gpt-oss-20b's speed (and the 120b's on a card with at least 80 GB), in one
table. Exit status 1 when a correctness check fails or a part breaks; the speed targets are goals, printed beside
the measurements, never failures.

    benchmarks/gpu_wheels.sh                                    # here, with network: the wheels the GPU machine lacks
    PYTHONPATH=src:$(echo benchmarks/wheels/*.whl | tr ' ' :) python benchmarks/gpu_check.py   # there
    ... python benchmarks/gpu_check.py --tiny-only              # only the correctness part (about a minute)
    python benchmarks/gpu_check.py --simulate                   # a CPU machine: the tiny part under numba's CUDA
                                                                # simulator, smaller still (CI runs this)

Steps, each part in a child process of its own (a crash or a broken CUDA context stays in its part, and each
part's VRAM is its own):
1. tiny: small synthetic models (4 layers, hidden 64, head 32, window 8, the full 201,088-token vocabulary) with
   f32, q8_0 and bf16 weights, each with f32, f16 and q8_0 KV caches, loaded with device="cpu" and device="cuda"
   from the same file: a 600-token prompt (the sliding layers' ring of window + 511 positions wraps), 8 greedy
   decode steps (the CPU's ids fed to both, so every position compares), then a 40-token block at the end of the
   cache. Logits must agree within TOLERANCE (both paths compute in float32); the table shows the largest
   difference and how many argmaxes agree.
2. 20b: the full-size file is written directly as GGUF (synthetic weights with the statistics of
   ossrt.testing.synthetic, q8_0 matrices, MXFP4 experts: 12.1 GB in 21 s on a 2-core machine, where the
   checkpoint + convert route takes two minutes), in /dev/shm when it has room, else in --workdir. On the GPU (context 8192): decode after a
   128-token prompt, prefill of 2048 tokens, the VRAM it used; on the CPU, all cores: decode for scale.
3. 120b (~63 GB), on a card with at least 80 GB and when the time left allows it: decode after a 128-token
   prompt, VRAM. A 64 GB disk cannot hold it, so it needs /dev/shm (or --workdir) with room for it.
Synthetic files are deleted after their part. Times: see `--budget` (the issue's 8 minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOLERANCE = 1e-2  # max |logit difference| GPU vs CPU: both compute activations and sums in float32 (engine.model)
TARGETS = {  # tok/s on an H100-class card, batch 1 (issue 13): goals, not failures
    ("20b", "decode"): 150,
    ("20b", "prefill"): 5000,
    ("120b", "decode"): 80,
}
VRAM_GOAL_20B = 16 * 2**30  # gpt-oss-20b must run on 16 GB cards at 8192 context
BIG_CARD = 80e9  # the 120b runs on cards of at least 80 GB (an H100 has 85.0e9 bytes)
BUDGET_SECONDS = 480
CONTEXT = 8192  # the full-size models' context: the default, and the 16 GB goal's
PROMPT, DECODE, PREFILL = 128, 64, 2048  # GPU speed: decode after a PROMPT-token prompt, prefill of PREFILL tokens
CPU_DECODE = 8  # the CPU's decode for scale: a few tokens
SHM = Path("/dev/shm")
FAILED = ("FAIL", "ERROR")  # results that make the exit status 1


@dataclass(frozen=True)
class Tiny:
    """The correctness part's shape: sizes, which weight/KV types, and the token sequence it runs."""

    vocab: int
    layers: int
    checks: tuple[tuple[str, str], ...]  # (weight outtype, kv type)
    prompt: int
    decode: int
    block: int


FULL = Tiny(vocab=201088, layers=4, checks=tuple((w, kv) for w in ("f32", "q8_0", "bf16") for kv in ("f32", "f16", "q8_0")),
            prompt=600, decode=8, block=40)
# The simulator runs each CUDA thread as a Python thread: a small vocabulary, two layers (one sliding, one full),
# a prompt that crosses the window, and one KV type per weight type.
SIMULATED = Tiny(vocab=256, layers=2, checks=(("f32", "f32"), ("q8_0", "q8_0"), ("bf16", "f16")), prompt=10,
                 decode=2, block=3)


@dataclass
class Row:
    """One line of the table. `result`: ok/FAIL/ERROR for checks, met/below for goals, skipped, or empty."""

    part: str
    what: str
    measured: str
    goal: str = ""
    result: str = ""


# --- synthetic model files -------------------------------------------------------------------------------------------
def model_config(size: str, **overrides):
    """The ModelConfig of synthetic.hf_config(size) with HF-named overrides."""
    from ossrt.format.config import ModelConfig
    from ossrt.testing import synthetic

    return ModelConfig.from_hf_config(synthetic.hf_config(size, **overrides))


def tiny_config(tiny: Tiny):
    # head_dim 32: q8_0 KV caches need a multiple of 32.
    return model_config("tiny", head_dim=32, vocab_size=tiny.vocab, num_hidden_layers=tiny.layers)


def file_bytes(cfg, outtype: str) -> int:
    """The size of `write_model`'s file, but for the header (a few kB)."""
    return sum(t.nbytes for t, _, _ in plan(cfg, outtype))


def plan(cfg, outtype: str) -> list:
    """The file's tensors in `ModelConfig.tensor_specs()` order, as `ossrt convert` types them (dense matrices as
    `outtype`, experts MXFP4, vectors and the router F32): (convert.OutTensor for the stored shape and size, mean,
    std of the values). The data comes from `_tensor_data`."""
    from gguf import GGMLQuantizationType as QT

    from ossrt.format.convert import OUTTYPES, OutTensor

    qtypes = {"vector": QT.F32, "router": QT.F32, "matrix": OUTTYPES[outtype], "experts": QT.MXFP4}
    return [(OutTensor(spec.name, qtypes[spec.kind], spec.shape, chunks=None),
             *_statistics(spec.name, spec.kind, spec.shape)) for spec in cfg.tensor_specs()]


def _statistics(name: str, kind: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor's values, by ossrt.testing.synthetic's rules: projections keep their input's RMS
    (std 1/sqrt(fan_in)), output projections at gain 0.5 so the residual stream grows slowly, norms about 1, biases
    small."""
    role = name.split(".", 2)[-1] if name.startswith("blk.") else name
    if kind == "vector":
        if role.endswith("norm.weight"):
            return 1.0, 0.05
        return 0.0, 0.5 if role == "attn_sinks.weight" else 0.02
    if role == "token_embd.weight":
        return 0.0, 1.0
    gain = 0.5 if role in ("attn_output.weight", "ffn_down_exps.weight") else 1.0
    return 0.0, gain / math.sqrt(shape[-1])


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniform random bytes (the bit generator's raw output: ~15x faster than Generator.bytes)."""
    return rng.bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n]


def _tensor_data(t, mean: float, std: float, rng: np.random.Generator) -> np.ndarray:
    """The raw data of tensor `t` (an OutTensor). Float types: normal values. Block types are drawn as random codes
    directly (no quantization pass, so the 120b takes seconds): Q8_0 codes uniform in -127..127 with the scale giving
    `std`; MXFP4 like synthetic's experts, random nibbles with the block exponent for `std` jittered by ±1."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

    from ossrt.testing import synthetic

    n = math.prod(t.shape)
    if t.qtype in (QT.F32, QT.BF16):
        x = rng.standard_normal(n, dtype=np.float32)
        x *= np.float32(std)
        x += np.float32(mean)
        return x if t.qtype == QT.F32 else synthetic.to_bf16_bits(x)
    block_values, block_bytes = GGML_QUANT_SIZES[t.qtype]
    blocks = _random_bytes(rng, n // block_values * block_bytes).reshape(-1, block_bytes)
    if t.qtype == QT.Q8_0:
        codes = blocks[:, 2:].view(np.int8)
        np.maximum(codes, -127, out=codes)  # llama.cpp's codes: amax maps to 127
        code_rms = math.sqrt(127 * 128 / 3)  # of the uniform codes -127..127
        blocks[:, :2] = np.array([std / code_rms], dtype=np.float16).view(np.uint8)
    elif t.qtype == QT.MXFP4:
        blocks[:, 0] = synthetic._uniform_rms_exponent(std) - 1 + blocks[:, 0] % 3
    else:
        raise ValueError(f"{t.name}: no synthetic data for {t.qtype.name}")
    return blocks


def write_model(path: Path, cfg, outtype: str, seed: int = 0) -> None:
    """A gpt-oss GGUF file of `cfg` with synthetic weights (`plan`). No tokenizer (the checks feed ids), so the
    vocabulary size is stated outright."""
    import gguf

    from ossrt.format.config import ARCH, KEY_VOCAB_SIZE

    tensors = plan(cfg, outtype)
    w = gguf.GGUFWriter(None, ARCH)
    w.add_name("gpt-oss synthetic (benchmarks/gpu_check.py)")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (vtype, value) in cfg.gguf_metadata().items():
        w.add_key_value(key, value, vtype)
    w.add_uint32(KEY_VOCAB_SIZE, cfg.n_vocab)
    for t, _, _ in tensors:
        w.add_tensor_info(t.name, t.raw_shape, t.np_dtype, t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # Drawing the data takes as long as writing it: threads draw the next tensors (NumPy releases the GIL) while
    # this one writes, in order, with a bounded number of tensors in memory.
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        drawn: deque = deque()
        for k, (t, mean, std) in enumerate(tensors):
            drawn.append(pool.submit(_tensor_data, t, mean, std, np.random.default_rng([seed, k])))
            if len(drawn) > workers:
                w.write_tensor_data(drawn.popleft().result())
        while drawn:
            w.write_tensor_data(drawn.popleft().result())
    w.close()


def place_for(nbytes: int, workdir: Path) -> Path | None:
    """Where a file of `nbytes` goes: /dev/shm (RAM: fast, spares the disk) when it and the RAM left over hold it
    with room to spare, else `workdir` when its disk does; None when neither can."""
    spare = 2**30
    if _free(SHM) > nbytes + spare and _available_ram() > nbytes + 16 * 2**30:
        return SHM
    if _free(workdir) > nbytes + spare:
        return workdir
    return None


def _free(directory: Path) -> int:
    return shutil.disk_usage(directory).free if directory.is_dir() else 0


def _available_ram() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- the device ------------------------------------------------------------------------------------------------------
def device_description(simulate: bool) -> tuple[str, float]:
    """A line naming the device, CuPy and numba-cuda, and the device's memory in bytes (0 under the simulator)."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    numba_cuda = f"numba-cuda {version('numba-cuda')}"
    if simulate:
        return f"numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, NumPy for CuPy), {numba_cuda}", 0.0
    from ossrt.engine import cuda

    cuda.check()  # DeviceError naming what is missing: CuPy, numba-cuda, a driver, the device
    import cupy

    # Whichever CuPy wheel the machine has: the check uses only what both provide.
    cupy_dist = next((d for d in ("cupy-cuda13x", "cupy-cuda12x", "cupy") if version(d)), "cupy")
    device = cupy.cuda.Device(0)
    name = cupy.cuda.runtime.getDeviceProperties(0).get("name", b"?")
    name = name.decode() if isinstance(name, bytes) else name
    total = device.mem_info[1]
    runtime, driver = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
    return (f"{name}, {total / 2**30:.1f} GiB, compute capability {device.compute_capability}, CUDA runtime "
            f"{runtime // 1000}.{runtime % 1000 // 10}, driver {driver // 1000}.{driver % 1000 // 10}; "
            f"{cupy_dist} {cupy.__version__}, {numba_cuda}; {os.cpu_count()} cores"), float(total)


def vram_used() -> tuple[int, int]:
    """(bytes the CuPy memory pool holds, bytes in use on the device by every process). The pool keeps what it
    allocated unless asked to free it, so at the end of a part it holds that part's peak; the device figure adds the
    CUDA context and memory allocated outside the pool."""
    import cupy

    free, total = cupy.cuda.Device().mem_info
    return cupy.get_default_memory_pool().total_bytes(), total - free


def vram_estimate(cfg, weight_bytes: int) -> int:
    """What `ossrt info --device cuda` predicts at CONTEXT: weights as stored, an f16 KV cache, the workspace."""
    from ossrt.engine import cuda
    from ossrt.engine.kv_cache import CHUNK, cache_bytes

    return weight_bytes + cache_bytes(cfg, CONTEXT, "f16") + cuda.workspace_bytes(cfg, CHUNK)


# --- part 1: tiny models, GPU against CPU ------------------------------------------------------------------------------
@dataclass
class Agreement:
    max_diff: float
    argmax_equal: int
    positions: int

    def ok(self, tolerance: float) -> bool:
        return math.isfinite(self.max_diff) and self.max_diff <= tolerance


def agreement(cpu: np.ndarray, gpu: np.ndarray) -> Agreement:
    """How closely the GPU's logits [positions, vocab] follow the CPU's: the largest difference (inf where the GPU
    has a NaN or infinity the CPU has not, or the shapes differ) and at how many positions the argmax is the same."""
    if cpu.shape != gpu.shape:
        return Agreement(math.inf, 0, len(cpu))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(cpu - gpu)  # float32 is ample for a 1e-2 tolerance (and the arrays are large)
    max_diff = float(np.max(diff, initial=0.0)) if np.isfinite(diff).all() else math.inf
    return Agreement(max_diff, int(np.sum(cpu.argmax(-1) == gpu.argmax(-1))), len(cpu))


def run_sequence(model, prompt: np.ndarray, block: np.ndarray, decode_ids: list[int] | None, decode: int):
    """Logits [positions, vocab] of: `prompt` in one call, `decode` single-token steps, then `block` in one call.
    The decode steps feed `decode_ids` when given (the CPU's choices, so the GPU's logits stay comparable), else
    each step's own argmax. Returns the logits and the ids fed."""
    engine = model.engine
    cache = engine.new_cache()
    logits = [engine.forward(prompt, cache, all_logits=True)]
    fed = []
    for step in range(decode):
        token = decode_ids[step] if decode_ids is not None else int(logits[-1][-1].argmax())
        fed.append(token)
        logits.append(engine.forward(np.array([token]), cache, all_logits=True))
    logits.append(engine.forward(block, cache, all_logits=True))
    return np.concatenate(logits), fed


def check_tiny(tiny: Tiny, workdir: Path, rows: list[Row]) -> None:
    """Part 1: for each (weights, KV type) pair, the GPU's logits against the CPU's on the same file."""
    import ossrt

    cfg = tiny_config(tiny)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.n_vocab, tiny.prompt)
    block = rng.integers(0, cfg.n_vocab, tiny.block)
    context = tiny.prompt + tiny.decode + tiny.block
    for outtype in dict.fromkeys(w for w, _ in tiny.checks):
        path = workdir / f"tiny-{outtype}.gguf"
        write_model(path, cfg, outtype)
        for weights, kv_type in tiny.checks:
            if weights != outtype:
                continue
            what = f"{outtype} weights, {kv_type} KV: GPU vs CPU logits"
            try:
                # The CPU's float32 path: the GPU's activations are float32 too.
                with ossrt.load(path, device="cpu", context_length=context, kv_type=kv_type,
                                int8_activations=False) as cpu_model:
                    expected, ids = run_sequence(cpu_model, prompt, block, None, tiny.decode)
                with ossrt.load(path, device="cuda", context_length=context, kv_type=kv_type) as gpu_model:
                    got, _ = run_sequence(gpu_model, prompt, block, ids, tiny.decode)
            except Exception as e:  # noqa: BLE001 - a broken backend is a row of the table, not the end of it
                rows.append(Row("tiny", what, _error(e), result="ERROR"))
                continue
            a = agreement(expected, got)
            rows.append(Row("tiny", what, f"max |diff| {a.max_diff:.2e}, argmax {a.argmax_equal}/{a.positions}",
                            f"<= {TOLERANCE:g}", "ok" if a.ok(TOLERANCE) else "FAIL"))
        path.unlink()


# --- parts 2 and 3: full-size speed ------------------------------------------------------------------------------------
def goal_row(size: str, kind: str, what: str, tokens_per_second: float, note: str = "") -> Row:
    target = TARGETS[(size, kind)]
    return Row(size, what, f"{tokens_per_second:.1f} tok/s{note}", f">= {target} tok/s",
               "met" if tokens_per_second >= target else "below")


def decode_speed(model, prompt: np.ndarray, steps: int) -> tuple[float, float]:
    """Greedy decode of `steps` tokens after `prompt`, one engine call each, as generation makes them: (tokens/s of
    the median step, the steady state; tokens/s over all the steps, including a cache's first steps, which the CUDA
    backend runs eagerly and then records as a graph)."""
    engine = model.engine
    cache = engine.new_cache()
    token = int(engine.forward(prompt, cache)[-1].argmax())
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        token = int(engine.forward(np.array([token]), cache)[-1].argmax())
        seconds.append(time.perf_counter() - t0)
    return 1 / float(np.median(seconds)), steps / sum(seconds)


def prefill_speed(model, tokens: np.ndarray) -> float:
    """Tokens/s of one forward pass over `tokens` in a fresh cache (the engine steps through them in chunks)."""
    cache = model.engine.new_cache()
    t0 = time.perf_counter()
    model.engine.forward(tokens, cache)
    return len(tokens) / (time.perf_counter() - t0)


def bench_full(size: str, workdir: Path, rows: list[Row], timings: dict) -> None:
    """Parts 2 and 3: write the synthetic `size` model, measure it on the GPU (and for the 20b on the CPU, for
    scale). `timings` gets the write and load seconds (the parent scales them to plan the 120b)."""
    import ossrt

    cfg = model_config(size)
    nbytes = file_bytes(cfg, "q8_0")
    where = place_for(nbytes, workdir)
    if where is None:
        room = (f"{SHM} has {_free(SHM) / 1e9:.1f} GB free ({_available_ram() / 1e9:.0f} GB RAM available), "
                f"{workdir} {_free(workdir) / 1e9:.1f} GB")
        rows.append(Row(size, "synthetic q8_0 file", f"needs {nbytes / 1e9:.1f} GB: {room}",
                        "a larger /dev/shm or --workdir", "skipped"))
        return
    path = where / f"ossrt-gpu-check-{size}.gguf"
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, cfg.n_vocab, PROMPT)
    try:
        t0 = time.perf_counter()
        write_model(path, cfg, "q8_0")
        timings["write"] = time.perf_counter() - t0
        rows.append(Row(size, "synthetic file (q8_0 matrices, MXFP4 experts)",
                        f"{nbytes / 1e9:.1f} GB in {timings['write']:.1f} s, {where}"))

        t0 = time.perf_counter()
        with ossrt.load(path, device="cuda", context_length=CONTEXT) as model:
            timings["load"] = time.perf_counter() - t0
            rows.append(Row(size, "load onto the GPU", f"{timings['load']:.1f} s"))
            peak = vram_used()[1]
            decode_speed(model, prompt[:16], 4)  # compiles the kernels (and records the graph, if any)
            rate, overall = decode_speed(model, prompt, DECODE)
            rows.append(goal_row(size, "decode", f"GPU decode after a {PROMPT}-token prompt (median of {DECODE} "
                                 "steps; all steps)", rate, f"; {overall:.1f}"))
            peak = max(peak, vram_used()[1])
            if size == "20b":
                tokens = rng.integers(0, cfg.n_vocab, PREFILL)
                prefill_speed(model, tokens)  # compiles the prefill shapes' kernels
                rows.append(goal_row(size, "prefill", f"GPU prefill, {PREFILL} tokens", prefill_speed(model, tokens)))
            pool, device = vram_used()
            peak = max(peak, device)
            goal, result = "", ""
            if size == "20b":
                goal, result = f"<= {VRAM_GOAL_20B / 2**30:.0f} GiB", "met" if peak <= VRAM_GOAL_20B else "below"
            rows.append(Row(size, f"VRAM peak at context {CONTEXT}: CuPy pool; device; `ossrt info` estimate",
                            f"{pool / 2**30:.2f}; {peak / 2**30:.2f}; {vram_estimate(cfg, nbytes) / 2**30:.2f} GiB",
                            goal, result))
        if size == "20b":
            with ossrt.load(path, device="cpu", context_length=PROMPT + CPU_DECODE + 1) as model:
                rate, _ = decode_speed(model, prompt, CPU_DECODE)
                rows.append(Row(size, f"CPU decode for scale, {CPU_DECODE} tokens, {os.cpu_count()} cores",
                                f"{rate:.1f} tok/s"))
    finally:
        path.unlink(missing_ok=True)


# --- running the parts and the table -----------------------------------------------------------------------------------
def run_part(part: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Run a part in this process (the child's side): {"rows", "timings", "device", "device_bytes"}. The rows made
    before a failure stay, and the failure becomes an ERROR row (its traceback goes to stderr)."""
    rows: list[Row] = []
    result: dict = {"timings": {}}
    try:
        result["device"], result["device_bytes"] = device_description(args.simulate)
        if part == "tiny":
            from ossrt.engine.cuda import device

            with device.switch_interval(device.FREE_RUNNING_SWITCH_INTERVAL):  # a no-op on a GPU
                check_tiny(SIMULATED if args.simulate else FULL, workdir, rows)
        else:
            bench_full(part, workdir, rows, result["timings"])
    except Exception as e:  # noqa: BLE001 - reported in the table by the parent
        rows.append(Row(part, "part stopped", _error(e), result="ERROR"))
    result["rows"] = [dataclasses.asdict(r) for r in rows]
    return result


def _error(e: Exception) -> str:
    """An exception as a table cell: its type and the first line of its message. Its traceback goes to stderr,
    unless it is an expected failure (OssrtError: no device, non-finite output, ...), whose message says all."""
    from ossrt.errors import OssrtError

    if not isinstance(e, OssrtError):
        traceback.print_exc()
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]


def run_child(part: str, args: argparse.Namespace) -> dict:
    """Run a part in a child process of its own; a crash becomes an ERROR row."""
    with tempfile.TemporaryDirectory(prefix="ossrt-gpu-check-", dir=args.workdir) as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--part", part, "--result", str(out), "--workdir", tmp]
        if args.simulate:
            command.append("--simulate")
        status = subprocess.run(command).returncode
        if out.is_file():
            return json.loads(out.read_text())
    return {"rows": [dataclasses.asdict(Row(part, "part crashed", f"exit status {status} (output above)",
                                            result="ERROR"))], "timings": {}}


def estimate_120b(timings_20b: dict) -> float | None:
    """Seconds the 120b part should take, scaled from the 20b's write and load times by file size; None without
    them."""
    if "write" not in timings_20b or "load" not in timings_20b:
        return None
    ratio = file_bytes(model_config("120b"), "q8_0") / file_bytes(model_config("20b"), "q8_0")
    return ratio * (timings_20b["write"] + timings_20b["load"]) + 30  # + start-up and the decode run


def print_table(rows: list[Row]) -> None:
    header = Row("part", "check", "measured", "goal / limit", "result")
    table = [header] + rows
    widths = [max(len(getattr(r, f.name)) for r in table) for f in dataclasses.fields(Row)]
    for r in table:
        print("  ".join(getattr(r, f.name).ljust(w) for f, w in zip(dataclasses.fields(Row), widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny-only", "--quick", action="store_true", help="only the tiny correctness part")
    ap.add_argument("--simulate", action="store_true",
                    help="numba's CUDA simulator instead of a GPU (tiny part only, smaller models)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                    help="where files go when /dev/shm has no room [default: %(default)s]")
    ap.add_argument("--budget", type=float, default=BUDGET_SECONDS,
                    help="seconds the whole check may take; the 120b is skipped if it would not fit "
                         "[default: %(default)s]")
    ap.add_argument("--part", choices=["tiny", "20b", "120b"], help=argparse.SUPPRESS)  # a child's part
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # where a child writes its result
    args = ap.parse_args(argv)
    if args.part:
        # Before anything imports numba.cuda. Set both ways, so a value left in the environment (the tests set it)
        # cannot put a GPU run on the simulator.
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1" if args.simulate else "0"
        args.result.write_text(json.dumps(run_part(args.part, args, args.workdir)))
        return 0

    start = time.perf_counter()
    tiny = run_child("tiny", args)
    rows = [Row(**r) for r in tiny["rows"]]
    device_bytes = tiny.get("device_bytes")
    if device_bytes is None and not (args.tiny_only or args.simulate):
        rows.append(Row("20b", "speed", "no usable CUDA device (see the tiny part)", result="skipped"))
    elif not (args.tiny_only or args.simulate):
        full = run_child("20b", args)
        rows += [Row(**r) for r in full["rows"]]
        estimate = estimate_120b(full["timings"])
        elapsed = time.perf_counter() - start
        if device_bytes < BIG_CARD:
            rows.append(Row("120b", "decode", f"the card has {device_bytes / 1e9:.0f} GB", f">= {BIG_CARD / 1e9:.0f} GB",
                            "skipped"))
        elif estimate is None or elapsed + estimate > args.budget:
            rows.append(Row("120b", "decode", f"{elapsed:.0f} s used, the 120b needs ~{estimate or math.inf:.0f} s",
                            f"budget {args.budget:.0f} s", "skipped"))
        else:
            rows += [Row(**r) for r in run_child("120b", args)["rows"]]
    elapsed = time.perf_counter() - start
    rows.append(Row("all", "wall time", f"{elapsed:.0f} s", f"<= {args.budget:.0f} s",
                    "met" if elapsed <= args.budget else "below"))

    print(f"\nossrt GPU check: {tiny.get('device', 'no usable CUDA device')}")
    print(f"logits: GPU vs CPU on the same file, float32 activations both sides, tolerance {TOLERANCE:g}; speed "
          "goals are targets, not failures")
    print_table(rows)
    failed = [r for r in rows if r.result in FAILED]
    print(f"\n{len(failed)} failed" if failed else "\nall correctness checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
