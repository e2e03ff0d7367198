"""The `ossrt` command line: a click group; each command is a thin layer over the library."""

from __future__ import annotations

import functools
import signal
import sys
from pathlib import Path

import click

from .errors import OssrtError


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
    from .convert import convert as run

    out = out or src.resolve().parent / f"{src.resolve().name}-{outtype}.gguf"
    run(src, out, outtype=outtype, progress=False if quiet else None)
    click.echo(str(out))


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="context length for the RAM figures [default: the model's]")
@expected_errors
def info(file: Path, context: int | None) -> None:
    """Describe a gpt-oss GGUF FILE: architecture, sizes, tensor types, parameters, RAM needed."""
    from .info import report

    click.echo(report(file, context))


if __name__ == "__main__":
    main()
