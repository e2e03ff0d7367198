"""examples/desktop_chat.py, the desktop app that embeds ossrt: its real Tk window on an Xvfb display, driven with X
events (keys typed into the entry, clicks on the buttons, the window manager's close message) over scripted model
files, and the script itself run as a program."""

import gc
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

tkinter = pytest.importorskip("tkinter", reason="the desktop example needs Tk (python3-tk / a Python built with it)")
if shutil.which("Xvfb") is None:
    pytest.skip("the desktop example's tests need Xvfb (Debian: apt-get install xvfb)", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "desktop_chat.py"
# A scripted model gives each token one successor, so its two messages can share no token: the analysis message has
# no <|message|> and the final one no <|channel|> (the parser reads both and records a problem for each).
ANSWER = "<|channel|>analysis The user greets me.<|end|><|start|>final<|message|>Hello there!<|return|>"
ENDLESS = "<|channel|>final<|message|>one two three four five"
KEYSYMS = {" ": "space", "!": "exclam", "\n": "Return"}
MAX_GAP = 0.5  # seconds the Tk event loop may stall while a worker loads or generates (2 busy cores in CI)


@pytest.fixture(scope="module")
def display():
    """A private X display: Xvfb picks a free number and writes it to the pipe once it accepts connections."""
    read, write = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                            pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        number = pipe.readline().strip().decode()
    try:
        if not number:
            pytest.fail(f"Xvfb exited ({xvfb.wait()}) without opening a display")
        with pytest.MonkeyPatch.context() as env:
            env.setenv("DISPLAY", f":{number}")
            yield f":{number}"
    finally:
        xvfb.terminate()
        xvfb.wait(10)


@pytest.fixture(scope="module")
def desktop_chat():
    spec = importlib.util.spec_from_file_location("desktop_chat", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def open_window(display, desktop_chat):
    """Factory: `open_window(model_path) -> ChatWindow` in a new Tk root; windows a test left open are closed."""
    windows = []

    def open_(model_path) -> "desktop_chat.ChatWindow":
        window = desktop_chat.ChatWindow(tkinter.Tk(), str(model_path), threads=1)
        windows.append(window)
        return window

    yield open_
    for window in windows:
        if exists(window.root):
            window.close()
    windows.clear()
    # A window's Tk variables must die on this thread: a collection that a later worker thread happens to run would
    # call Tcl from there ("main thread is not in main loop").
    gc.collect()


def exists(root) -> bool:
    try:
        return bool(root.winfo_exists())
    except tkinter.TclError:  # the application has been destroyed
        return False


def pump(root, until, what: str, timeout: float = 30.0) -> None:
    """Run the Tk event loop until `until()` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        root.update()
        time.sleep(0.005)


def type_text(widget, text: str) -> None:
    widget.focus_force()
    widget.update()
    for char in text:
        widget.event_generate("<KeyPress>", keysym=KEYSYMS.get(char, char))
    widget.update()


def click(widget) -> None:
    x, y = widget.winfo_width() // 2, widget.winfo_height() // 2
    for event in ("<Enter>", "<ButtonPress-1>", "<ButtonRelease-1>"):
        widget.event_generate(event, x=x, y=y)
    widget.update()


def shown(window) -> str:
    """The transcript as displayed: hidden (elided) text left out."""
    return window.transcript.tk.call(window.transcript, "get", "-displaychars", "1.0", "end-1c")


def enabled(widget) -> bool:
    return str(widget.cget("state")) != "disabled"


class Heartbeat:
    """An `after` callback every 10 ms notes when it ran: gaps between beats are times the event loop stalled."""

    def __init__(self, root):
        self.root, self.beats = root, []
        self._beat()

    def _beat(self) -> None:
        self.beats.append(time.perf_counter())
        self.root.after(10, self._beat)

    def longest_gap(self, since: float) -> float:
        beats = [t for t in self.beats if t >= since]
        assert len(beats) >= 2, f"only {len(beats)} beat(s)"
        return max(b - a for a, b in zip(beats, beats[1:]))


def send_wm_delete_window(root_or_id) -> None:
    """What a window manager sends when the user closes a window: a WM_PROTOCOLS client message."""
    pytest.importorskip("Xlib", reason="closing the window like a window manager needs python-xlib")
    from Xlib import X, display, protocol

    dpy = display.Display()
    window_id = root_or_id if isinstance(root_or_id, int) else int(root_or_id.wm_frame(), 16)
    window = dpy.create_resource_object("window", window_id)
    protocols, delete = dpy.intern_atom("WM_PROTOCOLS"), dpy.intern_atom("WM_DELETE_WINDOW")
    window.send_event(protocol.event.ClientMessage(window=window, client_type=protocols,
                                                   data=(32, [delete, X.CurrentTime, 0, 0, 0])), event_mask=0)
    dpy.sync()  # a flush alone sometimes lost the message when the connection closed right after
    dpy.close()


def test_type_send_see_the_answer_and_toggle_the_reasoning(open_window, scripted_gguf):
    window = open_window(scripted_gguf(ANSWER))
    root = window.root
    start = time.perf_counter()
    heartbeat = Heartbeat(root)
    assert window.model is None and window.status.cget("text").startswith("Loading")
    assert not enabled(window.entry) and not enabled(window.send_button) and not enabled(window.stop_button)
    pump(root, lambda: window.model is not None, "the model to load")
    assert heartbeat.longest_gap(start) < MAX_GAP
    assert enabled(window.entry) and enabled(window.send_button) and window.status.cget("text") == "Ready (cpu)"

    type_text(window.entry, "Hi there")
    assert window.entry.get() == "Hi there"
    start = time.perf_counter()
    click(window.send_button)
    assert window.entry.get() == "" and enabled(window.stop_button) and not enabled(window.send_button)
    pump(root, lambda: enabled(window.send_button), "the answer")
    assert heartbeat.longest_gap(start) < MAX_GAP
    assert shown(window) == "You: Hi there\nThe user greets me.\nHello there!\n\n"
    assert window.messages == [{"role": "user", "content": "Hi there"},
                               {"role": "assistant", "content": "Hello there!", "reasoning": "The user greets me."}]
    assert window.status.cget("text").startswith("stop: ") and not enabled(window.stop_button)

    click(window.reasoning_toggle)
    assert shown(window) == "You: Hi there\nHello there!\n\n"
    assert "The user greets me." in window.transcript.get("1.0", "end")  # hidden, not deleted

    # The second turn: Enter sends, high effort from the menu, the reasoning stays hidden, the first turn is cached.
    window.effort_menu["menu"].invoke("high")
    type_text(window.entry, "Again!\n")
    pump(root, lambda: enabled(window.send_button), "the second answer")
    assert shown(window) == "You: Hi there\nHello there!\n\nYou: Again!\nHello there!\n\n"
    assert [m["content"] for m in window.messages] == ["Hi there", "Hello there!", "Again!", "Hello there!"]
    assert "Reasoning: high" in window.model.tokenizer.decode(window.stream.request.prompt)
    assert window.stream.response.usage.cached_tokens > 0
    click(window.reasoning_toggle)
    assert shown(window).count("The user greets me.\n") == 2


def test_stop_ends_the_answer_and_the_window_stays_responsive(open_window, scripted_gguf):
    window = open_window(scripted_gguf(ENDLESS, loop=True))
    root = window.root
    pump(root, lambda: window.model is not None, "the model to load")
    type_text(window.entry, "Count\n")
    pump(root, lambda: shown(window).count("five") >= 3, "the answer to stream")
    heartbeat, start = Heartbeat(root), time.perf_counter()
    pump(root, lambda: time.perf_counter() - start > 1.0, "a second of generation")
    assert heartbeat.longest_gap(start) < MAX_GAP
    streamed = shown(window).count("five")
    assert window.worker.is_alive() and streamed > 3 and enabled(window.stop_button)

    click(window.stop_button)
    pump(root, lambda: enabled(window.send_button), "the stream to end", timeout=10)
    window.worker.join(5)
    assert not window.worker.is_alive()
    assert window.stream.response.finish_reason == "cancelled"
    assert shown(window).endswith(" [stopped]\n\n") and not enabled(window.stop_button)
    assert window.messages == []  # the unanswered question is not kept
    assert window.status.cget("text").startswith("cancelled: ")


def test_closing_the_window_while_answering_cancels_and_joins(open_window, scripted_gguf):
    window = open_window(scripted_gguf(ENDLESS, loop=True))
    root = window.root
    pump(root, lambda: window.model is not None, "the model to load")
    type_text(window.entry, "Count\n")
    pump(root, lambda: "five" in shown(window), "the answer to stream")
    worker = window.worker
    send_wm_delete_window(root)
    pump(root, lambda: not exists(root), "the window to close", timeout=10)
    assert not worker.is_alive() and window.stream.response.finish_reason == "cancelled"


def test_a_question_too_long_for_the_context_is_refused_and_the_chat_goes_on(open_window, scripted_gguf):
    window = open_window(scripted_gguf(ANSWER))
    root = window.root
    pump(root, lambda: window.model is not None, "the model to load")
    root.clipboard_clear()
    root.clipboard_append("word " * 5000)  # over the 4096-token context
    window.entry.focus_force()
    window.entry.event_generate("<<Paste>>")
    type_text(window.entry, "\n")
    assert re.search(r"\nError: \d{4} prompt tokens do not fit the context length 4096\n\n$", shown(window))
    assert window.messages == [] and window.worker is None and enabled(window.send_button)
    type_text(window.entry, "Hi\n")
    pump(root, lambda: enabled(window.send_button), "the answer")
    assert shown(window).endswith("You: Hi\nThe user greets me.\nHello there!\n\n") and len(window.messages) == 2


@pytest.mark.parametrize("content, message", [(None, "no such file"), (b"not a model", "GGUF")])
def test_a_model_that_cannot_load_shows_an_error_in_the_window(open_window, tmp_path, content, message):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    window = open_window(path)
    root = window.root
    pump(root, lambda: window.status.cget("text") == "Could not load the model", "the load error")
    text = shown(window)
    assert text.startswith("Error: ") and str(path) in text and message in text and "Traceback" not in text
    assert not enabled(window.entry) and not enabled(window.send_button)
    send_wm_delete_window(root)
    pump(root, lambda: not exists(root), "the window to close", timeout=10)


def test_the_program_answers_real_keystrokes_and_exits_cleanly_when_closed(display, scripted_gguf):
    """The script as a user runs it: X input through the server (XTEST), the transcript read back over Tk's `send`,
    closed by the window manager's message."""
    pytest.importorskip("Xlib", reason="typing into another program and closing it needs python-xlib")
    from Xlib import X, XK
    from Xlib import display as xdisplay
    from Xlib.ext import xtest

    program = subprocess.Popen([sys.executable, str(EXAMPLE), str(scripted_gguf(ANSWER)), "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dpy, tk_here = xdisplay.Display(), tkinter.Tk()
    try:
        def wait(until, what: str, timeout: float = 60.0):
            deadline = time.monotonic() + timeout
            while not (found := until()):
                assert program.poll() is None, program.communicate()
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.05)
            return found

        window = wait(lambda: next((w for w in dpy.screen().root.query_tree().children
                                    if w.get_wm_name() == "ossrt chat"), None), "the window")
        app = wait(lambda: next((a for a in tk_here.tk.call("winfo", "interps")
                                 if a != tk_here.tk.call("tk", "appname")), None), "the program's Tk")

        def remote(*command: str) -> str:
            return str(tk_here.tk.call("send", app, " ".join(command)))

        widgets = {remote("winfo class", w): w for w in remote("winfo children .").split()}
        bar = {remote(w, "cget -text") or remote("winfo class", w): w
               for w in remote("winfo children", widgets["TFrame"]).split()}
        wait(lambda: remote(widgets["TLabel"], "cget -text").startswith("Ready"), "the model to load")

        def pointer_to(widget: str) -> None:
            x, y, width, height = (int(remote(f"winfo {v}", widget)) for v in ("rootx", "rooty", "width", "height"))
            xtest.fake_input(dpy, X.MotionNotify, x=x + width // 2, y=y + height // 2)

        def press(keysym_name: str) -> None:
            keysym = XK.string_to_keysym(keysym_name)
            keycode = dpy.keysym_to_keycode(keysym)
            shift = [dpy.keysym_to_keycode(XK.XK_Shift_L)] if dpy.keycode_to_keysym(keycode, 0) != keysym else []
            for code in shift + [keycode]:
                xtest.fake_input(dpy, X.KeyPress, code)
            for code in [keycode] + shift:
                xtest.fake_input(dpy, X.KeyRelease, code)

        pointer_to(bar["TEntry"])  # no window manager: the keyboard goes to the window under the pointer
        for char in "Hi there":
            press(KEYSYMS.get(char, char))
        pointer_to(bar["Send"])
        xtest.fake_input(dpy, X.ButtonPress, 1)
        xtest.fake_input(dpy, X.ButtonRelease, 1)
        dpy.sync()
        wait(lambda: remote(widgets["TLabel"], "cget -text").startswith("stop:"), "the answer")
        assert remote(widgets["Text"], "get 1.0 end-1c") == "You: Hi there\nThe user greets me.\nHello there!\n\n"
        send_wm_delete_window(window.id)
        out, err = program.communicate(timeout=20)
    finally:
        tk_here.destroy()
        dpy.close()
        if program.poll() is None:
            program.kill()
            program.communicate()
    assert (program.returncode, out, err) == (0, "", "")


def test_the_program_without_a_display_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    done = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path / "model.gguf")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("error: cannot open a window: ") and "Traceback" not in done.stderr
