"""The result of `validate`: the findings, the verdict, the summary and the exit code of one adapter."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lora_convert.errors import EXIT_FINDINGS, EXIT_OK
from lora_convert.findings import Finding, errors, severity_counts, sort_findings, warnings

JSON_SCHEMA_VERSION = 1


@dataclass
class ValidationReport:
    adapter: str  # what identifies the adapter (folder or Hub id)
    adapter_path: str | None  # the local folder that was read
    base: str | None  # the base model that was checked against (None: unresolved)
    engine: str
    findings: list[Finding] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    strict: bool = False
    allow_unchecked: bool = False

    @property
    def errors(self) -> list[Finding]:
        return errors(self.findings)

    @property
    def warnings(self) -> list[Finding]:
        return warnings(self.findings)

    @property
    def exit_code(self) -> int:
        """The CLI's exit code for this report: 0 when ok, 1 when the adapter has errors (or warnings under strict)."""
        return EXIT_OK if self.ok else EXIT_FINDINGS

    def verdict(self) -> str:
        s = self.summary
        counts = f"{s.get('errors', 0)} error(s), {s.get('warnings', 0)} warning(s), {s.get('infos', 0)} note(s)"
        against = f" against {self.base}" if self.base else " (not checked against a base model)"
        engine = f", engine {self.engine}" if self.engine != "none" else ""
        if self.ok:
            head = "OK"
        else:
            head = "FAIL (errors)" if s.get("errors") else "FAIL (warnings under --strict)"
        return f"{head}: {self.adapter}{against}{engine}: {counts}.{checks_sentence(s.get('checks') or {})}"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": JSON_SCHEMA_VERSION,
            "ok": self.ok,
            "adapter": self.adapter,
            "adapter_path": self.adapter_path,
            "base": self.base,
            "engine": self.engine,
            "strict": self.strict,
            "allow_unchecked": self.allow_unchecked,
            "verdict": self.verdict(),
            "findings": [f.to_json() for f in self.findings],
            "summary": self.summary,
        }


def checks_sentence(checks: dict[str, Any]) -> str:
    """ " Checked: a, b. Not run: c (why)." from summary.checks, so a reader sees what an OK covers."""
    ran = checks.get("run") or []
    skipped = checks.get("skipped") or {}
    text = f" Checked: {', '.join(ran)}." if ran else " Checked: nothing."
    if skipped:
        text += " Not run: " + ", ".join(f"{name} ({why})" for name, why in skipped.items()) + "."
    return text


def _dedupe(findings: list[Finding]) -> list[Finding]:
    """One finding per (code, keys): a problem seen by two checks (e.g. the adapter model and a check) counts once."""
    seen: set[tuple] = set()
    out = []
    for f in findings:
        ident = (f.code, tuple(f.keys)) if f.keys else (f.code, f.message)
        if ident in seen:
            continue
        seen.add(ident)
        out.append(f)
    return out


def finish(report: ValidationReport, started: float, extra: dict[str, Any]) -> ValidationReport:
    """Sort and count the findings, set the verdict and the summary."""
    report.findings = sort_findings(_dedupe(report.findings))
    counts = severity_counts(report.findings)
    report.ok = counts["errors"] == 0 and not (report.strict and counts["warnings"])
    report.summary = {
        **counts,
        "codes": dict(sorted(Counter(f.code for f in report.findings).items())),
        **extra,
        "seconds": round(time.monotonic() - started, 3),
    }
    return report
