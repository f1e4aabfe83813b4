"""A scan's records (lora_convert/scan/task.py) as one SARIF 2.1.0 log, through the one builder,
lora_convert/check/sarif.py.

A record's findings carry `keys` since issue 27 (at most 20 per finding); a record of an older report has none,
and its findings are then located at the adapter's config. An adapter that could not be scanned (status error,
crashed, timeout) is a tool execution notification.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lora_convert.check.sarif import SarifAdapter, sarif_log
from lora_convert.errors import UsageError

_NOT_SCANNED = ("error", "crashed", "timeout")


def _folder(record: dict[str, Any]) -> Path | None:
    spec = record.get("adapter")
    if not isinstance(spec, str) or not spec:
        return None
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def record_adapter(record: dict[str, Any]) -> SarifAdapter:
    name = str(record.get("id") or record.get("adapter"))
    error = None
    if record.get("status") in _NOT_SCANNED:
        why = record.get("error") or {}
        error = f"{record['status']}: {why.get('message') if isinstance(why, dict) else why}"
    findings = [f for f in record.get("findings") or [] if isinstance(f, dict) and isinstance(f.get("code"), str)]
    return SarifAdapter(name, _folder(record), findings, error)


def records_sarif(records: list[dict[str, Any]], *, cwd: Path | None = None) -> dict[str, Any]:
    """The SARIF log of a scan: one result per finding of every record."""
    return sarif_log([record_adapter(r) for r in records], cwd=cwd)


def report_file_sarif(path: str | os.PathLike, *, cwd: Path | None = None) -> dict[str, Any]:
    """The SARIF log of an existing JSONL report (`scan --output`; a resumed or interrupted one's complete lines).
    Adapter folders are found as the scan named them, so run it where the scan ran. Raises UsageError."""
    from lora_convert.scan.report import read_report

    if not Path(path).is_file():
        raise UsageError(f"No report at {path}.", hint="Pass the JSONL file `lora-convert scan --output` wrote.")
    records, _ = read_report(path)
    return records_sarif(records, cwd=cwd)
