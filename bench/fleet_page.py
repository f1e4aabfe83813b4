"""The fleet page in a browser (issue 27): seeded synthetic scan records (tests/fleet_records.py) of N adapters,
rendered by `lora-convert report REPORT.jsonl --html`, opened from a file:// URL in Debian's headless Chromium
(tests/browser.py) several times; per load the browser's own clocks (ms from navigation start):

  first_paint, first_contentful_paint   the Paint Timing API (performance.getEntriesByType('paint'))
  dom_content_loaded, load              the Navigation Timing API
  table_populated                       the first row in `#adapters tbody`, seen by a MutationObserver that is
                                        installed before the page's own scripts run (CDP
                                        Page.addScriptToEvaluateOnNewDocument)

plus the file's size and the wall time of the `report --html` command (bench/fleet_render.py times the rendering
alone, in process). The median of --repeat loads is reported, and every load. After the last load, the browser
test's check runs on the page (tests/test_fleet_page_browser.py: every number shown equals the JSONL's).

    .venv/bin/python bench/fleet_page.py                      # N = 1,000 and 10,000
    .venv/bin/python bench/fleet_page.py --count 1000 --report /tmp/scan.jsonl   # also a real scan's JSONL
    .venv/bin/python bench/fleet_page.py --json bench/results/fleet_page_2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import browser  # noqa: E402
from fleet_records import synthetic_records, write_jsonl  # noqa: E402

# Runs in the page before its own scripts: the time the adapters table gets its first row.
WATCH_TABLE = """
window.__tablePopulated = null;
new MutationObserver((changes, observer) => {
  if (document.querySelector('#adapters tbody tr')) {
    window.__tablePopulated = performance.now();
    observer.disconnect();
  }
}).observe(document, {childList: true, subtree: true});
"""
READ_TIMINGS = """
const paint = Object.fromEntries(performance.getEntriesByType('paint').map(e => [e.name, e.startTime]));
const nav = performance.getEntriesByType('navigation')[0];
return {
  first_paint: paint['first-paint'] ?? null,
  first_contentful_paint: paint['first-contentful-paint'] ?? null,
  dom_content_loaded: nav.domContentLoadedEventEnd,
  load: nav.loadEventEnd,
  table_populated: window.__tablePopulated,
  rows_rendered: document.querySelectorAll('#adapters tbody tr').length,
  shown_count: document.getElementById('shown-count').textContent.trim(),
};
"""
# The floor: the same clocks on a page of one line of text and one table row (what headless Chromium takes for any
# page from a file, whatever is in it).
BASELINE_PAGE = (
    '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>baseline</title></head><body>'
    '<h1>baseline</h1><span id="shown-count">1</span><table id="adapters"><tbody><tr><td>x</td></tr></tbody></table>'
    "</body></html>"
)
METRICS = ("first_paint", "first_contentful_paint", "dom_content_loaded", "load", "table_populated")


def render(report: Path, html: Path) -> float:
    cli = Path(sys.executable).with_name("lora-convert")
    started = time.perf_counter()
    run = subprocess.run([str(cli), "report", str(report), "--html", str(html)], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode not in (0, 1) or not html.is_file():
        raise SystemExit(f"report --html failed ({run.returncode}): {run.stderr}")
    return seconds


def measure(driver, html: Path, repeat: int) -> list[dict]:
    loads = []
    for _ in range(repeat):
        driver.get("about:blank")
        driver.get(browser.file_url(html))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            timings = driver.execute_script(READ_TIMINGS)
            if timings["table_populated"] is not None and timings["first_contentful_paint"] is not None:
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"{html}: the table never got a row, or nothing was painted: {timings}")
        loads.append(timings)
    return loads


def verify(driver, report: Path) -> None:
    """The browser test's check on the page now loaded: every number it shows is the JSONL's."""
    from lora_convert.scan.report import read_report
    from test_fleet_page_browser import READ_PAGE, assert_numbers_match

    records, _ = read_report(report)
    page = driver.execute_script(READ_PAGE)
    assert_numbers_match(page, records)
    print(f"{report.name}: every number on the page equals the JSONL's ({len(records)} records)", file=sys.stderr)


def bench_baseline(driver, folder: Path, repeat: int) -> dict:
    html = folder / "baseline.html"
    html.write_text(BASELINE_PAGE, encoding="utf-8")
    loads = measure(driver, html, repeat)
    result = {
        "name": "baseline (one line, one row)",
        "html_bytes": html.stat().st_size,
        "median_ms": {m: round(statistics.median(load[m] for load in loads), 1) for m in METRICS},
        "loads": loads,
    }
    print(
        f"baseline: median of {repeat}: " + ", ".join(f"{m} {v} ms" for m, v in result["median_ms"].items()),
        file=sys.stderr,
    )
    return result


def bench_one(driver, name: str, report: Path, records: int, folder: Path, repeat: int) -> dict:
    html = folder / f"{name}.html"
    render_s = render(report, html)
    loads = measure(driver, html, repeat)
    verify(driver, report)
    result = {
        "name": name,
        "adapters": records,
        "jsonl_bytes": report.stat().st_size,
        "html_bytes": html.stat().st_size,
        "report_html_s": round(render_s, 3),
        "median_ms": {m: round(statistics.median(load[m] for load in loads), 1) for m in METRICS},
        "rows_rendered": loads[-1]["rows_rendered"],
        "shown_count": loads[-1]["shown_count"],
        "loads": loads,
    }
    print(
        f"{name}: {records} adapters, html {result['html_bytes'] / 1e6:.2f} MB (jsonl {result['jsonl_bytes'] / 1e6:.2f}"
        f" MB), report --html {render_s:.2f} s; median of {repeat}: "
        + ", ".join(f"{m} {v} ms" for m, v in result["median_ms"].items()),
        file=sys.stderr,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, action="append", help="synthetic adapters (default: 1000 and 10000)")
    parser.add_argument("--report", type=Path, action="append", default=[], help="also a real scan's JSONL")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    missing = browser.missing()
    if missing:
        raise SystemExit(missing)
    results = []
    with tempfile.TemporaryDirectory() as tmp, browser.chromium() as driver:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_TABLE})
        version = driver.capabilities.get("browserVersion")
        folder = Path(tmp)
        results.append(bench_baseline(driver, folder, args.repeat))
        for count in args.count or (1000, 10000):
            report = write_jsonl(synthetic_records(count), folder / f"synthetic-{count}.jsonl")
            results.append(bench_one(driver, f"synthetic-{count}", report, count, folder, args.repeat))
        for report in args.report:
            count = sum(1 for line in report.read_text().splitlines() if line.strip())
            results.append(bench_one(driver, report.stem, report, count, folder, args.repeat))
    doc = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "chromium": version,
        },
        "repeat": args.repeat,
        "results": results,
    }
    text = json.dumps(doc, indent=1) + "\n"
    if args.json:
        args.json.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
