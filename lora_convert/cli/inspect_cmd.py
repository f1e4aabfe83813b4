"""`lora-convert inspect`: calls lora_convert.api.inspect_adapter and renders what the adapter holds as a table or JSON."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from lora_convert.cli._app import command
from lora_convert.cli._options import AdapterArg, CacheDirOpt, FormatOpt, TokenOpt
from lora_convert.cli._output import OutputFormat, print_error, print_json, stdout
from lora_convert.errors import EXIT_FINDINGS
from lora_convert.text import spans


@command("inspect")
def inspect_command(
    adapter: str = AdapterArg,
    format: OutputFormat = FormatOpt,
    cache_dir: str | None = CacheDirOpt,
    token: str | None = TokenOpt,
) -> None:
    """Show what an adapter holds: files, dtypes, sizes, modules by kind and layer with rank and scaling,
    the expert layout, and warnings. Reads headers only, never tensor data.

    Example: lora-convert inspect ./my-adapter --format json | jq .families
    """
    from lora_convert.api import inspect_adapter

    report = inspect_adapter(adapter, cache_dir=cache_dir, token=token).to_json()
    if format is OutputFormat.json:
        print_json(report)
    else:
        render_report(report)
    if not report["ok"]:
        # The report above is the data; the verdict goes to stderr like every other error, with exit 1.
        message, hint = failure_message(report)
        print_error(message, hint)
        raise typer.Exit(EXIT_FINDINGS)


def failure_message(report: dict) -> tuple[str, str]:
    cfg = report["config"]
    if not cfg["valid"]:
        where = ", ".join(
            dict.fromkeys(
                "not a JSON object" if f["code"] == "config.not-an-object" else f"`{k}`"
                for f in cfg["errors"]
                for k in f["keys"][:1]
            )
        )
        unknown = any(m["scaling"] is None for m in report["modules"])
        return (
            f"{report['adapter']}: adapter_config.json is invalid ({len(cfg['errors'])} error(s): {where})"
            + ("; ranks and scalings that depend on it are shown as `?`." if unknown else "."),
            "Fix the fields listed above (each with the value expected and the value found); "
            "`lora-convert validate` runs every check.",
        )
    codes = sorted({f["code"] for f in report["findings"] if f["severity"] == "error"})
    return (
        f"{report['adapter']} has errors: {', '.join(codes)}.",
        "See the notes above; `lora-convert validate ADAPTER --base BASE` checks it in full.",
    )


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _number(key: str, kind) -> str:
    """A rank or scaling key of the report; `unknown` where the config does not define it."""
    return "?" if key == "unknown" else f"{kind(key):g}" if kind is float else key


def _config_line(cfg: dict) -> str:
    """`r=8 lora_alpha=16 ...` as the file states them; a field the file gets wrong reads `invalid`."""

    def field(name: str) -> str:
        if name in cfg["invalid_fields"]:
            return f"{name}=[red]invalid[/]"
        value = cfg[name]
        return f"{name}={value:g}" if isinstance(value, float) else f"{name}={escape(str(value))}"

    line = " ".join(field(name) for name in ("r", "lora_alpha", "use_rslora", "use_dora"))
    for name in ("rank_pattern", "alpha_pattern"):
        if cfg[name] or name in cfg["invalid_fields"]:
            line += "  " + field(name)
    return line


def render_report(report: dict) -> None:
    cfg = report["config"]
    stdout.print(
        f"[bold]{escape(report['adapter'])}[/]  ({report['file_format']}, {', '.join(escape(f) for f in report['files'])})"
    )
    stdout.print(f"base model: {escape(str(report['base_model']))}")
    stdout.print(
        f"{report['tensors']} tensors, {report['total_params']:,} parameters, {_bytes(report['total_bytes'])}; dtypes: "
        + ", ".join(f"{k} x{v}" for k, v in report["dtypes"].items())
    )
    if not cfg["valid"]:
        stdout.print(f"[bold red]adapter_config.json is invalid[/] ({len(cfg['errors'])} error(s)):")
        for f in cfg["errors"]:
            stdout.print(f"  [red]error[/] {f['code']}: {escape(f['message'])}")
    stdout.print(_config_line(cfg))
    stdout.print(f"{report['module_count']} LoRA modules; expert layout: {report['expert_layout']}")
    table = Table(show_lines=False)
    for col in ("family", "module", "count", "layers", "experts", "rank", "scaling"):
        table.add_column(col)
    for family, data in report["families"].items():
        for entry in data["entries"]:
            table.add_row(
                family,
                escape(entry["name"]),
                str(entry["count"]),
                spans(entry["layers"]),
                str(entry["experts"] or "-"),
                ", ".join(
                    _number(k, int) + (f" (x{v})" if len(entry["ranks"]) > 1 else "") for k, v in entry["ranks"].items()
                ),
                ", ".join(
                    _number(k, float) + (f" (x{v})" if len(entry["scalings"]) > 1 else "")
                    for k, v in entry["scalings"].items()
                ),
            )
    stdout.print(table)
    shown_above = {(f["code"], f["message"]) for f in cfg["errors"]}
    findings = [f for f in report["findings"] if (f["code"], f["message"]) not in shown_above]
    if findings:
        stdout.print(f"[bold]{len(findings)} note(s):[/]")
        for f in findings:
            colour = {"error": "red", "warning": "yellow"}.get(f["severity"], "cyan")
            stdout.print(f"  [{colour}]{f['severity']}[/] {f['code']}: {escape(f['message'])}")
