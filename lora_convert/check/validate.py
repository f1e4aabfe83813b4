"""`lora-convert validate`: every check on one adapter, in one library call.

`run_checks` never stops at the first problem: given the prepared adapter (read once, its base resolved once:
lora_convert/pipeline/prepared.py), it runs the checks of `CHECKS` in order; each returns its findings and says
whether it ran (and why not), which is what the verdict line and `summary.checks` report. The report's verdict is
"no error" (and, with `strict`, "no warning"). Only problems that leave nothing to check raise: a usage error (no
such folder, a malformed Hub id, an explicit --base that names nothing, bad flags: exit 2) or an environment
problem (the Hub unreachable for a Hub id: exit 3). A malformed adapter file is a finding (`files.unreadable` /
`config.unreadable`, `unreadable_report`), so CI gets a report and an annotation for it like for anything else.
docs/validate.md lists every check and code.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from lora_convert.check import config, data, engine, keys, moe, pairs, shapes, sharding, smoke
from lora_convert.check.context import DEVICES, CheckContext, ValidateOptions
from lora_convert.check.report import ValidationReport, checks_sentence, finish
from lora_convert.codes import finding
from lora_convert.errors import AdapterConfigError, AdapterFormatError, UsageError
from lora_convert.io.source import AdapterSource

# The checks in the order they run: smoke looks at the findings of those before it; engine uses the data scan.
CHECKS = tuple(m.CHECK for m in (config, keys, pairs, shapes, moe, data, sharding, smoke, engine))
CHECK_NAMES = tuple(c.name for c in CHECKS)

__all__ = [
    "CHECKS",
    "CHECK_NAMES",
    "DEVICES",
    "ValidateOptions",
    "ValidationReport",
    "checks_sentence",
    "known_check_names",
    "run_checks",
    "unreadable_report",
]


def known_check_names(checks: Collection[str] | None) -> None:
    """Raise UsageError for a check group that does not exist (`scan --checks`)."""
    unknown = sorted(set(checks or ()) - set(CHECK_NAMES))
    if unknown:
        raise UsageError(
            f"Unknown check group(s): {', '.join(unknown)}.", hint=f"Use some of: {', '.join(CHECK_NAMES)}."
        )


def run_checks(
    prepared, options: ValidateOptions, *, strict: bool = False, checks: Collection[str] | None = None
) -> ValidationReport:
    """Run every check on one prepared adapter (lora_convert.pipeline.prepared.PreparedAdapter) and return the report
    (never raises for a problem *in* the adapter; an explicit --base that names nothing raises).

    `options.allow_unchecked`: a check that was asked for and could not run is a warning (`shapes.unchecked-allowed`,
    `engine-rules.unchecked-allowed`) instead of an error (`shapes.unchecked`, `engine-rules.unchecked`; see
    lora_convert.check.context.not_checked). `checks`: run only these check groups (CHECK_NAMES; `scan --checks`);
    the others are reported as skipped, "not selected by --checks", so the verdict never claims them.
    """
    known_check_names(checks)
    started = time.monotonic()
    report = _new_report(prepared.source, options, strict)
    ctx = CheckContext(prepared, options, findings=report.findings)
    report.base = ctx.base.name
    report.findings.extend(ctx.base.findings)
    ran: list[str] = []
    skipped: dict[str, str] = {}
    for check in CHECKS:
        if checks is not None and check.name not in checks:
            skipped[check.name] = "not selected by --checks"
            continue
        outcome = check.run(ctx)
        report.findings.extend(outcome.findings)
        if outcome.skipped is None:
            ran.append(check.name)
        else:
            skipped[check.name] = outcome.skipped
    return finish(report, started, _summary(ctx, {"run": ran, "skipped": skipped}))


def unreadable_report(
    source: AdapterSource, options: ValidateOptions, problem: AdapterConfigError | AdapterFormatError, *, strict: bool
) -> ValidationReport:
    """The report of an adapter whose files could not be read: one finding (`config.unreadable` or
    `files.unreadable`), every check listed as not run, so CI gets a report and an annotation like for any other
    problem."""
    started = time.monotonic()
    report = _new_report(source, options, strict)
    if isinstance(problem, AdapterConfigError):
        report.findings.append(
            finding("config.unreadable", problem.message, keys=["adapter_config.json"], fix=problem.hint)
        )
        return finish(report, started, {"checks": _nothing_ran("adapter_config.json unreadable")})
    report.findings.append(finding("files.unreadable", problem.message, fix=problem.hint))
    return finish(report, started, {"checks": _nothing_ran("adapter files unreadable")})


def _new_report(source: AdapterSource, options: ValidateOptions, strict: bool) -> ValidationReport:
    return ValidationReport(
        adapter=source.describe(),
        adapter_path=str(source.path),
        base=None,
        engine=options.engine,
        strict=strict,
        allow_unchecked=options.allow_unchecked,
    )


def _nothing_ran(why: str) -> dict[str, Any]:
    return {"run": [], "skipped": {name: why for name in CHECK_NAMES}}


def _summary(ctx: CheckContext, checks: dict[str, Any]) -> dict[str, Any]:
    adapter, cfg = ctx.adapter, ctx.adapter.config
    return {
        "adapter": {
            "files": [p.name for p in adapter.files],
            "file_format": adapter.file_format,
            "layout": "stacked" if ctx.stacked else "peft",
            "tensors": len(adapter.index),
            "modules": len(adapter.modules),
            "bytes": adapter.total_bytes,
            "parameters": adapter.total_params,
            "expert_layout": adapter.expert_layout,
            "r": None if "r" in cfg.invalid else cfg.r,
            "lora_alpha": None if "lora_alpha" in cfg.invalid else cfg.lora_alpha,
        },
        "base_origin": ctx.base.config.origin if ctx.base.config is not None else None,
        "family": getattr(ctx.arch, "family", None),
        "checks": checks,
        "data_scan": ctx.scan.summary() if ctx.scan is not None else None,
    }
