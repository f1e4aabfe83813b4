"""The scan report (one JSON line per adapter, appended and flushed as each arrives) and the scan itself.

An interrupted scan (Ctrl-C, SIGTERM, a killed machine) loses nothing it wrote: every record is one line, written
and flushed before the next. `--resume` reads the report back, skips the ids it holds and cuts off a torn last
line (the one being written when the process died) before appending.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_convert.errors import UsageError
from lora_convert.io.small_files import parse_json
from lora_convert.scan.discover import discover
from lora_convert.scan.summary import summarize
from lora_convert.scan.task import ScanOptions, ScanTask

__all__ = ["ReportWriter", "ScanInterrupted", "ScanResult", "read_report", "run_scan"]


class ScanInterrupted(KeyboardInterrupt):
    """SIGTERM, turned into the same clean stop as Ctrl-C."""


@dataclass
class ScanResult:
    records: list[dict[str, Any]] = field(default_factory=list)  # this run's and, with resume, the report's earlier
    resumed: int = 0  # records that were already in the report
    discovered: int = 0  # adapters found in the SOURCEs
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM before every adapter had a record
    output: str | None = None
    normalizing: bool | None = None  # ran with --normalize (None: as the records say)
    page: str | None = None  # the fleet page written (scan --html)

    @property
    def summary(self) -> dict[str, Any]:
        """lora_convert.scan.summary.summarize of the records (by status, family, code, engine outcome, worst,
        and with --normalize converted / skipped / failed); never ok when the scan was interrupted."""
        return summarize(self.records, complete=not self.interrupted, normalizing=self.normalizing)

    @property
    def ok(self) -> bool:
        """Every adapter has a record, and none has errors, failed to be read, crashed or timed out (exit 0)."""
        return self.summary["ok"]

    def to_json(self) -> dict[str, Any]:
        """The document of `lora-convert scan --format json`: the summary and every record, sorted by id."""
        return {
            "ok": self.ok,
            "interrupted": self.interrupted,
            "discovered": self.discovered,
            "resumed": self.resumed,
            "report": self.output,
            "summary": self.summary,
            "records": sorted(self.records, key=lambda r: r["id"]),
        }


def read_report(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """The complete records of a JSONL report, and the byte length of its complete lines (a torn last line, with
    no newline or not JSON, is not counted: it is what a killed scan was writing)."""
    records: list[dict[str, Any]] = []
    good = 0
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return records, 0
    except OSError as exc:
        raise UsageError(f"Cannot read the report {path} ({exc}).") from None
    offset = 0
    for line in data.splitlines(keepends=True):
        end = offset + len(line)
        if not line.endswith(b"\n"):
            break  # torn
        text = line.strip()
        if text:
            try:  # not UTF-8, not JSON or nested too deeply: the one JSON reader's UsageError
                record = parse_json(text, str(path), UsageError)
            except UsageError:
                if end == len(data):
                    break  # a torn last line that happened to end in a newline byte
                lineno = data[:offset].count(b"\n") + 1
                raise UsageError(
                    f"{path} line {lineno} is not a scan record; it is not a report of "
                    "`lora-convert scan`, or it was edited.",
                    hint="Pass another --output, or remove that line.",
                ) from None
            if not isinstance(record, dict) or "id" not in record:
                raise UsageError(f"{path} holds a line without an `id`; it is not a report of `lora-convert scan`.")
            records.append(record)
        good = end
        offset = end
    return records, good


class ReportWriter:
    """Appends one record per line, flushed (and handed to the OS) before returning."""

    def __init__(self, path: str | os.PathLike, *, keep_bytes: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        if self._file.tell() > keep_bytes:
            self._file.truncate(keep_bytes)  # drop the torn last line before appending after it
            self._file.seek(keep_bytes)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False, sort_keys=False).encode("utf-8") + b"\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job, `kill`) stops the scan like Ctrl-C: workers are stopped, the report
    keeps every line written. Only the main thread can install handlers; elsewhere SIGTERM keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise ScanInterrupted()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _executor(backend: str, address: str | None) -> Callable[..., None]:
    if backend == "local":
        from lora_convert.scan.local import run_all

        return run_all
    if backend == "ray":
        from lora_convert.scan import ray_backend

        ray_backend.ray_module()  # fail before the report is opened, not after

        def run_all(tasks, options, *, on_result, jobs=None):
            ray_backend.run_all(tasks, options, on_result=on_result, jobs=jobs, address=address)

        return run_all
    raise UsageError(f"Unknown scan backend {backend!r}.", hint="Use local or ray.")


def _check_arguments(options: ScanOptions, *, jobs: int | None, resume: bool, output: str | os.PathLike | None) -> None:
    """UsageError for arguments no scan can run with (before anything is discovered or written)."""
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise UsageError(f"jobs must be a positive integer, got {jobs!r}.")
    if not options.timeout_s > 0:
        raise UsageError(f"The timeout must be positive, got {options.timeout_s!r} s.")
    if resume and output is None:
        raise UsageError("--resume needs --output: the report to resume.", hint="Pass --output report.jsonl.")
    if options.normalize_root and not options.layout:
        from lora_convert.convert.layout_rules import output_layouts

        *first, last = output_layouts()
        raise UsageError("--normalize needs --layout.", hint=f"Pass --layout {', '.join(first)} or {last}.")


def _earlier_records(output: str | os.PathLike | None, *, resume: bool) -> tuple[list[dict[str, Any]], int]:
    """With `resume`, the records already in `output` and the byte length of its complete lines; otherwise none,
    and UsageError if `output` already holds something (a report is never overwritten)."""
    earlier: list[dict[str, Any]] = []
    keep = 0
    if output is not None:
        path = Path(output)
        if path.exists() and not path.is_file():
            raise UsageError(f"The report {output} exists and is not a file.")
        if resume:
            earlier, keep = read_report(path)
        elif path.exists() and path.stat().st_size:
            raise UsageError(
                f"The report {output} exists and is not empty.",
                hint="Pass --resume to continue that scan, or another --output.",
            )
    return earlier, keep


def run_scan(
    sources: list[str],
    options: ScanOptions,
    *,
    output: str | os.PathLike | None = None,
    resume: bool = False,
    jobs: int | None = None,
    backend: str = "local",
    address: str | None = None,
    on_start: Callable[[list[ScanTask]], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> ScanResult:
    """Discover the adapters of `sources`, run each (skipping, with `resume`, those already in `output`), append
    each record to `output` as it arrives and return them all. Ctrl-C / SIGTERM end the scan early with
    `interrupted=True` (the records so far are written); they are not raised.

    `on_start(tasks)` gets the tasks that will run (e.g. to size a progress bar), `on_record(record)` each record."""
    _check_arguments(options, jobs=jobs, resume=resume, output=output)
    earlier, keep = _earlier_records(output, resume=resume)
    tasks = discover(list(sources), normalize_root=options.normalize_root)
    done = {r["id"] for r in earlier}
    todo = [t for t in tasks if t.id not in done]
    result = ScanResult(records=list(earlier), resumed=len(earlier), discovered=len(tasks))
    result.output = str(output) if output is not None else None
    result.normalizing = bool(options.normalize_root)
    run_all = _executor(backend, address)
    writer = ReportWriter(output, keep_bytes=keep) if output is not None else None
    seen: set[str] = set(done)

    def accept(record: dict[str, Any]) -> None:
        if record["id"] in seen:  # an executor that retried a task: the first record stands
            return
        seen.add(record["id"])
        if writer is not None:
            writer.write(record)
        result.records.append(record)
        if on_record is not None:
            on_record(record)

    if on_start is not None:
        on_start(todo)
    try:
        with _sigterm_as_interrupt():
            run_all(todo, options, on_result=accept, jobs=jobs)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through ScanInterrupted
        result.interrupted = True
    finally:
        if writer is not None:
            writer.close()
    return result
