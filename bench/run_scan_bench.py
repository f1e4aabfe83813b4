"""Fleet-scan benchmark (issue 15): adapters/s and MB/s of `scan` with `--jobs 1`, `--jobs 2` and `--ray` (a local
Ray instance), on the registry bench/gen_registry.py writes, and a check that every planted defect is reported,
nothing else is flagged, and the three reports agree apart from timings.

    .venv/bin/python bench/gen_registry.py /tmp/lc-registry --large 3
    .venv/bin/python bench/run_scan_bench.py /tmp/lc-registry [--repeat 3] [--json bench/results/scan_bench.json]

Each mode runs the scan's executor on the same discovered task list (what `lora-convert scan` does after
discovery), timed from the first task handed out to the last record received, so that worker start-up is included
and argument parsing and report writing are not. Ray's own start (`ray.init` of a local instance) is timed apart:
on a cluster it is paid once, not per scan. The best of --repeat runs is reported; the machine's load average is
recorded before each mode, since other work on the machine slows every mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

TIMING_KEYS = ("seconds",)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def check(records: list[dict], root: Path, manifest: dict) -> dict:
    """Planted defects found, and adapters flagged that should not be."""
    by_rel = {Path(r["adapter"]).relative_to(root).as_posix(): r for r in records}
    missed, false_flags, found = [], [], 0
    for rel, meta in manifest["adapters"].items():
        r = by_rel.get(rel)
        flagged = {f["code"] for f in (r or {}).get("findings", []) if f["severity"] != "info"}
        if meta["expect"] is None:
            if r is None or r["status"] != "ok" or flagged:
                false_flags.append({"adapter": rel, "status": r and r["status"], "codes": sorted(flagged)})
        elif meta["expect"] in flagged:
            found += 1
        else:
            missed.append({"adapter": rel, "defect": meta["defect"], "codes": sorted(flagged)})
    return {
        "planted": sum(1 for a in manifest["adapters"].values() if a["defect"]),
        "found": found,
        "missed": missed,
        "false_flags": false_flags,
        "records": len(records),
        "duplicates": len(records) - len(by_rel),
    }


def without_timings(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records}


def run_mode(mode: str, tasks, options) -> tuple[float, list[dict]]:
    from lora_convert.scan import local, ray_backend

    records: list[dict] = []
    started = time.perf_counter()
    if mode == "ray":
        ray_backend.run_all(tasks, options, on_result=records.append)
    else:
        local.run_all(tasks, options, on_result=records.append, jobs=int(mode.split()[1]))
    return time.perf_counter() - started, records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("registry", type=Path, help="a folder written by bench/gen_registry.py")
    p.add_argument("--repeat", type=int, default=3, help="runs per mode; the best is reported")
    p.add_argument("--modes", default="jobs 1,jobs 2,ray")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    from lora_convert.scan.discover import discover
    from lora_convert.scan.task import ScanOptions

    manifest = json.loads((args.registry / "manifest.json").read_text())
    root = (args.registry / "adapters").resolve()
    tasks = discover([str(root)])
    options = ScanOptions()
    total_bytes = sum(t.nbytes for t in tasks)
    out: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "adapters": len(tasks),
        "bytes": total_bytes,
        "planted": sum(1 for a in manifest["adapters"].values() if a["defect"]),
        "modes": {},
    }
    reports: dict[str, dict] = {}
    for mode in [m.strip() for m in args.modes.split(",")]:
        row: dict = {"load_before": load_avg()}
        ray = None
        if mode == "ray":
            import ray

            t = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="error")
            row["ray_init_s"] = round(time.perf_counter() - t, 2)
            row["ray_version"] = ray.__version__
        times = []
        try:
            for _ in range(args.repeat):
                seconds, records = run_mode(mode, tasks, options)
                times.append(seconds)
        finally:
            if ray is not None:
                ray.shutdown()
        best = min(times)
        row.update(
            seconds_best=round(best, 2),
            seconds_all=[round(t, 2) for t in times],
            adapters_per_s=round(len(tasks) / best, 1),
            mb_per_s=round(total_bytes / 1e6 / best, 1),
            check=check(records, root, manifest),
            load_after=load_avg(),
        )
        reports[mode] = without_timings(records)
        out["modes"][mode] = row
        print(json.dumps({mode: row}), file=sys.stderr)
    first = next(iter(reports.values()))
    out["reports_identical_apart_from_timings"] = all(r == first for r in reports.values())
    if "jobs 1" in out["modes"] and "jobs 2" in out["modes"]:
        out["speedup_jobs2"] = round(out["modes"]["jobs 1"]["seconds_best"] / out["modes"]["jobs 2"]["seconds_best"], 2)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = out["reports_identical_apart_from_timings"] and all(
        not m["check"]["missed"] and not m["check"]["false_flags"] and m["check"]["found"] == m["check"]["planted"]
        for m in out["modes"].values()
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
