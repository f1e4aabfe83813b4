"""The `data` check: dtypes from the headers (always), and with the data scan (`--data`, the default) NaN/Inf,
all-zero B and magnitude outliers, streamed one tensor at a time (lora_convert/check/data_scan.py)."""

from __future__ import annotations

from lora_convert.check.context import Check, CheckContext, Outcome
from lora_convert.check.data_scan import dtype_findings, scan_adapter
from lora_convert.codes import finding
from lora_convert.engines.profiles import row_energy_modules
from lora_convert.findings import Finding

NORMALIZE_REPORT = "lora_convert_report.json"


def run(ctx: CheckContext) -> Outcome:
    found = dtype_findings(ctx.adapter.index)
    if not ctx.options.data_scan:
        return Outcome(found, skipped="--no-data")
    rows = row_energy_modules(ctx.adapter, ctx.arch) if ctx.options.engine != "none" else ()
    ctx.scan = scan_adapter(ctx.adapter, progress=ctx.options.progress, row_energy_modules=rows)
    listed_in = _zero_fills_listed_in(ctx)
    for f in ctx.scan.findings:
        found.append(_as_zero_fill(f, listed_in) if listed_in and f.code == "data.zero-b" else f)
    return Outcome(found)


CHECK = Check("data", run)


def _zero_fills_listed_in(ctx: CheckContext) -> str | None:
    """The file where `normalize` listed the zero fills it wrote on purpose, if this adapter is its output."""
    if ctx.stacked:
        return "lora_layout.json"
    return NORMALIZE_REPORT if (ctx.adapter.path / NORMALIZE_REPORT).exists() else None


def _as_zero_fill(zero_b: Finding, listed_in: str) -> Finding:
    """`data.zero-b` on a normalize output: the expected zeros of its fills, `data.zero-fill`."""
    count = zero_b.message.split(" lora_B", 1)[0]  # "N of M"
    return finding(
        "data.zero-fill",
        f"{count} lora_B tensor(s) are all zero: the zero fills lora-convert normalize wrote for slices the adapter "
        f"did not have, listed in {listed_in}.",
        keys=zero_b.keys,
        expected=zero_b.expected,
        actual=zero_b.actual,
    )
