"""Size and generation time of the fleet page (lora_convert/scan/fleet.py) for a scan report, and for N synthesized
records (a report's records copied under new ids, or varied records when no report is given).

    .venv/bin/python bench/fleet_render.py --report /tmp/scan.jsonl            # the report's own records
    .venv/bin/python bench/fleet_render.py --report /tmp/scan.jsonl --count 10000
    .venv/bin/python bench/fleet_render.py --count 10000                         # varied synthetic records

Prints one JSON line: records, bytes of the page, seconds to render (best of --repeat).
"""

from __future__ import annotations

import argparse
import json
import random
import time

from lora_convert.scan.fleet import render_page
from lora_convert.scan.report import read_report

OUTCOMES = ("exact", "needs-flag", "dropped", "wrong", "load-failure")
CODES = ("data.nan", "pairs.missing-B", "engine.sglang.mixtral-head-dim", "engine.vllm.fused-3d-on-2d-wrapper")


def synthetic(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        fired = {o: rng.randint(1, 3) for o in OUTCOMES[1:] if rng.random() < 0.15}
        code = rng.choice(CODES) if fired or rng.random() < 0.1 else None
        records.append(
            {
                "id": f"team-{i % 37}/family-{i % 11}/adapter-{i:05d}",
                "status": "findings" if code else "ok",
                "family": f"family-{i % 11}",
                "base": f"/registry/bases/base-{i % 7}",
                "rank": rng.choice((8, 16, 32, 64)),
                "bytes": rng.randint(10_000, 500_000_000),
                "seconds": round(rng.random() * 5, 3),
                "findings": [{"code": code, "severity": "error", "message": "m", "keys": []}] if code else [],
                "engines": {"sglang==0.5.23": fired, "vllm==0.33.0": {}},
            }
        )
    return records


def scaled(records: list[dict], n: int) -> list[dict]:
    return [{**records[i % len(records)], "id": f"{records[i % len(records)]['id']}#{i}"} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report")
    parser.add_argument("--count", type=int)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.report:
        records, _ = read_report(args.report)
        if args.count:
            records = scaled(records, args.count)
    else:
        records = synthetic(args.count or 1000)
    best, page = float("inf"), ""
    for _ in range(args.repeat):
        started = time.perf_counter()
        page = render_page(records)
        best = min(best, time.perf_counter() - started)
    print(json.dumps({"records": len(records), "page_bytes": len(page.encode()), "render_s": round(best, 3)}))


if __name__ == "__main__":
    main()
