"""The fleet page (lora_convert/scan/fleet.py) without a browser: the numbers it embeds and writes equal the records,
every record value is escaped, old reports render, the page is written atomically and replaces only a previous page,
and `lora-convert report` / `scan --html` take the paths and exit codes of the README's table.
The browser side (sorting, filtering, what is shown) is tests/test_fleet_page_browser.py."""

from __future__ import annotations

import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lora_convert.errors import UsageError
from lora_convert.scan.fleet import render_page, write_page

HOSTILE = 'team/x</script><img src=x onerror="alert(1)">&amp;<!--'


def _record(ident, status="ok", *, family="llama", bytes_=1000, seconds=0.5, rank=8, findings=(), engines=None, **kw):
    record = {
        "id": ident,
        "adapter": f"/reg/{ident}",
        "status": status,
        "family": family,
        "base": "meta-llama/Llama-3.1-8B",
        "rank": rank,
        "findings": [{"code": c, "severity": s, "message": "m", "keys": []} for c, s in findings],
        "engines": engines if engines is not None else {},
        "seconds": seconds,
        "bytes": bytes_,
        "error": None,
    }
    record.update(kw)
    return record


RECORDS = [
    _record("a/clean", bytes_=5000, seconds=0.2, engines={"vllm==0.33.0": {}, "sglang==0.5.23": {}}),
    _record(
        "a/wrong",
        "findings",
        bytes_=9000,
        seconds=3.0,
        findings=[("engine.sglang.x", "error"), ("data.zero-b", "warning")],
        engines={"vllm==0.33.0": {"needs-flag": 1}, "sglang==0.5.23": {"wrong": 1, "dropped": 2}},
    ),
    _record(
        "b/load",
        "findings",
        family="mixtral",
        bytes_=7000,
        seconds=1.0,
        findings=[("data.zero-b", "warning"), ("data.nan", "error")],
        engines={"vllm==0.33.0": {"load-failure": 1, "exact": 3}, "sglang==0.5.23": None},
    ),
    _record("b/dead", "crashed", family=None, rank=None, bytes_=0, seconds=0.0, error={"type": "WorkerCrashed"}),
    _record(HOSTILE, "timeout", family=HOSTILE, bytes_=100, seconds=9.5, engines={"vllm==0.33.0": {"ignored": 2}}),
]


class _Elements(HTMLParser):
    """Every element's attributes and text, in document order (enough for the page's flat elements)."""

    def __init__(self):
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.scripts: list[tuple[dict, str]] = []

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, **{k: v for k, v in attrs}, "text": ""}
        self.elements.append(element)
        if tag not in ("meta", "input", "br"):
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open:
            element = self._open.pop()
            if element["tag"] == tag:
                if tag == "script":
                    self.scripts.append((element, element["text"]))
                break

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data

    def find(self, **attrs) -> list[dict]:
        return [e for e in self.elements if all(e.get(k) == v for k, v in attrs.items())]


def _parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    return parser


def _data(page: str) -> dict:
    (script,) = re.findall(r'<script type="application/json" id="fleet-data">(.*?)</script>', page, re.S)
    return json.loads(script)


def _rows(data: dict) -> list[dict]:
    interned = {"family", "base", "status", "first_finding"}
    out = []
    for row in data["rows"]:
        values, eo = row[:-1], row[-1]
        item = {
            c: data["strings"][v] if c in interned and v is not None else v
            for c, v in zip(data["columns"], values, strict=True)
        }
        item["eo"] = eo
        out.append(item)
    return out


def test_the_embedded_json_holds_every_record():
    rows = {r["id"]: r for r in _rows(_data(render_page(RECORDS)))}
    assert set(rows) == {r["id"] for r in RECORDS}
    for record in RECORDS:
        row = rows[record["id"]]
        for key in ("family", "base", "bytes", "rank", "status", "seconds"):
            assert row[key] == record[key], (record["id"], key)
    assert rows["a/wrong"]["first_finding"] == "engine.sglang.x"  # the first error, not the first finding
    assert rows["b/load"]["first_finding"] == "data.nan"
    assert rows["b/dead"]["first_finding"] == "WorkerCrashed"
    assert rows["a/clean"]["first_finding"] is None


def test_totals_equal_the_records():
    page = _parse(render_page(RECORDS))
    status = Counter(r["status"] for r in RECORDS)
    expected = {"adapters": len(RECORDS), "bytes": sum(r["bytes"] for r in RECORDS)}
    expected.update({s: status[s] for s in ("ok", "findings", "error", "crashed", "timeout")})
    for key, n in expected.items():
        (element,) = page.find(**{"data-total": key})
        assert element["text"] == str(n), key


def test_the_engine_matrix_counts_each_adapters_worst_outcome():
    page = _parse(render_page(RECORDS))
    expected = {
        # clean: exact; wrong: needs-flag; load: load-failure (worse than exact); dead: not checked; hostile: ignored
        "vllm==0.33.0": {"exact": 1, "needs-flag": 1, "load-failure": 1, "ignored": 1, "unchecked": 1},
        # wrong beats dropped; b/load's null: asked for, not evaluated
        "sglang==0.5.23": {"exact": 1, "wrong": 1, "unchecked": 3},
    }
    rows = page.find(tag="tr")
    assert {r["data-release"] for r in rows if "data-release" in r} == set(expected)
    cells = [e for e in page.elements if e["tag"] == "td" and "data-outcome" in e]
    assert len(cells) == 2 * 7
    # cells follow their row: 7 per release, in the order the releases' rows appear
    releases = [r["data-release"] for r in rows if "data-release" in r]
    for i, release in enumerate(releases):
        got = {c["data-outcome"]: int(c["text"]) for c in cells[7 * i : 7 * i + 7]}
        assert got == {o: expected[release].get(o, 0) for o in got}, release
        assert sum(got.values()) == len(RECORDS)
    # and the JSON lets the script find exactly those adapters
    data = _data(render_page(RECORDS))
    i = data["releases"].index("vllm==0.33.0")
    load = [r["id"] for r in _rows(data) if r["eo"][i] == str(data["outcomes"].index("load-failure"))]
    assert load == ["b/load"]


def test_findings_by_code_count_adapters():
    page = _parse(render_page(RECORDS))
    adapters = Counter(c for r in RECORDS for c in {f["code"] for f in r["findings"]})
    rows = page.find(tag="tr")
    shown = {r["data-code"]: r for r in rows if "data-code" in r}
    assert set(shown) == set(adapters)
    cells = [e for e in page.elements if e.get("data-col") == "adapters"]
    assert {c: int(cells[i]["text"]) for i, c in enumerate(shown)} == dict(adapters)
    assert adapters["data.zero-b"] == 2


def test_largest_and_slowest():
    page = _parse(render_page(RECORDS))
    by_bytes = [r["id"] for r in sorted(RECORDS, key=lambda r: -r["bytes"])]
    by_seconds = [r["id"] for r in sorted(RECORDS, key=lambda r: -r["seconds"])]
    items = [e for e in page.elements if e["tag"] == "li"]
    assert [e["data-id"] for e in items] == by_bytes + by_seconds


def test_record_values_are_escaped_everywhere():
    page = render_page(RECORDS)
    # the hostile id never reaches the markup as markup: no second <img, no early </script>, no comment opened
    assert page.count("<img") == 0 and "<!--" not in page.split("-->", 1)[1]
    (script,) = re.findall(r'id="fleet-data">(.*?)</script>', page, re.S)
    assert "<" not in script and ">" not in script and "&" not in script
    assert HOSTILE in {r["id"] for r in _rows(json.loads(script))}
    parsed = _parse(page)
    assert [e["data-id"] for e in parsed.find(tag="li") if e["data-id"] == HOSTILE]  # attribute round-trips
    assert len(parsed.scripts) == 2  # the data and the page's script: nothing else became a script


def test_a_placeholder_in_a_record_is_not_substituted():
    page = render_page([_record("@@data@@"), _record("x", family="@@js@@")])
    assert {r["id"] for r in _rows(_data(page))} == {"@@data@@", "x"}
    # once in the JSON, twice (attribute and text) in each of the largest and slowest lists; never substituted
    assert page.count("@@data@@") == 5 and page.count("@@js@@") == 1


def test_an_old_report_renders():
    """Records of a report written before issue 27: no base, rank, engines or finding keys."""
    old = [
        {"id": "a", "status": "ok", "findings": [], "bytes": 10, "seconds": 0.1, "engine_outcomes": {}},
        {"id": "b", "status": "findings", "findings": [{"code": "data.nan", "severity": "error", "message": "m"}]},
    ]
    page = render_page(old)
    rows = {r["id"]: r for r in _rows(_data(page))}
    assert rows["b"]["first_finding"] == "data.nan" and rows["b"]["bytes"] is None and rows["a"]["rank"] is None
    assert 'id="engine-matrix-none"' in page
    (total,) = _parse(page).find(**{"data-total": "findings"})
    assert total["text"] == "1"


def test_an_incomplete_scan_says_so():
    assert 'id="incomplete"' not in render_page(RECORDS)
    page = render_page(RECORDS, complete=False, discovered=9)
    assert 'id="incomplete"' in page and f"{len(RECORDS)} of 9 adapters" in page


def test_the_page_is_self_contained():
    page = render_page(RECORDS)
    assert not re.search(r'\b(src|href)\s*=\s*"(https?:)?//', page)
    assert "<link" not in page and "@import" not in page


# ---------------------------------------------------------------------------------------------------- writing
def test_write_page_replaces_only_a_previous_page(tmp_path):
    out = tmp_path / "fleet.html"
    write_page(render_page(RECORDS[:1]), out)
    write_page(render_page(RECORDS), out)  # its own previous page: replaced
    assert len(_data(out.read_text())["rows"]) == len(RECORDS)
    assert [p.name for p in tmp_path.iterdir()] == ["fleet.html"]  # no temporary file left
    other = tmp_path / "notes.html"
    other.write_text("<html>mine</html>")
    with pytest.raises(UsageError, match="not a fleet page"):
        write_page(render_page(RECORDS), other)
    assert other.read_text() == "<html>mine</html>"
    with pytest.raises(UsageError, match="not a regular file"):
        write_page(render_page(RECORDS), tmp_path)
    report = tmp_path / "scan.jsonl"
    report.write_text("")
    with pytest.raises(UsageError, match="the report itself"):
        write_page(render_page(RECORDS), report, keep=(report,))
    with pytest.raises(UsageError, match="does not exist"):
        write_page(render_page(RECORDS), tmp_path / "no" / "fleet.html")


def test_a_failed_write_leaves_the_previous_page(tmp_path, monkeypatch):
    import os

    out = tmp_path / "fleet.html"
    write_page(render_page(RECORDS[:1]), out)
    before = out.read_bytes()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(UsageError, match="No space left"):
        write_page(render_page(RECORDS), out)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["fleet.html"]


# -------------------------------------------------------------------------------------------------------- CLI
def _cli(argv):
    from typer.testing import CliRunner

    from lora_convert.cli import app

    return CliRunner().invoke(app, argv)


def _write_report(path: Path, records, torn: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)
    return path


def test_report_command_writes_the_page(tmp_path):
    report = _write_report(tmp_path / "scan.jsonl", RECORDS)
    result = _cli(["report", str(report), "--html", str(tmp_path / "fleet.html")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "fleet.html").read_text()
    assert len(_data(page)["rows"]) == len(RECORDS) and 'id="incomplete"' not in page


def test_report_of_a_killed_scan_leaves_out_the_torn_line(tmp_path):
    report = _write_report(tmp_path / "scan.jsonl", RECORDS[:2], torn='{"id": "half", "sta')
    result = _cli(["report", str(report), "--html", str(tmp_path / "fleet.html")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "fleet.html").read_text()
    assert [r["id"] for r in _rows(_data(page))] == ["a/clean", "a/wrong"] and 'id="incomplete"' in page


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "No report at"),
        ("not-a-report", "not a scan record"),
        ("folder-output", "not a regular file"),
        ("foreign-output", "not a fleet page"),
        ("same-file", "the report itself"),
        ("no-html", "Pass --html"),
    ],
)
def test_report_command_errors_exit_2(tmp_path, case, message):
    report = _write_report(tmp_path / "scan.jsonl", RECORDS)
    out = tmp_path / "fleet.html"
    if case == "missing":
        report = tmp_path / "nope.jsonl"
    elif case == "not-a-report":
        report.write_text("<html>\n<body>\n")
    elif case == "folder-output":
        out.mkdir()
    elif case == "foreign-output":
        out.write_text("keep me")
    elif case == "same-file":
        out = report
    argv = ["report", str(report)] + ([] if case == "no-html" else ["--html", str(out)])
    before = report.read_bytes() if report.exists() else None
    result = _cli(argv)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    if before is not None:
        assert report.read_bytes() == before
    if case == "foreign-output":
        assert out.read_text() == "keep me"


@pytest.mark.slow
def test_scan_html_writes_the_page_of_the_scan(tmp_path):
    from lora_convert.engines.rules import installed_engines, resolve_engine

    example = Path(__file__).resolve().parent.parent / "examples" / "tiny-deepseek-v3"
    report, out = tmp_path / "scan.jsonl", tmp_path / "fleet.html"
    argv = ["scan", str(example / "adapter"), "--base", str(example / "base"), "--no-data", "-j", "1"]
    result = _cli([*argv, "-e", "all", "--output", str(report), "--html", str(out)])
    assert result.exit_code == 1, result.output  # the example has engine findings
    records = [json.loads(line) for line in report.read_text().splitlines()]
    (row,) = _rows(_data(out.read_text()))
    assert row["id"] == records[0]["id"] and row["status"] == records[0]["status"]
    newest = sorted(resolve_engine(e).spec for e in installed_engines())  # `-e all`: every engine's newest release
    assert _data(out.read_text())["releases"] == sorted(records[0]["engines"]) == newest
    # an --html path in the way is refused before anything is scanned
    (tmp_path / "in-the-way").mkdir()
    refused = _cli([*argv, "--output", str(tmp_path / "other.jsonl"), "--html", str(tmp_path / "in-the-way")])
    assert refused.exit_code == 2 and not (tmp_path / "other.jsonl").exists()
