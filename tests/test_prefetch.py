"""Keeping the mapped model in RAM: the background prefetch at load, mlock, and their options in the API and CLI."""

import ctypes
import ctypes.util
import json
import mmap
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from click.testing import CliRunner

import ossrt
from ossrt.cli import main
from ossrt.errors import OssrtError, ParameterError
from ossrt.format import modelfile
from ossrt.format.modelfile import ModelFile

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-cache residency via mincore")


def resident_fraction(path) -> float:
    """The share of the file's pages in the page cache (mincore(2) over a fresh map)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    vec = ctypes.create_string_buffer(pages)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        view = np.frombuffer(buf, dtype=np.uint8)
        assert libc.mincore(view.ctypes.data, size, vec) == 0, os.strerror(ctypes.get_errno())
        del view
    return np.count_nonzero(np.frombuffer(vec.raw, np.uint8) & 1) / pages


def evicted_copy(src, tmp_path):
    """A copy of `src` whose pages are not in the page cache (or skip where the OS keeps them anyway)."""
    path = tmp_path / src.name
    shutil.copyfile(src, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if resident_fraction(path) > 0.1:
        pytest.skip("this file system keeps the file's pages in memory (tmpfs?)")
    return path


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("prefetch ")]


@linux_only
@pytest.mark.parametrize("populate", [True, False], ids=["populate", "read"])
def test_prefetch_reads_the_whole_file_in_a_daemon_thread(tiny_gguf, tmp_path, monkeypatch, populate):
    path = evicted_copy(tiny_gguf(), tmp_path)
    if not populate:  # as on a kernel without MADV_POPULATE_READ, or off Linux: the file is read instead
        monkeypatch.setattr(modelfile, "_populate", lambda whole, chunks, stop: 0)
    with ModelFile.open(path, prefetch=True) as mf:
        thread = mf.prefetch_thread
        assert thread is not None and thread.daemon  # never keeps the process alive
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert resident_fraction(path) == 1.0


@linux_only
def test_without_prefetch_the_data_stays_on_disk(tiny_gguf, tmp_path):
    path = evicted_copy(tiny_gguf(), tmp_path)
    before = set(prefetch_threads())
    with ModelFile.open(path) as mf:
        assert mf.prefetch_thread is None and set(prefetch_threads()) == before
        # Opening reads the header (the vocabulary) and what the kernel reads around it, not the tensors.
        assert resident_fraction(path) < 0.9


def test_load_prefetches_by_default_and_not_when_turned_off(tiny_gguf):
    with ossrt.load(tiny_gguf(), context_length=64) as m:
        assert m.model_file.prefetch_thread is not None
    with ossrt.load(tiny_gguf(), context_length=64, prefetch=False) as m:
        assert m.model_file.prefetch_thread is None


def test_prefetch_is_skipped_when_the_file_does_not_fit_in_ram(tiny_gguf, monkeypatch):
    with ModelFile.open(tiny_gguf()) as mf:
        monkeypatch.setattr(modelfile, "available_ram", lambda: mf.file_size // 2)
        assert mf.start_prefetch() is None and mf.prefetch_thread is None
        monkeypatch.setattr(modelfile, "available_ram", lambda: None)  # an OS that does not say
        assert mf.start_prefetch() is None


def test_available_ram_is_a_plausible_byte_count():
    ram = modelfile.available_ram()
    if sys.platform.startswith("linux"):
        assert ram is not None and 1 << 20 < ram < 1 << 50


def test_prefetch_goes_in_the_order_a_forward_pass_needs_the_data(tiny_gguf):
    with ModelFile.open(tiny_gguf()) as mf:
        ranges = mf._ranges_in_use_order()
        base = np.frombuffer(mf._buf, np.uint8).ctypes.data

        def where(name):
            start = mf.tensors[name].data.ctypes.data - base
            return next(i for i, (a, b) in enumerate(ranges) if a <= start and start + mf.tensors[name].nbytes <= b)

        # The file holds the embeddings and the head first; the layers (contiguous) come first here.
        assert [where(n) for n in ("blk.0.attn_norm.weight", "blk.3.ffn_down_exps.bias", "output.weight",
                                   "token_embd.weight")] == [0, 0, 1, 2]
        assert all(a % mmap.PAGESIZE == 0 for a, _ in ranges)
        assert sum(b - a for a, b in ranges) < mf.file_size  # each byte once, the header not at all


def test_close_stops_the_prefetch(tiny_gguf):
    stop = threading.Event()
    stop.set()
    chunks = [(0, 1 << 20)] * 1024
    modelfile._read(tiny_gguf(), chunks, stop)  # returns at once, not after 1 GiB
    assert modelfile._populate(np.zeros(1 << 20, np.uint8), chunks, stop) == len(chunks)
    mf = ModelFile.open(tiny_gguf(), prefetch=True)
    mf.close()
    mf.prefetch_thread.join(timeout=60)
    assert not mf.prefetch_thread.is_alive()


def test_prefetch_survives_a_vanished_file(tmp_path, monkeypatch):
    monkeypatch.setattr(modelfile, "_populate", lambda whole, chunks, stop: 0)
    modelfile._prefetch(np.zeros(1, np.uint8), tmp_path / "gone.gguf", [(0, 1)], threading.Event())  # no error


# mlock runs in a child process: the lock lasts as long as the map, and the child can lower its limit.
MLOCK_CHILD = """
import json, sys
from ossrt.errors import ParameterError
from ossrt.format.modelfile import ModelFile
caps = next(l for l in open("/proc/self/status") if l.startswith("CapEff:"))
can_ignore_limit = bool(int(caps.split()[1], 16) >> 14 & 1)  # CAP_IPC_LOCK: mlock ignores RLIMIT_MEMLOCK
try:
    mf = ModelFile.open(sys.argv[1], mlock=True)
except ParameterError as e:
    print(json.dumps({"error": str(e), "cap": can_ignore_limit}))
else:
    locked_kib = int(next(l for l in open("/proc/self/status") if l.startswith("VmLck:")).split()[1])
    print(json.dumps({"locked": mf.locked, "locked_bytes": locked_kib * 1024, "size": mf.file_size,
                      "cap": can_ignore_limit, "prefetch": mf.prefetch_thread is not None}))
"""


def _no_lock_rights():
    """In the child before exec: no locked memory allowed, and (as root) no CAP_IPC_LOCK to bypass the limit."""
    import resource

    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(24, 14, 0, 0, 0)  # PR_CAPBSET_DROP CAP_IPC_LOCK: root's exec then lacks it; fails harmlessly if not root


def mlock_child(path, preexec=None) -> dict:
    out = subprocess.run([sys.executable, "-c", MLOCK_CHILD, str(path)], capture_output=True, text=True,
                         preexec_fn=preexec, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_mlock_locks_the_file_or_says_how_to_raise_the_limit(tiny_gguf):
    r = mlock_child(tiny_gguf())
    if "error" in r:  # an unprivileged user whose limit is below the file's size
        assert not r["cap"] and "RLIMIT_MEMLOCK" in r["error"] and "ulimit -l unlimited" in r["error"]
    else:
        assert r["locked"] and r["locked_bytes"] >= r["size"] and not r["prefetch"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_mlock_under_a_zero_limit_fails_naming_the_limit_and_the_fix(tiny_gguf):
    path = tiny_gguf()
    r = mlock_child(path, preexec=_no_lock_rights)
    if r["cap"]:
        pytest.skip("the child kept CAP_IPC_LOCK, which ignores the limit")
    error = r["error"]
    assert error.startswith(f"mlock: cannot lock {path} (")
    assert "the locked-memory limit (RLIMIT_MEMLOCK) is 0 bytes" in error
    assert "ulimit -l unlimited" in error and "load without mlock" in error


def test_mlock_failure_message(tiny_gguf):
    """The message's parts without needing a system that refuses: an ENOMEM from mlock."""
    import errno

    text = modelfile._mlock_failure(tiny_gguf(), 12_109_551_392, errno.ENOMEM)
    assert "(11.3 GiB) in RAM: Cannot allocate memory; the locked-memory limit (RLIMIT_MEMLOCK) is " in text
    assert "ulimit -l unlimited" in text


@pytest.mark.parametrize("name, value", [("prefetch", 1), ("mlock", "yes"), ("prefetch", None)])
def test_load_checks_the_flags(tiny_gguf, name, value):
    with pytest.raises(ParameterError, match=f"^{name} must be True or False, got {value!r}"):
        ossrt.load(tiny_gguf(), **{name: value})


@pytest.mark.parametrize("command", [["generate", "-p", "hi"], ["run"], ["serve", "--port", "0", "--no-store"]])
@pytest.mark.parametrize("flags, expected", [([], (True, False, None)), (["--no-prefetch"], (False, False, None)),
                                             (["--mlock"], (True, True, None)),
                                             (["--no-prefetch", "--mlock"], (False, True, None)),
                                             (["--max-memory", "12G"], (True, False, "12G"))])
def test_cli_flags_reach_load(tiny_gguf, monkeypatch, command, flags, expected):
    if command[0] == "serve":
        pytest.importorskip("uvicorn")
    seen = {}

    def load(path, **kwargs):
        seen.update(kwargs)
        raise OssrtError("stopped after load's arguments")

    monkeypatch.setattr(ossrt, "load", load)
    r = CliRunner().invoke(main, [command[0], str(tiny_gguf()), *command[1:], *flags], input="")
    assert r.exit_code == 2 and "stopped after load's arguments" in r.output, r.output
    assert (seen["prefetch"], seen["mlock"], seen["max_memory"]) == expected


@pytest.mark.parametrize("command", ["generate", "run", "serve"])
def test_cli_help_documents_the_flags(command):
    r = CliRunner().invoke(main, [command, "--help"])
    assert "--no-prefetch" in r.output and "--mlock" in r.output and "ulimit -l" in r.output
    assert "--max-memory" in r.output
