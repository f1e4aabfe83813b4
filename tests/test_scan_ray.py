"""`lora-convert scan --ray` (issue 15): the Ray executor on a local Ray instance (one start for the module) gives
the same report as the local `--jobs` executor apart from timings, and records a hanging or dying adapter without
stopping the scan. `make test` installs Ray (the `ray` extra)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
import ray

from lora_convert.errors import EnvironmentProblem
from lora_convert.scan import local, ray_backend
from lora_convert.scan.discover import discover
from lora_convert.scan.task import ScanOptions, run_task

# A local Ray instance: not the unit layer (`make test-fast` skips this module).
pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench"
TIMING_KEYS = ("seconds",)


def _gen_registry():
    spec = importlib.util.spec_from_file_location("gen_registry", BENCH / "gen_registry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def local_ray():
    # Two CPUs, as on the CI machine; log_to_driver off so that workers' output stays out of pytest's capture.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """27 small adapters of mixed families, 9 with a planted defect (one of each kind), and the manifest."""
    gen = _gen_registry()
    out = tmp_path_factory.mktemp("registry")
    gen.generate_registry(out, count=27, defect_rate=1 / 3, seed=7)
    return out, json.loads((out / "manifest.json").read_text()), gen.DEFECTS


def _without_timings(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records}


def test_ray_report_equals_the_local_report(local_ray, registry):
    out, manifest, defects = registry
    tasks = discover([str(out / "adapters")])
    assert len(tasks) == 27
    via_ray: list[dict] = []
    ray_backend.run_all(tasks, ScanOptions(), on_result=via_ray.append)
    via_jobs: list[dict] = []
    local.run_all(tasks, ScanOptions(), on_result=via_jobs.append, jobs=2)
    assert len(via_ray) == len(tasks)  # each adapter once
    assert _without_timings(via_ray) == _without_timings(via_jobs)
    # ... and that report is the right one: exactly the planted defects, nothing else flagged.
    by_rel = {Path(r["adapter"]).relative_to(out / "adapters").as_posix(): r for r in via_ray}
    assert set(by_rel) == set(manifest["adapters"])
    assert sorted(a["defect"] for a in manifest["adapters"].values() if a["defect"]) == sorted(defects)
    for rel, meta in manifest["adapters"].items():
        flagged = {f["code"] for f in by_rel[rel]["findings"] if f["severity"] != "info"}
        if meta["expect"] is None:
            assert flagged == set() and by_rel[rel]["status"] == "ok", (rel, flagged)
        else:
            assert meta["expect"] in flagged, (rel, meta["defect"], flagged)


def test_a_hanging_adapter_is_timed_out_and_the_others_finish(local_ray, registry):
    out, _, _ = registry
    tasks = discover([str(out / "adapters")])[:3]
    hung = tasks[1].id

    # Defined here, so that Ray ships it by value (the test module is not importable in a Ray worker).
    def hang_on_one(task, options):
        if task.id == hung:
            time.sleep(600)
        return run_task(task, options)

    records: list[dict] = []
    ray_backend.run_all(tasks, ScanOptions(timeout_s=4.0), on_result=records.append, task_fn=hang_on_one)
    status = {r["id"]: r["status"] for r in records}
    assert len(records) == 3 and status[hung] == "timeout"
    assert all(s in ("ok", "findings") for i, s in status.items() if i != hung), status
    (record,) = [r for r in records if r["id"] == hung]
    assert record["error"]["type"] == "Timeout" and record["seconds"] >= 4.0


def test_a_task_queued_in_ray_is_not_timed_out_for_its_wait(local_ray, registry):
    """On 2 CPUs with 4 tasks in flight, the 3rd and 4th wait in Ray's queue behind two that take 6 s; their clocks
    start when they are among the 2 oldest in flight (when Ray runs them), so 6 s of work each stays within a 10 s
    timeout (a clock started at submission would give them 12 s). The margins are for a loaded machine: starting a
    Ray worker takes seconds there, and so does importing torch (no legacy .bin adapter here)."""
    out, _, _ = registry
    tasks = [t for t in discover([str(out / "adapters")]) if not t.legacy_bin][:4]

    def slow(task, options):
        time.sleep(6.0)
        return run_task(task, options)

    records: list[dict] = []
    ray_backend.run_all(tasks, ScanOptions(timeout_s=10.0), on_result=records.append, task_fn=slow)
    assert len(records) == 4
    assert all(r["status"] in ("ok", "findings") for r in records), [(r["id"], r["status"]) for r in records]


def test_a_worker_that_dies_is_recorded_as_crashed(local_ray, registry):
    out, _, _ = registry
    tasks = discover([str(out / "adapters")])[:3]
    doomed = tasks[0].id

    def die_on_one(task, options):
        if task.id == doomed:
            os._exit(3)  # as a segfault or the OOM killer would: no exception, the process is gone
        return run_task(task, options)

    records: list[dict] = []
    ray_backend.run_all(tasks, ScanOptions(), on_result=records.append, task_fn=die_on_one)
    status = {r["id"]: r["status"] for r in records}
    assert len(records) == 3 and status[doomed] == "crashed", status
    (record,) = [r for r in records if r["id"] == doomed]
    assert record["error"]["type"] == "WorkerCrashed" and "Ray task failed" in record["error"]["message"]


def test_without_ray_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(EnvironmentProblem) as info:
        ray_backend.run_all([], ScanOptions(), on_result=lambda r: None)
    assert "pip install 'lora-convert[ray]'" in info.value.hint


def test_memory_reservation_grows_with_size_up_to_a_cap():
    from lora_convert.scan.task import ScanTask

    small = ray_backend._memory_for(ScanTask("a", "a", 100_000))
    large = ray_backend._memory_for(ScanTask("b", "b", 400 << 20))
    huge = ray_backend._memory_for(ScanTask("c", "c", 50 << 30))
    assert ray_backend.WORKER_BASE_MEMORY <= small < large < huge
    assert huge == ray_backend.WORKER_BASE_MEMORY + ray_backend.LARGE_ADAPTER_EXTRA


def test_the_cli_runs_the_ray_path(local_ray, registry):
    from typer.testing import CliRunner

    from lora_convert.cli import app

    out, manifest, _ = registry
    docs = {}
    for how in (["--ray"], ["--jobs", "1"]):
        result = CliRunner().invoke(app, ["scan", str(out / "adapters"), *how, "--format", "json"])
        assert result.exit_code == 1, result.output  # the planted defects fail the scan
        docs[how[0]] = json.loads(result.stdout)
    assert len(docs["--ray"]["records"]) == len(manifest["adapters"])
    assert _without_timings(docs["--ray"]["records"]) == _without_timings(docs["--jobs"]["records"])
    assert docs["--ray"]["summary"]["codes"] == docs["--jobs"]["summary"]["codes"]


@pytest.mark.parametrize("jobs, most", [(None, 4), (1, 1)])
def test_tasks_in_flight_are_bounded_and_largest_go_first(local_ray, registry, monkeypatch, jobs, most):
    """At most two tasks per CPU of the 2-CPU instance are in flight (--jobs 1: one), so the driver holds a bounded
    number of references however large the registry; the largest adapters are submitted first."""
    out, _, _ = registry
    tasks = discover([str(out / "adapters")])
    seen: list[set] = []
    real_wait = ray.wait

    def spy(refs, *args, **kwargs):
        seen.append(set(refs))
        return real_wait(refs, *args, **kwargs)

    monkeypatch.setattr(ray, "wait", spy)
    records: list[dict] = []
    ray_backend.run_all(tasks, ScanOptions(), on_result=records.append, jobs=jobs)
    assert len(records) == len(tasks)
    assert max(len(refs) for refs in seen) == most
    if jobs == 1:  # one at a time: the records come back in submission order, largest adapter first
        assert [r["id"] for r in records] == [t.id for t in sorted(tasks, key=lambda t: (-t.nbytes, t.id))]
