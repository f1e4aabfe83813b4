"""The fleet summary of a scan report: by status, by family, by finding code, by engine outcome, worst adapters.

Built from the records alone (lora_convert/scan/task.py), so a summary of a report read back from disk equals the
summary of the scan that wrote it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from lora_convert.scan.task import FAILING, STATUSES

WORST = 10  # adapters listed as the worst
NORMALIZE_OUTCOMES = ("converted", "skipped", "failed")
_STATUS_RANK = {"crashed": 0, "timeout": 1, "error": 2, "findings": 3, "ok": 4}

__all__ = ["NORMALIZE_OUTCOMES", "WORST", "normalize_outcome", "summarize"]


def _counts(record: dict[str, Any]) -> tuple[int, int]:
    findings = record.get("findings") or []
    return (
        sum(1 for f in findings if f.get("severity") == "error"),
        sum(1 for f in findings if f.get("severity") == "warning"),
    )


def normalize_outcome(record: dict[str, Any]) -> str:
    """What --normalize did with one adapter: converted; skipped (it has errors the layout does not fix); failed
    (the converter refused it, or it could not be scanned: crashed, timed out, unreadable)."""
    norm = record.get("normalize") or {}
    if norm.get("output"):
        return "converted"
    return "skipped" if norm.get("skipped") else "failed"


def summarize(
    records: list[dict[str, Any]], *, worst: int = WORST, complete: bool = True, normalizing: bool | None = None
) -> dict[str, Any]:
    """One JSON-able document: totals, and the tables the human summary prints. `complete`: False for an
    interrupted scan, which is never ok (the adapters without a record were not checked). `normalizing`: whether
    the scan ran with --normalize (None: whether any record has a conversion)."""
    if normalizing is None:
        normalizing = any(r.get("normalize") is not None for r in records)
    status = Counter(r.get("status") for r in records)
    families: dict[str, Counter] = defaultdict(Counter)
    codes: dict[str, dict[str, Any]] = {}
    outcomes: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        fam = families[r.get("family") or "(unknown)"]
        fam["adapters"] += 1
        fam[r.get("status") or "?"] += 1
        fam["bytes"] += r.get("bytes") or 0
        for code in sorted({f["code"] for f in r.get("findings") or []}):
            entry = codes.setdefault(code, {"severity": None, "adapters": 0})
            entry["adapters"] += 1
        for f in r.get("findings") or []:
            codes[f["code"]]["severity"] = f.get("severity")
        for outcome, n in (r.get("engine_outcomes") or {}).items():
            outcomes[outcome]["adapters"] += 1
            outcomes[outcome]["rules"] += n
    ranked = sorted(
        (r for r in records if r.get("status") != "ok"),
        key=lambda r: (_STATUS_RANK.get(r.get("status"), 5), -_counts(r)[0], -_counts(r)[1], r.get("id", "")),
    )
    normalized = Counter(normalize_outcome(r) for r in records) if normalizing else None
    return {
        "ok": complete and not any(status[s] for s in FAILING),
        "complete": complete,
        "adapters": len(records),
        "status": {s: status[s] for s in STATUSES if status[s]},
        "bytes": sum(r.get("bytes") or 0 for r in records),
        "seconds": round(sum(r.get("seconds") or 0.0 for r in records), 3),
        "families": {
            name: {"adapters": c["adapters"], **{s: c[s] for s in STATUSES if c[s]}, "bytes": c["bytes"]}
            for name, c in sorted(families.items())
        },
        "codes": dict(sorted(codes.items(), key=lambda kv: (-kv[1]["adapters"], kv[0]))),
        "engine_outcomes": {k: dict(v) for k, v in sorted(outcomes.items())},
        # only with --normalize: a scan that converted nothing must not read as one that was not asked to
        "normalize": {k: normalized[k] for k in NORMALIZE_OUTCOMES} if normalized is not None else None,
        "worst": [
            {
                "id": r.get("id"),
                "status": r.get("status"),
                "errors": _counts(r)[0],
                "warnings": _counts(r)[1],
                "codes": sorted({f["code"] for f in r.get("findings") or [] if f.get("severity") == "error"})
                or ([r["error"]["type"]] if r.get("error") else []),
            }
            for r in ranked[:worst]
        ],
    }
