"""Fleet-scan benchmark (issue 15): adapters/s and MB/s of `scan` with `--jobs 1`, `--jobs 2` and `--ray` (a local
Ray instance), on the registry bench/gen_registry.py writes, and a check that every planted defect is reported,
nothing else is flagged, and the three reports agree apart from timings.

    .venv/bin/python bench/gen_registry.py /tmp/lc-registry --large 3
    .venv/bin/python bench/run_scan_bench.py /tmp/lc-registry [--repeat 3] [--json bench/results/scan_bench.json]

Each mode runs the scan's executor on the same discovered task list (what `lora-convert scan` does after
discovery), timed from the first task handed out to the last record received, so that worker start-up is included
and argument parsing is not. With --write-report each record is also appended and flushed to a JSONL report and
the summary is built at the end, as `scan --output` does, so that the parent does all of the command's work. Ray's
own start (`ray.init` of a local instance) is timed apart: on a cluster it is paid once, not per scan. The best of
--repeat runs is reported, and every run; the machine's load average is recorded before each run, since other work
on the machine slows every mode. --interleave runs the modes in rounds (jobs 1, jobs 2, jobs 1, ...) so that each
mode sees the same machine when its load changes.

CPU time is recorded with the wall time, as wall-clock ratios mean little on a shared machine: the parent's (this
process: the executor, on_result, report writing) and the workers' (their own CPU time, counted once they have
exited: the local modes only; Ray's workers outlive a run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
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


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_mode(mode: str, tasks, options, *, write_report: bool = False) -> tuple[dict, list[dict]]:
    """One run: {seconds, parent_cpu_s, workers_cpu_s (None for Ray), load_before} and its records."""
    from lora_convert.scan import local, ray_backend
    from lora_convert.scan.report import ReportWriter
    from lora_convert.scan.summary import summarize

    records: list[dict] = []
    on_result = records.append
    with tempfile.TemporaryDirectory(prefix="lc-scan-bench-") as tmp:
        writer = ReportWriter(Path(tmp) / "report.jsonl", keep_bytes=0) if write_report else None
        if writer is not None:

            def on_result(record: dict) -> None:
                writer.write(record)
                records.append(record)

        load = os.getloadavg()[0]
        parent, children = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        if mode == "ray":
            ray_backend.run_all(tasks, options, on_result=on_result)
        else:
            local.run_all(tasks, options, on_result=on_result, jobs=int(mode.split()[1]))
        if writer is not None:
            writer.close()
            summarize(records)
        seconds = time.perf_counter() - started
        run = {
            "seconds": seconds,
            "parent_cpu_s": _cpu(resource.RUSAGE_SELF) - parent,
            # The local workers have exited (run_all joins them); Ray's are not children of this process.
            "workers_cpu_s": None if mode == "ray" else _cpu(resource.RUSAGE_CHILDREN) - children,
            "load_before": round(load, 2),
        }
    return run, records


def _rounded(values: list, digits: int = 2) -> list:
    return [None if v is None else round(v, digits) for v in values]


def summarize_runs(runs: list[dict], n: int, total_bytes: int) -> dict:
    """The best run's rates, and every run's wall time, CPU times and load."""
    best = min(r["seconds"] for r in runs)
    workers = [r["workers_cpu_s"] for r in runs]
    return {
        "seconds_best": round(best, 2),
        "seconds_all": _rounded([r["seconds"] for r in runs]),
        "adapters_per_s": round(n / best, 1),
        "mb_per_s": round(total_bytes / 1e6 / best, 1),
        "parent_cpu_s_all": _rounded([r["parent_cpu_s"] for r in runs]),
        "parent_cpu_ms_per_adapter_all": _rounded([r["parent_cpu_s"] * 1000 / n for r in runs], 3),
        "workers_cpu_s_all": _rounded(workers) if any(w is not None for w in workers) else None,
        "load_before_all": [r["load_before"] for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("registry", type=Path, help="a folder written by bench/gen_registry.py")
    p.add_argument("--repeat", type=int, default=3, help="runs per mode; the best is reported")
    p.add_argument("--modes", default="jobs 1,jobs 2,ray")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--write-report", action="store_true", help="append each record to a JSONL report, as `scan --output` does"
    )
    p.add_argument("--interleave", action="store_true", help="run the modes in rounds (not with ray)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",")]
    if args.interleave and "ray" in modes:
        p.error("--interleave runs local modes only (a Ray instance would be started and stopped every round)")

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
        "write_report": args.write_report,
        "interleave": args.interleave,
        "modes": {},
    }
    reports: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    rows: dict[str, dict] = {m: {"load_before": load_avg()} for m in modes}

    def finish(mode: str, records: list[dict]) -> None:
        row = rows[mode]
        row.update(summarize_runs(runs[mode], len(tasks), total_bytes))
        row.update(check=check(records, root, manifest), load_after=load_avg())
        reports[mode] = without_timings(records)
        out["modes"][mode] = row
        print(json.dumps({mode: row}), file=sys.stderr)

    if args.interleave:
        last: dict[str, list[dict]] = {}
        for _ in range(args.repeat):
            for mode in modes:
                run, last[mode] = run_mode(mode, tasks, options, write_report=args.write_report)
                runs[mode].append(run)
        for mode in modes:
            finish(mode, last[mode])
    for mode in [] if args.interleave else modes:
        row = rows[mode]
        ray = None
        if mode == "ray":
            import ray

            t = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="error")
            row["ray_init_s"] = round(time.perf_counter() - t, 2)
            row["ray_version"] = ray.__version__
        try:
            for _ in range(args.repeat):
                run, records = run_mode(mode, tasks, options, write_report=args.write_report)
                runs[mode].append(run)
        finally:
            if ray is not None:
                ray.shutdown()
        finish(mode, records)
    first = next(iter(reports.values()))
    out["reports_identical_apart_from_timings"] = all(r == first for r in reports.values())
    if "jobs 1" in out["modes"] and "jobs 2" in out["modes"]:
        one, two = runs["jobs 1"], runs["jobs 2"]
        out["speedup_jobs2"] = round(out["modes"]["jobs 1"]["seconds_best"] / out["modes"]["jobs 2"]["seconds_best"], 2)
        if args.interleave:  # each round's jobs 1 over the same round's jobs 2: the machine was about the same
            out["speedup_jobs2_by_round"] = [
                round(a["seconds"] / b["seconds"], 2) for a, b in zip(one, two, strict=True)
            ]
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
