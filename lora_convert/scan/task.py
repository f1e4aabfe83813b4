"""One adapter of a scan: what to do with it (`ScanTask`, `ScanOptions`) and the function that does it (`run_task`).

This is the contract between the scan's executors: `lora_convert/scan/local.py` (worker processes) and
`lora_convert/scan/ray_backend.py` (Ray tasks) both call `run_task` and write what it returns, one JSON line per
adapter, through `lora_convert/scan/report.py`. Everything here is picklable and the record is plain JSON, so the
same task gives the same record (apart from `seconds`) whichever executor ran it.

An executor implements

    def run_all(tasks: list[ScanTask], options: ScanOptions, *, on_result: Callable[[dict], None],
                jobs: int | None = None) -> None

calling `on_result(record)` once per task, in the order the records arrive, with `timeout_record` for a task that
ran past `options.timeout_s` and `crash_record` for a worker that died.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_convert.errors import EXIT_FINDINGS, EXIT_INTERNAL, LoraConvertError, UsageError

STATUSES = ("ok", "findings", "error", "crashed", "timeout")
# Statuses that make `lora-convert scan` exit 1 (an adapter with errors, or one that could not be scanned).
FAILING = ("findings", "error", "crashed", "timeout")
MAX_KEYS = 20  # keys kept per finding in a record (SARIF locates a finding by them)

__all__ = ["FAILING", "STATUSES", "ScanOptions", "ScanTask", "crash_record", "new_record", "run_task", "timeout_record"]


@dataclass(frozen=True)
class ScanTask:
    """One adapter."""

    id: str  # stable identity: the path relative to its SOURCE root (or the Hub id / list line)
    spec: str  # what validate/normalize get (a local folder path or a Hub id)
    nbytes: int  # tensor bytes from headers/file sizes (0 if unknown): used to schedule largest first
    output: str | None = None  # with --normalize: OUTROOT/<id>, mirroring the source tree
    # stored only as a legacy adapter_model.bin, which is read through torch (the local executor keeps those on one
    # worker); found by discovery's one listing of the folder
    legacy_bin: bool = False


@dataclass(frozen=True)
class ScanOptions:
    """Everything validate/normalize need for every adapter of the scan (picklable)."""

    base: str | None = None
    engine: str = "none"  # the first engine release asked for: validate's engine (findings, verdict, engine_outcomes)
    # the other releases asked for (`scan --engine` given several times, or `all`): their rules are evaluated too,
    # their findings added to the record's, and each release's outcome counts kept under "engines"
    more_engines: tuple[str, ...] = ()
    # the flags `engine`'s server runs with (validate --server-args; one command line, checked before the scan)
    server_args: str | None = None
    checks: tuple[str, ...] | None = None  # names of lora_convert.check.validate.CHECK_NAMES; None: all of them
    data_scan: bool = True
    smoke: bool | None = False  # a scan runs no forward pass unless asked: it would load torch in every worker
    allow_unchecked: bool = False
    strict: bool = False
    layout: str | None = None  # with normalize_root: "stacked", "sglang" or "peft"
    normalize_root: str | None = None
    timeout_s: float = 600.0


def new_record(task: ScanTask, status: str, **fields: Any) -> dict[str, Any]:
    """Every key in a fixed order, so that two reports of the same scan compare line by line."""
    record: dict[str, Any] = {
        "id": task.id,
        "adapter": task.spec,
        "status": status,
        "exit_code": None,
        "family": None,
        "base": None,
        "rank": None,
        "verdict": None,
        "findings": [],
        "checks": {"run": [], "skipped": {}},
        "engine_outcomes": {},
        "engines": {},
        "normalize": None,
        "seconds": 0.0,
        "bytes": task.nbytes,
        "error": None,
    }
    record.update(fields)
    return record


def timeout_record(task: ScanTask, seconds: float) -> dict[str, Any]:
    """What an executor records for a task it stopped after `seconds`."""
    return new_record(
        task,
        "timeout",
        seconds=round(seconds, 3),
        error={"type": "Timeout", "message": f"no result after {seconds:.0f} s (--timeout); the worker was stopped"},
    )


def crash_record(task: ScanTask, message: str) -> dict[str, Any]:
    """What an executor records for a task whose worker died (killed, segfault, out of memory)."""
    return new_record(task, "crashed", error={"type": "WorkerCrashed", "message": message})


def run_task(task: ScanTask, options: ScanOptions) -> dict[str, Any]:
    """Validate (and, with options.normalize_root, convert) one adapter. Never raises: a problem is the record."""
    started = time.monotonic()
    try:
        record = _run(task, options)
    except LoraConvertError as exc:  # nothing to check: no such folder, the Hub unreachable, a bad --base
        record = new_record(
            task,
            "error",
            exit_code=exc.exit_code,
            error={"type": type(exc).__name__, "message": exc.message + (f" Hint: {exc.hint}" if exc.hint else "")},
        )
    except Exception as exc:  # a bug in lora-convert: recorded, and the scan goes on with the next adapter
        record = new_record(
            task, "error", exit_code=EXIT_INTERNAL, error={"type": type(exc).__name__, "message": str(exc)}
        )
    record["seconds"] = round(time.monotonic() - started, 3)
    return record


def _run(task: ScanTask, options: ScanOptions) -> dict[str, Any]:
    adapter = _prepare(task.spec, options)  # read once; every engine release's checks and the conversion reuse it
    report = _validate(adapter, options)
    summary = report.summary
    adapter_bytes = (summary.get("adapter") or {}).get("bytes")
    findings = list(report.findings)
    engines = {}
    if options.engine != "none":
        engines = _release_outcomes(options.engine, report.findings, summary)
    failed_elsewhere = []
    for engine in options.more_engines:
        extra = _validate(adapter, options, engine=engine)
        fired = [f for f in extra.findings if _is_engine_finding(f.code)]
        findings += fired
        engines.update(_release_outcomes(engine, fired, extra.summary))
        if not extra.ok:
            failed_elsewhere.append(_spec(engine))
    ok = report.ok and not failed_elsewhere
    verdict = report.verdict()
    if failed_elsewhere:
        verdict += f" Also failed for {', '.join(failed_elsewhere)}."
    record = new_record(
        task,
        "ok" if ok else "findings",
        exit_code=report.exit_code if ok or not report.ok else EXIT_FINDINGS,
        family=summary.get("family"),
        base=report.base,
        rank=_rank(report),
        verdict=verdict,
        findings=[
            {"code": f.code, "severity": f.severity.value, "message": f.message, "keys": list(f.keys[:MAX_KEYS])}
            for f in findings
        ],
        checks=summary.get("checks") or {"run": [], "skipped": {}},
        engine_outcomes=_engine_outcomes(options.engine, report.findings),
        engines=dict(sorted(engines.items())),
        bytes=adapter_bytes if isinstance(adapter_bytes, int) else task.nbytes,
    )
    if options.normalize_root and task.output:
        record["normalize"] = _normalize(task, adapter, options, report)
        failed = record["normalize"].pop("exit_code", None)
        if failed is not None:  # it validated, but the converter refused it (e.g. not servable in that layout)
            record.update(status="error", exit_code=failed, error=record["normalize"]["error"])
    return record


def _prepare(spec: str, options: ScanOptions):
    """The adapter read once (lora_convert.pipeline.prepared.PreparedAdapter), or the spec itself when its files
    cannot be read: validate then reports that as a finding."""
    from lora_convert.errors import AdapterConfigError, AdapterFormatError
    from lora_convert.pipeline.prepared import prepare

    try:
        return prepare(spec, base=options.base)
    except (AdapterConfigError, AdapterFormatError):
        return spec


def _validate(adapter, options: ScanOptions, engine: str | None = None):
    """`validate`'s checks on one adapter (prepared, or a spec), or only those named by options.checks (in
    validate's order). With `engine` (one of options.more_engines): only that release's engine rules, without
    reading tensor data again (the data scan refines the rules' messages, not whether they fire)."""
    from lora_convert.pipeline.commands import validate

    if engine is not None:
        return validate(
            adapter,
            base=options.base,
            engine=engine,
            data_scan=False,
            smoke=False,
            strict=options.strict,
            allow_unchecked=options.allow_unchecked,
            checks=("engine",),
        )
    return validate(
        adapter,
        base=options.base,
        engine=options.engine,
        server_args=options.server_args,
        data_scan=options.data_scan,
        smoke=options.smoke,
        strict=options.strict,
        allow_unchecked=options.allow_unchecked,
        checks=options.checks,
    )


def _spec(engine: str) -> str:
    """`engine==version` of an engine name or release (the key of a record's "engines")."""
    from lora_convert.engines.rules import resolve_engine

    return resolve_engine(engine).spec


def _is_engine_finding(code: str) -> bool:
    from lora_convert.codes import ENGINE_PREFIX

    return code.startswith((ENGINE_PREFIX, "engine-rules."))


def _release_outcomes(engine: str, findings, summary: dict[str, Any]) -> dict[str, dict[str, int] | None]:
    """{"engine==version": {outcome: rules fired}} when the release's rules were all evaluated (an empty count: none
    fired); {"engine==version": None} when they were not (the engine check skipped, or `engine-rules.unchecked`).
    A release absent from a record's "engines" was not asked for."""
    checks = summary.get("checks") or {}
    evaluated = "engine" in (checks.get("run") or []) and not any(
        f.code.startswith("engine-rules.unchecked") for f in findings
    )
    return {_spec(engine): _engine_outcomes(engine, findings) if evaluated else None}


def _rank(report) -> int | None:
    """The adapter's LoRA rank: the largest of r and its rank_pattern values (None when unknown)."""
    r = (report.summary.get("adapter") or {}).get("r")
    ranks = [r] if isinstance(r, int) and not isinstance(r, bool) else []
    if report.adapter_path:
        from lora_convert.io.small_files import read_small_json

        try:
            config = read_small_json(Path(report.adapter_path) / "adapter_config.json", UsageError)
        except LoraConvertError:  # unreadable: validate's findings say so
            config = None
        pattern = config.get("rank_pattern") if isinstance(config, dict) else None
        if isinstance(pattern, dict):
            ranks += [v for v in pattern.values() if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return max(ranks) if ranks else None


def _engine_outcomes(engine: str, findings) -> dict[str, int]:
    """{outcome: count} of the engine rules that fired (outcomes as in lora_convert/engines/*.json)."""
    if engine == "none":
        return {}
    from lora_convert.codes import ENGINE_PREFIX
    from lora_convert.engines.profiles import load_rules
    from lora_convert.engines.rules import resolve_engine

    prefix = f"{ENGINE_PREFIX}{resolve_engine(engine).engine}."  # codes name the engine, not the release
    outcome_of = {rule["id"]: rule["outcome"] for rule in load_rules(engine)}
    counts = Counter(outcome_of.get(f.code[len(prefix) :], "unknown") for f in findings if f.code.startswith(prefix))
    return dict(sorted(counts.items()))


def _normalize(task: ScanTask, adapter, options: ScanOptions, report) -> dict[str, Any]:
    """Write the converted adapter to task.output. An adapter with errors the layout does not fix is not converted
    (its output would carry them into serving): the same decision `normalize --layout L` makes
    (lora_convert/convert/blockers.py), so with --engine E --layout E an adapter whose only errors are what layout E
    rewrites is converted. A refusal of the converter is recorded, not raised."""
    from lora_convert.convert.blockers import normalize_blockers
    from lora_convert.pipeline.commands import normalize

    layout = options.layout or "stacked"
    out: dict[str, Any] = {"output": None, "bytes_out": 0}
    blockers = normalize_blockers(report.findings, layout, strict=options.strict)
    if blockers:
        codes = sorted({f.code for f in blockers})
        out["skipped"] = (
            f"the adapter has {len(blockers)} problem(s) --layout {layout} does not fix: {', '.join(codes)}"
        )
        return out
    try:
        # force: a scan re-run (or --resume after a kill) replaces its own previous output of this adapter; the
        # output-folder safety still refuses a folder that is not one, and any folder over or inside an input.
        result = normalize(adapter, Path(task.output), base=options.base, layout=layout, force=True)
    except LoraConvertError as exc:
        out["error"] = {"type": type(exc).__name__, "message": exc.message}
        out["exit_code"] = exc.exit_code  # taken out again by _run
        return out
    out["output"] = task.output
    out["bytes_out"] = result.bytes_out
    return out
