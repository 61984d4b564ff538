"""The ``losa`` application: options every command shares, error mapping, progress, and how results leave.

Each command (one module each) parses its options into its stage's config, calls one workflow, and
renders the result (``render.py``): a table on stdout (or JSON with ``--json``), progress bars on
stderr (the libraries' own bars, logs and warnings only with ``--verbose``: ``core/quiet.py``).  This
is the one place that maps exceptions to one-line messages and exit codes; ``--debug`` or
``LOSA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..core.config import to_dict
from ..core.errors import LosaError
from ..core.quiet import quiet_third_party

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make LLMs sparse and keep them accurate.")
stdout = Console()
stderr = Console(stderr=True)
_debug = {"on": os.environ.get("LOSA_DEBUG", "") not in ("", "0")}

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model folder, .gguf file, Hub id, or smollm2-135m.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ForceOpt = Annotated[bool, typer.Option(help="Replace an existing --out.")]
RemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repo's own code.")]
ENCODING_HELP = ("Text encoding of the data files: auto | utf-8 | latin-1 | cp1252 | ... any Python codec "
                 "(auto: UTF-8, else detected and named in a warning).")
SAMPLING_HELP = ("Calibration windows: stream (from the documents joined by blank lines) | document "
                 "(one random window of a random document longer than --seqlen, as the Wanda/SparseGPT loaders).")


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", envvar="LOSA_VERBOSE",
                                          help="Also show the libraries' own progress bars, log messages and "
                                               "warnings.")] = False,
) -> None:
    """losa: prune, recover, export, benchmark and evaluate sparse LLMs."""
    if debug:
        _debug["on"] = True
    # Spin-waiting OpenMP threads slow torch ~5x on a busy 2-core machine; must precede torch's import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    quiet_third_party(verbose)  # before any library is imported: losa draws its own progress


def fail(message: str, code: int) -> typer.Exit:
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handled(command: Callable[..., None]) -> Callable[..., None]:
    """Turn known failures into a one-line message and a non-zero exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except LosaError as exc:
            if _debug["on"]:
                raise
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            if _debug["on"]:
                raise
            raise fail("interrupted; no half-written output was left (finished stages and checkpoints are kept)",
                       130) from None
        except MemoryError:
            if _debug["on"]:
                raise
            raise fail("out of memory: lower --nsamples or --seqlen, or use --dtype bfloat16", 3) from None
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if _debug["on"] or "out of memory" not in str(exc).lower():
                raise
            raise fail("out of memory on the device: lower --nsamples or --seqlen, or use --device cpu", 3) from None

    return wrapper


PLAIN_PROGRESS_S = 20.0


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[..., None] | None]:
    """A progress callback: one rich bar per task description on a terminal, else plain lines on
    stderr (each task at most every ``PLAIN_PROGRESS_S`` seconds, and when it completes), so a log
    of a long run shows it is alive."""
    if not enabled:
        yield None
        return
    if not stderr.is_terminal and os.environ.get("LOSA_PROGRESS") != "1":
        yield _plain_progress()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=stderr, transient=False) as bars:
        tasks: dict[str, int] = {}

        def update(description: str, done: int, total: int, info: str = "") -> None:
            if description not in tasks:
                tasks[description] = bars.add_task(description, total=total, info=info)
            bars.update(tasks[description], completed=done, total=total, info=info)

        yield update


def _plain_progress() -> Callable[..., None]:
    last: dict[str, float] = {}

    def update(description: str, done: int, total: int, info: str = "") -> None:
        now = time.monotonic()
        if done >= total or now - last.get(description, -PLAIN_PROGRESS_S) >= PLAIN_PROGRESS_S:
            last[description] = now
            print(f"{description} {done}/{total} {info}".rstrip(), file=sys.stderr, flush=True)

    return update


def is_main_process() -> bool:
    """Under ``accelerate launch`` / torchrun only rank 0 reports."""
    return os.environ.get("RANK", "0") == "0"


def emit_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def execute(workflow: Callable[..., Any], config: Any, as_json: bool) -> Any | None:
    """Run a workflow with progress bars; print warnings, and the JSON when asked.

    Returns the result for the command to render as a table, or None when there is nothing more
    to show (JSON printed, or a non-zero rank under ``accelerate launch``)."""
    with progress_bars(not as_json and is_main_process()) as progress:
        result = workflow(config, progress)
    if not is_main_process():
        return None
    warn(result.warnings)
    if as_json:
        emit_json(result.to_dict() if hasattr(result, "to_dict") else to_dict(result))
        return None
    return result


def warn(warnings: list[str]) -> None:
    for line in warnings:
        stderr.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


def line(text: str) -> None:
    """One plain line of results on stdout (no rich markup or highlighting)."""
    stdout.print(text, highlight=False)
