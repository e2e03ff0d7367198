"""The `ossrt` command line: a click group; each command is a thin layer over the library."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

from .defaults import DEFAULT_CONTEXT_LENGTH, DEFAULT_DEVICE, DEFAULT_KV_TYPE, DEFAULT_MODEL, DEVICES, KV_TYPES
from .errors import OssrtError, ParameterError
from .harmony import DEFAULT_REASONING_EFFORT, REASONING_EFFORTS


def expected_errors(fn):
    """Print an OssrtError as `error: ...` on stderr and exit 2 — never a traceback for a user's mistake."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OssrtError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(package_name="ossrt")
def main() -> None:
    """Run OpenAI's gpt-oss models from a GGUF file."""
    # `kill` unwinds like Ctrl-C, so temporary files are removed and nothing is left half-written.
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum, frame):
    sys.exit(128 + signum)


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path),
              help="output GGUF file [default: SRC's name + '-OUTTYPE.gguf' beside SRC]")
@click.option("--outtype", type=click.Choice(["q8_0", "bf16", "f16", "f32"]), default="q8_0", show_default=True,
              help="type of the non-expert matrices (experts stay MXFP4)")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@expected_errors
def convert(src: Path, out: Path | None, outtype: str, quiet: bool) -> None:
    """Convert a Hugging Face gpt-oss checkpoint directory SRC to one GGUF file."""
    from .format.convert import convert as run

    out = out or src.resolve().parent / f"{src.resolve().name}-{outtype}.gguf"
    run(src, out, outtype=outtype, progress=False if quiet else None)
    click.echo(str(out))


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="context length for the memory figures [default: the model's]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="report the RAM a CPU run needs, or the VRAM on a CUDA device")
@expected_errors
def info(file: Path, context: int | None, device: str) -> None:
    """Describe a gpt-oss GGUF FILE: architecture, sizes, tensor types, parameters, RAM (or VRAM) needed."""
    from .info import report

    click.echo(report(file, context, device))


_EFFORTS = click.Choice(REASONING_EFFORTS)
_KV_TYPES = click.Choice(KV_TYPES)
_DEVICE = click.option("--device", type=click.Choice(DEVICES), default=DEFAULT_DEVICE, show_default=True,
                       help="cuda: an NVIDIA GPU (the cuda12/cuda13 extras); auto: CUDA when CuPy finds a device")
_CTX = click.option("-c", "--ctx", type=click.IntRange(min=1), default=None,
                    help=f"context length [default: {DEFAULT_CONTEXT_LENGTH}]")
_KV_TYPE = click.option("--kv-type", type=_KV_TYPES, default=DEFAULT_KV_TYPE, show_default=True,
                        help="KV cache precision")
_DRAFT = click.option("--draft", "draft_tokens", type=click.IntRange(min=0), default=0, show_default=True,
                      help="prompt lookup: check up to N tokens that followed an earlier occurrence of the last few "
                           "in each decode pass (at most 3 on the CPU); the same output, faster where it repeats "
                           "its context")
# The flags of the two servers (serve, serve-cluster) that mean the same in both.
_API_KEY = click.option("--api-key", envvar="OSSRT_API_KEY", default=None,
                        help="require 'Authorization: Bearer KEY' on every request [env OSSRT_API_KEY]")
_SERVED_NAME = click.option("--name", default=None, help="model id to serve under [default: from MODEL]")


def _warn_if_open(host: str, api_key: str | None) -> None:
    """The servers' warning when they listen beyond this machine without a key."""
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it", err=True)


def _base_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _memory_options(fn):
    """How the mapped model file is kept in RAM: the flags `run`, `generate` and `serve` share."""
    fn = click.option("--max-memory", "max_memory", metavar="SIZE", default=None,
                      help="bound the model's RAM (e.g. 16G) on a machine smaller than the model: experts are "
                           "cached within it and read from the file as needed")(fn)
    fn = click.option("--mlock", is_flag=True, help="read the whole model at start and lock it in RAM, never "
                      "evicted (needs `ulimit -l` above the file size)")(fn)
    return click.option("--no-prefetch", "no_prefetch", is_flag=True,
                        help="do not read the model into the page cache in the background at start (by default "
                             "it is, when it fits in the available RAM, for a fast first answer)")(fn)


def _model_options(fn):
    """The loading, sampling and chat flags `run` and `generate` share, spelled as in llama.cpp."""
    options = [
        click.option("--system", help="system instructions (rendered as the Harmony developer message)"),
        click.option("--effort", type=_EFFORTS, default=DEFAULT_REASONING_EFFORT, show_default=True,
                     help="reasoning effort"),
        click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=None, help="[default: until done]"),
        click.option("--temp", type=click.FloatRange(min=0), default=1.0, show_default=True, help="0 is greedy"),
        click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0,
                     show_default=True),
        click.option("--seed", type=int, default=None),
        _CTX,
        click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="[default: all cores]"),
        _KV_TYPE,
        _DEVICE,
        _DRAFT,
    ]
    for option in reversed(options):
        fn = option(fn)
    return _memory_options(fn)


@main.command()
@click.argument("model")
@click.option("-p", "--prompt", required=True, help="the prompt; - reads it from stdin")
@_model_options
@click.option("--show-reasoning", is_flag=True, help="print the reasoning (analysis) before the answer")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object: content, reasoning, tool calls, "
              "finish reason, usage, timing")
@click.option("--raw", is_flag=True, help="no chat format: continue PROMPT as plain text")
@click.option("--json-schema", "schema_file", type=click.Path(dir_okay=False), default=None,
              help="answer with JSON that follows the JSON schema in this file (enforced while sampling)")
@expected_errors
def generate(model: str, prompt: str, system: str | None, effort: str, max_tokens: int | None, temp: float,
             top_p: float, seed: int | None, ctx: int | None, threads: int | None, kv_type: str, device: str,
             draft_tokens: int, no_prefetch: bool, mlock: bool, max_memory: str | None, show_reasoning: bool,
             as_json: bool,
             raw: bool, schema_file: str | None) -> None:
    """One answer from MODEL (a .gguf file) to PROMPT, streamed to stdout."""
    import dataclasses
    import json

    import ossrt
    from ossrt.chat import ContentDelta, Done, ReasoningDelta

    if raw and schema_file is not None:
        raise ParameterError("--json-schema constrains a chat answer; it cannot be used with --raw")
    response_format = _schema_file_format(schema_file) if schema_file is not None else None
    if prompt == "-":
        prompt = _read_stdin()
    m = ossrt.load(model, context_length=ctx, threads=threads, kv_type=kv_type, device=device,
                   prefetch=not no_prefetch, mlock=mlock, max_memory=max_memory, draft_tokens=draft_tokens)
    if raw:
        ids = m.tokenizer.encode(prompt)
        if not ids:
            raise ParameterError("--raw needs a non-empty prompt to continue")
        decoder = m.tokenizer.incremental_decoder()
        pieces = []
        generation = m.generate(ids, max_tokens=max_tokens, temperature=temp, top_p=top_p, seed=seed)
        for token in generation:
            text = decoder.feed(token)
            pieces.append(text)
            if not as_json:
                click.echo(text, nl=False)
        pieces.append(decoder.flush())
        s = generation.stats
        if as_json:
            click.echo(json.dumps({"content": "".join(pieces), "finish_reason": s.stop_reason,
                                   "usage": {"prompt_tokens": s.prompt_tokens,
                                             "completion_tokens": s.generated_tokens}}))
        else:
            click.echo(pieces[-1])
        return
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    color = sys.stdout.isatty()
    in_reasoning = False
    for event in m.chat(messages, reasoning_effort=effort, max_tokens=max_tokens, temperature=temp, top_p=top_p,
                        seed=seed, stream=True, response_format=response_format):
        if as_json:
            if isinstance(event, Done):
                r = event.response
                click.echo(json.dumps({"content": r.content, "reasoning": r.reasoning, "tool_calls": r.tool_calls,
                                       "finish_reason": r.finish_reason, "usage": dataclasses.asdict(r.usage),
                                       "timing": dataclasses.asdict(r.timing)}))
        elif isinstance(event, ReasoningDelta) and show_reasoning:
            click.echo(click.style(event.text, dim=True) if color else event.text, nl=False)
            in_reasoning = True
        elif isinstance(event, ContentDelta):
            if in_reasoning:
                click.echo("\n")
                in_reasoning = False
            click.echo(event.text, nl=False)
        elif isinstance(event, Done):
            click.echo()


def _schema_file_format(path: str):
    """`--json-schema FILE`: a strict json_schema response format named after the file, checked."""
    import json
    import re

    from ossrt.constrain import json_schema_format

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ParameterError(f"--json-schema: cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ParameterError(f"--json-schema: {path} is not JSON: {e}") from None
    spec = {"name": re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)[:64] or "schema", "schema": schema, "strict": True}
    return json_schema_format(spec, field=f"--json-schema {path}")


@main.command()
@click.argument("model", required=False)
@_model_options
@click.option("--hide-reasoning", is_flag=True, help="do not show the model's reasoning (/reasoning toggles)")
@click.option("--verbose", is_flag=True, help="tokens and tokens/s after each answer")
@expected_errors
def run(model: str | None, system: str | None, effort: str, max_tokens: int | None, temp: float, top_p: float,
        seed: int | None, ctx: int | None, threads: int | None, kv_type: str, device: str, draft_tokens: int,
        no_prefetch: bool, mlock: bool, max_memory: str | None, hide_reasoning: bool, verbose: bool) -> None:
    """Chat with MODEL [default: gpt-oss-20b]. Piped input is answered once; /help lists the commands."""
    import ossrt
    from ossrt.repl import Repl

    m = ossrt.load(model or DEFAULT_MODEL, context_length=ctx, threads=threads, kv_type=kv_type, device=device,
                   prefetch=not no_prefetch, mlock=mlock, max_memory=max_memory, draft_tokens=draft_tokens)
    repl = Repl(m, sys.stdout, err=sys.stderr, system=system, effort=effort, show_reasoning=not hide_reasoning,
                verbose=verbose, color=sys.stdout.isatty(), temperature=temp, top_p=top_p, seed=seed,
                max_tokens=max_tokens)
    if not sys.stdin.isatty():
        text = _read_stdin().strip()
        if text and repl.answer(text) is None:
            sys.exit(130)  # stopped by Ctrl-C, as a shell reports an interrupted command
        return
    # A terminal session answers Ctrl-C even when started with SIGINT ignored (as a non-interactive shell starts
    # background jobs, and so their children): only the terminal's foreground process gets it from the keyboard.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _enable_line_editing()
    click.echo("Type a message, /help for commands, Ctrl-D to leave.")
    repl.run(input)


def _read_stdin() -> str:
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as e:
        raise ParameterError(f"standard input is not {e.encoding} text: byte {e.object[e.start]:#04x} at offset "
                             f"{e.start}") from None


def _enable_line_editing() -> None:
    """Line editing and a history file through the standard readline module, where it exists."""
    try:
        import atexit
        import readline

        from .resolve import cache_dir
    except ImportError:
        return
    history = cache_dir() / "history"
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(history)
    except OSError:
        pass
    atexit.register(lambda: _save_history(readline, history))


def _save_history(readline, history: Path) -> None:
    try:
        readline.write_history_file(history)
    except OSError:
        pass


@main.command()
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (loopback: this machine "
              "only)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@_API_KEY
@_SERVED_NAME
@click.option("-np", "--parallel", type=click.IntRange(min=1), default=2, show_default=True,
              help="requests generated at once (each keeps its own KV cache)")
@click.option("--queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="requests waiting beyond those; more get 503")
@_CTX
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="[default: all cores]")
@_KV_TYPE
@_DEVICE
@_DRAFT
@_memory_options
@click.option("--store", "store", type=click.Path(dir_okay=False), default=None,
              help="SQLite file keeping responses (previous_response_id, GET /v1/responses/ID) "
                   "[default: responses.sqlite3 in the cache folder]")
@click.option("--no-store", "no_store", is_flag=True, help="keep no responses")
@expected_errors
def serve(model: str | None, host: str, port: int, api_key: str | None, name: str | None, parallel: int,
          queue: int, ctx: int | None, threads: int | None, kv_type: str, device: str, draft_tokens: int,
          no_prefetch: bool, mlock: bool, max_memory: str | None, store: str | None, no_store: bool) -> None:
    """An OpenAI-compatible API for MODEL [default: gpt-oss-20b] at http://HOST:PORT/v1."""
    try:
        from .server.serve import listen, model_names, serve as run_server
        from .server.store import ResponseStore, default_store_path
    except ImportError as e:
        raise OssrtError(f"ossrt serve needs the serve extra ({e.name} is missing): pip install 'ossrt[serve]'") \
            from None
    import ossrt
    from .resolve import resolve_model

    spec = model or DEFAULT_MODEL
    path = resolve_model(spec)
    model_id, aliases = model_names(spec, path)
    if store is not None and no_store:
        raise ParameterError("--store and --no-store exclude each other")
    # Opened before the model loads, so a bad file fails at once.
    with contextlib.nullcontext() if no_store else ResponseStore(store or default_store_path()) as responses:
        sock = listen(host, port)  # before loading: a taken port fails at once
        m = ossrt.load(path, context_length=ctx, threads=threads, kv_type=kv_type, device=device,
                       prefetch=not no_prefetch, mlock=mlock, max_memory=max_memory, draft_tokens=draft_tokens)
        _warn_if_open(host, api_key)
        url = _base_url(host, sock.getsockname()[1])
        bound = "" if max_memory is None else f", experts cached within --max-memory {max_memory}"
        click.echo(f"serving {path} as {name or model_id!r} at {url}/v1 (chat page: {url}/){bound}", err=True)
        run_server(m, sock, model_id=name or model_id, aliases=[model_id, *aliases], api_key=api_key,
                   parallel=parallel, queue=queue, store=responses)


@main.command("serve-cluster")
@click.argument("model", required=False)
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="copies of the model, each loaded once (initial count when autoscaling)")
@click.option("--min-replicas", type=click.IntRange(min=1), default=None, help="autoscale: fewest replicas")
@click.option("--max-replicas", type=click.IntRange(min=1), default=None, help="autoscale: most replicas")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="threads per replica; each replica reserves as many of Ray's CPUs")
@click.option("--address", default=None, help="Ray cluster to join (e.g. 10.0.0.1:6379 after `ray start --head`) "
              "[default: a running local cluster, else a new one in this process]")
@click.option("--host", default="127.0.0.1", show_default=True, help="address Ray's HTTP proxies listen on")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@_API_KEY
@_SERVED_NAME
@click.option("-np", "--parallel", type=click.IntRange(min=1), default=2, show_default=True,
              help="requests generated at once per replica (each keeps its own KV cache)")
@click.option("--queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="requests waiting per replica beyond those; more get 503")
@_CTX
@_KV_TYPE
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="seconds a stopping replica gets to finish its requests")
@click.option("--store", "store", type=click.Path(dir_okay=False), default=None,
              help="SQLite file keeping responses, on this node [default: responses.sqlite3 in the cache folder]")
@click.option("--no-store", "no_store", is_flag=True, help="keep no responses")
@expected_errors
def serve_cluster(model: str | None, replicas: int, min_replicas: int | None, max_replicas: int | None, threads: int,
                  address: str | None, host: str, port: int, api_key: str | None, name: str | None, parallel: int,
                  queue: int, ctx: int | None, kv_type: str, drain_timeout: float, store: str | None,
                  no_store: bool) -> None:
    """`ossrt serve` on a Ray cluster: MODEL [default: gpt-oss-20b] on several replicas behind one URL, each
    conversation's turns on the replica holding its KV cache. MODEL must be a path every node can read, or a hub
    name (each node downloads it)."""
    # Read when Ray is imported: its crash reporter would take `kill` (SIGTERM) for a crash and abort the drain.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        import ray
        from ray import serve as ray_serve

        from .server import cluster
    except ImportError as e:
        raise OssrtError(f"ossrt serve-cluster needs the ray extra ({e.name} is missing): pip install 'ossrt[ray]'") \
            from None
    from .resolve import resolve_model

    if store is not None and no_store:
        raise ParameterError("--store and --no-store exclude each other")
    spec = model or DEFAULT_MODEL
    path = resolve_model(spec)  # a missing file fails here, before Ray starts
    _warn_if_open(host, api_key)
    ray.init(address=address)
    signal.signal(signal.SIGTERM, _terminated)  # Ray's handler exits with status 15; ossrt's commands with 143
    store_actor = None
    try:
        app, store_actor = cluster.application(
            spec, name=name, store=store, keep_responses=not no_store, api_key=api_key, replicas=replicas,
            min_replicas=min_replicas, max_replicas=max_replicas, threads=threads, parallel=parallel, queue=queue,
            load_options=dict(context_length=ctx, kv_type=kv_type), graceful_shutdown_timeout_s=drain_timeout)
        ray_serve.start(http_options={"host": host, "port": port})
        try:
            ray_serve.run(app, name=cluster.APP_NAME, route_prefix="/")
        except RuntimeError as e:  # a replica failed to start (Ray's log above says why)
            raise OssrtError(f"the replicas did not start: {e}") from None
        url = _base_url(host, port)
        click.echo(f"serving {path} on {replicas} replica(s) at {url}/v1 (chat page: {url}/)", err=True)
        while True:  # until Ctrl-C or SIGTERM
            time.sleep(3600)
    finally:
        click.echo("draining and stopping the replicas", err=True)

        def stop() -> None:
            with contextlib.suppress(Exception):  # Ray may already be gone (its head stopped)
                ray_serve.delete(cluster.APP_NAME)
                if store_actor is not None:
                    ray.kill(store_actor)
            ray.shutdown()

        # Ray waits for ever on a node that is gone (a SIGTERM to the whole process group stops the Ray node this
        # command started, along with the command), so the drain gets a bound.
        stopping = threading.Thread(target=stop, daemon=True, name="ossrt-stop")
        stopping.start()
        stopping.join(drain_timeout + 30)
        if stopping.is_alive():
            click.echo("error: Ray did not confirm that the replicas stopped (its node may be gone)", err=True)
            os._exit(1)


if __name__ == "__main__":
    main()
