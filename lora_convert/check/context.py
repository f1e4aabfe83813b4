"""What every check of `validate` is given, and what it gives back.

A check is a name and a function `run(ctx) -> Outcome`. `run_checks` (lora_convert/check/validate.py) runs them in the order of
`lora_convert.check.validate.CHECKS`; each returns its findings and, when it did not run, why not (the verdict line
and `summary.checks` are built from those answers, so a report never claims a check it skipped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lora_convert.check.base_resolution import BaseResolution
from lora_convert.codes import PEFT_LAYOUT_CODES, check_of
from lora_convert.errors import InternalError, UsageError
from lora_convert.findings import Finding

DEVICES = ("auto", "cpu", "cuda")
MAX_KEYS = 50  # keys listed per finding


@dataclass(frozen=True)
class ValidateOptions:
    """The caller's choices, checked once (a bad value is a UsageError, exit 2)."""

    base: str | None = None
    engine: str = "none"
    tp: int | None = None
    ep: int | None = None
    data_scan: bool = True
    smoke: bool | None = None  # None: on where it is cheap
    device: str = "auto"
    progress: Callable[[int, int], None] | None = None
    cache_dir: Any = None
    token: str | None = None
    allow_unchecked: bool = False
    # the server's flags (lora_convert.engines.server_args.ServerArgs, parsed for `engine`); None: none given, the
    # release's defaults are assumed
    server_args: Any = None

    def __post_init__(self) -> None:
        if self.engine != "none":
            from lora_convert.engines.rules import resolve_engine

            resolve_engine(self.engine)  # UsageError naming the engines and releases that have rules
        if self.device not in DEVICES:
            raise UsageError(f"Unknown device {self.device!r}.", hint=f"Use one of: {', '.join(DEVICES)}.")
        for name, value in (("--tp", self.tp), ("--ep", self.ep)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UsageError(f"{name} must be a positive integer, got {value!r}.")
        if self.server_args is not None and self.server_args.release.spec != _release_spec(self.engine):
            raise UsageError(f"The server flags were read for {self.server_args.release.spec}, not {self.engine}.")
        if self.server_args is not None and self.server_args.tp not in (None, self.tp):
            raise UsageError(
                f"--tp {self.tp} and the server's tensor-parallel size {self.server_args.tp} differ.",
                hint="Give the tensor-parallel size once (in the server flags, or as --tp), as the server runs.",
            )


def _release_spec(engine: str) -> str | None:
    from lora_convert.engines.rules import resolve_engine

    return resolve_engine(engine).spec if engine != "none" else None


@dataclass
class CheckContext:
    # lora_convert.pipeline.prepared.PreparedAdapter: the adapter read once, its base, shape findings and plans
    prepared: Any
    options: ValidateOptions
    findings: list[Finding] = field(default_factory=list)  # what the checks before this one found
    scan: Any = None  # the data scan (lora_convert.check.data_scan.DataScanResult), once the data check ran

    @property
    def adapter(self):  # lora_convert.peft.adapter.Adapter
        return self.prepared.adapter

    @property
    def base(self) -> BaseResolution:
        return self.prepared.base

    @property
    def shape_findings(self) -> list[Finding]:
        return self.prepared.shape_findings

    @property
    def arch(self):
        return self.base.arch

    @property
    def text_config(self) -> dict:
        return self.base.text_config

    @property
    def stacked(self) -> bool:
        """A stacked output of `normalize` (lora_layout.json): checked against its own layout file."""
        return self.adapter.stacked_layout is not None


@dataclass
class Outcome:
    findings: list[Finding] = field(default_factory=list)
    skipped: str | None = None  # why the check did not run; None: it ran


ACCEPTED = "; accepted with --allow-unchecked"


def unchecked_text(allowed: bool, message: str, fix: str) -> dict[str, str]:
    """The message and fix of a `*.unchecked` / `*.unchecked-allowed` finding (see `not_checked`)."""
    if allowed:
        return {"message": message + " Accepted with --allow-unchecked.", "fix": fix + "."}
    return {"message": message, "fix": fix + "; --allow-unchecked accepts the adapter without this check."}


def not_checked(ctx: CheckContext, why: str, gap: Finding, findings=()) -> Outcome:
    """A check that was asked for and could not run (or not in full) is never a pass: it reports `gap`, the error
    `<area>.unchecked` or, with --allow-unchecked, the warning `<area>.unchecked-allowed` (both registered in
    lora_convert/codes.py; the caller names them as literals, with `unchecked_text` for the wording), and is listed
    as not run, with `why`. A check the caller turned off (--no-data, --engine none, --no-smoke) is a plain
    `Outcome(skipped=...)` instead. `findings`: what the check found before it had to stop."""
    allowed = ctx.options.allow_unchecked
    if not gap.code.endswith(".unchecked-allowed" if allowed else ".unchecked"):
        raise InternalError(f"{gap.code} is not the unchecked finding for allow_unchecked={allowed}.")
    return Outcome([*findings, gap], skipped=why + (ACCEPTED if allowed else ""))


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[CheckContext], Outcome]


def adapter_findings(ctx: CheckContext, group: str) -> list[Finding]:
    """The findings made while the adapter was read (lora_convert/peft/adapter.py and peft/config.py) that check
    `group` reports: each code's check is written in the codes registry (lora_convert/codes.py `check_of`).

    A stacked output's factors are not PEFT's per-module A/B pairs; its rank and shape findings are replaced by the
    checks against lora_layout.json (lora_convert/check/shapes.py)."""
    return [
        f
        for f in ctx.adapter.findings
        if check_of(f.code) == group and not (ctx.stacked and f.code in PEFT_LAYOUT_CODES)
    ]
