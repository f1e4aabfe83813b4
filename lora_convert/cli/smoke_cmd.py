"""`lora-convert smoke`: calls lora_convert.pipeline.commands.smoke and renders its per-group results."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from lora_convert.cli._app import command
from lora_convert.cli._options import AdapterArg, BaseOpt, CacheDirOpt, Device, FormatOpt, TokenOpt
from lora_convert.cli._output import OutputFormat, log, print_json, stdout
from lora_convert.errors import EXIT_FINDINGS


@command("smoke")
def smoke_command(
    adapter: str = AdapterArg,
    base: str | None = BaseOpt,
    original: str | None = typer.Option(
        None,
        "--original",
        help="When ADAPTER is a stacked output: the PEFT adapter it came from (the reference is computed from it).",
    ),
    device: Device = typer.Option(
        Device.auto, "--device", help="`auto`: CUDA when present, else the Triton interpreter on the CPU."
    ),
    tokens: int = typer.Option(
        160,
        "--tokens",
        min=1,
        help="Rows of random input per group (more than 128 by default: some kernel bugs only show past 128 rows).",
    ),
    layers: str = typer.Option(
        "auto",
        "--layers",
        help="`auto` (all on a GPU; on a CPU the first, one of each layer type and the last), `all`, or a list such as 0,3,5-7.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the inputs and the expert routing."),
    format: OutputFormat = FormatOpt,
    cache_dir: str | None = CacheDirOpt,
    token: str | None = TokenOpt,
) -> None:
    """Run the stacked tensors through the Triton LoRA kernels and compare with PEFT's semantics on the
    original adapter: relative error per dtype, no NaN, no no-op slices, zero fills untouched. Exit 1 on any failure.

    Needs torch and triton, the smoke extra: pip install 'lora-convert\\[smoke]' (without them: exit 3).

    Examples: lora-convert smoke ./my-adapter --base deepseek-v3
              lora-convert smoke ./stacked --original ./my-adapter --device cuda
    """
    from lora_convert.pipeline.commands import smoke
    from lora_convert.smoke.report import TOLERANCES

    report = smoke(
        adapter,
        base=base,
        original=original,
        device=device.value,
        tokens=tokens,
        layers=layers,
        seed=seed,
        cache_dir=cache_dir,
        token=token,
    )
    if report.sampled:
        log(
            f"on the CPU only layers {report.layers_checked} of {report.layers_total} were checked; "
            "pass --layers all for every layer"
        )
    if format is OutputFormat.json:
        print_json(report.to_json())
    else:
        table = Table(
            title=f"smoke on {report.device}{' (Triton interpreter)' if report.interpreter else ''}: "
            f"{report.tokens} tokens, rank {report.rank}"
        )
        for col in ("group", "experts", "dtype", "rel err", "tol", "status"):
            table.add_column(col)
        for g in report.groups:
            status = (
                "[green]ok[/]"
                if g.ok
                else "[red]FAIL[/] "
                + escape("; ".join(g.problems + [f"{s.name}: {s.problem}" for s in g.slices if s.problem]))
            )
            table.add_row(
                escape(g.key),
                str(g.experts or "-"),
                g.dtype,
                f"{g.rel_err:.2e}",
                f"{TOLERANCES.get(g.dtype, 1e-5):g}",
                status,
            )
        stdout.print(table)
        failed = sum(not g.ok for g in report.groups)
        verdict = "[green]PASS[/]" if report.ok else "[red]FAIL[/]"
        stdout.print(
            f"{verdict}: {len(report.groups) - failed}/{len(report.groups)} groups within tolerance in {report.seconds:.1f} s"
        )
    if not report.ok:
        raise typer.Exit(EXIT_FINDINGS)
