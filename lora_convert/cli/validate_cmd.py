"""`lora-convert validate`: calls lora_convert.api.validate_adapter per adapter and renders findings and verdict."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape

from lora_convert.cli._app import command
from lora_convert.cli._options import ADAPTER_HELP, BaseOpt, CacheDirOpt, Device, TokenOpt
from lora_convert.cli._output import ReportFormat, byte_progress, print_error, print_json, stdout, write_stdout
from lora_convert.errors import EXIT_OK, LoraConvertError

PROGRESS_MIN_BYTES = 100 * 1024 * 1024  # show a progress bar only for scans larger than this


ENGINE_HELP = (
    "Also report what this serving engine release would do with the adapter: `sglang` or `vllm` (the newest release "
    "with a rule file), ENGINE==VERSION (a pinned one; `lora-convert engines list` shows them all) or "
    "ENGINE==installed (the version installed in this Python). One rule file per release "
    "(lora_convert/engines/<engine>-<version>.json), each rule citing the release's source; `normalize --layout "
    "ENGINE` refuses exactly the module groups this reports as unservable."
)
SERVER_ARGS_HELP = (
    "With --engine: the flags the engine's server runs with, in its own names, as one quoted command line (e.g. "
    '"--max-lora-rank 32 --lora-target-modules qkv_proj"; `vllm serve MODEL ...` may be pasted whole). The '
    "prediction takes them into account (modules the flags exclude, ranks above the maximum, TP size, LoRA dtype); "
    "LoRA flags the release does not know, or bad values, are exit 2; other flags are ignored. Without it the "
    'release\'s defaults are assumed (docs/validate.md, "Server flags").'
)
SERVER_ARGS_FILE_HELP = "Read the --server-args from FILE (one or more lines; `#` starts a comment)."
ServerArgsOpt = typer.Option(None, "--server-args", metavar="FLAGS", help=SERVER_ARGS_HELP)
ServerArgsFileOpt = typer.Option(None, "--server-args-file", metavar="FILE", help=SERVER_ARGS_FILE_HELP)


@command("validate")
def validate_command(
    adapters: list[str] = typer.Argument(
        ...,
        metavar="ADAPTER...",
        show_default=False,
        help=ADAPTER_HELP
        + " Several may be given; a path to an adapter_config.json means its folder (for pre-commit).",
    ),
    base: str | None = BaseOpt,
    engine: str = typer.Option("none", "--engine", "-e", metavar="ENGINE[==VERSION]", help=ENGINE_HELP),
    server_args: str | None = ServerArgsOpt,
    server_args_file: str | None = ServerArgsFileOpt,
    tp: int | None = typer.Option(None, "--tp", min=1, help="Tensor-parallel size to check divisibility for."),
    ep: int | None = typer.Option(None, "--ep", min=1, help="Expert-parallel size to check divisibility for."),
    data: bool = typer.Option(
        True,
        "--data/--no-data",
        help="Read the tensors (streamed, one at a time): NaN/Inf, all-zero B, "
        "magnitude outliers. --no-data checks headers and config only.",
    ),
    smoke: bool | None = typer.Option(
        None,
        "--smoke/--no-smoke",
        show_default=False,
        help="Run a forward pass with the adapter. Default: on with a GPU, and on a CPU for adapters up to 50 MB; "
        "when it cannot run, a note. --smoke that cannot run fails: exit 3 when this machine cannot (no torch/triton, "
        "no CUDA for --device cuda), the error `smoke.unchecked` when the adapter cannot (a stacked output, no base, "
        "errors found before it); --allow-unchecked makes either a warning.",
    ),
    device: Device = typer.Option(Device.auto, "--device", case_sensitive=False, help="Where the smoke forward runs."),
    strict: bool = typer.Option(False, "--strict", help="Fail (exit 1) on warnings too."),
    allow_unchecked: bool = typer.Option(
        False,
        "--allow-unchecked",
        help="Accept an adapter a check could not cover: shapes (no base, a base that does not resolve, a family "
        "without a schema), --engine rules that could not be evaluated, or a --smoke forward pass that did not run. "
        "The warnings `shapes.unchecked-allowed` / `engine-rules.unchecked-allowed` / `smoke.unchecked-allowed` "
        "instead of the errors `shapes.unchecked` / `engine-rules.unchecked` / `smoke.unchecked` (or, for --smoke on "
        "a machine that cannot run it, exit 3).",
    ),
    format: ReportFormat = typer.Option(
        ReportFormat.human,
        "--format",
        "-f",
        case_sensitive=False,
        help="`human` table, one `json` document, `github` workflow annotations, or one `sarif` (SARIF 2.1.0) log "
        "for code scanning (every adapter in one run).",
    ),
    sarif_file: str | None = typer.Option(
        None,
        "--sarif",
        metavar="FILE",
        help="Also write the SARIF 2.1.0 log (what --format sarif prints) to FILE, whatever --format is: the "
        "Action's annotations and a log for code scanning from one run. It replaces only a previous SARIF log of "
        "lora-convert.",
    ),
    cache_dir: str | None = CacheDirOpt,
    token: str | None = TokenOpt,
) -> None:
    """Check an adapter against its base model and report every problem: config, keys, A/B pairs and ranks,
    shapes against the architecture schema, MoE experts, tensor data, TP/EP sharding and, with --engine, what
    SGLang or vLLM would do with it. Shapes, engine rules or a --smoke forward pass that could not be checked are the
    errors shapes.unchecked / engine-rules.unchecked / smoke.unchecked unless --allow-unchecked; the verdict line
    names the checks that ran and those that did not.

    Exit codes: 0 no error (warnings allowed unless --strict), 1 errors, 2 usage error, 3 environment problem,
    4 internal error (a bug in lora-convert), 141 stdout closed by its reader (`| head`).

    Example: lora-convert validate ./my-adapter --base Qwen/Qwen3-8B --engine sglang --format json
    """
    from lora_convert.api import validate_adapter

    adapters = _distinct(adapters)
    if sarif_file is not None:
        from lora_convert.check.sarif import check_sarif_path

        check_sarif_path(sarif_file)  # before any work: a path it may not write fails at once
    reports = []
    codes: list[int] = []
    failed: dict[str, str] = {}  # adapter -> why it was not validated (SARIF's tool notifications)
    for spec in adapters:
        bar = _ByteProgress()
        try:
            report = validate_adapter(
                spec,
                base=base,
                engine=engine,
                tp=tp,
                ep=ep,
                data_scan=data,
                smoke=smoke,
                device=device.value,
                strict=strict,
                progress=bar,
                cache_dir=cache_dir,
                token=token,
                allow_unchecked=allow_unchecked,
                server_args=server_args,
                server_args_file=server_args_file,
            )
        except LoraConvertError as exc:
            if format is ReportFormat.github:
                _annotation("error", "lora-convert", exc.message + (f" Hint: {exc.hint}" if exc.hint else ""), None)
            if len(adapters) == 1:
                raise
            print_error(f"{spec}: {exc.message}", exc.hint)
            codes.append(exc.exit_code)
            failed[spec] = exc.message
            continue
        finally:
            bar.close()
        reports.append(report)
        codes.append(report.exit_code)
        if format is ReportFormat.human:
            render_human(report, base_given=base)
        elif format is ReportFormat.github:
            render_github(report)
    if format is ReportFormat.json:
        if len(adapters) == 1 and reports:
            print_json(reports[0].to_json())
        elif reports or len(adapters) > 1:
            print_json({"ok": all(c == EXIT_OK for c in codes), "reports": [r.to_json() for r in reports]})
    if format is ReportFormat.sarif or sarif_file is not None:
        from lora_convert.check.sarif import reports_sarif, write_sarif

        log = reports_sarif(reports, failed=failed)
        if sarif_file is not None:
            write_sarif(log, sarif_file)
        if format is ReportFormat.sarif:
            print_json(log)
    code = max(codes) if codes else EXIT_OK
    if code:
        raise typer.Exit(code)


def _distinct(specs: list[str]) -> list[str]:
    """One entry per adapter: pre-commit passes adapter_config.json and the weights of one folder separately."""
    seen: set[str] = set()
    out = []
    for spec in specs:
        path = Path(spec).expanduser()
        try:
            ident = str((path.parent if path.is_file() else path).resolve()) if path.exists() else spec
        except OSError:
            ident = spec
        if ident not in seen:
            seen.add(ident)
            out.append(spec)
    return out


class _ByteProgress:
    """A rich progress bar on stderr, shown only when stderr is a terminal and the scan is large."""

    def __init__(self) -> None:
        self._progress = None
        self._task = None
        self._enabled = sys.stderr.isatty()

    def __call__(self, nbytes: int, total: int) -> None:
        if not self._enabled or total < PROGRESS_MIN_BYTES:
            return
        if self._progress is None:
            self._progress = byte_progress("scanning tensors")
            self._task = self._progress.add_task("scan", total=total)
        self._progress.advance(self._task, nbytes)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# ----------------------------------------------------------------------------------------------- rendering
def _safe(text) -> str:
    """Printable text: lone surrogates and other unencodable characters become escapes."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _short(value, limit: int = 60) -> str:
    if value is None:
        return ""
    text = _safe(value if isinstance(value, str) else repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def render_human(report, *, base_given: str | None = None) -> None:
    """A heading, one block per finding (severity and code, then the message, keys, expected vs actual and fix
    indented under it), and the verdict. Blocks rather than a table: a six-column table folds module paths and
    messages into narrow columns at any width a terminal or CI log has."""
    import textwrap

    stdout.print(
        f"[bold]{escape(_safe(report.adapter))}[/]"
        + f"  base: {escape(_safe(report.base or base_given or '(none)'))}"
        + (f"  engine: {report.engine}" if report.engine != "none" else "")
    )
    indent = " " * (max(len(s) for s in SEVERITY_STYLE) + 2)
    text_width = max(40, stdout.width - len(indent))

    def lines(text: str, style: str | None = None) -> None:
        for line in textwrap.wrap(_safe(text), text_width, break_long_words=False, break_on_hyphens=False):
            stdout.print(indent + (f"[{style}]{escape(line)}[/]" if style else escape(line)), soft_wrap=True)

    for f in report.findings:
        sev = f.severity.value
        stdout.print(f"[{SEVERITY_STYLE[sev]}]{sev.ljust(len(indent))}[/][bold]{escape(f.code)}[/]", soft_wrap=True)
        lines(f.message)
        if f.keys:
            lines(f"keys: {f.keys[0]}" + (f" (+{len(f.keys) - 1} more)" if len(f.keys) > 1 else ""), "dim")
        if f.expected is not None or f.actual is not None:
            lines(f"expected: {_short(f.expected)}  actual: {_short(f.actual)}", "dim")
        if f.fix:
            lines(f"fix: {f.fix}", "dim")
    style = "bold green" if report.ok else "bold red"
    # One line whatever the width, so that logs can be grepped for it (the same text as --format github prints).
    stdout.print(f"[{style}]{escape(_safe(report.verdict()))}[/]", soft_wrap=True)


def _escape_data(text: str) -> str:
    return _safe(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _annotation(level: str, title: str, message: str, file: str | None) -> None:
    props = f"title={_escape_property(title)}"
    if file:
        props += f",file={_escape_property(file)}"
    write_stdout(f"::{level} {props}::{_escape_data(message)}\n")


GITHUB_LEVEL = {"error": "error", "warning": "warning", "info": "notice"}


def render_github(report) -> None:
    file = None
    if report.adapter_path and Path(report.adapter_path).exists() and not report.adapter_path.startswith(("/", "~")):
        file = str(Path(report.adapter_path) / "adapter_config.json")
    elif report.adapter_path and Path(report.adapter_path).exists():
        try:
            file = str((Path(report.adapter_path) / "adapter_config.json").resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            file = None
    for f in report.findings:
        message = f.message
        if f.keys:
            message += f" Keys: {', '.join(f.keys[:5])}{' ...' if len(f.keys) > 5 else ''}."
        if f.expected is not None or f.actual is not None:
            message += f" Expected {f.expected!r}, got {f.actual!r}."
        if f.fix:
            message += f" Fix: {f.fix}"
        _annotation(GITHUB_LEVEL[f.severity.value], f.code, message, file)
    write_stdout(_safe(f"lora-convert validate: {report.verdict()}") + "\n")
