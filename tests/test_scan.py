"""`lora-convert scan` (issue 15): a generated registry with planted defects, resume after SIGTERM, a hung adapter,
--normalize mirroring the tree. Worker processes are real (spawned); nothing here measures time."""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import FIXTURES
from lora_convert.errors import UsageError
from lora_convert.scan.discover import discover, output_path
from lora_convert.scan.report import read_report
from scan_planted import HANG_IN_BATCH, KILL, SLOW, SLOW_S, SLOW_START, planted_task

# Whole scans in worker processes, with timeouts and signals: not the unit layer (`make test-fast` skips this module).
pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-deepseek-v3"
WEIGHTS = "adapter_model.safetensors"
# id -> the error code its planted defect must produce (and the only error of that adapter).
PLANTED = {
    "bad/nan": "data.nan",
    "bad/shape": "shapes.out-features",
    "bad/missing-b": "pairs.missing-B",
    "bad/config": "config.wrong-type",
}
CLEAN = {"team-a/llama", "team-a/mixtral", "team-b/llama5", "team-b/qwen/moe", "team-b/deepseek"}


def _copy_case(root: Path, case: str, ident: str) -> Path:
    """A PEFT-written fixture adapter at root/ident whose config names its base folder (so shapes are checked)."""
    dst = root / ident
    shutil.copytree(FIXTURES / "cases" / case / "adapter", dst)
    base = json.loads((FIXTURES / "cases" / case / "case.json").read_text())["base"]
    _set_config(dst, base_model_name_or_path=str((FIXTURES / "bases" / base).resolve()))
    return dst


def _set_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _mutate(folder: Path, change) -> None:
    tensors = {k: v.copy() for k, v in load_file(folder / WEIGHTS).items()}
    change(tensors)
    save_file(tensors, folder / WEIGHTS)


def _first(tensors: dict, part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


def build_registry(root: Path) -> Path:
    for case, ident in [
        ("v4_llama", "team-a/llama"),
        ("v4_mixtral", "team-a/mixtral"),
        ("v5_llama", "team-b/llama5"),
        ("v5_qwen3_moe", "team-b/qwen/moe"),
    ]:
        _copy_case(root, case, ident)
    shutil.copytree(EXAMPLE / "adapter", root / "team-b/deepseek")
    _set_config(root / "team-b/deepseek", base_model_name_or_path=str(EXAMPLE / "base"))

    def nan(t):
        k = _first(t, "lora_A")
        t[k].flat[3] = np.nan

    def shape(t):
        k = _first(t, "lora_B")
        t[k] = np.full((t[k].shape[0] + 3, t[k].shape[1]), 0.01, t[k].dtype)

    def missing_b(t):
        del t[_first(t, "lora_B")]

    _mutate(_copy_case(root, "v4_llama", "bad/nan"), nan)
    _mutate(_copy_case(root, "v4_llama", "bad/shape"), shape)
    _mutate(_copy_case(root, "v4_llama", "bad/missing-b"), missing_b)
    _set_config(_copy_case(root, "v4_llama", "bad/config"), r="eight")
    # Not adapters, and not to be reported: a hidden folder and a stray file.
    (root / ".cache").mkdir()
    shutil.copytree(root / "bad/nan", root / ".cache/old")
    (root / "README.md").write_text("registry\n")
    return root


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    return build_registry(tmp_path_factory.mktemp("registry"))


HANG = "org/stalled"  # a Hub id whose download never answers (see `stalled_hub`)


@pytest.fixture
def stalled_hub(monkeypatch, tmp_path):
    """A Hub that accepts connections and never answers, as a stalled proxy or a black-holed route does: a local
    socket that listens (the kernel completes the handshakes into its backlog) but is never accepted from, with
    huggingface_hub's timeouts raised so that fetching HANG waits for ten minutes, so its worker never answers.
    Set in the test process (spawned workers inherit it); yields the whole environment, to pass to a CLI subprocess."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    settings = {
        "HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}",
        "HF_HOME": str(tmp_path / "hf-home"),  # an empty cache: nothing of HANG is found without the Hub
        "HF_HUB_ETAG_TIMEOUT": "600",
        "HF_HUB_DOWNLOAD_TIMEOUT": "600",
    }
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest sets it; the Hub must be asked to hang on it
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    try:
        yield dict(os.environ)
    finally:
        server.close()


def _stop_scan_after(args: list[str], env: dict, report: Path, records: int, sig: int) -> tuple[int, str, str]:
    """Run the scan CLI, send `sig` once its report holds `records` lines (while it still runs); its exit code,
    stdout and stderr."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while proc.poll() is None and (not report.exists() or report.read_text().count("\n") < records):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("lora-convert")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lora_convert"]


def _by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}


def _errors(record: dict) -> list[str]:
    return [f["code"] for f in record["findings"] if f["severity"] == "error"]


# --------------------------------------------------------------------------------------------- the report
def test_scan_flags_exactly_the_planted_defects(registry, tmp_path):
    from lora_convert import scan_adapters

    report = tmp_path / "scan.jsonl"
    result = scan_adapters(registry, jobs=2, output=report)
    records = _by_id(result.records)
    assert set(records) == CLEAN | set(PLANTED)  # .cache and README.md are not adapters
    flagged = {i for i, r in records.items() if r["status"] != "ok"}
    assert flagged == set(PLANTED)
    for ident, code in PLANTED.items():
        assert records[ident]["status"] == "findings" and _errors(records[ident]) == [code], records[ident]
    for ident in CLEAN:
        assert records[ident]["exit_code"] == 0 and records[ident]["family"], records[ident]
        assert "data" in records[ident]["checks"]["run"]
    assert not result.ok
    # The file holds the same records, one per line.
    on_disk, _ = read_report(report)
    assert sorted(r["id"] for r in on_disk) == sorted(records)
    summary = result.summary
    assert summary["status"] == {"ok": len(CLEAN), "findings": len(PLANTED)}
    assert {c: v["adapters"] for c, v in summary["codes"].items() if v["severity"] == "error"} == dict.fromkeys(
        PLANTED.values(), 1
    )
    assert {w["id"] for w in summary["worst"]} == set(PLANTED)
    assert summary["families"]["llama"]["adapters"] == 6


def test_cli_summary_json_and_exit_codes(registry, tmp_path):
    run = subprocess.run(
        [*_cli(), "scan", str(registry), "--jobs", "2", "--format", "json"], capture_output=True, text=True
    )
    assert run.returncode == 1, run.stderr
    doc = json.loads(run.stdout)
    assert doc["ok"] is False and doc["summary"]["adapters"] == len(CLEAN) + len(PLANTED)
    assert [r["id"] for r in doc["records"]] == sorted(CLEAN | set(PLANTED))

    clean = subprocess.run([*_cli(), "scan", str(registry / "team-a"), "-j", "1"], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    assert "By family" in clean.stdout and "llama" in clean.stdout and "OK: every adapter passed." in clean.stdout


def test_checks_selects_groups(registry):
    from lora_convert import scan_adapters

    result = scan_adapters(registry / "bad", checks=["config", "keys", "pairs"], jobs=1)
    records = _by_id(result.records)
    # Without the data and shapes checks, the NaN and the wrong shape go unseen, and the report says so.
    assert records["nan"]["status"] == "ok" and records["shape"]["status"] == "ok"
    assert _errors(records["missing-b"]) == ["pairs.missing-B"]
    assert records["nan"]["checks"]["run"] == ["config", "keys", "pairs"]
    assert records["nan"]["checks"]["skipped"]["data"] == "not selected by --checks"
    with pytest.raises(UsageError, match="Unknown check"):
        scan_adapters(registry, checks=["nope"])


def test_engine_outcomes_are_counted(registry):
    from lora_convert import scan_adapters

    result = scan_adapters(registry / "team-b" / "deepseek", engine="vllm", jobs=1)
    (record,) = result.records
    fired = [f["code"] for f in record["findings"] if f["code"].startswith("engine.vllm.")]
    assert fired and sum(record["engine_outcomes"].values()) == len(fired)
    assert result.summary["engine_outcomes"]


# ------------------------------------------------------------------------------------- hangs and resume
def test_a_hung_adapter_is_timed_out_and_the_others_finish(registry, tmp_path, stalled_hub):
    from lora_convert import scan_adapters

    # A second SOURCE folder (empty) keeps this a scan of several folders, whose ids carry the folder name.
    (tmp_path / "more").mkdir()
    result = scan_adapters([registry, tmp_path / "more", HANG], jobs=2, timeout=2)
    records = _by_id(result.records)
    assert records[HANG]["status"] == "timeout"
    assert records[HANG]["error"]["type"] == "Timeout"
    others = {i: r for i, r in records.items() if i != HANG}
    assert len(others) == len(CLEAN) + len(PLANTED)  # several SOURCE folders: ids carry the folder name
    assert {i for i, r in others.items() if r["status"] != "ok"} == {f"{registry.name}/{i}" for i in PLANTED}


def test_resume_after_sigterm_completes_the_report_without_duplicates(registry, tmp_path, stalled_hub):
    # The stalled Hub adapter (0 bytes known: scheduled last) keeps the first scan running until it is stopped.
    report, page = tmp_path / "scan.jsonl", tmp_path / "fleet.html"
    args = [*_cli(), "scan", str(registry), HANG, "--jobs", "1", "--output", str(report), "--html", str(page)]
    returncode, _, err = _stop_scan_after([*args, "--timeout", "600"], stalled_hub, report, 3, signal.SIGTERM)
    assert returncode == 130, err
    assert "--resume" in err
    first, _ = read_report(report)
    assert len(first) >= 3 and HANG not in {r["id"] for r in first}
    # the interrupted scan's fleet page is written, says so, and holds exactly the records of the report
    html = page.read_text()
    assert 'id="incomplete"' in html and f'data-total="adapters">{len(first)}<' in html
    # A line torn by a kill mid-write is dropped, not kept or duplicated.
    with open(report, "ab") as handle:
        handle.write(b'{"id": "team-a/ll')
    resumed = subprocess.run(
        [*args, "--resume", "--timeout", "2"], capture_output=True, text=True, timeout=300, env=stalled_hub
    )
    assert resumed.returncode == 1, resumed.stderr
    lines = report.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert len(ids) == len(set(ids)) == len(CLEAN) + len(PLANTED) + 1
    assert ids[: len(first)] == [r["id"] for r in first]
    assert _by_id([json.loads(x) for x in lines])[HANG]["status"] == "timeout"
    assert 'id="incomplete"' not in page.read_text()  # the resumed, complete scan replaced its page


def test_an_existing_report_needs_resume(registry, tmp_path):
    from lora_convert import scan_adapters

    report = tmp_path / "scan.jsonl"
    report.write_text('{"id": "x"}\n')
    with pytest.raises(UsageError, match="exists and is not empty") as refused:
        scan_adapters(registry, output=report)
    assert "--resume" in refused.value.hint
    with pytest.raises(UsageError, match="--output"):
        scan_adapters(registry, resume=True)


def test_read_report_ignores_only_a_torn_last_line(tmp_path):
    report = tmp_path / "r.jsonl"
    report.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "sta')
    records, good = read_report(report)
    assert [r["id"] for r in records] == ["a", "b"] and good == len(b'{"id": "a"}\n{"id": "b"}\n')
    report.write_bytes(b'{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(UsageError, match="line 2"):
        read_report(report)


# ------------------------------------------------------------------------ a crash or a hang inside a batch
# The local executor hands a worker several adapters per message (lora_convert/scan/local.py). A worker killed, or
# an adapter hung, in the middle of a batch must cost that adapter alone: the adapters before it in the batch keep
# the records they sent, the ones after it never ran and go back to the queue, and every adapter gets one record.
BATCH = 4  # adapters per batch in these tests (the executor's own size shrinks towards the end of a scan)
FLEET = 20  # plain adapters, fleet/a00 .. fleet/a19, all of one size: scheduled in id order
# The planted adapters (KILL, HANG_IN_BATCH) and the slow ones (SLOW, SLOW_START) are played by planted_task, in
# tests/scan_planted.py: a module of its own, so that the workers import it by its top-level name.
# Timeouts here hold on a loaded 2-core machine: a worker's start-up (spawn, imports: seconds under load) is not on
# any adapter's clock (test_a_slow_worker_start_is_not_the_adapters_time), and a tiny adapter is ~50 ms of work, so
# TIMEOUT_S leaves it seconds of margin while SLOW_S + SLOW_S runs past it.
TIMEOUT_S = 6


def test_planted_task_is_importable_by_the_workers_without_the_repository_root(tmp_path):
    """A spawned worker unpickles planted_task by its module name, with the parent's sys.path, which has tests/
    (pytest's pythonpath) and not the repository root (nothing puts it there: issue 22)."""
    import pickle

    tests = Path(__file__).resolve().parent
    code = "import pickle, sys; f = pickle.loads(sys.stdin.buffer.read()); print(f.__module__, f.__name__)"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", SLOW_START)}
    env["PYTHONPATH"] = str(tests)
    done = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(planted_task), capture_output=True, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == [planted_task.__module__, "planted_task"]
    assert "." not in planted_task.__module__  # a top-level module, not tests.<module>


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Path:
    """FLEET copies of one fixture adapter plus a `-kill` and a `-hang` one, all of the same size."""
    root = tmp_path_factory.mktemp("fleet")
    first = _copy_case(root, "v4_llama", "fleet/a00")
    for i in range(1, FLEET):
        shutil.copytree(first, root / f"fleet/a{i:02d}")
    for ident in (KILL, HANG_IN_BATCH):
        shutil.copytree(first, root / ident)
    return root


@pytest.fixture
def batches(monkeypatch) -> list[list[str]]:
    """Fixed batches of BATCH adapters, and the list of every batch the executor hands out (ids), in order."""
    from lora_convert.scan import local

    monkeypatch.setattr(local, "_batch_limit", lambda remaining, jobs: BATCH)
    sent: list[list[str]] = []
    take = local._take_batch

    def spy(pending, limit):
        batch = take(pending, limit)
        sent.append([t.id for t in batch])
        return batch

    monkeypatch.setattr(local, "_take_batch", spy)
    return sent


def _once(records: list[dict]):
    """on_result for run_all: appends to `records`, and fails at once on a second record for an adapter (an
    executor that re-ran a crashing adapter would otherwise crash it again and again)."""

    def on_result(record: dict) -> None:
        assert record["id"] not in {r["id"] for r in records}, f"a second record for {record['id']}"
        records.append(record)

    return on_result


def _without_timings(records: list[dict]) -> dict[str, dict]:
    """Records by id, without what depends on the clock (`seconds`, and the seconds in a timeout's message)."""
    out = {}
    for r in records:
        r = {k: v for k, v in r.items() if k != "seconds"}
        if r["status"] == "timeout":
            r["error"] = {"type": r["error"]["type"]}
        out[r["id"]] = r
    return out


def _expected(tasks, *, killed=(), hung=()) -> dict[str, dict]:
    """What each task's record must be: run_task's own record in this process, `crashed` / `timeout` for the planted."""
    from lora_convert.scan.task import ScanOptions, crash_record, run_task, timeout_record

    records = []
    for t in tasks:
        if t.id in killed:
            records.append(crash_record(t, "the worker was killed by SIGKILL"))
        elif t.id in hung:
            records.append(timeout_record(t, 0.0))
        else:
            records.append(run_task(t, ScanOptions()))
    return _without_timings(records)


def test_a_worker_killed_mid_batch_costs_only_its_adapter(fleet, batches):
    from lora_convert.scan import local
    from lora_convert.scan.task import ScanOptions

    tasks = [t for t in discover([str(fleet)]) if t.id != HANG_IN_BATCH]
    records: list[dict] = []
    local.run_all(tasks, ScanOptions(timeout_s=60), on_result=_once(records), jobs=2, task_fn=planted_task)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == len(tasks)  # one record each: none lost, none twice
    got = _without_timings(records)
    assert got[KILL]["status"] == "crashed" and got[KILL]["error"]["type"] == "WorkerCrashed"
    assert "SIGKILL" in got[KILL]["error"]["message"]
    assert got == _expected(tasks, killed={KILL})  # every other adapter: exactly its normal record
    _handed_out_again(batches, KILL)


def _handed_out_again(sent: list[list[str]], ident: str, *, only_failure: bool = True) -> None:
    """The adapters after `ident` in its batch never ran in that worker: they were handed out again; the ones
    before it (which have their records) and `ident` itself were not. With one failure in the scan, no adapter
    was handed out more than twice (behind two failures, one may be re-queued twice)."""
    batch = next(b for b in sent if ident in b)
    at = batch.index(ident)
    assert 0 < at < len(batch) - 1, (ident, batch)  # the case under test: adapters before and after it in its batch
    count = {i: sum(i in b for b in sent) for b in sent for i in b}
    assert all(count[i] == 1 for i in batch[: at + 1]), sent
    assert all(count[i] >= 2 for i in batch[at + 1 :]), sent
    assert not only_failure or max(count.values()) == 2, sent


def test_an_adapter_hung_mid_batch_is_timed_out_alone(fleet, batches, monkeypatch):
    from lora_convert.scan import local
    from lora_convert.scan.task import ScanOptions

    # Each adapter has its own clock, started when the one before it in the batch finished: two adapters of the
    # first batch that take SLOW_S each (more than TIMEOUT_S together) stay within the timeout.
    assert SLOW_S < TIMEOUT_S < 2 * SLOW_S
    monkeypatch.setenv(SLOW, "fleet/a01,fleet/a02")
    tasks = [t for t in discover([str(fleet)]) if t.id != KILL]
    records: list[dict] = []
    local.run_all(tasks, ScanOptions(timeout_s=TIMEOUT_S), on_result=_once(records), jobs=2, task_fn=planted_task)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == len(tasks)
    (hung,) = [r for r in records if r["status"] == "timeout"]
    assert hung["id"] == HANG_IN_BATCH and hung["seconds"] >= TIMEOUT_S
    assert batches[0][:3] == ["fleet/a00", "fleet/a01", "fleet/a02"]
    assert _without_timings(records) == _expected(tasks, hung={HANG_IN_BATCH})
    _handed_out_again(batches, HANG_IN_BATCH)


def test_crash_and_hang_mid_batch_match_jobs_1_and_resume(fleet, batches, monkeypatch, tmp_path):
    """--jobs 2, interrupted and resumed, writes the report --jobs 1 writes in one go (apart from timings)."""
    import functools

    from lora_convert.scan import local
    from lora_convert.scan.report import run_scan
    from lora_convert.scan.task import ScanOptions

    options = ScanOptions(timeout_s=TIMEOUT_S)
    tasks = discover([str(fleet)])
    serial: list[dict] = []
    local.run_all(tasks, options, on_result=_once(serial), jobs=1, task_fn=planted_task)
    _handed_out_again(batches, KILL, only_failure=False)
    expected = _expected(tasks, killed={KILL}, hung={HANG_IN_BATCH})
    assert _without_timings(serial) == expected and len(serial) == len(tasks)

    # run_scan runs local.run_all (looked up when it starts): the same executor, with the planted task function.
    monkeypatch.setattr(local, "run_all", functools.partial(local.run_all, task_fn=planted_task))
    report = tmp_path / "scan.jsonl"
    seen: list[str] = []

    def stop_after_five(record):
        seen.append(record["id"])
        if len(seen) == 5:  # Ctrl-C while both workers hold a running and a queued batch
            raise KeyboardInterrupt

    first = run_scan([str(fleet)], options, output=report, jobs=2, on_record=stop_after_five)
    assert first.interrupted and len(first.records) == 5
    resumed = run_scan([str(fleet)], options, output=report, jobs=2, resume=True)
    assert not resumed.interrupted and resumed.resumed == 5
    on_disk, _ = read_report(report)
    ids = [r["id"] for r in on_disk]
    assert len(ids) == len(set(ids)) == len(tasks) and ids[:5] == seen
    assert _without_timings(on_disk) == expected


def test_a_slow_worker_start_is_not_the_adapters_time(fleet, batches, monkeypatch):
    """The flaky `crash_and_hang` case: under load, spawning a worker and importing took longer than the timeout,
    and its first adapter was recorded `timeout`. Its clock starts when the worker is READY."""
    from lora_convert.scan import local
    from lora_convert.scan.task import ScanOptions

    monkeypatch.setenv(SLOW_START, f"{os.getpid()}:3")
    tasks = [t for t in discover([str(fleet)]) if t.id not in (KILL, HANG_IN_BATCH)][:4]
    records: list[dict] = []
    local.run_all(tasks, ScanOptions(timeout_s=2), on_result=_once(records), jobs=2, task_fn=planted_task)
    assert _without_timings(records) == _expected(tasks)  # all four: their normal record, none timed out


def test_a_worker_that_never_starts_costs_its_first_adapter_a_crash(fleet, monkeypatch):
    """A worker still not READY after WORKER_START_S (or --timeout, if longer) is killed; the adapter it was given
    is recorded `crashed` (it never ran: not a `timeout` of that adapter) and the next goes to a fresh worker."""
    from lora_convert.scan import local
    from lora_convert.scan.task import ScanOptions

    monkeypatch.setattr(local, "WORKER_START_S", 1.0)
    monkeypatch.setenv(SLOW_START, f"{os.getpid()}:30")  # every worker: far longer than it is given
    tasks = discover([str(fleet)])[:2]
    records: list[dict] = []
    local.run_all(tasks, ScanOptions(timeout_s=1), on_result=_once(records), jobs=1, task_fn=planted_task)
    assert [r["id"] for r in records] == [t.id for t in tasks]
    for record in records:
        assert record["status"] == "crashed" and record["error"]["type"] == "WorkerCrashed", record
        assert re.fullmatch(r"the worker did not start within \d+ s", record["error"]["message"]), record
    assert not [p for p in multiprocessing.active_children() if p.name == "lora-convert-scan-worker"]


def test_an_exception_in_on_result_stops_every_worker(fleet):
    """An exception out of on_result (a full disk under the report, or Ctrl-C in it) propagates at once, and no
    worker is left running: each is killed or told to stop, and waited for."""
    from lora_convert.scan import local
    from lora_convert.scan.task import ScanOptions

    tasks = [t for t in discover([str(fleet)]) if t.id not in (KILL, HANG_IN_BATCH)]
    seen: list[str] = []

    def fail_on_the_third(record: dict) -> None:
        seen.append(record["id"])
        if len(seen) == 3:
            raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space left"):
        local.run_all(tasks, ScanOptions(timeout_s=60), on_result=fail_on_the_third, jobs=2, task_fn=planted_task)
    assert len(seen) == 3
    assert not [p for p in multiprocessing.active_children() if p.name == "lora-convert-scan-worker"]


@pytest.mark.parametrize("large", [False, True])
def test_a_worker_holds_at_most_its_running_and_one_queued_batch(fleet, batches, monkeypatch, large):
    """Memory stays bounded: while its first adapter runs (slowly), a worker has been sent its running batch and
    QUEUED_BATCHES more, not the queue; behind a large adapter (alone in its batch), nothing."""
    from lora_convert.scan import local
    from lora_convert.scan.task import ScanOptions

    if large:
        monkeypatch.setattr(local, "BATCH_MAX_BYTES", 1)  # every adapter is large
    tasks = [t for t in discover([str(fleet)]) if t.id not in (KILL, HANG_IN_BATCH)][:10]
    monkeypatch.setenv(SLOW, tasks[0].id)
    sent_at_first_record: list[int] = []
    records: list[dict] = []

    def on_result(record: dict) -> None:
        sent_at_first_record.append(len(batches))
        records.append(record)

    local.run_all(tasks, ScanOptions(timeout_s=60), on_result=on_result, jobs=1, task_fn=planted_task)
    assert _without_timings(records) == _expected(tasks)
    assert batches[0][0] == tasks[0].id
    assert sent_at_first_record[0] == (1 if large else 1 + local.QUEUED_BATCHES), batches
    assert max(len(b) for b in batches) == (1 if large else BATCH)


def test_legacy_bin_adapters_go_to_one_worker(tmp_path, monkeypatch):
    """Reading an adapter_model.bin imports torch (~1 s and ~300 MB per worker): one worker takes them all, first;
    another takes some only when nothing else is left and more than TORCH_JOIN per torch worker are waiting."""
    from lora_convert.scan import local
    from lora_convert.scan.discover import tensor_files
    from lora_convert.scan.task import ScanTask

    def task(name: str, *files: str) -> ScanTask:
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_bytes(b"x")
        return ScanTask(id=name, spec=str(tmp_path / name), nbytes=1, legacy_bin=tensor_files(str(tmp_path / name))[1])

    both = task("both", "adapter_model.bin", "adapter_model.safetensors")  # safetensors is what gets read
    plain = task("st", "adapter_model.safetensors")
    queue = local._Queue([task("bin2", "adapter_model.bin"), plain, both, task("bin1", "adapter_model.bin")])
    assert [t.id for t in queue.torch] == ["bin1", "bin2"] and [t.id for t in queue.plain] == ["both", "st"]
    assert queue.lane(False, 0) is queue.torch  # no worker holds torch yet: the first one fed takes them
    assert queue.lane(False, 1) is queue.plain and queue.lane(True, 1) is queue.torch
    queue.plain.clear()
    assert queue.lane(False, 1) is None  # 2 waiting: cheaper for the torch worker to do them than a 2nd import
    monkeypatch.setattr(local, "TORCH_JOIN", 1)
    assert queue.lane(False, 1) is queue.torch
    (bin1,) = [t for t in queue.torch if t.id == "bin1"]
    queue.torch.remove(bin1)
    queue.put_back([bin1, both])  # each back to its own lane, at the front
    assert queue.torch[0] is bin1 and list(queue.plain) == [both]


# ------------------------------------------------------------------------------------------ --normalize
def test_normalize_mirrors_the_tree_and_skips_failing_adapters(registry, tmp_path):
    from lora_convert import scan_adapters

    out = tmp_path / "converted"
    result = scan_adapters(registry, normalize=out, layout="stacked", jobs=2)
    records = _by_id(result.records)
    for ident in CLEAN:
        norm = records[ident]["normalize"]
        assert norm["output"] == str(out / ident) and norm["bytes_out"] > 0, records[ident]
        assert (out / ident / "adapter_config.json").is_file()
    for ident in PLANTED:
        assert records[ident]["normalize"]["output"] is None and not (out / ident).exists()
    # The converted tree is a registry of its own, with the same ids, and validates clean.
    again = scan_adapters(out, jobs=2)
    assert {r["id"] for r in again.records} == CLEAN
    assert all(r["status"] == "ok" for r in again.records), [r for r in again.records if r["status"] != "ok"]


def test_a_refused_conversion_is_an_error_record(registry, tmp_path):
    from lora_convert import scan_adapters

    # Mixtral's router LoRA cannot be served by SGLang 0.5.23: the converter refuses, the scan records it.
    result = scan_adapters(registry / "team-a", normalize=tmp_path / "out", layout="sglang", jobs=1)
    records = _by_id(result.records)
    assert records["llama"]["status"] == "ok"
    assert records["mixtral"]["status"] == "error" and records["mixtral"]["exit_code"] == 1
    assert records["mixtral"]["error"]["type"] == "UnsupportedAdapterError"
    assert not (tmp_path / "out" / "mixtral").exists() and not result.ok


def test_normalize_inside_the_source_is_not_rescanned(registry, tmp_path):
    from lora_convert import scan_adapters

    source = tmp_path / "reg"
    shutil.copytree(registry / "team-a", source)
    out = source / "converted"
    for _ in range(2):  # the second run replaces its own outputs and does not scan them as adapters
        result = scan_adapters(source, normalize=out, layout="stacked", jobs=1)
        assert {r["id"] for r in result.records} == {"llama", "mixtral"}
        assert all(r["status"] == "ok" for r in result.records), result.records
    assert (out / "llama" / "lora_layout.json").is_file()


def _fleet_for_the_recipe(root: Path) -> Path:
    """The DeepSeek example, whose only errors under --engine sglang are what `--layout sglang` fixes; a clean
    llama; a NaN llama (an error no layout fixes); Mixtral, whose router LoRA `--layout sglang` refuses."""
    shutil.copytree(EXAMPLE / "adapter", root / "deepseek")
    _set_config(root / "deepseek", base_model_name_or_path=str(EXAMPLE / "base"))
    _copy_case(root, "v4_llama", "llama")
    _copy_case(root, "v4_mixtral", "mixtral")
    _mutate(_copy_case(root, "v4_llama", "nan"), lambda t: t[_first(t, "lora_A")].flat.__setitem__(3, np.nan))
    return root


def test_readme_fleet_recipe_converts_what_the_layout_fixes(tmp_path):
    """`scan SRC --engine sglang --normalize OUT --layout sglang` (README's fleet recipe): the adapter whose only
    errors are the engine.sglang.* findings the layout exists to fix is converted, and its output validates OK."""
    from lora_convert.convert.blockers import normalize_blockers

    source, out, report = _fleet_for_the_recipe(tmp_path / "reg"), tmp_path / "served", tmp_path / "convert.jsonl"
    args = [*_cli(), "scan", str(source), "--engine", "sglang", "--normalize", str(out), "--layout", "sglang"]
    run = subprocess.run([*args, "--output", str(report), "-j", "2"], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr  # the sources have errors: the scan says so
    records = _by_id(read_report(report)[0])
    deepseek = records["deepseek"]
    assert _errors(deepseek) and all(c.startswith("engine.sglang.") for c in _errors(deepseek))
    assert deepseek["normalize"]["output"] == str(out / "deepseek"), deepseek
    assert records["llama"]["normalize"]["output"] == str(out / "llama")
    assert records["nan"]["normalize"]["output"] is None and "data.nan" in records["nan"]["normalize"]["skipped"]
    assert records["mixtral"]["status"] == "error" and records["mixtral"]["error"]["type"] == "UnsupportedAdapterError"
    text = " ".join(run.stdout.split())
    assert "normalize: converted 2, skipped 1 (errors the layout does not fix), failed 1" in text, run.stdout
    assert "OK: every adapter passed." not in run.stdout
    # What was converted is served exactly: the output validates clean against the same engine.
    for ident in ("deepseek", "llama"):
        check = subprocess.run(
            [*_cli(), "validate", str(out / ident), "--engine", "sglang", "--no-smoke"], capture_output=True, text=True
        )
        assert check.returncode == 0 and check.stdout.strip().splitlines()[-1].startswith("OK: "), check.stdout
    # One decision: `normalize --layout sglang` itself converts the same adapter, and the other layouts would not.
    from lora_convert.pipeline.commands import validate

    findings = validate(source / "deepseek", engine="sglang", smoke=False).findings
    assert normalize_blockers(findings, "sglang") == []
    assert {f.code for f in normalize_blockers(findings, "stacked")} == set(_errors(deepseek))
    assert {f.code for f in normalize_blockers(findings, "vllm")} == set(_errors(deepseek))
    made = subprocess.run(
        [*_cli(), "normalize", str(source / "deepseek"), "-o", str(tmp_path / "one"), "--layout", "sglang"],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr


def test_readme_vllm_recipe_counts_what_it_did(tmp_path):
    """The README's own line, `--engine vllm --normalize ./served --layout vllm`: every adapter is converted,
    skipped or failed, and the summary counts each."""
    from lora_convert import scan_adapters

    source = _fleet_for_the_recipe(tmp_path / "reg")
    result = scan_adapters(source, engine="vllm", normalize=tmp_path / "served", layout="vllm", jobs=2)
    counts = result.summary["normalize"]
    assert sum(counts.values()) == len(result.records) == 4
    assert counts["skipped"] >= 1 and counts["converted"] >= 1, result.records
    assert _by_id(result.records)["nan"]["normalize"]["skipped"]


def test_an_interrupted_scan_is_never_ok(registry):
    """`OK: every adapter passed.` was printed just before `Interrupted: 2 of 31 ...` (exit 130)."""
    from rich.console import Console

    from lora_convert.cli import scan_cmd
    from lora_convert.scan.report import ScanResult

    clean = _scan_records(registry / "team-a")
    result = ScanResult(records=clean, discovered=len(clean) + 3, interrupted=True)
    assert not result.ok and result.to_json()["ok"] is False and result.summary["ok"] is False
    console = Console(record=True, width=200)
    original, scan_cmd.stdout = scan_cmd.stdout, console
    try:
        scan_cmd.render_human(result)
    finally:
        scan_cmd.stdout = original
    text = console.export_text()
    assert "OK" not in text and "every adapter passed" not in text
    assert f"INTERRUPTED: {len(clean)} of {len(clean) + 3} adapters have a record" in text


def _scan_records(source: Path) -> list[dict]:
    from lora_convert import scan_adapters

    result = scan_adapters(source, jobs=1)
    assert result.ok, result.records
    return result.records


def test_ctrl_c_mid_scan_prints_no_ok(registry, tmp_path, stalled_hub):
    """The CLI end to end: every adapter scanned so far passed, the stalled Hub adapter is still running when
    Ctrl-C comes: exit 130, and no OK anywhere in what it printed."""
    report = tmp_path / "scan.jsonl"
    args = [*_cli(), "scan", str(registry / "team-a"), HANG, "--jobs", "1", "--output", str(report)]
    returncode, out, err = _stop_scan_after(args, stalled_hub, report, 2, signal.SIGINT)
    assert returncode == 130, err
    assert "ok 2" in out and "OK" not in out and "every adapter passed" not in out, out
    assert out.strip().splitlines()[-1] == "INTERRUPTED: 2 of 3 adapters have a record; the others were not scanned."
    assert "Interrupted: 2 of 3 adapters" in err


# ------------------------------------------------------------------------------------------- discovery
def test_discover_list_files_hub_ids_and_safe_output_paths(registry, tmp_path):
    listing = tmp_path / "adapters.txt"
    listing.write_text(f"# the fleet\n{registry / 'team-a' / 'llama'}\n\norg/some-adapter  # on the Hub\n")
    tasks = discover([str(listing), "org/other@v2"], normalize_root=str(tmp_path / "out"))
    assert [t.id for t in tasks] == [str(registry / "team-a" / "llama"), "org/some-adapter", "org/other@v2"]
    assert tasks[0].nbytes == (registry / "team-a" / "llama" / WEIGHTS).stat().st_size
    assert tasks[1].nbytes == 0 and tasks[1].output == str(tmp_path / "out" / "org" / "some-adapter")
    assert tasks[0].output.startswith(str(tmp_path / "out") + os.sep)  # an absolute path id stays under the root
    with pytest.raises(UsageError):
        output_path(tmp_path, "../escape")
    with pytest.raises(UsageError):
        discover([str(tmp_path / "no-such-folder")])


def test_ray_without_ray_installed_is_an_environment_problem(registry, monkeypatch):
    from typer.testing import CliRunner

    from lora_convert.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    result = CliRunner().invoke(app, ["scan", str(registry), "--ray"])
    assert result.exit_code == 3
    assert "pip install 'lora-convert[ray]'" in result.stderr


# ------------------------------------------------------------------------------------------------- --help
def test_help_prints_every_bracket_of_the_option_texts():
    """Rich markup ate `[ray]` from `pip install 'lora-convert[ray]'`: help texts are escaped, and printed whole."""
    from typer.testing import CliRunner

    from lora_convert.cli import app
    from lora_convert.cli.scan_cmd import scan_command

    result = CliRunner().invoke(app, ["scan", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "pip install 'lora-convert[ray]'" in text
    for param in inspect.signature(scan_command).parameters.values():
        for bracket in re.findall(r"\[[^\]\s]*\]", getattr(param.default, "help", None) or ""):
            assert bracket in text, (param.name, bracket)


@pytest.mark.parametrize("kind", ["empty folder", "only a link to an adapter", "empty list file"])
def test_a_scan_that_finds_no_adapter_is_an_error_not_an_ok(tmp_path, kind):
    # a gate that checked nothing never passes: exit 2 with what was searched, not "OK: every adapter passed."
    from typer.testing import CliRunner

    from lora_convert.cli import app

    source = tmp_path / "registry"
    source.mkdir()
    if kind == "only a link to an adapter":
        (source / "linked").symlink_to(FIXTURES / "cases" / "v5_llama" / "adapter", target_is_directory=True)
    elif kind == "empty list file":
        source = tmp_path / "adapters.txt"
        source.write_text("# nothing yet\n", encoding="utf-8")
    with pytest.raises(UsageError, match="No adapter was found"):
        discover([str(source)])
    result = CliRunner().invoke(app, ["scan", str(source), "--no-smoke"])
    assert result.exit_code == 2, result.output
    assert "No adapter was found" in result.stderr and "OK" not in result.stdout
