from __future__ import annotations

from typing import Optional

from rich.markup import escape
from rich.table import Table

from lora_convert.cli._app import command
from lora_convert.cli._options import AdapterArg, CacheDirOpt, FormatOpt, TokenOpt
from lora_convert.cli._output import OutputFormat, print_json, stdout
from lora_convert.text import spans


@command("inspect")
def inspect_command(
    adapter: str = AdapterArg,
    format: OutputFormat = FormatOpt,
    cache_dir: Optional[str] = CacheDirOpt,
    token: Optional[str] = TokenOpt,
) -> None:
    """Show what an adapter holds: files, dtypes, sizes, modules by kind and layer with rank and scaling,
    the expert layout, and warnings. Reads headers only, never tensor data.

    Example: lora-convert inspect ./my-adapter --format json | jq .families
    """
    from lora_convert.adapter import load_adapter
    from lora_convert.inspect import build_report

    report = build_report(load_adapter(adapter, cache_dir=cache_dir, token=token, strict_config=False))
    if format is OutputFormat.json:
        print_json(report)
        return
    render_report(report)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_report(report: dict) -> None:
    cfg = report["config"]
    stdout.print(f"[bold]{escape(report['adapter'])}[/]  ({report['file_format']}, {', '.join(escape(f) for f in report['files'])})")
    stdout.print(f"base model: {escape(str(report['base_model']))}")
    stdout.print(
        f"{report['tensors']} tensors, {report['total_params']:,} parameters, {_bytes(report['total_bytes'])}; dtypes: "
        + ", ".join(f"{k} x{v}" for k, v in report["dtypes"].items())
    )
    stdout.print(
        f"r={cfg['r']} lora_alpha={cfg['lora_alpha']:g} use_rslora={cfg['use_rslora']} use_dora={cfg['use_dora']}"
        f"{'  rank_pattern=' + escape(str(cfg['rank_pattern'])) if cfg['rank_pattern'] else ''}"
        f"{'  alpha_pattern=' + escape(str(cfg['alpha_pattern'])) if cfg['alpha_pattern'] else ''}"
    )
    stdout.print(f"{report['module_count']} LoRA modules; expert layout: {report['expert_layout']}")
    table = Table(show_lines=False)
    for col in ("family", "module", "count", "layers", "experts", "rank", "scaling"):
        table.add_column(col)
    for family, data in report["families"].items():
        for entry in data["entries"]:
            table.add_row(
                family, escape(entry["name"]), str(entry["count"]), spans(entry["layers"]),
                str(entry["experts"] or "-"),
                ", ".join(f"{k}" + (f" (x{v})" if len(entry["ranks"]) > 1 else "") for k, v in entry["ranks"].items()),
                ", ".join(f"{float(k):g}" + (f" (x{v})" if len(entry["scalings"]) > 1 else "") for k, v in entry["scalings"].items()),
            )
    stdout.print(table)
    findings = report["findings"]
    if findings:
        stdout.print(f"[bold]{len(findings)} note(s):[/]")
        for f in findings:
            colour = {"error": "red", "warning": "yellow"}.get(f["severity"], "cyan")
            stdout.print(f"  [{colour}]{f['severity']}[/] {f['code']}: {escape(f['message'])}")
