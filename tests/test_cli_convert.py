"""`ossrt convert` / `ossrt info` / tools/convert.py: exit codes, one-line errors, no tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from ossrt.cli import main
from ossrt.format.modelfile import ModelFile

REPO = Path(__file__).resolve().parents[1]


def test_convert_and_info(tiny_checkpoint, tmp_path):
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["convert", str(tiny_checkpoint()), "-o", str(out), "--outtype", "bf16", "-q"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)
    with ModelFile.open(out) as m:
        assert m.tensors["token_embd.weight"].type.name == "BF16"
    r = CliRunner().invoke(main, ["info", str(out), "--context", "1024"])
    assert r.exit_code == 0
    assert "architecture       gpt-oss" in r.stdout and "RAM at context 1024:" in r.stdout


def test_bad_input_exits_2_with_one_line(tmp_path):
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "missing")])
    assert r.exit_code == 2
    assert r.stderr == f"error: {tmp_path / 'missing'}: no such checkpoint directory\n"
    (tmp_path / "x.gguf").write_bytes(b"nope")
    r = CliRunner().invoke(main, ["info", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_tools_convert_script(tiny_checkpoint, tmp_path):
    out = tmp_path / "t.gguf"
    p = subprocess.run([sys.executable, str(REPO / "tools" / "convert.py"), str(tiny_checkpoint()), str(out), "-q"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # no progress bar when stderr is not a terminal / with -q
    assert out.is_file()
    p = subprocess.run([sys.executable, str(REPO / "tools" / "convert.py"), str(tmp_path / "nope"), str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error: ")


def test_sigterm_during_convert_leaves_nothing(tiny_checkpoint, tmp_path):
    """`kill` mid-write unwinds like Ctrl-C: exit 143, no temporary or partial file."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = (
        "import os, signal, sys\n"
        "import ossrt.format.mxfp4 as m\n"
        "repack, calls = m.hf_to_gguf, []\n"
        "def slow_repack(*a):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 5:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return repack(*a)\n"
        "m.hf_to_gguf = slow_repack\n"
        "from ossrt.cli import main\n"
        "main(['convert', sys.argv[1], '-o', sys.argv[2], '-q'])\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(tiny_checkpoint()), str(out_dir / "o.gguf")],
                       capture_output=True, text=True)
    assert r.returncode == 143, r.stderr
    assert list(out_dir.iterdir()) == []


def _one_error_line(r, *fragments):
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.output
    for fragment in fragments:
        assert fragment in r.stderr
    assert r.stdout == ""


def test_malformed_input_and_unusable_paths_exit_2_with_one_line(tiny_checkpoint, tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    for f in tiny_checkpoint().iterdir():
        (src / f.name).symlink_to(f)  # links, never written: the index below is replaced, not edited in place
    index = src / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())
    weight_map["weight_map"]["model.norm.weight"] = 5
    index.unlink()
    index.write_text(json.dumps(weight_map))
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(out_dir / "o.gguf"), "-q"])
    _one_error_line(r, f"{index}: weight_map['model.norm.weight'] is 5")
    long_out = out_dir / ("m" * 300 + ".gguf")
    r = CliRunner().invoke(main, ["convert", str(tiny_checkpoint()), "-o", str(long_out), "-q"])
    _one_error_line(r, f"{long_out}: the file name is 305 bytes long")
    assert list(out_dir.iterdir()) == []

    long_model = tmp_path / ("m" * 300)
    r = CliRunner().invoke(main, ["generate", str(long_model), "-p", "hi"])
    _one_error_line(r, f"{long_model}: File name too long")
