"""The fleet page: one self-contained HTML file of a scan's records (`scan --html`, `report --html`).

No server and no network: the template, styles and script (lora_convert/scan/fleet_page/) are inlined, and the
records travel as one compact JSON document inside the page (script#fleet-data), from which the script renders the
adapters table in chunks, so a 10,000-adapter fleet stays a small file that paints at once. What does not need the
script (totals, the engine matrix, findings by code, the largest and slowest adapters) is written as HTML here.
Every record value is escaped: adapter ids are user input. docs/fleet-page.md describes the page.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from lora_convert.io.report_file import check_report_path, write_report_file
from lora_convert.scan.summary import summarize
from lora_convert.scan.task import STATUSES

__all__ = [
    "COLUMNS",
    "WORST_FIRST",
    "check_page_path",
    "fleet_data",
    "first_finding",
    "render_page",
    "worst_outcome",
    "write_page",
]

# The first bytes of every page: what lets a later run overwrite its own previous page and nothing else.
MARKER = "<!DOCTYPE html>\n<!-- lora-convert fleet page -->"
COLUMNS = ("id", "family", "base", "bytes", "rank", "status", "first_finding", "seconds")
_INTERNED = ("family", "base", "status", "first_finding")  # repeated strings: stored once, rows hold an index
# An adapter's outcome on one engine release is the worst of the outcomes of the rules that fired for it, in this
# order; no rule fired (or only exact ones) is exact. A release not in the record was not checked.
WORST_FIRST = ("load-failure", "wrong", "dropped", "ignored", "needs-flag", "exact")
OUTCOMES = tuple(reversed(WORST_FIRST))  # the matrix columns, best first
UNCHECKED = "unchecked"
TOP = 10  # adapters in the largest / slowest lists
_SEVERITY_ORDER = ("error", "warning", "info")


def worst_outcome(counts: dict[str, int] | None) -> str | None:
    """The outcome an adapter gets for one release from its {outcome: rules fired}: the worst outcome that fired,
    exact when none did; None when the release was not checked (counts is None)."""
    if counts is None:
        return None
    for outcome in WORST_FIRST:
        if counts.get(outcome):
            return outcome
    return "exact"


def first_finding(record: dict[str, Any]) -> str | None:
    """What the table shows as an adapter's problem: the code of its first finding of the worst severity (errors,
    then warnings; notes are not problems), or the type of the error that stopped its scan."""
    findings = record.get("findings") or []
    for severity in _SEVERITY_ORDER[:2]:
        for f in findings:
            if f.get("severity") == severity and f.get("code"):
                return str(f["code"])
    error = record.get("error")
    if isinstance(error, dict) and error.get("type"):
        return str(error["type"])
    return None


def _releases(records: list[dict[str, Any]]) -> list[str]:
    return sorted({name for r in records for name in (r.get("engines") or {})})


def _number(value: Any) -> int | float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def fleet_data(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The page's JSON: one row per record (COLUMNS, then one character per release: the index of its worst outcome
    in `outcomes`, or "-" when not checked), with the repeated strings interned in `strings`."""
    releases = _releases(records)
    strings: list[str] = []
    index: dict[str, int] = {}

    def intern(value: Any) -> int | None:
        if value is None:
            return None
        text = str(value)
        if text not in index:
            index[text] = len(strings)
            strings.append(text)
        return index[text]

    rows = []
    for r in sorted(records, key=lambda r: str(r.get("id"))):
        values = {
            "id": str(r.get("id")),
            "family": r.get("family"),
            "base": r.get("base"),
            "bytes": _number(r.get("bytes")),
            "rank": _number(r.get("rank")),
            "status": r.get("status"),
            "first_finding": first_finding(r),
            "seconds": _number(r.get("seconds")),
        }
        row: list[Any] = [intern(values[c]) if c in _INTERNED else values[c] for c in COLUMNS]
        engines = r.get("engines") or {}
        row.append("".join(_outcome_char(worst_outcome(engines.get(name))) for name in releases))
        rows.append(row)
    return {
        "version": 1,
        "columns": list(COLUMNS),
        "outcomes": list(OUTCOMES),
        "releases": releases,
        "strings": strings,
        "rows": rows,
    }


def _outcome_char(outcome: str | None) -> str:
    return "-" if outcome is None else str(OUTCOMES.index(outcome))


def engine_matrix(records: list[dict[str, Any]]) -> dict[str, Counter]:
    """{release: Counter(worst outcome or "unchecked" -> adapters)} for every release some record was checked for."""
    matrix: dict[str, Counter] = {}
    for name in _releases(records):
        matrix[name] = Counter(worst_outcome((r.get("engines") or {}).get(name)) or UNCHECKED for r in records)
    return matrix


# ------------------------------------------------------------------------------------------------ rendering
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _script_json(document: Any) -> str:
    """JSON that cannot end its <script> element or open a comment: <, > and & as \\u escapes (still the same
    JSON to the parser)."""
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _totals(summary: dict[str, Any]) -> str:
    items = [("adapters", "adapters", summary["adapters"], "")]
    for status in STATUSES:
        n = summary["status"].get(status, 0)
        tone = "good" if status == "ok" else ("bad" if n else "")
        items.append((status, status, n, tone))
    items.append(("bytes", "bytes", summary["bytes"], ""))
    out = []
    for key, label, n, tone in items:
        shown = f' title="{summary["bytes"] / 1e6:.1f} MB"' if key == "bytes" else ""
        out.append(
            f'<div class="total {tone}"><span class="label">{label}</span>'
            f'<span data-total="{key}"{shown}>{int(n)}</span></div>'
        )
    return "\n".join(out)


def _matrix(records: list[dict[str, Any]]) -> str:
    matrix = engine_matrix(records)
    if not matrix:
        return '<p id="engine-matrix-none">No engine release was checked (scan with --engine).</p>'
    columns = (*OUTCOMES, UNCHECKED)
    head = "".join(f'<th class="num">{_e(c)}</th>' for c in columns)
    body = []
    for name, counts in matrix.items():
        cells = "".join(
            f'<td data-outcome="{c}" class="num{"" if counts[c] else " zero"}">{counts[c]}</td>' for c in columns
        )
        body.append(f'<tr data-release="{_e(name)}"><th>{_e(name)}</th>{cells}</tr>')
    return f'<table id="engine-matrix"><thead><tr><th>release</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _codes(summary: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr data-code="{_e(code)}"><td><code>{_e(code)}</code></td><td data-col="severity">{_e(v["severity"])}</td>'
        f'<td data-col="adapters" class="num">{int(v["adapters"])}</td></tr>'
        for code, v in summary["codes"].items()
    )
    return (
        '<table id="findings-by-code"><thead><tr><th>code</th><th>severity</th><th class="num">adapters</th></tr>'
        f"</thead><tbody>{rows}</tbody></table>"
    )


def _top(records: list[dict[str, Any]], key: str, element_id: str, unit) -> str:
    ranked = sorted(
        (r for r in records if _number(r.get(key)) is not None),
        key=lambda r: (-r[key], str(r.get("id"))),
    )[:TOP]
    items = "".join(
        f'<li data-id="{_e(r.get("id"))}">{_e(r.get("id"))} <span>{unit(r[key])}</span></li>' for r in ranked
    )
    return f'<ol id="{element_id}">{items}</ol>'


def _asset(name: str) -> str:
    return (resources.files("lora_convert.scan") / "fleet_page" / name).read_text(encoding="utf-8")


def render_page(
    records: list[dict[str, Any]],
    *,
    complete: bool = True,
    discovered: int | None = None,
    source: str | None = None,
) -> str:
    """The page of `records` (scan records, old reports' included: missing keys are unknown). `complete`: False for
    an interrupted scan (the page says so, and how many adapters were found); `source`: what the records were read
    from, shown under the title."""
    from lora_convert import __version__

    summary = summarize(records, complete=complete)
    banner = ""
    if not complete:
        of = f" of {discovered}" if discovered is not None else ""
        banner = (
            f'<p class="banner" id="incomplete">This scan is incomplete: {len(records)}{of} adapters have a record; '
            "the others were not checked (run the scan again with --resume).</p>"
        )
    meta = f"{len(records)} adapters" + (f" from {source}" if source else "")
    status_options = '<option value="">all statuses</option>' + "".join(
        f'<option value="{s}">{s}</option>' for s in STATUSES
    )
    parts = {
        "version": _e(__version__),
        "title": "lora-convert fleet report" + ("" if complete else " (incomplete)"),
        "meta": _e(meta),
        "banner": banner,
        "totals": _totals(summary),
        "matrix": _matrix(records),
        "status_options": status_options,
        "adapters": str(len(records)),
        "codes": _codes(summary),
        "largest": _top(records, "bytes", "largest", lambda n: f"{n / 1e6:.1f} MB"),
        "slowest": _top(records, "seconds", "slowest", lambda n: f"{n:.2f} s"),
        "css": _asset("fleet.css"),
        "js": _asset("fleet.js"),
        "data": _script_json(fleet_data(records)),
    }
    # One pass over the template: a value that happens to contain "@@name@@" (an adapter id) is never substituted.
    return re.sub(r"@@(\w+)@@", lambda m: parts[m[1]], _asset("fleet.html"))


# ------------------------------------------------------------------------------------------------- writing
def _is_fleet_page(path: Path) -> bool:
    """Whether `path` begins as every page render_page writes does."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MARKER.encode())) == MARKER.encode()
    except OSError:
        return False


def check_page_path(path: str | os.PathLike, *, keep: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an --html path the page may not replace (lora_convert/io/report_file.py): anything but a previous
    fleet page, or one of `keep` (the report). Raises UsageError."""
    return check_report_path(path, option="--html", kind="fleet page", is_ours=_is_fleet_page, protected=keep)


def write_page(page: str, path: str | os.PathLike, *, keep: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write `page` to `path` atomically; what it may replace: check_page_path."""
    return write_report_file(page.encode("utf-8"), check_page_path(path, keep=keep), option="--html")
