"""The root command and the `command` decorator every command registers with: where errors become `Error:` +
`Hint:` lines and exit codes."""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Callable

import typer
from typer.core import TyperGroup

try:  # typer 0.2x vendors click, whose errors derive from typer.TyperException; older typer raises click's own
    from typer import TyperException as ClickError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import ClickException as ClickError

from lora_convert import __version__
from lora_convert.cli._output import fit_page, output_closed, print_error, write_stdout
from lora_convert.errors import BUG_REPORT_HINT, EXIT_INTERNAL, EXIT_OK, EXIT_OUTPUT_CLOSED, LoraConvertError

HELP = """Validate PEFT LoRA adapters against their base model and normalize them into the fused, stacked layout
that serving kernels compute with.

Exit codes: 0 ok, 1 the adapter has errors, 2 usage error, 3 environment problem (e.g. no CUDA), 4 internal
error (a bug in lora-convert: please report it), 141 stdout closed by its reader (`| head`).
Set LORA_CONVERT_DEBUG=1 to see a traceback for any error."""


class HelpWithoutCommandGroup(TyperGroup):
    """A command group (`no_args_is_help`) that, called without a command, prints its help on stdout and exits 2:
    a usage error whose message is the help itself."""

    def parse_args(self, ctx, args):
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            help_text = ctx.get_help()  # typer's rich help prints itself and returns ""; plain click's returns it
            if help_text:
                typer.echo(help_text)
            raise typer.Exit(2)
        return super().parse_args(ctx, args)


class _Group(HelpWithoutCommandGroup):
    """The root command group. Click reports a bad flag, a missing argument or an out-of-range value (`--rank 0`)
    in a framed box that starts with `Usage:`; here those become the same `Error:` + `Hint:` lines, exit 2, as
    every other usage error, so that scripts and CI logs can rely on one format."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickError as exc:
            print_error(exc.format_message(), _usage_hint(exc))
            sys.exit(exc.exit_code)
        except typer.Abort:
            print_error("Interrupted.", None)
            sys.exit(130)
        except SystemExit as exc:
            # typer (on EPIPE) and rich's own consoles (the help pages) exit 1 when stdout's reader has gone; 1 says
            # the adapter has errors, so that exit becomes ours (README: exit codes).
            if exc.code != EXIT_OUTPUT_CLOSED and isinstance(exc.__context__, BrokenPipeError):
                output_closed()
            raise
        # Without standalone mode click returns the command's return value (None) or an Exit's code.
        sys.exit(code if isinstance(code, int) else EXIT_OK)


def _usage_hint(exc: Exception) -> str:
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return "Run `lora-convert --help` for the commands and their options."
    usage = ctx.get_usage().strip().removeprefix("Usage:").strip()
    return f"Run `{ctx.command_path} --help` for the arguments and options (usage: {usage})."


# Every (sub)command group: no tracebacks or completion installers, -h as well as --help, help without arguments.
_GROUP_SETTINGS = {
    "no_args_is_help": True,
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "pretty_exceptions_show_locals": False,
    "context_settings": {"help_option_names": ["-h", "--help"]},
}
app = typer.Typer(name="lora-convert", help=HELP, cls=_Group, **_GROUP_SETTINGS)


def command_group(name: str, help: str) -> typer.Typer:
    """A group of subcommands (`lora-convert schemas ...`), registered on the app."""
    group = typer.Typer(name=name, help=help, cls=HelpWithoutCommandGroup, **_GROUP_SETTINGS)
    app.add_typer(group, name=name)
    return group


def debug_enabled() -> bool:
    return os.environ.get("LORA_CONVERT_DEBUG", "") not in ("", "0", "false", "no")


def command(*names: str, target: typer.Typer | None = None, **kwargs) -> Callable:
    """Register a command (on `app`, or on a sub-app `target`) whose LoraConvertErrors become `Error: ...` +
    hint on stderr and an exit code."""

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args, **kw):
            fit_page()
            try:
                return func(*args, **kw)
            except typer.Exit:
                raise
            except LoraConvertError as exc:
                if debug_enabled():
                    raise
                print_error(exc.message, exc.hint)
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                print_error("Interrupted.", None)
                raise typer.Exit(130) from None
            except MemoryError:
                # lora-convert streams one tensor at a time, so running out of memory is a bug, not the adapter's fault.
                if debug_enabled():
                    raise
                print_error(
                    "Internal error: ran out of memory, which is a bug in lora-convert (it should stream).",
                    BUG_REPORT_HINT,
                )
                raise typer.Exit(EXIT_INTERNAL) from None
            except Exception as exc:  # a bug in lora-convert, not in the user's input: exit 4, never 1
                if debug_enabled():
                    raise
                print_error(f"Internal error ({type(exc).__name__}: {exc}): a bug in lora-convert.", BUG_REPORT_HINT)
                raise typer.Exit(EXIT_INTERNAL) from None

        return (target or app).command(*names, **kwargs)(wrapper)

    return decorate


def _version_callback(value: bool) -> None:
    if value:
        write_stdout(f"lora-convert {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version_callback, is_eager=True
    ),
) -> None:
    pass


def _tune_runtime() -> None:
    """Process-wide settings for a one-shot command whose work is streaming many small tensors.

    perf (docs/benchmarks.md): (1) torch's OpenMP pool costs more per small op than it saves: on the 2-core
    bench machine, with other processes running, a data scan took 69 s with 2 threads and 4.6 s with 1. An
    OMP_NUM_THREADS the user set wins; it must be set before torch is imported, so it is set here. (2) The cyclic
    garbage collector rescanned the ~500,000 long-lived header objects of a 94,000-tensor adapter again and
    again; a command's objects are freed by reference counting, so collections are made rare, not disabled.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    gc.set_threshold(100_000, 50, 100)


def main() -> None:
    _tune_runtime()
    app()
