"""`ossrt run`: the REPL's commands and conversation (driven directly), and the real thing in a pseudo-terminal."""

import io
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

import ossrt
from ossrt.repl import Repl

ANSWER = "<|channel|>final<|message|>Hello there!<|return|>"
ENDLESS = "<|channel|>final<|message|>one two three four five"


@pytest.fixture(scope="module")
def answer_model(scripted_gguf):
    with ossrt.load(scripted_gguf(ANSWER), context_length=1024) as m:
        yield m


def drive(repl, lines):
    feed = iter(lines)

    def read_line(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    repl.run(read_line)
    return repl.out.getvalue()


def test_conversation_commands_and_multiline(answer_model, tmp_path):
    repl = Repl(answer_model, io.StringIO(), temperature=0)
    out = drive(repl, ["Hi", "/effort high", '"""', "first line", "second line", '"""', "/stats",
                       f"/save {tmp_path / 'chat.json'}", "/clear", f"/load {tmp_path / 'chat.json'}",
                       "/reasoning off", "/frobnicate", "/exit", "never read"])
    assert out.count("Hello there!") == 2
    assert "reasoning effort: high" in out and "reasoning hidden" in out and "unknown command" in out
    assert "tokens (" in out and "cached)" in out  # /stats
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][2]["content"] == "first line\nsecond line" and saved["effort"] == "high"
    assert repl.messages == saved["messages"] and "loaded 4 messages" in out


def test_second_turn_reuses_the_cache(answer_model):
    repl = Repl(answer_model, io.StringIO(), temperature=0, verbose=True)
    out = drive(repl, ["Hi", "And again"])
    assert repl.last.usage.cached_tokens > 0 and out.count("tokens (") == 2


def test_bad_files_for_save_and_load(answer_model, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    out = drive(Repl(answer_model, io.StringIO()), [f"/load {tmp_path / 'bad.json'}",
                                                   f"/save {tmp_path / 'no-such-dir' / 'x.json'}"])
    assert "not a saved conversation" in out and "cannot write" in out


def expect(fd, text, timeout=60.0):
    """Read from the terminal until `text` appears; return everything read."""
    seen = b""
    end = time.time() + timeout
    while text.encode() not in seen:
        left = end - time.time()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {text!r}; got {seen.decode(errors='replace')!r}")
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


def spawn_in_terminal(args):
    """The CLI with a pseudo-terminal as its controlling terminal, so Ctrl-C and Ctrl-D work as typed."""
    master, slave = pty.openpty()

    def make_controlling():
        os.setsid()
        import fcntl
        import termios

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    p = subprocess.Popen([sys.executable, "-m", "ossrt.cli", *args], stdin=slave, stdout=slave, stderr=slave,
                         preexec_fn=make_controlling, close_fds=True)
    os.close(slave)
    return p, master


def test_terminal_session_with_ctrl_c_and_ctrl_d(scripted_gguf):
    p, fd = spawn_in_terminal(["run", str(scripted_gguf(ENDLESS, loop=True)), "-c", "4096"])
    try:
        expect(fd, ">>> ")
        os.write(fd, b'"""\n')
        expect(fd, "... ")
        os.write(fd, b"tell me\na story\n\"\"\"\n")
        expect(fd, "three four five")  # streaming, never ending on its own
        os.write(fd, b"\x03")  # Ctrl-C: stop the answer, back to the prompt
        expect(fd, "[interrupted]\r\n>>> ")
        os.write(fd, b"/help\n")
        expect(fd, "on its own line.\r\n>>> ")
        os.write(fd, b"\x04")  # Ctrl-D: leave
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(fd)


def test_piped_input_is_answered_once(scripted_gguf):
    r = subprocess.run([sys.executable, "-m", "ossrt.cli", "run", str(scripted_gguf(ANSWER)), "-c", "512"],
                       input="Hi there", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello there!\n"
