"""`lora-convert scan`: calls lora_convert.api.scan_adapters and renders the fleet's progress and summary."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from lora_convert.cli._app import command
from lora_convert.cli._output import ScanFormat, byte_progress, print_json, stderr, stdout
from lora_convert.cli.validate_cmd import ENGINE_HELP, ServerArgsFileOpt, ServerArgsOpt
from lora_convert.errors import EXIT_FINDINGS, EXIT_OK, UsageError
from lora_convert.scan.task import FAILING, STATUSES

INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C, as elsewhere in the CLI


@command("scan")
def scan_command(
    sources: list[str] = typer.Argument(
        ...,
        metavar="SOURCE...",
        show_default=False,
        help="A folder searched recursively for adapters (folders with adapter_config.json), a text file of adapter "
        "folders or Hub ids (one per line, # comments), or a Hub id.",
    ),
    base: str | None = typer.Option(
        None,
        "--base",
        "-b",
        help="The base model for every adapter (folder, config.json, Hub id or preset). Default: each adapter's "
        "base_model_name_or_path.",
    ),
    engine: list[str] = typer.Option(
        ["none"],
        "--engine",
        "-e",
        metavar="ENGINE[==VERSION]",
        help=ENGINE_HELP + " Give it several times to check every adapter against several releases (the record's "
        "`engines` counts each release's outcomes), or `all` for every engine's newest release.",
    ),
    server_args: str | None = ServerArgsOpt,
    server_args_file: str | None = ServerArgsFileOpt,
    checks: str | None = typer.Option(
        None,
        "--checks",
        help="Comma-separated check groups to run (config, keys, pairs, shapes, moe, data, sharding, smoke, "
        "engine). Default: all, as validate.",
    ),
    data: bool = typer.Option(True, "--data/--no-data", help="Read the tensors (NaN/Inf, all-zero B, outliers)."),
    smoke: bool = typer.Option(
        False, "--smoke/--no-smoke", help="Run a forward pass per adapter (needs torch; off by default in a scan)."
    ),
    strict: bool = typer.Option(False, "--strict", help="Warnings make an adapter fail too."),
    allow_unchecked: bool = typer.Option(
        False,
        "--allow-unchecked",
        help="Shapes, engine rules or a --smoke forward pass that could not be checked are a warning, not an error "
        "(as validate).",
    ),
    normalize: str | None = typer.Option(
        None,
        "--normalize",
        metavar="OUTROOT",
        help="Also convert into OUTROOT/<id> (mirroring the source tree) every adapter without errors that --layout "
        "does not fix (as `normalize --layout`; with --engine E --layout E, the E findings that layout rewrites).",
    ),
    layout: str | None = typer.Option(
        None, "--layout", metavar="LAYOUT", help="The layout for --normalize (as `normalize --layout`)."
    ),
    jobs: int | None = typer.Option(
        None, "--jobs", "-j", min=1, help="Worker processes on this machine. Default: the core count."
    ),
    ray: bool = typer.Option(  # help texts are rich markup: escape() keeps the extra's [ray]
        False, "--ray", help=escape("Run on a Ray cluster (pip install 'lora-convert[ray]').")
    ),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        metavar="ADDRESS",
        help="The Ray cluster to join (implies --ray). Without it --ray starts a local Ray instance.",
    ),
    timeout: float = typer.Option(600.0, "--timeout", min=0.001, help="Seconds per adapter before it is stopped."),
    output: str | None = typer.Option(
        None, "--output", "-o", help="The JSONL report: one line per adapter, appended as each finishes."
    ),
    resume: bool = typer.Option(False, "--resume", help="Skip the adapters already in the --output report."),
    html: str | None = typer.Option(
        None,
        "--html",
        metavar="OUT.html",
        help="Also write the fleet page of the scan (one self-contained HTML file) when it ends, also when it is "
        "interrupted (the page then says so). It replaces only a previous fleet page.",
    ),
    format: ScanFormat = typer.Option(
        ScanFormat.human,
        "--format",
        "-f",
        case_sensitive=False,
        help="`human` summary tables, one `json` document (summary and every record), or one `sarif` (SARIF "
        "2.1.0) log of every adapter's findings for code scanning, on stdout.",
    ),
) -> None:
    """Validate every adapter of a registry (and with --normalize convert them), in parallel, into one report.

    Each adapter gets the checks of `validate`; its record (findings, verdict, engine outcomes, timings, bytes) is
    appended to --output as it finishes, so an interrupted scan loses nothing and --resume continues it. An adapter
    that hangs (--timeout) or kills its worker is recorded as such; the scan goes on.

    Exit codes: 0 every adapter ok, 1 some adapter has errors, could not be read, crashed or timed out, 2 usage
    error, 3 environment problem, 130 interrupted (the report keeps what was done).

    Example: lora-convert scan ./registry --engine vllm --jobs 8 --output scan.jsonl
    """
    from lora_convert.api import scan_adapters

    bar = _FleetProgress() if sys.stderr.isatty() else None
    result = scan_adapters(
        sources,
        base=base,
        engine=engine,
        server_args=server_args,
        server_args_file=server_args_file,
        checks=_check_names(checks),
        data_scan=data,
        smoke=smoke,
        strict=strict,
        allow_unchecked=allow_unchecked,
        normalize=normalize,
        layout=layout,
        jobs=jobs,
        ray=ray or ray_address is not None,
        ray_address=ray_address,
        timeout=timeout,
        output=output,
        resume=resume,
        html=html,
        on_start=bar.start if bar else None,
        on_record=bar.advance if bar else None,
    )
    if bar:
        bar.close()
    if result.page:
        stderr.print(f"Fleet page: {escape(result.page)}", highlight=False, soft_wrap=True)
    if format is ScanFormat.json:
        print_json(result.to_json())
    elif format is ScanFormat.sarif:
        from lora_convert.scan.sarif import records_sarif

        print_json(records_sarif(result.records))
    else:
        render_human(result)
    if result.interrupted:
        stderr.print(
            f"Interrupted: {len(result.records)} of {result.discovered} adapters have a record"
            + (f" in {escape(result.output)}; run again with --resume to continue." if result.output else "."),
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(INTERRUPTED)
    if not result.summary["ok"]:
        raise typer.Exit(EXIT_FINDINGS)
    raise typer.Exit(EXIT_OK)


def _check_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--checks is empty.", hint="Name check groups, e.g. --checks config,keys,data.")
    return names


class _FleetProgress:
    """One bar for the fleet on stderr (only on a terminal): adapters done of all, bytes, rate and ETA."""

    def __init__(self) -> None:
        self._progress = None
        self._task = None
        self._done = 0
        self._total = 0

    def start(self, tasks) -> None:
        self._total = len(tasks)
        self._progress = byte_progress("scan {task.fields[adapters]}")
        self._task = self._progress.add_task(
            "scan", total=sum(t.nbytes for t in tasks) or None, adapters=f"0/{self._total}"
        )

    def advance(self, record) -> None:
        if self._progress is None:
            return
        self._done += 1
        self._progress.update(self._task, advance=record.get("bytes") or 0, adapters=f"{self._done}/{self._total}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# ----------------------------------------------------------------------------------------------- rendering
def _table(title: str, columns: list[str], rows: list[list]) -> None:
    """A titled table; columns of numbers are right-aligned."""
    from rich.table import Table

    stdout.print(f"[bold]{escape(title)}[/]")
    table = Table(show_edge=False, pad_edge=False)
    for i, name in enumerate(columns):
        numbers = all(isinstance(row[i], int) or name == "MB" for row in rows)
        # Only the first column (ids, family names) folds: a folded code or count would not be greppable.
        table.add_column(name, justify="right" if numbers else "left", overflow="fold", no_wrap=i > 0)
    for row in rows:
        table.add_row(*[escape(str(c)) for c in row])
    stdout.print(table)
    stdout.print()


def _first_codes(codes: list[str]) -> str:
    return (codes[0] + (f" +{len(codes) - 1}" if len(codes) > 1 else "")) if codes else ""


def render_human(result) -> None:
    s = result.summary
    status = ", ".join(f"{k} {n}" for k, n in s["status"].items()) or "nothing scanned"
    resumed = f" ({result.resumed} from the earlier report)" if result.resumed else ""
    stdout.print(f"[bold]{s['adapters']} adapter(s){resumed}, {s['bytes'] / 1e6:.1f} MB: {status}[/]", soft_wrap=True)
    stdout.print()
    if s["families"]:
        # Only the statuses that occur, so that a clean fleet's table is not a wall of zeros.
        seen = [k for k in STATUSES if any(k in f for f in s["families"].values())]
        rows = [
            [name, f["adapters"], *(f.get(k, 0) for k in seen), f"{f['bytes'] / 1e6:.1f}"]
            for name, f in s["families"].items()
        ]
        _table("By family", ["family", "adapters", *seen, "MB"], rows)
    if s["codes"]:
        _table(
            "By finding code",
            ["code", "severity", "adapters"],
            [[c, v["severity"], v["adapters"]] for c, v in s["codes"].items()],
        )
    if s["engine_outcomes"]:
        _table(
            "By engine outcome",
            ["outcome", "adapters", "rules fired"],
            [[k, v.get("adapters", 0), v.get("rules", 0)] for k, v in s["engine_outcomes"].items()],
        )
    if s["worst"]:
        _table(
            "Worst adapters",
            ["adapter", "status", "error codes", "errors", "warnings"],
            [[w["id"], w["status"], _first_codes(w["codes"]), w["errors"], w["warnings"]] for w in s["worst"]],
        )
    if s.get("normalize") is not None:
        counts = s["normalize"]
        stdout.print(
            f"normalize: converted {counts['converted']}, skipped {counts['skipped']} (errors the layout does not "
            f"fix), failed {counts['failed']} (refused by the converter, or not scanned)",
            soft_wrap=True,
        )
    stdout.print(f"[{'bold green' if s['ok'] else 'bold red'}]{escape(_verdict(result))}[/]", soft_wrap=True)


def _verdict(result) -> str:
    """The last line: OK only for a complete scan in which every adapter passed."""
    s = result.summary
    if result.interrupted:
        return (
            f"INTERRUPTED: {len(result.records)} of {result.discovered} adapters have a record; the others were not "
            "scanned" + ("." if not any(st in s["status"] for st in FAILING) else ", and some have errors.")
        )
    return "OK: every adapter passed." if s["ok"] else "FAIL: some adapters have errors or could not be scanned."
