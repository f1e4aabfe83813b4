"""`lora-convert report`: an existing scan report as a fleet page (lora_convert.api.fleet_page) or a SARIF log."""

from __future__ import annotations

import typer
from rich.markup import escape

from lora_convert.cli._app import command
from lora_convert.cli._output import print_json, stderr
from lora_convert.errors import EXIT_OK, UsageError


@command("report")
def report_command(
    report: str = typer.Argument(
        ..., metavar="REPORT.jsonl", show_default=False, help="The JSONL report of `lora-convert scan --output`."
    ),
    html: str | None = typer.Option(
        None,
        "--html",
        metavar="OUT.html",
        help="Write the fleet page: one self-contained HTML file (totals, a sortable, filterable adapters table, the "
        "engine release matrix, findings by code, the largest and slowest adapters). It replaces only a previous "
        "fleet page.",
    ),
    sarif: bool = typer.Option(
        False,
        "--sarif",
        help="Print the report's findings as one SARIF 2.1.0 log on stdout (as `scan --format sarif`), for code "
        "scanning; run it where the scan ran, so that the adapters' files are found for the locations.",
    ),
) -> None:
    """Turn an existing scan report into a fleet page (a resumed or interrupted scan's report too).

    A torn last line (a killed scan) is left out and the page says the scan is incomplete. Exit codes: 0 written,
    2 usage error (no such report, not a scan report, an --html path that is a folder, the report or a file that
    is not a previous fleet page).

    Example: lora-convert report scan.jsonl --html fleet.html
    """
    from lora_convert.api import fleet_page

    if html is None and not sarif:
        raise UsageError("Nothing to write.", hint="Pass --html OUT.html, or --sarif for a SARIF log on stdout.")
    if sarif:
        from lora_convert.scan.sarif import report_file_sarif

        print_json(report_file_sarif(report))
        if html is None:
            raise typer.Exit(EXIT_OK)
    page = fleet_page(report, html)
    incomplete = "" if page.complete else " (incomplete: the report ends in a torn line)"
    stderr.print(f"Wrote {escape(page.path)}: {page.adapters} adapter(s){incomplete}.", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_OK)
