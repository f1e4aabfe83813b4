"""The fleet page (`lora-convert report REPORT.jsonl --html`, `scan --html`) in a real browser: Debian's headless
Chromium opens the file from a file:// URL; every number it shows is checked against the JSONL, and sorting,
filtering and the engine matrix's click-through are exercised with real clicks and keystrokes.

Skipped only where Chromium, its driver or selenium is absent (the reason says how to install them);
LORA_CONVERT_REQUIRE_BROWSER=1 (`.ci/run` sets it, after installing them) turns that skip into a failure.
`LORA_CONVERT_WRITE_SCREENSHOT=1` (`make screenshot`) rewrites docs/images/fleet-page.png, which the README shows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import browser
from fleet_records import RELEASES, synthetic_records, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "images" / "fleet-page.png"
STATUSES = ("ok", "findings", "error", "crashed", "timeout")
# The page's worst-outcome order (its help text says the same): the first outcome with a count wins; none: exact.
WORST_FIRST = ("load-failure", "wrong", "dropped", "ignored", "needs-flag")

pytestmark = pytest.mark.slow

_missing = browser.missing()
if _missing and os.environ.get(browser.REQUIRE):
    pytest.fail(f"{browser.REQUIRE} is set, but the browser test cannot run: {_missing}", pytrace=False)
if _missing:
    pytest.skip(_missing, allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

# Everything the page shows as a number, read in one round trip (textContent, trimmed).
READ_PAGE = """
const q = (s, root) => [...(root || document).querySelectorAll(s)];
const text = e => e.textContent.trim();
return {
  totals: Object.fromEntries(q('[data-total]').map(e => [e.dataset.total, text(e)])),
  matrix: Object.fromEntries(q('#engine-matrix tr[data-release]').map(tr => [tr.dataset.release,
      Object.fromEntries(q('td[data-outcome]', tr).map(td => [td.dataset.outcome, text(td)]))])),
  codes: Object.fromEntries(q('#findings-by-code tr[data-code]').map(tr => [tr.dataset.code, {
      adapters: text(tr.querySelector('td[data-col="adapters"]')),
      severity: text(tr.querySelector('td[data-col="severity"]'))}])),
  largest: q('#largest li[data-id]').map(li => li.dataset.id),
  slowest: q('#slowest li[data-id]').map(li => li.dataset.id),
  shown: text(document.getElementById('shown-count')),
  rows: q('#adapters tbody tr[data-id]').map(tr => tr.dataset.id),
  sort: Object.fromEntries(q('#adapters thead th[data-key]').map(th => [th.dataset.key, th.getAttribute('aria-sort')])),
};
"""
COLUMN_VALUES = (
    "return [...document.querySelectorAll('#adapters tbody tr[data-id] td[data-key=\"' + arguments[0] + '\"]')]"
    ".map(td => td.dataset.value);"
)


# --------------------------------------------------------------------------------------- what the JSONL says
def worst_outcome(counts: dict[str, int]) -> str:
    return next((o for o in WORST_FIRST if counts.get(o, 0) > 0), "exact")


def expected_numbers(records: list[dict]) -> dict:
    status = Counter(r["status"] for r in records)
    totals = {s: status.get(s, 0) for s in STATUSES}
    totals.update(adapters=len(records), bytes=sum(r.get("bytes") or 0 for r in records))
    matrix: dict[str, Counter] = {}
    for r in records:
        for release, counts in (r.get("engines") or {}).items():
            cells = matrix.setdefault(release, Counter())
            if counts is not None:  # None: asked for, but its rules could not all be evaluated
                cells[worst_outcome(counts)] += 1
    codes: dict[str, dict] = {}
    for r in records:
        for code in {f["code"] for f in r["findings"]}:
            entry = codes.setdefault(code, {"adapters": 0, "severity": set()})
            entry["adapters"] += 1
        for f in r["findings"]:
            codes[f["code"]]["severity"].add(f["severity"])
    return {"totals": totals, "matrix": matrix, "codes": codes}


def adapters_in_cell(records: list[dict], release: str, outcome: str) -> set[str]:
    return {
        r["id"]
        for r in records
        if (r.get("engines") or {}).get(release) is not None and worst_outcome(r["engines"][release]) == outcome
    }


def first_finding(record: dict) -> str:
    """The table's "first finding" (the contract's definition): the code of the first error finding, else of the
    first warning, else the error type of a record whose scan stopped, else empty."""
    for severity in ("error", "warning"):
        for f in record["findings"]:
            if f["severity"] == severity:
                return f["code"]
    return (record.get("error") or {}).get("type") or ""


def top10(records: list[dict], key: str) -> list:
    return sorted((r.get(key) or 0 for r in records), reverse=True)[:10]


# ------------------------------------------------------------------------------------------------ the page
def _cli() -> list[str]:
    script = Path(sys.executable).with_name("lora-convert")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lora_convert"]


def render_report(report: Path, html: Path) -> Path:
    """`report --html`, run in the report's folder with relative paths: the page names its report as
    "report.jsonl", not a temporary path, so that the same records give the same screenshot."""
    run = subprocess.run(
        [*_cli(), "report", report.name, "--html", str(html.resolve())],
        capture_output=True,
        text=True,
        cwd=report.parent,
    )
    assert run.returncode in (0, 1), run.stderr  # 1: the report holds failing adapters
    assert html.is_file(), run.stderr
    return html


def open_page(driver, html: Path) -> dict:
    driver.get(browser.file_url(html))
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(READ_PAGE)["rows"])
    return driver.execute_script(READ_PAGE)


def wait_shown(driver, count: int) -> dict:
    """The page once #shown-count says `count` (filters apply on events; rendering may follow a frame later)."""
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(READ_PAGE)["shown"] == str(count))
    return driver.execute_script(READ_PAGE)


def retype(box, text: str) -> None:
    """Replace the box's text with keystrokes, as a user does (WebElement.clear() fires no input event)."""
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    if text:
        box.send_keys(text)


def assert_numbers_match(page: dict, records: list[dict]) -> None:
    want = expected_numbers(records)
    assert {k: int(v) for k, v in page["totals"].items()} == want["totals"]
    assert set(page["matrix"]) == set(want["matrix"]), "one row per engine release in the records"
    for release, cells in page["matrix"].items():
        assert {"exact", "dropped", "wrong", "load-failure"} <= set(cells), release
        shown = {o: int(v) for o, v in cells.items()}
        expected = dict(want["matrix"][release])
        checked = sum(expected.values())
        if "unchecked" in shown:  # the adapters not checked against this release, or not all its rules
            expected["unchecked"] = len(records) - checked
        assert shown == {o: expected.get(o, 0) for o in shown}, release
        assert sum(shown.values()) == sum(expected.values()), f"{release}: an outcome has no column"
    assert {c: int(v["adapters"]) for c, v in page["codes"].items()} == {
        c: v["adapters"] for c, v in want["codes"].items()
    }
    for code, cell in page["codes"].items():
        assert cell["severity"] in want["codes"][code]["severity"], code
    by_id = {r["id"]: r for r in records}
    assert [by_id[i].get("bytes") or 0 for i in page["largest"]] == top10(records, "bytes")
    assert [by_id[i].get("seconds") or 0 for i in page["slowest"]] == top10(records, "seconds")
    assert page["shown"] == str(len(records))


@pytest.fixture(scope="module")
def driver():
    with browser.chromium() as d:
        yield d


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """300 seeded records of every status and outcome, as `report --html` renders them."""
    folder = tmp_path_factory.mktemp("fleet")
    records = synthetic_records(300)
    html = render_report(write_jsonl(records, folder / "report.jsonl"), folder / "fleet.html")
    return records, html


# ------------------------------------------------------------------------------------------------ the tests
def test_every_number_shown_is_the_jsonls(driver, synthetic):
    records, html = synthetic
    assert_numbers_match(open_page(driver, html), records)


def test_sorting_by_a_column(driver, synthetic):
    records, html = synthetic
    page = open_page(driver, html)
    assert set(page["sort"].values()) == {"none"}
    assert page["rows"] == sorted(r["id"] for r in records)[: len(page["rows"])]  # id order until sorted
    header = driver.find_element(By.CSS_SELECTOR, '#adapters thead th[data-key="bytes"]')
    for direction, reverse in (("ascending", False), ("descending", True)):
        header.click()
        page = driver.execute_script(READ_PAGE)
        assert page["sort"] == {k: direction if k == "bytes" else "none" for k in page["sort"]}
        shown = [int(v) for v in driver.execute_script(COLUMN_VALUES, "bytes")]
        assert len(shown) >= min(len(records), 50)
        assert shown == sorted((r["bytes"] for r in records), reverse=reverse)[: len(shown)]
    # Another column takes the sort over; the first loses its aria-sort.
    driver.find_element(By.CSS_SELECTOR, '#adapters thead th[data-key="seconds"]').click()
    page = driver.execute_script(READ_PAGE)
    assert page["sort"]["seconds"] == "ascending" and page["sort"]["bytes"] == "none"
    shown = [float(v) for v in driver.execute_script(COLUMN_VALUES, "seconds")]
    assert shown == sorted(r["seconds"] for r in records)[: len(shown)]
    # Unknown values (a crashed adapter's rank) come first ascending, last descending.
    rank = driver.find_element(By.CSS_SELECTOR, '#adapters thead th[data-key="rank"]')
    ranks = sorted((r["rank"] for r in records), key=lambda v: (v is not None, v or 0))
    rank.click()
    shown = driver.execute_script(COLUMN_VALUES, "rank")
    assert shown == ["" if v is None else str(v) for v in ranks][: len(shown)]
    rank.click()
    shown = driver.execute_script(COLUMN_VALUES, "rank")
    assert shown == ["" if v is None else str(v) for v in reversed(ranks)][: len(shown)]


def test_filtering_by_text_and_status_then_clearing(driver, synthetic):
    records, html = synthetic
    open_page(driver, html)
    box = driver.find_element(By.ID, "filter")
    status = Select(driver.find_element(By.ID, "status-filter"))
    assert {o.get_attribute("value") for o in status.options} >= {"", *STATUSES}

    # Case-insensitive, on the id ...
    needle = "LEGAL/MIX"
    assert not any(needle.lower() in f["code"].lower() for r in records for f in r["findings"])
    retype(box, needle)
    want = {r["id"] for r in records if needle.lower() in r["id"]}
    assert 0 < len(want) < len(records)
    assert set(wait_shown(driver, len(want))["rows"]) == want
    # ... and with a status
    status.select_by_value("findings")
    want_both = {i for i in want if next(r for r in records if r["id"] == i)["status"] == "findings"}
    assert set(wait_shown(driver, len(want_both))["rows"]) == want_both

    # On the first finding (a code no id, family or base holds)
    retype(box, "Data.NaN")
    want = {r["id"] for r in records if r["status"] == "findings" and first_finding(r) == "data.nan"}
    assert want and set(wait_shown(driver, len(want))["rows"]) == want
    # On the base (no id holds it); status alone
    retype(box, "qwen/qwen3")
    want = {r["id"] for r in records if r["status"] == "findings" and "qwen/qwen3" in (r["base"] or "").lower()}
    assert want and set(wait_shown(driver, len(want))["rows"]) == want
    retype(box, "")
    status.select_by_value("crashed")
    crashed = [r for r in records if r["status"] == "crashed"]
    page = wait_shown(driver, len(crashed))
    assert set(page["rows"]) == {r["id"] for r in crashed}
    # Sorting keeps the filter: the crashed adapters, slowest first.
    seconds = driver.find_element(By.CSS_SELECTOR, '#adapters thead th[data-key="seconds"]')
    seconds.click()
    seconds.click()
    assert driver.execute_script(READ_PAGE)["rows"] == [
        r["id"] for r in sorted(crashed, key=lambda r: r["seconds"], reverse=True)
    ]

    driver.find_element(By.ID, "clear-filters").click()
    page = wait_shown(driver, len(records))
    assert box.get_attribute("value") == "" and status.first_selected_option.get_attribute("value") == ""


def test_engine_matrix_cells_click_through_to_their_adapters(driver, synthetic):
    records, html = synthetic
    open_page(driver, html)
    clicked = 0
    for release in RELEASES:
        for outcome in ("load-failure", "wrong", "dropped"):
            want = adapters_in_cell(records, release, outcome)
            cell = driver.find_element(
                By.CSS_SELECTOR, f'#engine-matrix tr[data-release="{release}"] td[data-outcome="{outcome}"]'
            )
            assert int(cell.text) == len(want)
            if not want:
                continue
            cell.click()
            assert set(wait_shown(driver, len(want))["rows"]) == want, (release, outcome)
            clicked += 1
            driver.find_element(By.ID, "clear-filters").click()
            wait_shown(driver, len(records))
    assert clicked >= 4  # the seeded records have adapters in most of these cells
    # The biggest cell too: the count is right even where only the first rows are rendered.
    exact = adapters_in_cell(records, RELEASES[0], "exact")
    driver.find_element(
        By.CSS_SELECTOR, f'#engine-matrix tr[data-release="{RELEASES[0]}"] td[data-outcome="exact"]'
    ).click()
    page = wait_shown(driver, len(exact))
    assert set(page["rows"]) <= exact and page["rows"]


def test_a_large_fleet_renders_in_chunks(driver, tmp_path):
    """1,200 adapters: the table draws the first rows only, #shown-count still counts them all, "show more" draws
    the next ones in the current order, and the numbers above the table cover every record."""
    records = synthetic_records(1200, seed=5)
    html = render_report(write_jsonl(records, tmp_path / "report.jsonl"), tmp_path / "fleet.html")
    page = open_page(driver, html)
    assert_numbers_match(page, records)
    first = len(page["rows"])
    assert 0 < first < len(records)
    more = driver.find_element(By.ID, "show-more")
    assert more.is_displayed()
    driver.find_element(By.CSS_SELECTOR, '#adapters thead th[data-key="bytes"]').click()
    driver.find_element(By.CSS_SELECTOR, '#adapters thead th[data-key="bytes"]').click()
    more.click()
    shown = [int(v) for v in driver.execute_script(COLUMN_VALUES, "bytes")]
    assert len(records) >= len(shown) > first
    assert shown == sorted((r["bytes"] for r in records), reverse=True)[: len(shown)]
    assert driver.execute_script(READ_PAGE)["shown"] == str(len(records))


def test_nothing_is_fetched_and_nothing_fails(driver, synthetic):
    records, html = synthetic
    open_page(driver, html)
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    external = driver.execute_script(
        "return [...document.querySelectorAll('script[src], link[href]:not(a), img[src], iframe, object, embed')]"
        ".map(e => e.outerHTML.slice(0, 120))"
    )
    assert external == []
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_screenshot(driver, synthetic, tmp_path):
    """The README's picture of the page; rewritten only on request (`make screenshot`), so it changes only when
    someone means it to."""
    records, html = synthetic
    open_page(driver, html)
    driver.set_window_size(1280, 1000)
    shot = tmp_path / "fleet-page.png"
    assert driver.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    if os.environ.get("LORA_CONVERT_WRITE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    assert SCREENSHOT.is_file(), "no docs/images/fleet-page.png: run `make screenshot`"
    assert "docs/images/fleet-page.png" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_a_real_scan_of_peft_adapters(driver, tmp_path):
    """`scan --html` of a registry of PEFT-written adapters with planted defects (tests/test_scan.py's), checked
    against every engine release: the page's numbers are the scan's JSONL's."""
    from lora_convert.scan.report import read_report
    from test_scan import build_registry

    registry = build_registry(tmp_path / "registry")
    report, html = tmp_path / "scan.jsonl", tmp_path / "scan.html"
    run = subprocess.run(
        [
            *_cli(),
            "scan",
            str(registry),
            "--jobs",
            "2",
            "--engine",
            "all",
            "--output",
            str(report),
            "--html",
            str(html),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1, run.stderr  # the planted defects
    records, _ = read_report(report)
    assert len(records) == 9 and any(r["engines"] for r in records)
    page = open_page(driver, html)
    assert_numbers_match(page, records)
    assert set(page["rows"]) == {r["id"] for r in records}
