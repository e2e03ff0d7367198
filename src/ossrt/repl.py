"""The chat REPL behind `ossrt run`: streams answers, shows reasoning dimmed (or hides it), slash commands.

Terminal input and output are passed in, so the loop can be driven by tests as well as by a terminal. Ctrl-C
during an answer stops it and drops that question from the conversation (the model never finished answering it);
Ctrl-C at the prompt clears the line; Ctrl-D exits. Errors go to `err`; in the loop, a failed message leaves the
conversation as it was and the session goes on.

During an answer, Ctrl-C cancels the stream rather than raising KeyboardInterrupt: the generation loop stops at
its next check (between layers, before each token) and nothing depends on where in Python's bytecode the
exception would have landed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from .chat import ChatResponse, ChatStream, ContentDelta, Done, PreambleDelta, ReasoningDelta, ToolCall
from .errors import OssrtError
from .harmony import DEFAULT_REASONING_EFFORT, REASONING_EFFORTS

HELP = f"""Commands:
  /help                    this list
  /effort {'|'.join(REASONING_EFFORTS):<17}reasoning effort
  /system TEXT             set the system instructions (and start over)
  /clear                   forget the conversation
  /reasoning on|off        show or hide the model's reasoning
  /stats                   tokens and speed of the last answer
  /save FILE               save the conversation as JSON
  /load FILE               load a conversation saved with /save
  /exit                    leave (or Ctrl-D)
Start and end a multi-line message with \"\"\" on its own line."""
DIM, RESET = "\x1b[2m", "\x1b[0m"


class Repl:
    def __init__(self, model, out: TextIO, *, err: TextIO | None = None, system: str | None = None,
                 effort: str = DEFAULT_REASONING_EFFORT, show_reasoning: bool = True, verbose: bool = False,
                 color: bool = False, **sampling: Any):
        self.model = model
        self.out = out
        self.err = err if err is not None else sys.stderr
        self.system = system
        self.effort = effort
        self.show_reasoning = show_reasoning
        self.verbose = verbose
        self.color = color
        self.sampling = sampling  # temperature, top_p, seed, max_tokens
        self.messages: list[dict] = []
        self.last = None  # the last ChatResponse

    # --- the loop -------------------------------------------------------------------------------------------
    def run(self, read_line: Callable[[str], str]) -> None:
        """Read messages with `read_line(prompt)` (which raises EOFError at the end, KeyboardInterrupt on
        Ctrl-C) until /exit or the end of input."""
        while True:
            try:
                text = self.read_message(read_line)
            except KeyboardInterrupt:
                self.out.write("\n")
                continue
            except EOFError:
                self.out.write("\n")
                return
            if text is None:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
            else:
                self.ask(text)

    def read_message(self, read_line: Callable[[str], str]) -> str | None:
        line = read_line(">>> ")
        if not line.strip():
            return None
        if not line.lstrip().startswith('"""'):
            return line.strip()
        first = line.lstrip()[3:]
        if first.rstrip().endswith('"""') and first.strip() != "":
            return first.rstrip()[:-3].strip()
        lines = [first] if first.strip() else []
        while True:
            more = read_line("... ")
            if more.rstrip().endswith('"""'):
                lines.append(more.rstrip()[:-3])
                return "\n".join(lines).strip() or None
            lines.append(more)

    # --- answers --------------------------------------------------------------------------------------------
    def ask(self, text: str) -> None:
        """Answer one message of the loop: an error is printed on `err` and the conversation stays as it was."""
        try:
            self.answer(text)
        except OssrtError as e:
            self.error(str(e))

    def answer(self, text: str) -> ChatResponse | None:
        """Stream the answer to `text` to `out` and add both to the conversation. Returns the response, or None
        if Ctrl-C stopped it (the question is then dropped). OssrtError (e.g. a message too long for the context,
        a corrupt model) propagates, and the conversation stays as it was."""
        self.messages.append({"role": "user", "content": text})
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        try:
            stream = self.model.chat(history, reasoning_effort=self.effort, stream=True, **self.sampling)
            with stream, _ctrl_c_cancels(stream) as interrupted:
                response = self._show(stream, interrupted)
        except KeyboardInterrupt:  # Ctrl-C where it raises: outside the main thread, or before the stream began
            response = None
        except BaseException:
            self.messages.pop()
            raise
        if response is None or response.finish_reason == "cancelled":
            self.messages.pop()  # the question was never answered: drop it
            self.out.write("\n[interrupted]\n")
            self.out.flush()
            return None
        self.last = response
        self.messages.append(response.message)
        self.out.write("\n")
        if self.verbose:
            self.out.write(self.stats_line() + "\n")
        self.out.flush()
        return response

    def _show(self, stream: ChatStream, interrupted: threading.Event) -> ChatResponse | None:
        """Write the events as they come; the final response, or None once `interrupted` is set."""
        thinking = False
        try:
            for event in stream:
                if interrupted.is_set():
                    return None
                if isinstance(event, ReasoningDelta):
                    if self.show_reasoning:
                        if not thinking:
                            self.out.write(DIM + "Thinking...\n" if self.color else "Thinking...\n")
                            thinking = True
                        self.out.write(event.text)
                        self.out.flush()
                    continue
                if thinking:
                    self.out.write("\n...done thinking.\n\n" + (RESET if self.color else ""))
                    thinking = False
                if isinstance(event, (ContentDelta, PreambleDelta)):
                    self.out.write(event.text)
                elif isinstance(event, ToolCall):
                    self.out.write(f"[tool call: {event.name}({event.arguments})]")
                elif isinstance(event, Done):
                    return event.response
                self.out.flush()
        finally:
            if thinking and self.color:
                self.out.write(RESET)
        return None

    def stats_line(self) -> str:
        if self.last is None:
            return "no answer yet"
        u, t = self.last.usage, self.last.timing
        return (f"[{u.completion_tokens} tokens, {t.decode_tokens_per_second:.2f} tok/s; prompt {u.prompt_tokens} "
                f"tokens ({u.cached_tokens} cached), {t.prefill_tokens_per_second:.1f} tok/s; "
                f"{self.last.finish_reason}]")

    # --- commands -------------------------------------------------------------------------------------------
    def command(self, text: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/bye", "/quit"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/effort" and arg in REASONING_EFFORTS:
            self.effort = arg
            self.say(f"reasoning effort: {arg}")
        elif name == "/system" and arg:
            self.system, self.messages = arg, []
            self.say("system instructions set; conversation cleared")
        elif name == "/clear":
            self.messages = []
            self.say("conversation cleared")
        elif name == "/reasoning" and arg in ("on", "off"):
            self.show_reasoning = arg == "on"
            self.say(f"reasoning {'shown' if self.show_reasoning else 'hidden'}")
        elif name == "/stats":
            self.say(self.stats_line())
        elif name == "/save" and arg:
            self.save(Path(arg))
        elif name == "/load" and arg:
            self.load(Path(arg))
        else:
            self.error(f"unknown command or missing argument: {text!r}; /help lists the commands")
        return True

    def say(self, text: str) -> None:
        self.out.write(text + "\n")

    def error(self, text: str) -> None:
        self.out.flush()  # what was said before the error comes before it on a terminal that shows both
        self.err.write(f"error: {text}\n")
        self.err.flush()

    def save(self, path: Path) -> None:
        data = {"system": self.system, "effort": self.effort, "messages": self.messages}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self.error(f"{path}: cannot write: {e.strerror or e}")
            return
        self.say(f"saved {len(self.messages)} messages to {path}")

    def load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            messages = data["messages"]
            if not (isinstance(messages, list) and all(isinstance(m, dict) and "role" in m for m in messages)):
                raise ValueError("messages must be a list of objects with a role")
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.error(f"{path}: not a saved conversation ({e})")
            return
        self.messages = messages
        self.system = data.get("system") or self.system
        self.effort = data.get("effort") if data.get("effort") in REASONING_EFFORTS else self.effort
        self.say(f"loaded {len(messages)} messages from {path}")


@contextlib.contextmanager
def _ctrl_c_cancels(stream: ChatStream) -> Iterator[threading.Event]:
    """While the block runs, Ctrl-C (SIGINT) cancels `stream` and sets the event it yields, instead of raising
    KeyboardInterrupt. Only where Ctrl-C would raise KeyboardInterrupt anyway: in the main thread, with Python's
    default handler (a SIGINT ignored by the parent, as for a background job, stays ignored)."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield interrupted
        return

    def cancel(signum, frame):
        interrupted.set()
        stream.cancel()

    signal.signal(signal.SIGINT, cancel)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
