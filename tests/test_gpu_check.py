"""benchmarks/gpu_check.py and gpu_wheels.sh, on a CPU: the check's logic, its synthetic files, and its tiny part
end to end under numba's CUDA simulator (the GPU machine runs the same code on the device). Nothing is downloaded."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import ossrt
from ossrt.format.modelfile import ModelFile

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.py"
WHEELS_SCRIPT = ROOT / "benchmarks" / "gpu_wheels.sh"

# What the GPU machine's Python 3.12 has (issue 13), with what tiktoken requires (requests, regex).
GPU_MACHINE = {"cupy-cuda13x", "numba", "numba-cuda", "numpy", "safetensors", "tiktoken", "requests", "regex",
               "click", "tqdm", "torch"}

# ossrt's dependencies that only parts the check never imports need (constrained decoding): a binary wheel that
# cannot travel as a zip on PYTHONPATH.
NOT_IMPORTED_BY_THE_CHECK = {"llguidance"}

spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


# --- gpu_wheels.sh ---------------------------------------------------------------------------------------------------
def wheel_list() -> list[str]:
    subprocess.run(["bash", "-n", str(WHEELS_SCRIPT)], check=True)  # valid bash
    out = subprocess.run(["bash", str(WHEELS_SCRIPT), "--list"], check=True, capture_output=True, text=True).stdout
    return out.split()


def test_wheels_are_pinned_and_cover_what_the_gpu_machine_lacks():
    wheels = wheel_list()
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.]*", w) for w in wheels), wheels
    carried = {_name(w) for w in wheels}
    # ossrt's own dependencies (pyproject.toml), then what gguf needs in turn (not its optional extras).
    import tomllib  # noqa: PLC0415 - Python 3.11+; CI runs 3.11

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {_name(r) for r in project["dependencies"]} - NOT_IMPORTED_BY_THE_CHECK
    needed |= {_name(r) for r in metadata.requires("gguf") if "extra ==" not in r}
    missing = needed - GPU_MACHINE - carried
    assert not missing, f"add wheels for {sorted(missing)} to gpu_wheels.sh"
    assert carried == {"gguf", "pyyaml"}


def test_what_the_check_imports_leaves_out_what_it_does_not_carry():
    """The check's imports (the API, the CUDA backend, conversion, the synthetic models) never import the
    dependencies it does not carry."""
    code = ("import sys, ossrt, ossrt.engine.cuda.device, ossrt.format.convert, ossrt.testing.synthetic, "
            "ossrt.engine.kv_cache; print(sorted(m for m in sys.modules if m.split('.')[0] in %r))"
            % sorted(NOT_IMPORTED_BY_THE_CHECK))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip() == "[]"


def test_pinned_gguf_satisfies_the_projects_requirement():
    import tomllib  # noqa: PLC0415

    pinned = next(w for w in wheel_list() if _name(w) == "gguf").split("==")[1]
    bound = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                 if _name(r) == "gguf")
    lower = re.search(r">=\s*([0-9.]+)", bound).group(1)
    assert tuple(map(int, pinned.split("."))) >= tuple(map(int, lower.split(".")))


def test_wheels_script_refuses_an_unknown_option():
    run = subprocess.run(["bash", str(WHEELS_SCRIPT), "--bogus"], capture_output=True, text=True)
    assert run.returncode == 2 and "usage:" in run.stderr


# --- the synthetic files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("outtype", ["f32", "q8_0", "bf16"])
def test_synthetic_file_has_the_layout_and_statistics(tmp_path, outtype):
    import gguf

    cfg = gpu_check.tiny_config(gpu_check.SIMULATED)
    path = tmp_path / "m.gguf"
    gpu_check.write_model(path, cfg, outtype)
    assert path.stat().st_size - gpu_check.file_bytes(cfg, outtype) < 64 << 10  # the header
    with ModelFile.open(path) as m:  # validates every tensor's shape and type against the config
        assert m.config == cfg
        types = {t.type.name for t in m.tensors.values()}
        assert types == {"F32", "MXFP4", outtype.upper()}
        for name, kind, (mean, std) in [("token_embd.weight", "matrix", (0.0, 1.0)),
                                        ("blk.0.attn_output.weight", "matrix", (0.0, 0.5 / math.sqrt(cfg.q_dim))),
                                        ("blk.1.ffn_up_exps.weight", "experts", (0.0, 1 / math.sqrt(cfg.n_embd))),
                                        ("blk.1.ffn_down_exps.weight", "experts",
                                         (0.0, 0.5 / math.sqrt(cfg.n_ff_exp))),
                                        ("blk.0.attn_norm.weight", "vector", (1.0, 0.05)),
                                        ("blk.0.attn_q.bias", "vector", (0.0, 0.02)),
                                        ("blk.1.ffn_gate_inp.weight", "router", (0.0, 1 / math.sqrt(cfg.n_embd)))]:
            t = m.tensors[name]
            values = gguf.quants.dequantize(np.asarray(t.data).view(np.uint8), t.type).astype(np.float64)
            assert values.shape == t.shape
            # Within a few standard errors (the vectors are short) and, for MXFP4, its coarse scales (±1 exponent).
            assert abs(values.mean() - mean) < 5 * std / math.sqrt(values.size) + 1e-6, name
            assert std * 0.7 < values.std() < std * 1.4, (name, values.std(), std)


def test_synthetic_file_is_the_same_for_a_seed(tmp_path):
    cfg = gpu_check.tiny_config(gpu_check.SIMULATED)
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    gpu_check.write_model(a, cfg, "q8_0", seed=0)
    gpu_check.write_model(b, cfg, "q8_0", seed=0)
    gpu_check.write_model(c, cfg, "q8_0", seed=1)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def full_size_bytes(layers: int, experts: int) -> int:
    """A full-size file's tensor bytes, counted by hand: q8_0 matrices (34 bytes a block of 32), MXFP4 experts (17
    bytes a block of 32), F32 vectors and router."""
    V, H, I, q, kv, heads = 201088, 2880, 2880, 64 * 64, 8 * 64, 64
    q8_0 = lambda n: n // 32 * 34  # noqa: E731
    embeddings = 2 * q8_0(V * H) + 4 * H
    attention = q8_0(2 * q * H + 2 * kv * H) + 4 * (2 * H + q + 2 * kv + H + heads)
    moe = 3 * experts * I * H // 32 * 17 + 4 * (experts * H + experts + 2 * experts * I + experts * H)
    return embeddings + layers * (attention + moe)


def test_full_size_file_sizes():
    """The sizes the check plans with (and prints): 12.1 GB for the 20b, 63.4 GB for the 120b."""
    assert gpu_check.file_bytes(gpu_check.model_config("20b"), "q8_0") == full_size_bytes(24, 32)
    assert gpu_check.file_bytes(gpu_check.model_config("120b"), "q8_0") == full_size_bytes(36, 128)
    assert round(full_size_bytes(24, 32) / 1e9, 1) == 12.1 and round(full_size_bytes(36, 128) / 1e9, 1) == 63.4


# --- the check's logic -----------------------------------------------------------------------------------------------
def test_agreement_measures_the_largest_difference_and_the_argmax():
    rng = np.random.default_rng(0)
    cpu = rng.standard_normal((5, 100)).astype(np.float32)
    gpu = cpu.copy()
    gpu[2, 7] += 0.004
    a = gpu_check.agreement(cpu, gpu)
    assert a.max_diff == pytest.approx(0.004, rel=1e-3) and a.argmax_equal == 5 and a.ok(gpu_check.TOLERANCE)
    gpu[3, cpu[3].argmin()] = cpu[3].max() + 1  # a different argmax, far beyond the tolerance
    a = gpu_check.agreement(cpu, gpu)
    assert a.argmax_equal == 4 and not a.ok(gpu_check.TOLERANCE)
    gpu = cpu.copy()
    gpu[0, 0] = np.nan
    assert not gpu_check.agreement(cpu, gpu).ok(gpu_check.TOLERANCE)
    assert gpu_check.agreement(cpu, cpu[:4]).max_diff == math.inf


def test_teacher_forced_run_reproduces_the_greedy_run(tmp_path):
    """The GPU side is fed the CPU's greedy ids: on one backend that must give the very same logits."""
    tiny = gpu_check.SIMULATED
    cfg = gpu_check.tiny_config(tiny)
    path = tmp_path / "m.gguf"
    gpu_check.write_model(path, cfg, "f32")
    prompt, block = np.arange(tiny.prompt) * 7 % cfg.n_vocab, np.arange(tiny.block) + 3
    with ossrt.load(path, context_length=tiny.prompt + tiny.decode + tiny.block, kv_type="f32",
                    int8_activations=False) as model:
        free, ids = gpu_check.run_sequence(model, prompt, block, None, tiny.decode)
        forced, fed = gpu_check.run_sequence(model, prompt, block, ids, tiny.decode)
        logits = model.logits(np.concatenate([prompt, ids, block]))
    assert fed == ids and len(ids) == tiny.decode
    assert free.shape == (tiny.prompt + tiny.decode + tiny.block, cfg.n_vocab)
    assert [int(free[tiny.prompt - 1 + k].argmax()) for k in range(tiny.decode)] == ids
    np.testing.assert_array_equal(free, forced)
    np.testing.assert_allclose(free, logits, atol=1e-4)  # one pass over the whole sequence


def test_place_prefers_ram_then_disk(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    free = {str(gpu_check.SHM): 70e9, str(tmp_path): 40e9}
    monkeypatch.setattr(gpu_check.shutil, "disk_usage", lambda p: usage(0, 0, free[str(p)]))
    monkeypatch.setattr(gpu_check, "_available_ram", lambda: 120e9)
    assert gpu_check.place_for(int(12e9), tmp_path) == gpu_check.SHM
    assert gpu_check.place_for(int(63.4e9), tmp_path) == gpu_check.SHM
    monkeypatch.setattr(gpu_check, "_available_ram", lambda: 60e9)  # the RAM could not hold it beside the rest
    assert gpu_check.place_for(int(63.4e9), tmp_path) is None
    assert gpu_check.place_for(int(12e9), tmp_path) == gpu_check.SHM
    free[str(gpu_check.SHM)] = 64e6  # a container's default /dev/shm
    assert gpu_check.place_for(int(12e9), tmp_path) == tmp_path


def test_120b_estimate_scales_the_20b_by_size():
    assert gpu_check.estimate_120b({}) is None
    estimate = gpu_check.estimate_120b({"write": 10.0, "load": 5.0})
    assert estimate == pytest.approx(15.0 * full_size_bytes(36, 128) / full_size_bytes(24, 32) + 30)


def test_exit_status_follows_the_correctness_rows(monkeypatch, capsys):
    rows = {"tiny": [gpu_check.Row("tiny", "f32 weights, f32 KV", "max |diff| 1e-06", "<= 0.01", "ok")]}
    monkeypatch.setattr(gpu_check, "run_child", lambda part, args: {
        "rows": [vars(r) for r in rows[part]], "device": "a test device", "device_bytes": 0.0, "timings": {}})
    assert gpu_check.main(["--tiny-only"]) == 0
    out = capsys.readouterr().out
    assert "ossrt GPU check: a test device" in out and "all correctness checks passed" in out
    rows["tiny"].append(gpu_check.Row("tiny", "q8_0 weights, q8_0 KV", "max |diff| 3e-01", "<= 0.01", "FAIL"))
    assert gpu_check.main(["--tiny-only"]) == 1
    assert "1 failed" in capsys.readouterr().out
    # Goals missed are not failures; a card under 80 GB skips the 120b.
    rows["tiny"].pop()
    rows["20b"] = [gpu_check.Row("20b", "GPU decode", "90.0 tok/s", ">= 150 tok/s", "below")]
    assert gpu_check.main([]) == 0
    assert re.search(r"120b .* the card has 0 GB .* skipped", capsys.readouterr().out)


def test_device_line_and_vram_with_a_stand_in_cupy(monkeypatch):
    """The CuPy calls the GPU run makes (not importable here), against a stand-in with CuPy's API."""
    from types import SimpleNamespace

    import ossrt.engine.cuda

    device = SimpleNamespace(mem_info=(40 * 2**30, 141 * 2**30), compute_capability="90")
    runtime = SimpleNamespace(getDeviceProperties=lambda i: {"name": b"NVIDIA H200"},
                              runtimeGetVersion=lambda: 13000, driverGetVersion=lambda: 13010)
    pool = SimpleNamespace(total_bytes=lambda: 90 * 2**30)
    cupy = SimpleNamespace(__version__="14.2.0", get_default_memory_pool=lambda: pool,
                           cuda=SimpleNamespace(Device=lambda i=0: device, runtime=runtime))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(ossrt.engine.cuda, "check", lambda: None)
    line, total = gpu_check.device_description(simulate=False)
    assert total == 141 * 2**30
    assert line.startswith("NVIDIA H200, 141.0 GiB, compute capability 90, CUDA runtime 13.0, driver 13.1; cupy")
    assert gpu_check.vram_used() == (90 * 2**30, 101 * 2**30)


def test_120b_runs_on_a_big_card_within_the_budget(monkeypatch, capsys):
    parts = []

    def run_child(part, args):
        parts.append(part)
        timings = {"write": 10.0, "load": 5.0} if part == "20b" else {}
        return {"rows": [], "device": "a big card", "device_bytes": 141e9, "timings": timings}

    monkeypatch.setattr(gpu_check, "run_child", run_child)
    assert gpu_check.main([]) == 0 and parts == ["tiny", "20b", "120b"]
    parts.clear()
    assert gpu_check.main(["--budget", "100"]) == 0 and parts == ["tiny", "20b"]  # the 120b needs ~109 s
    assert re.search(r"120b .* the 120b needs ~109 s .* budget 100 s .* skipped", capsys.readouterr().out)


def test_speed_part_logic_on_a_tiny_model(tmp_path, monkeypatch):
    """bench_full's bookkeeping (file, rows, goals, VRAM, clean-up) with a tiny model and the CPU standing in for
    the GPU: the GPU machine runs it once, so a slip in it must show here. The CUDA path itself is the tiny
    part's."""
    tiny_cfg = gpu_check.tiny_config(gpu_check.SIMULATED)
    monkeypatch.setattr(gpu_check, "model_config", lambda size: tiny_cfg)
    monkeypatch.setattr(gpu_check, "vram_used", lambda: (3 << 30, 5 << 30))
    monkeypatch.setattr(gpu_check, "SHM", tmp_path / "no-shm")
    for name, value in [("PROMPT", 12), ("DECODE", 3), ("PREFILL", 20), ("CPU_DECODE", 2), ("CONTEXT", 64)]:
        monkeypatch.setattr(gpu_check, name, value)
    loads = []
    real_load = ossrt.load

    def load(path, *, device, **kwargs):
        loads.append((Path(path).parent, device))
        return real_load(path, device="cpu", **kwargs)

    monkeypatch.setattr(ossrt, "load", load)
    rows, timings = [], {}
    gpu_check.bench_full("20b", tmp_path, rows, timings)
    assert loads == [(tmp_path, "cuda"), (tmp_path, "cpu")] and list(tmp_path.iterdir()) == []  # file deleted
    assert set(timings) == {"write", "load"}
    table = {r.what: r for r in rows}
    assert [r.part for r in rows] == ["20b"] * 6
    decode = table["GPU decode after a 12-token prompt (median of 3 steps; all steps)"]
    prefill = table["GPU prefill, 20 tokens"]
    assert decode.goal == ">= 150 tok/s" and prefill.goal == ">= 5000 tok/s"
    for row, target in [(decode, 150), (prefill, 5000)]:
        assert row.result == ("met" if float(row.measured.split()[0].rstrip(";")) >= target else "below")
    vram = next(r for r in rows if r.what.startswith("VRAM peak"))
    estimate = gpu_check.vram_estimate(tiny_cfg, gpu_check.file_bytes(tiny_cfg, "q8_0"))
    assert vram.measured == f"3.00; 5.00; {estimate / 2**30:.2f} GiB" and vram.result == "met"
    assert re.fullmatch(r"[0-9.]+ tok/s", table[f"CPU decode for scale, 2 tokens, {os.cpu_count()} cores"].measured)


# --- end to end, under the simulator -----------------------------------------------------------------------------------
def test_tiny_part_under_the_simulator():
    """The one command as CI can run it: the tiny part on numba's CUDA simulator, every check within tolerance."""
    run = subprocess.run([sys.executable, str(CHECK), "--simulate"], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("tiny ")]
    assert len(rows) == len(gpu_check.SIMULATED.checks)
    for line, (weights, kv) in zip(rows, gpu_check.SIMULATED.checks):
        assert f"{weights} weights, {kv} KV" in line and line.rstrip().endswith("ok"), line
        positions = gpu_check.SIMULATED.prompt + gpu_check.SIMULATED.decode + gpu_check.SIMULATED.block
        assert f"argmax {positions}/{positions}" in line
    assert "numba's CUDA simulator" in run.stdout
