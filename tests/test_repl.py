"""`ossrt run`: the REPL's commands and conversation (driven directly), and the real thing in a pseudo-terminal."""

import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from click.testing import CliRunner

import ossrt
from ossrt.cli import main
from ossrt.repl import HELP, Repl

ANSWER = "<|channel|>final<|message|>Hello there!<|return|>"
ENDLESS = "<|channel|>final<|message|>one two three four five"


@pytest.fixture(scope="module")
def answer_model(scripted_gguf):
    with ossrt.load(scripted_gguf(ANSWER), context_length=1024) as m:
        yield m


def drive(repl, lines):
    """Run the loop on `lines`; an exception class among them is raised there (KeyboardInterrupt: Ctrl-C)."""
    feed = iter(lines)

    def read_line(prompt):
        line = next(feed, EOFError)
        if isinstance(line, type):
            raise line
        return line

    repl.run(read_line)
    return repl.out.getvalue()


def new_repl(model, **options):
    return Repl(model, io.StringIO(), err=io.StringIO(), **options)


def test_conversation_commands_and_multiline(answer_model, tmp_path):
    repl = new_repl(answer_model, temperature=0)
    out = drive(repl, ["Hi", "/effort high", '"""', "first line", "second line", '"""', "/stats",
                       f"/save {tmp_path / 'chat.json'}", "/clear", f"/load {tmp_path / 'chat.json'}",
                       "/reasoning off", "/frobnicate", "/exit", "never read"])
    assert out.count("Hello there!") == 2
    assert "reasoning effort: high" in out and "reasoning hidden" in out
    assert repl.err.getvalue() == ("error: unknown command or missing argument: '/frobnicate'; /help lists the "
                                   "commands\n")
    assert "tokens (" in out and "cached)" in out  # /stats
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][2]["content"] == "first line\nsecond line" and saved["effort"] == "high"
    assert repl.messages == saved["messages"] and "loaded 4 messages" in out


def test_ctrl_c_at_the_prompt_drops_the_line(answer_model):
    # A pseudo-terminal test of this would race CPython's readline, which sees a signal only while it waits in
    # select(): Ctrl-C typed right after the prompt appears can be lost there.
    repl = new_repl(answer_model)
    out = drive(repl, ['"""', "half a message", KeyboardInterrupt, "/help"])
    assert out == "\n" + HELP + "\n\n" and repl.messages == []  # a new line after ^C, then /help, then Ctrl-D


def test_second_turn_reuses_the_cache(answer_model):
    repl = new_repl(answer_model, temperature=0, verbose=True)
    out = drive(repl, ["Hi", "And again"])
    assert repl.last.usage.cached_tokens > 0 and out.count("tokens (") == 2


def test_bad_files_for_save_and_load(answer_model, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    repl = new_repl(answer_model)
    out = drive(repl, [f"/load {tmp_path / 'bad.json'}", f"/save {tmp_path / 'no-such-dir' / 'x.json'}"])
    errors = repl.err.getvalue().splitlines()
    assert out == "\n" and len(errors) == 2
    assert errors[0].startswith("error: ") and "bad.json: not a saved conversation" in errors[0]
    assert errors[1].startswith("error: ") and "x.json: cannot write" in errors[1]


def test_an_error_in_the_loop_goes_to_stderr_and_the_session_goes_on(scripted_gguf):
    with ossrt.load(scripted_gguf(ANSWER), context_length=128) as m:
        repl = new_repl(m, temperature=0)
        out = drive(repl, ["word " * 100, "Hi"])
    assert repl.err.getvalue().startswith("error: ") and "do not fit the context length 128" in repl.err.getvalue()
    assert out == "Hello there!\n\n"  # the second message is answered; the failed one left no trace
    assert [m["role"] for m in repl.messages] == ["user", "assistant"] and repl.messages[0]["content"] == "Hi"


def test_piped_input_that_fails_is_an_error_with_exit_code_2(scripted_gguf):
    r = CliRunner().invoke(main, ["run", str(scripted_gguf(ANSWER)), "-c", "16"], input="Hi there")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and "do not fit the context length 16" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def expect(fd, text, timeout=120.0):
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
    """The CLI with a pseudo-terminal as its controlling terminal, so Ctrl-C and Ctrl-D work as typed. It starts
    with SIGINT ignored, as children of a background job of a non-interactive shell (`pytest &`) do: a terminal
    session must answer Ctrl-C all the same."""
    master, slave = pty.openpty()

    def make_controlling():
        os.setsid()
        import fcntl
        import termios

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

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
