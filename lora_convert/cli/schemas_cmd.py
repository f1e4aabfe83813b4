"""`lora-convert schemas list | show | check`: the shipped architecture schemas and presets."""

from __future__ import annotations

from collections.abc import Callable

import typer
from rich.markup import escape
from rich.table import Table

from lora_convert.cli._app import command, command_group
from lora_convert.cli._options import BaseOpt, CacheDirOpt, FormatOpt, TokenOpt
from lora_convert.cli._output import OutputFormat, print_json, stdout
from lora_convert.errors import EXIT_FINDINGS, LoraConvertError, UsageError
from lora_convert.text import spans

schemas_app = command_group("schemas", "The architecture schemas and base-config presets that ship with lora-convert.")


def _command(name: str) -> Callable:
    return command(name, target=schemas_app)


# ------------------------------------------------------------------------------------------------- list
@_command("list")
def list_command(format: OutputFormat = FormatOpt) -> None:
    """List the schema families and the presets (base configs shipped with the tool) with the family each matches.

    Example: lora-convert schemas list --format json | jq '.presets[].name'
    """
    from lora_convert.arch.base_config import find_preset, list_presets
    from lora_convert.arch.schema import list_schemas, load_schema, schema_for_config

    families = []
    for family in list_schemas():
        s = load_schema(family)
        families.append(
            {
                "family": family,
                "file": s.file,
                "model_type": list(s.model_types),
                "architectures": list(s.architectures),
            }
        )
    presets = []
    for p in list_presets():
        try:
            family = schema_for_config(find_preset(p["name"], hub_ids=False)["config"]).family
        except LoraConvertError:
            family = None
        presets.append({**p, "family": family})
    if format is OutputFormat.json:
        print_json({"schemas": families, "presets": presets})
        return
    table = Table(title="schemas")
    for col in ("family", "model_type", "architectures", "file"):
        table.add_column(col)
    for f in families:
        table.add_row(f["family"], ", ".join(f["model_type"]), ", ".join(f["architectures"]), f["file"])
    stdout.print(table)
    table = Table(title="presets (--base NAME)")
    for col in ("preset", "family", "model_type", "hub ids"):
        table.add_column(col)
    for p in presets:
        table.add_row(p["name"], p["family"] or "-", str(p["model_type"]), escape(", ".join(p["hub_ids"])))
    stdout.print(table)


# ------------------------------------------------------------------------------------------------- show
@_command("show")
def show_command(
    target: str | None = typer.Argument(
        None,
        metavar="ARCH_OR_PRESET",
        help="A schema family (`llama`, `deepseek_v3`, ...), a preset name, or anything --base accepts.",
        show_default=False,
    ),
    base: str | None = BaseOpt,
    format: OutputFormat = FormatOpt,
    cache_dir: str | None = CacheDirOpt,
    token: str | None = TokenOpt,
) -> None:
    """Show a schema's LoRA-able modules per layer type: module, in, out, slices, gated, experts.

    With a family name and no --base, the dimensions are shown as expressions; with a preset, a config or
    --base they are evaluated.

    Example: lora-convert schemas show deepseek-v3
    """
    from lora_convert.arch.base_config import resolve_base
    from lora_convert.arch.schema import bind, list_schemas, load_schema

    if target is None and base is None:
        raise UsageError(
            "Give a schema family or preset (ARCH_OR_PRESET), or --base.",
            hint="`lora-convert schemas list` shows both.",
        )
    family = target if target in list_schemas() else None
    if family is not None and base is None:
        described = load_schema(family).describe()
        if format is OutputFormat.json:
            print_json(described)
        else:
            _render_symbolic(described)
        return
    if family is None and target is not None and base is not None:
        raise UsageError(
            f"{target!r} is not a schema family, so it cannot be combined with --base.",
            hint="Pass either a preset / config as ARCH_OR_PRESET, or a family name with --base.",
        )
    resolved = (
        resolve_base(base, cache_dir=cache_dir, token=token)
        if base is not None
        else _resolve_target(target, cache_dir=cache_dir, token=token)
    )
    arch = bind(resolved, schema=family)
    table = arch.table()
    table["base"] = {
        "name": resolved.name,
        "origin": resolved.origin,
        "note": resolved.source_note,
        "substitution": resolved.substitution,  # why a preset stands in for the base named, or None
    }
    if format is OutputFormat.json:
        print_json(table)
        return
    _render_table(table)


def _resolve_target(target: str, *, cache_dir, token):
    """ARCH_OR_PRESET that is no schema family: a preset, or anything --base accepts. A name that is none of them
    is reported as the argument it is (schema and preset names), not as a --base."""
    from lora_convert.arch.base_config import resolve_base

    try:
        return resolve_base(target, cache_dir=cache_dir, token=token)
    except UsageError:
        raise UsageError(
            f"ARCH_OR_PRESET {target!r} is not a schema family or a preset name, and not the folder, config.json "
            "or Hub repo id of a base model.",
            hint="`lora-convert schemas list` shows the schema families and the presets.",
        ) from None


def _slices_text(slices: list[dict]) -> str:
    if len(slices) == 1:
        return "-"
    return " | ".join(f"{s['name']}={s['out']}" for s in slices)


def _group_table(title: str, groups: list[dict]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("module", "in", "out", "slices", "gated", "experts"):
        table.add_column(col, justify="right" if col in ("in", "out", "experts") else "left")
    for g in groups:
        gated = "-" if g["gated"] is None else ("yes" if g["gated"] else "no")
        table.add_row(
            escape(g["name"]),
            str(g["in"]),
            str(g["out"]),
            escape(_slices_text(g["slices"])),
            gated,
            str(g["experts"] or "-"),
        )
    return table


def _render_table(table: dict) -> None:
    base = table["base"]
    stdout.print(
        f"[bold]{escape(table['family'])}[/] ({escape(table['schema_file'])}) bound to "
        f"{escape(base['name'])} ({base['origin']})"
    )
    if base.get("substitution"):
        stdout.print(f"note: the shipped preset {escape(base['name'])} is used: {escape(base['substitution'])}")
    extras = f", {table['mtp_layers']} MTP layer(s) after them" if table["mtp_layers"] else ""
    stdout.print(
        f"{table['num_layers']} layers{extras}; routed experts: {table['expert_count'] or '-'}; "
        f"checkpoint layer stack: {escape(table['checkpoint_prefix'])}.N"
    )
    for entry in table["layer_types"]:
        title = f"layers {spans(entry['layers'])}: {' + '.join(entry['types'])}"
        stdout.print(_group_table(title, entry["groups"]))
    if table["top_level"]:
        stdout.print(_group_table("top level", [{**g, "name": g["path"]} for g in table["top_level"]]))


def _render_symbolic(described: dict) -> None:
    stdout.print(
        f"[bold]{escape(described['family'])}[/] ({escape(described['file'])}): expressions over config "
        "fields; pass a preset or --base for numbers."
    )
    stdout.print(f"layers: {escape(described['num_layers'])}; experts: {escape(str(described['expert_count']))}")
    if described["let"]:
        stdout.print("let: " + escape("; ".join(f"{k} = {v}" for k, v in described["let"].items())))
    for name, expression in described["layer_types"].items():
        stdout.print(f"layer type [bold]{escape(name)}[/] when {escape(expression)}")
    table = Table(title="groups", title_justify="left")
    for col in ("module", "on", "when", "in", "slices (name = out)", "gated", "experts"):
        table.add_column(col)
    for g in described["groups"] + described["top_level"]:
        gated = "-" if g["gated"] is None else ("yes" if g["gated"] else "no")
        table.add_row(
            escape(g["path"]),
            ", ".join(g["on"]) or "top level",
            escape(g["when"] or "-"),
            escape(g["in"]),
            escape(" | ".join(f"{s['name']} = {s['out']}" for s in g["slices"])),
            gated,
            "E" if g["experts"] else "-",
        )
    stdout.print(table)


# ------------------------------------------------------------------------------------------------ check
def run_check() -> dict:
    """Load every shipped schema strictly and bind it to every preset it matches; collect every problem."""
    from lora_convert.arch.base_config import find_preset, list_presets, preset_base
    from lora_convert.arch.schema import bind, list_schemas, load_schema, schema_for_config

    report: dict = {"ok": True, "schemas": [], "presets": []}
    covered: set[str] = set()
    for family in list_schemas():
        entry = {"family": family, "ok": True, "error": None}
        try:
            load_schema(family)
        except LoraConvertError as exc:
            entry.update(ok=False, error=exc.message)
            report["ok"] = False
        report["schemas"].append(entry)
    for p in list_presets():
        entry = {"preset": p["name"], "family": None, "ok": True, "error": None}
        try:
            preset = find_preset(p["name"], hub_ids=False)
            schema = schema_for_config(preset["config"])
            entry["family"] = schema.family
            arch = bind(preset_base(preset), schema=schema)
            groups = 0
            for layer in range(arch.num_layers):
                groups += len(arch.groups(layer))
            groups += len(arch.top_level_groups())
            entry.update(
                layers=arch.num_layers, layer_types=[sorted(t) for t, _ in arch.layer_type_sets()], groups=groups
            )
            covered.add(schema.family)
        except LoraConvertError as exc:
            entry.update(ok=False, error=exc.message)
            report["ok"] = False
        report["presets"].append(entry)
    report["families_without_preset"] = sorted(set(list_schemas()) - covered)
    return report


@_command("check")
def check_command(format: OutputFormat = FormatOpt) -> None:
    """Validate every shipped schema file strictly and expand it against every preset; exit 1 on any problem.

    Example (CI): lora-convert schemas check
    """
    report = run_check()
    if format is OutputFormat.json:
        print_json(report)
    else:
        for s in report["schemas"]:
            mark = "[green]ok[/]     " if s["ok"] else "[red]FAILED[/] "
            stdout.print(f"{mark} schema {s['family']}" + (f": {escape(s['error'])}" if s["error"] else ""))
        for p in report["presets"]:
            mark = "[green]ok[/]     " if p["ok"] else "[red]FAILED[/] "
            detail = (
                f" -> {p['family']}: {p['layers']} layers, {len(p['layer_types'])} layer type(s), {p['groups']} groups"
                if p["ok"]
                else f": {escape(p['error'])}"
            )
            stdout.print(f"{mark} preset {p['preset']}{detail}")
        if report["families_without_preset"]:
            stdout.print(
                "note: no preset exercises "
                + ", ".join(report["families_without_preset"])
                + " (the test suite binds them to fixture configs)."
            )
    if not report["ok"]:
        raise typer.Exit(EXIT_FINDINGS)
