"""A desktop chat window that embeds ossrt: the model runs inside this process (no server), Tk from the standard
library draws the window.

    python examples/desktop_chat.py MODEL.gguf [--threads N]

Tk is not thread-safe, so the worker threads (one loads the model, then one per answer) never touch a widget: they
put what they have on a queue, and the Tk thread drains it every few milliseconds (`root.after`). That keeps the
window responsive while the model loads and generates.
"""

import argparse
import queue
import threading
import tkinter as tk
from tkinter import ttk

import ossrt
from ossrt.chat import ChatStream, ContentDelta, Done, ReasoningDelta
from ossrt.errors import OssrtError

POLL_MS = 20  # how often the Tk thread looks for the workers' news


class ChatWindow:
    def __init__(self, root: tk.Tk, model_path: str, *, threads: int | None = None):
        self.root = root
        self.model: ossrt.Model | None = None
        self.messages: list[dict] = []  # the conversation so far, sent whole with each question
        self.stream: ChatStream | None = None  # the latest answer's stream (Stop cancels it)
        self.worker: threading.Thread | None = None  # the thread iterating `stream`
        self.news: queue.Queue = queue.Queue()  # worker -> Tk thread: a Model, chat events, or an exception
        self.in_reasoning = False

        root.title("ossrt chat")
        self.transcript = tk.Text(root, wrap="word", width=80, height=24, state="disabled", font="TkDefaultFont")
        self.transcript.tag_configure("user", font=("TkDefaultFont", 10, "bold"))
        self.transcript.tag_configure("reasoning", foreground="gray45", font=("TkDefaultFont", 10, "italic"))
        self.transcript.tag_configure("note", foreground="firebrick")
        bar = ttk.Frame(root)
        self.entry = ttk.Entry(bar)
        self.entry.bind("<Return>", lambda event: self.send())
        self.send_button = ttk.Button(bar, text="Send", command=self.send)
        self.stop_button = ttk.Button(bar, text="Stop", command=self.stop)
        self.show_reasoning = tk.BooleanVar(value=True)
        self.reasoning_toggle = ttk.Checkbutton(bar, text="Show reasoning", variable=self.show_reasoning,
                                                command=self.update_reasoning)
        self.effort = tk.StringVar(value="low")
        self.effort_menu = ttk.OptionMenu(bar, self.effort, "low", "low", "medium", "high")
        self.status = ttk.Label(root, text=f"Loading {model_path}…", anchor="w")

        self.transcript.pack(fill="both", expand=True, padx=6, pady=6)
        bar.pack(fill="x", padx=6)
        self.entry.pack(side="left", fill="x", expand=True)
        for widget in (self.send_button, self.stop_button, self.reasoning_toggle, self.effort_menu):
            widget.pack(side="left", padx=(6, 0))
        self.status.pack(fill="x", padx=6, pady=(4, 6))
        root.protocol("WM_DELETE_WINDOW", self.close)

        self.set_busy(True)  # until the model is loaded
        threading.Thread(target=self.load, args=(model_path, threads), daemon=True).start()
        self.poll_id = root.after(POLL_MS, self.poll)

    # --- worker threads: no widgets here, only `self.news.put` -------------------------------------------------------
    def load(self, model_path: str, threads: int | None) -> None:
        try:
            self.news.put(ossrt.load(model_path, threads=threads))
        except Exception as error:  # shown in the window; the app stays open
            self.news.put(error)

    def answer(self, stream: ChatStream) -> None:
        try:
            with stream:  # closing it frees the model's conversation cache even if something fails
                for event in stream:  # ends with Done, also when cancelled
                    self.news.put(event)
        except Exception as error:
            self.news.put(error)

    # --- the Tk thread ---------------------------------------------------------------------------------------------
    def poll(self) -> None:
        while True:
            try:
                item = self.news.get_nowait()
            except queue.Empty:
                break
            self.handle(item)
        self.poll_id = self.root.after(POLL_MS, self.poll)

    def handle(self, item: object) -> None:
        if isinstance(item, ossrt.Model):
            self.model = item
            self.set_busy(False)
            self.status.configure(text=f"Ready ({item.device})")
            self.entry.focus_set()
        elif isinstance(item, ReasoningDelta):
            self.in_reasoning = True
            self.write(item.text, "reasoning")
        elif isinstance(item, ContentDelta):
            self.end_reasoning()
            self.write(item.text)
        elif isinstance(item, Done):
            self.end_reasoning()
            response = item.response
            if response.finish_reason == "cancelled":
                self.messages.pop()  # the question was never answered: leave it out of the conversation
                self.write(" [stopped]", "note")
            else:
                self.messages.append(response.message)
            self.write("\n\n")
            self.status.configure(text=f"{response.finish_reason.value}: {response.usage.completion_tokens} tokens, "
                                       f"{response.timing.decode_tokens_per_second:.1f} tokens/s")
            self.set_busy(False)
        elif isinstance(item, Exception):
            self.write(f"Error: {item}\n\n" if isinstance(item, OssrtError) else
                       f"Error: {type(item).__name__}: {item}\n\n", "note")
            if self.model is None:
                self.status.configure(text="Could not load the model")
            else:  # the answer failed: the question goes, the conversation stays as it was
                self.messages.pop()
                self.status.configure(text="Error")
                self.set_busy(False)

    def send(self) -> None:
        text = self.entry.get().strip()
        if not text or self.model is None or self.worker is not None and self.worker.is_alive():
            return
        self.entry.delete(0, "end")
        self.write(f"You: {text}\n", "user")
        self.messages.append({"role": "user", "content": text})
        try:  # the request is checked here (e.g. too long for the context); the work happens in the worker
            self.stream = self.model.chat(self.messages, stream=True, reasoning_effort=self.effort.get())
        except OssrtError as error:
            self.messages.pop()
            self.write(f"Error: {error}\n\n", "note")
            return
        self.set_busy(True, answering=True)
        self.status.configure(text="Answering…")
        self.worker = threading.Thread(target=self.answer, args=(self.stream,))
        self.worker.start()

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.cancel()  # the worker's loop gets Done before the next token
            self.status.configure(text="Stopping…")

    def close(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
        if self.worker is not None:
            self.worker.join()
        if self.model is not None:  # (a model still loading goes with its daemon thread when the program ends)
            self.model.close()
        self.root.after_cancel(self.poll_id)
        self.root.destroy()

    def set_busy(self, busy: bool, answering: bool = False) -> None:
        self.send_button.configure(state="disabled" if busy else "normal")
        self.entry.configure(state="disabled" if busy and not answering else "normal")  # type ahead while answering
        self.stop_button.configure(state="normal" if answering else "disabled")

    def update_reasoning(self) -> None:
        self.transcript.tag_configure("reasoning", elide=not self.show_reasoning.get())

    def end_reasoning(self) -> None:
        if self.in_reasoning:  # the newline belongs to the reasoning, so it hides with it
            self.in_reasoning = False
            self.write("\n", "reasoning")

    def write(self, text: str, *tags: str) -> None:
        self.transcript.configure(state="normal")  # a disabled Text ignores inserts, also the program's
        self.transcript.insert("end", text, tags)
        self.transcript.configure(state="disabled")
        self.transcript.see("end")


def main() -> None:
    parser = argparse.ArgumentParser(description="Chat with a gpt-oss model in a desktop window.")
    parser.add_argument("model", help="a GGUF file, a checkpoint directory or a hub name such as gpt-oss-20b")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    args = parser.parse_args()
    try:
        root = tk.Tk()
    except tk.TclError as error:  # no display, e.g. over ssh without X forwarding
        parser.exit(2, f"error: cannot open a window: {error}\n")
    ChatWindow(root, args.model, threads=args.threads)
    root.mainloop()


if __name__ == "__main__":
    main()
