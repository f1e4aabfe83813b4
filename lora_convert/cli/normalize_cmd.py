"""`lora-convert normalize`: calls lora_convert.api.normalize_adapter and renders the plan, progress and what was written."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from lora_convert.cli._app import command
from lora_convert.cli._options import AdapterArg, BaseOpt, CacheDirOpt, FormatOpt, TokenOpt
from lora_convert.cli._output import OutputFormat, byte_progress, log, print_json, stderr, stdout
from lora_convert.errors import UsageError


class DType(str, Enum):
    keep = "keep"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


@command("normalize")
def normalize_command(
    adapter: str = AdapterArg,
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Output folder: created, or an empty one filled. Refused (exit 2) when it is, "
        "contains or lies inside the input adapter or a local --base (after resolving symlinks, `.` and `..`), "
        "and when it is the current working directory: the output is swapped in as a whole folder, so run from "
        "its parent instead of passing `-o .`.",
    ),
    base: str | None = BaseOpt,
    layout: str = typer.Option(
        "stacked",
        "--layout",
        metavar="LAYOUT",
        help="`stacked`: fused groups, one rank, scaling folded (docs/stacked-layout.md). `peft`: per-module PEFT "
        "keys, one rank, scales folded, every module PEFT applies. `mlx`: what mlx-lm's load_adapters loads and "
        "applies exactly (adapters.safetensors; docs/formats.md). `gguf`: the GGUF LoRA file llama.cpp loads for "
        "the base's GGUF, written as OUT/adapter.gguf inside the output folder (the `gguf` extra; docs/formats.md). "
        "`sglang` / `vllm` (or ENGINE==VERSION): what that "
        "engine release (the newest, or the one named; `lora-convert engines list`) loads and applies exactly; "
        "what it would drop or apply wrongly "
        "is refused, the same groups `validate --engine` reports (docs/engine-layouts.md).",
    ),
    rank: int | None = typer.Option(
        None,
        "--rank",
        min=1,
        help="Pad every slice to this rank (default: the largest effective rank; smaller is an error).",
    ),
    dtype: DType = typer.Option(
        DType.keep, "--dtype", help="Output dtype; `keep` keeps the adapter's (the widest, if mixed)."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the plan (groups, slices, zero fills, foldings, drops, refusals) and every tensor the output "
        "would hold (name, dtype, shape), and write nothing.",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace a previous lora-convert output (recognised by its lora_convert_manifest.json). "
        "A folder holding anything the manifest does not list is refused. The old output is removed only after the "
        "new one is complete; an interrupted run leaves it as it was.",
    ),
    drop_unsupported: bool = typer.Option(
        False,
        "--drop-unsupported",
        help="Leave out what the layout cannot write exactly instead of refusing: DoRA, lora_bias, modules_to_save, "
        "past-the-end modules, vision-tower and projector modules (except `--layout peft`, which writes them), and "
        "an engine layout's refused groups. They are listed on stderr and in the output: lora_layout.json for "
        "`stacked`, lora_convert_report.json for the other layouts.",
    ),
    allow_non_finite: bool = typer.Option(
        False,
        "--allow-non-finite",
        help="Write NaN and Inf values as they are. By default a tensor that would be written with them is refused "
        "(exit 1, naming the source tensor) and no output is left; `validate` lists them as data.nan / data.inf.",
    ),
    format: OutputFormat = FormatOpt,
    cache_dir: str | None = CacheDirOpt,
    token: str | None = TokenOpt,
) -> None:
    """Turn a PEFT adapter into the fused, stacked, kernel-ready layout, exactly: every slice computes what PEFT
    computed for its source module (rank and alpha patterns and rsLoRA folded into B).

    Example: lora-convert normalize ./my-adapter -o ./my-adapter-stacked --base deepseek-v3
    """
    from lora_convert.api import normalize_adapter

    if output is None and not dry_run:
        raise UsageError("normalize needs an output folder.", hint="Pass -o OUT, or --dry-run to see the plan only.")
    progress = _NormalizeProgress() if sys.stderr.isatty() else None
    try:
        if progress:
            progress.planning()
        result = normalize_adapter(
            adapter,
            output,
            base=base,
            rank=rank,
            dtype=dtype.value,
            dry_run=dry_run,
            force=force,
            drop_unsupported=drop_unsupported,
            cache_dir=cache_dir,
            token=token,
            progress=progress,
            layout=layout,
            allow_non_finite=allow_non_finite,
        )
    finally:
        if progress:
            progress.close()
    for d in result.dropped:
        log(f"dropped {d.module}: {d.reason}")
    for note in result.notes:
        log(f"note: {note}")
    if format is OutputFormat.json:
        doc = result.summary_json()
        if dry_run:
            doc["plan"] = result.plan.layout_json()
            doc["tensors"] = result.tensors_json()
            doc["files"] = result.files
        print_json(doc)
        return
    if dry_run:
        _render_plan(result.plan)
        _render_tensors(result)
    _render_summary(result)


class _NormalizeProgress:
    """stderr feedback on a terminal: a spinner while the plan is built (seconds on a large adapter), then a bar
    over the bytes the plan writes, with rate and ETA. Implements io.output_folder.WriteProgress (start / advance)."""

    def __init__(self, console=None) -> None:
        self._console = console or stderr
        self._status = None
        self._bar = None
        self._task = None

    def planning(self) -> None:
        self._status = self._console.status("planning ...", spinner="dots")
        self._status.start()

    def start(self, total_bytes: int) -> None:
        self._stop_status()
        self._bar = byte_progress("writing", console=self._console)
        self._task = self._bar.add_task("write", total=total_bytes)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, nbytes)

    def close(self) -> None:
        self._stop_status()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def _render_plan(plan) -> None:
    table = Table(title=f"plan: rank {plan.rank}, {len(plan.groups)} groups")
    for col in ("group", "experts", "in", "slices (name:out rank scaling)"):
        table.add_column(col)
    for g in plan.groups:
        parts = []
        for s in g.slices:
            sc = s.scaling_json()
            sc_text = (
                "zero-filled" if s.is_zero_filled else (f"{sc:g}" if isinstance(sc, float) else f"{len(sc)} values")
            )
            parts.append(f"{s.name}:{s.out_features} r{s.rank} {sc_text}")
        missing = f" ({len(g.missing_experts)} missing)" if g.missing_experts else ""
        table.add_row(
            escape(g.key), f"{g.experts}{missing}" if g.experts else "-", str(g.in_features), escape(" | ".join(parts))
        )
    stdout.print(table)


def _render_tensors(result) -> None:
    """Every tensor the output will hold, in file order: what a dry run promises is exactly what is written."""
    stdout.print(f"tensors ({len(result.specs)}, {result.dtype}) and files {', '.join(result.files)}:", soft_wrap=True)
    for spec in result.specs:
        stdout.print(f"  {escape(spec.name)}  {spec.dtype}  {list(spec.shape)}", soft_wrap=True, highlight=False)


def _render_summary(result) -> None:
    s = result.summary_json()
    where = f"wrote {escape(s['output'])}" if s["output"] else "dry run, nothing written"
    stdout.print(
        f"{where}: {s['groups']} groups from {s['source_modules']} source modules, rank {s['rank']}, {s['dtype']}; "
        f"{len(s['zero_filled_slices'])} zero-filled slice(s), {len(s['dropped'])} dropped; "
        f"{s['bytes_in'] / 1e6:.1f} MB in, {s['bytes_out'] / 1e6:.1f} MB out, {s['seconds']:.2f} s",
        soft_wrap=True,  # one line, so that scripts can grep it
    )
