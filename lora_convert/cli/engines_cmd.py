"""`lora-convert engines list | diff`: the engine releases lora-convert has rules for, and what differs between two."""

from __future__ import annotations

from collections.abc import Callable

import typer
from rich.markup import escape
from rich.table import Table

from lora_convert.cli._app import command, command_group
from lora_convert.cli._options import BaseOpt, CacheDirOpt, FormatOpt, TokenOpt
from lora_convert.cli._output import OutputFormat, print_json, stdout

ENGINES_HELP = """The serving-engine releases lora-convert has rules for (one rule file per release, newer releases
inheriting what did not change), and what differs between two of them.

`--engine vllm` (validate, scan) means the newest release listed here; `--engine vllm==0.33.0` a pinned one;
`--engine vllm==installed` the release of the vllm package installed in this Python.

Examples:

  lora-convert engines list

  lora-convert engines diff vllm==0.33.0 vllm==0.34.0

  lora-convert engines diff vllm==0.33.0 vllm==0.34.0 ./my-adapter --base ./base-model"""

engines_app = command_group("engines", ENGINES_HELP)

RELEASE_HELP = (
    "An engine release: ENGINE==VERSION (`lora-convert engines list`), ENGINE (its newest) or ENGINE==installed."
)


def _command(name: str) -> Callable:
    return command(name, target=engines_app)


# ------------------------------------------------------------------------------------------------- list
@_command("list")
def list_command(format: OutputFormat = FormatOpt) -> None:
    """List the engine releases that have a rule file: the release, the rule file, the release it inherits from, its
    number of rules; `*` marks the newest of each engine (what `--engine ENGINE` means).

    Example: lora-convert engines list --format json | jq -r '.[].spec'
    """
    from lora_convert.api import engine_releases

    found = engine_releases()
    if format is OutputFormat.json:
        print_json(found)
        return
    table = Table(title="engine releases (* = newest: what --engine ENGINE means)")
    for col in ("release", "label", "inherits from", "rules", "file"):
        table.add_column(col)
    for r in found:
        mark = " *" if r["newest"] else ""
        table.add_row(f"{r['spec']}{mark}", r["label"], r["extends"] or "-", str(r["rules"]), r["file"])
    stdout.print(table)


# ------------------------------------------------------------------------------------------------- diff
@_command("diff")
def diff_command(
    old: str = typer.Argument(..., metavar="OLD", help=RELEASE_HELP, show_default=False),
    new: str = typer.Argument(
        ..., metavar="NEW", help="The release to compare OLD with (same engine).", show_default=False
    ),
    adapter: str | None = typer.Argument(
        None,
        metavar="ADAPTER",
        help="An adapter (folder or Hub id): show, per module, what each release predicts for it instead of the rules.",
        show_default=False,
    ),
    base: str | None = BaseOpt,
    all_modules: bool = typer.Option(
        False, "--all", help="With ADAPTER: list every module, not only those whose prediction differs."
    ),
    format: OutputFormat = FormatOpt,
    cache_dir: str | None = CacheDirOpt,
    token: str | None = TokenOpt,
) -> None:
    """Show what differs between two releases of one engine.

    Without ADAPTER: the rules added, removed or changed (outcome, message, fix, what they fire on, or only their
    source: the cited lines moved), each with its source, and the layout keys that differ. With ADAPTER: per module,
    what each release does with that adapter (exact, dropped, wrong, or load failure: the release refuses the whole
    adapter); only the modules that differ unless --all.

    Examples:

      lora-convert engines diff vllm==0.33.0 vllm==0.34.0

      lora-convert engines diff vllm==0.33.0 vllm ./my-adapter --base ./base-model --format json
    """
    from lora_convert.api import engines_diff

    result = engines_diff(old, new, adapter, base=base, all_modules=all_modules, cache_dir=cache_dir, token=token)
    if format is OutputFormat.json:
        print_json(result)
    elif adapter is None:
        _render_rules(result)
    else:
        _render_modules(result)


def _render_rules(result: dict) -> None:
    old_label, new_label = result["labels"]
    behaviour = [c for c in result["rules"] if c["fields"] != ["source"]]
    moved = [c["id"] for c in result["rules"] if c["fields"] == ["source"]]
    stdout.print(f"{old_label} -> {new_label}: {len(behaviour)} rule(s) differ in behaviour or text", markup=False)
    for c in behaviour:
        was, now = c["old"], c["new"]
        if c["change"] == "added":
            head = f"+ {c['id']}: added ({now['outcome']})"
        elif c["change"] == "removed":
            head = f"- {c['id']}: removed (was {was['outcome']})"
        else:
            outcome = f"{was['outcome']} -> {now['outcome']}" if "outcome" in c["fields"] else now["outcome"]
            head = f"~ {c['id']}: {outcome}; changed: {', '.join(c['fields'])}"
        stdout.print(head, markup=False)
        if "message" in c["fields"] or c["change"] != "changed":
            for side, rule in (("old", was), ("new", now)):
                if rule is not None:
                    stdout.print(f"    {side} message: {rule['message']}", markup=False)
        for side, rule in (("old", was), ("new", now)):
            if rule is not None and (side == "new" or c["change"] != "added"):
                stdout.print(f"    {side} source: {rule['source']}", markup=False)
    if moved:
        stdout.print(
            f"{len(moved)} rule(s) do the same and cite other lines in {new_label} (source only): {', '.join(moved)}",
            markup=False,
        )
    if result["layout"]:
        stdout.print(f"layout keys that differ: {', '.join(result['layout'])}", markup=False)


def _render_modules(result: dict) -> None:
    old_label, new_label = result["labels"]
    for side, label in (("old", old_label), ("new", new_label)):
        failing = result["load_failure"][side]
        state = f"load failure ({', '.join(failing)})" if failing else "loads"
        stdout.print(f"{label}: {state}", markup=False)
        if result["unchecked"][side]:
            stdout.print(f"{label}: not every rule could be evaluated: {result['unchecked'][side]}", markup=False)
    counted = f"{result['modules_differing']} of {result['modules_total']} module(s) predicted differently"
    if result["modules"]:
        counted += " (every module below)" if len(result["modules"]) == result["modules_total"] else " (below)"
    stdout.print(counted, markup=False)
    if not result["modules"]:
        return
    table = Table()
    for col in ("module", old_label, new_label):
        table.add_column(escape(col))
    for row in result["modules"]:
        table.add_row(escape(row["module"]), row["old"], row["new"])
    stdout.print(table)
