"""Findings: what a check found, with a stable code, a severity, the keys involved and expected vs actual.

Every check in lora-convert appends findings instead of raising, so that one run reports every problem.
Codes are stable identifiers (`area.what`); tests and CI users match on them, so never rename one.
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


def error(code: str, message: str, **kw: Any) -> Finding:
    return Finding(code, Severity.ERROR, message, **kw)


def warning(code: str, message: str, **kw: Any) -> Finding:
    return Finding(code, Severity.WARNING, message, **kw)


def info(code: str, message: str, **kw: Any) -> Finding:
    return Finding(code, Severity.INFO, message, **kw)


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity is Severity.ERROR for f in findings)


def sort_findings(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.code))
