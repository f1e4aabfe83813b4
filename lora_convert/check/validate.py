"""`lora-convert validate`: every check on one adapter, in one library call.

`run_checks` never stops at the first problem: it reads the adapter, resolves the base model once, then runs
the checks of `CHECKS` in order; each returns its findings and says whether it ran (and why not), which is what the
verdict line and `summary.checks` report. The report's verdict is "no error" (and, with `strict`, "no warning").
Only problems that leave nothing to check raise: a usage error (no such folder, a malformed Hub id, an explicit
--base that names nothing, bad flags: exit 2) or an environment problem (the Hub unreachable for a Hub id: exit 3).
A malformed adapter file is a finding (`files.unreadable` / `config.unreadable`), so CI gets a report and an
annotation for it like for anything else. docs/validate.md lists every check and code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from lora_convert.check import config, data, engine, keys, moe, pairs, shapes, sharding, smoke
from lora_convert.check.base import resolve_adapter_base
from lora_convert.check.context import DEVICES, CheckContext, ValidateOptions
from lora_convert.check.report import ValidationReport, checks_sentence, finish
from lora_convert.codes import finding
from lora_convert.errors import AdapterConfigError, AdapterFormatError, UsageError
from lora_convert.io.source import AdapterSource, resolve_adapter_source
from lora_convert.peft.adapter import load_adapter

# The checks in the order they run: smoke looks at the findings of those before it; engine uses the data scan.
CHECKS = tuple(m.CHECK for m in (config, keys, pairs, shapes, moe, data, sharding, smoke, engine))
CHECK_NAMES = tuple(c.name for c in CHECKS)

__all__ = ["CHECKS", "CHECK_NAMES", "DEVICES", "ValidationReport", "checks_sentence", "run_checks"]


def run_checks(
    spec: str | Path | AdapterSource,
    *,
    base: str | None = None,
    engine: str = "none",
    tp: int | None = None,
    ep: int | None = None,
    data_scan: bool = True,
    smoke: bool | None = None,
    device: str = "auto",
    strict: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    allow_unchecked: bool = False,
    checks: Collection[str] | None = None,
) -> ValidationReport:
    """Run every check on one adapter and return the report (never raises for a problem *in* the adapter).

    `allow_unchecked`: a check that was asked for and could not run is a warning (`shapes.unchecked-allowed`,
    `engine-rules.unchecked-allowed`) instead of an error (`shapes.unchecked`, `engine-rules.unchecked`; see
    lora_convert.check.context.not_checked). `checks`: run only these check groups (CHECK_NAMES; `scan --checks`);
    the others are reported as skipped, "not selected by --checks", so the verdict never claims them.
    """
    unknown = sorted(set(checks or ()) - set(CHECK_NAMES))
    if unknown:
        raise UsageError(
            f"Unknown check group(s): {', '.join(unknown)}.", hint=f"Use some of: {', '.join(CHECK_NAMES)}."
        )
    started = time.monotonic()
    options = ValidateOptions(
        base=base,
        engine=(engine or "none").lower(),
        tp=tp,
        ep=ep,
        data_scan=data_scan,
        smoke=smoke,
        device=device,
        progress=progress,
        cache_dir=cache_dir,
        token=token,
        allow_unchecked=bool(allow_unchecked),
    )
    source = (
        spec if isinstance(spec, AdapterSource) else resolve_adapter_source(str(spec), cache_dir=cache_dir, token=token)
    )
    report = ValidationReport(
        adapter=source.describe(),
        adapter_path=str(source.path),
        base=None,
        engine=options.engine,
        strict=strict,
        allow_unchecked=options.allow_unchecked,
    )
    try:
        adapter = load_adapter(source, strict_config=False)
    except AdapterConfigError as exc:
        report.findings.append(finding("config.unreadable", exc.message, keys=["adapter_config.json"], fix=exc.hint))
        return finish(report, started, {"checks": _nothing_ran("adapter_config.json unreadable")})
    except AdapterFormatError as exc:
        report.findings.append(finding("files.unreadable", exc.message, fix=exc.hint))
        return finish(report, started, {"checks": _nothing_ran("adapter files unreadable")})

    resolution = resolve_adapter_base(adapter, base, cache_dir=cache_dir, token=token)
    report.base = resolution.name
    ctx = CheckContext(adapter, options, resolution, findings=report.findings)
    report.findings.extend(resolution.findings)
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
