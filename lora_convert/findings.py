"""Findings: what a check found, with a stable code, a severity, the keys involved and expected vs actual.

Every check in lora-convert appends findings instead of raising, so that one run reports every problem.
Codes are stable identifiers (`area.what`); tests and CI users match on them, so never rename one. Findings are
made through `lora_convert.codes.finding`, which takes each code's one severity from the registry there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


SEVERITY_ORDER = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


@dataclass
class Finding:
    code: str
    severity: Severity
    message: str
    keys: list[str] = field(default_factory=list)
    expected: Any = None
    actual: Any = None
    fix: str | None = None  # what to do about it (a flag, a command)

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity.value,
            "message": self.message,
            "keys": list(self.keys),
            "expected": self.expected,
            "actual": self.actual,
            "fix": self.fix,
        }


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity is Severity.ERROR for f in findings)


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity is Severity.ERROR]


def warnings(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity is Severity.WARNING]


def severity_counts(findings: list[Finding]) -> dict[str, int]:
    """{"errors": n, "warnings": n, "infos": n}: the counts a report's summary and verdict show."""
    return {f"{sev.value}s": sum(1 for f in findings if f.severity is sev) for sev in Severity}


def sort_findings(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.code))
