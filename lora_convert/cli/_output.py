"""Output discipline: data (tables, JSON) to stdout; logs, progress, warnings and errors to stderr."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape

from lora_convert.errors import EXIT_OUTPUT_CLOSED


def page_width() -> int | None:
    """Off a terminal (pipes, CI logs) rich would wrap tables at 80 columns and cut module paths: a wide page,
    unless COLUMNS says how wide the page is. None: the terminal's own width."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit():
        return int(columns)
    return None if sys.stdout.isatty() else 200


def output_closed(stream: Any = None) -> NoReturn:
    """The reader of `stream` (stdout by default, or stderr) went away (`lora-convert validate ... | head` once
    head has its lines): stop at once, print nothing more, and exit EXIT_OUTPUT_CLOSED, as a program killed by
    SIGPIPE would. The stream is first pointed at /dev/null, so that what is still buffered does not fail again
    when the interpreter flushes it at exit (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    try:
        fd = (stream or sys.stdout).fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream (typer's CliRunner): nothing to flush
        fd = None
    if fd is not None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    raise SystemExit(EXIT_OUTPUT_CLOSED)


class _Console(Console):
    """rich's Console, except that a closed pipe ends the command through output_closed (rich exits 1, the code
    that says the adapter has errors)."""

    def on_broken_pipe(self) -> None:
        output_closed(self.file)


stdout = _Console(soft_wrap=False, highlight=False, width=page_width())
stderr = _Console(stderr=True, highlight=False)


def fit_page() -> None:
    """Re-read the page width (COLUMNS may differ between calls of one process: the API, tests)."""
    stdout.width = page_width()  # None: rich measures the terminal (and COLUMNS) itself


class OutputFormat(str, Enum):
    human = "human"
    json = "json"


class ReportFormat(str, Enum):
    human = "human"
    json = "json"
    github = "github"
    sarif = "sarif"


class ScanFormat(str, Enum):
    human = "human"
    json = "json"
    sarif = "sarif"


def print_json(document: Any) -> None:
    write_stdout(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")


def write_stdout(text: str) -> None:
    """Raw text to stdout (JSON, GitHub annotations, the version), flushed at once."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        output_closed()


def print_error(message: str, hint: str | None) -> None:
    stderr.print(f"[bold red]Error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    if hint:
        stderr.print(f"[dim]Hint:[/] {escape(hint)}", markup=True, highlight=False, soft_wrap=True)


def log(message: str) -> None:
    stderr.print(escape(message), highlight=False, soft_wrap=True)


def byte_progress(label: str, *, console: Console | None = None):
    """A started, transient byte progress bar on stderr (bar, bytes done/total, rate, ETA) after `label`, which
    may name task fields (`{task.fields[adapters]}`). The one bar style of every command that moves bytes."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console or stderr,
        transient=True,
    )
    bar.start()
    return bar
