"""The Ray executor of `lora-convert scan --ray` / `--ray-address ADDRESS`: the same `run_task` as Ray tasks.

Only Ray's public task API is used: `ray.init(address=...)` (no address: a local instance on this machine),
`@ray.remote` on a thin wrapper of `run_task`, `ray.wait` to take each record as it finishes, and
`ray.cancel(force=True)` for an adapter that ran past the timeout. Ray places and runs the tasks; this module only
decides the order (largest first, as the local executor does), how many tasks are in flight and how long each
may run.

- Placement: each task asks for one CPU and a memory reservation (`_memory_for`), so that Ray never puts more
  tasks on a node than it has cores, nor more large adapters than its memory holds. validate streams one tensor
  at a time, so a worker's memory is bounded by the adapter's largest tensor, not by its size.
- In flight: at most `slots` running (the cluster's CPUs, or --jobs) plus as many queued in Ray, so that a
  worker that finishes finds its next task already there, and the driver holds at most 2 x slots references
  however large the registry (its memory stays flat).
- Timeout: Ray does not say when a queued task starts, so a task's clock starts when it is among the `slots`
  oldest tasks in flight (Ray runs a queue of equal 1-CPU tasks in submission order); a task that has not
  finished `options.timeout_s` later is cancelled with force (its worker process is killed) and recorded with
  `timeout_record`. The estimate can only start a clock late, never early, while no other Ray job holds the
  cluster's CPUs (on a shared cluster, give --timeout room for the queue).
- A task whose worker dies (killed, segfault, Ray's out-of-memory killer, its node gone) is recorded with
  `crash_record`, not retried (`max_retries=0`): a deterministic crash would only crash again, and the local
  executor does the same, so both reports agree.

On a cluster every node needs lora-convert installed (the same version as the driver) and the adapters at the
same path (a shared file system) or as Hub ids; `--normalize OUTROOT` must be a path every node writes to.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from lora_convert.errors import EnvironmentProblem
from lora_convert.scan.local import schedule
from lora_convert.scan.task import ScanOptions, ScanTask, crash_record, run_task, timeout_record

__all__ = ["run_all"]

INSTALL_HINT = "pip install 'lora-convert[ray]'"
MiB = 1 << 20
# Ray's memory reservation per task (a scheduling quantity: Ray places no more tasks on a node than its memory
# holds). Measured on the bench registry (Ray 2.60, 2026-12-01): a Ray worker with lora_convert imported peaks at
# 103 MiB on a small adapter and at 162 MiB on a 171 MB fused-3d DeepSeek-V3 adapter; the data scan streams one
# tensor at a time, so the extra grows with the largest tensor (held with its float32 copy), not with the adapter.
WORKER_BASE_MEMORY = 256 * MiB
# The largest tensor is not known before reading the adapter; the adapter's size bounds it. Capped at 1 GiB: a
# rank-64 fused-3d DeepSeek-V3 factor is ~230 MB in bf16 (~700 MB with its float32 copy).
LARGE_ADAPTER_EXTRA = 1024 * MiB


def ray_module():
    """The `ray` module, or EnvironmentProblem naming the extra that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise EnvironmentProblem(
            "`scan --ray` needs Ray, which is not installed.",
            hint=f"{INSTALL_HINT} (or run without --ray: --jobs N uses this machine's cores).",
        ) from exc
    return ray


def _memory_for(task: ScanTask) -> int:
    """Ray's memory reservation for one task (bytes): the base, plus the adapter's size up to LARGE_ADAPTER_EXTRA
    (its largest tensor is unknown before reading it, and never larger than the adapter)."""
    return WORKER_BASE_MEMORY + min(max(task.nbytes, 0), LARGE_ADAPTER_EXTRA)


def _scan_one(task_fn: Callable[[ScanTask, ScanOptions], dict], task: ScanTask, options: ScanOptions) -> dict:
    """What runs on a Ray worker: the scan's task function (run_task) on one adapter."""
    import os

    # The same thread count as the local workers: a thread pool costs more than it saves per small op.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return task_fn(task, options)


def _crash_message(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"the Ray task failed: {type(exc).__name__}" + (f": {first}" if first else "")


def run_all(
    tasks: list[ScanTask],
    options: ScanOptions,
    *,
    on_result: Callable[[dict], None],
    jobs: int | None = None,
    address: str | None = None,
    task_fn: Callable[[ScanTask, ScanOptions], dict] = run_task,
) -> None:
    """Run every task as a Ray task; `on_result(record)` gets each record as it finishes.

    `address`: a running cluster ("auto", "HOST:6379", "ray://HOST:10001" with ray[client]); None starts a local
    instance with `jobs` CPUs (default: all of this machine's) and stops it at the end. If Ray is already
    initialised in this process, that instance is used (and left running). `jobs` caps the tasks running at once
    (default: the cluster's CPUs). `task_fn` is what each task runs (run_task; tests pass one that hangs).
    An exception (KeyboardInterrupt, or one raised by on_result) cancels the tasks in flight and propagates."""
    ray = ray_module()
    pending = deque(schedule(tasks))
    if not pending:
        return
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            # Workers' stdout would otherwise be copied to the driver's stdout, where the report may be going.
            "log_to_driver": False,
            # Ray's own notices (token authentication, the local instance's address) are not the scan's output.
            "logging_level": "error",
        }
        if address is None:
            kwargs.update(include_dashboard=False, num_cpus=jobs)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EnvironmentProblem(
                f"Could not connect to the Ray cluster at {address!r}: {exc}"
                if address
                else f"Could not start a local Ray instance: {exc}",
                hint="Start the cluster with `ray start --head` (and `ray start --address HEAD:6379` on the other "
                "nodes), then pass --ray-address auto on a cluster node or --ray-address HEAD:6379.",
            ) from exc
        started_here = True

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    slots = min(jobs, cpus) if jobs else cpus
    # Queued tasks beyond `slots` only where every CPU is ours to fill; with --jobs below the cluster's CPUs a
    # queued task would start at once on a free CPU, and --jobs would not cap anything.
    limit = 2 * slots if slots >= cpus else slots
    remote = ray.remote(num_cpus=1, max_retries=0, retry_exceptions=False)(_scan_one)
    fn_ref = ray.put(task_fn)
    options_ref = ray.put(options)  # sent once, not with every task
    # ref -> [task, clock start or None], in submission order (the order Ray starts them in).
    in_flight: OrderedDict[Any, list] = OrderedDict()

    def start_clocks(now: float) -> None:
        for i, entry in enumerate(in_flight.values()):
            if i >= slots:
                break
            if entry[1] is None:
                entry[1] = now

    try:
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                task = pending.popleft()
                ref = remote.options(memory=_memory_for(task), name=f"scan:{task.id}"[:200]).remote(
                    fn_ref, task, options_ref
                )
                in_flight[ref] = [task, None]
            now = time.monotonic()
            start_clocks(now)
            deadline = min(e[1] + options.timeout_s for e in in_flight.values() if e[1] is not None)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=max(0.0, deadline - now))
            if ready:  # take every record that is there, not one per round trip
                ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
            for ref in ready:
                task, _started = in_flight.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died, or the task could not run there
                    record = crash_record(task, _crash_message(exc))
                on_result(record)
            now = time.monotonic()
            for ref, (task, started) in list(in_flight.items()):
                if started is not None and now - started >= options.timeout_s:
                    ray.cancel(ref, force=True)
                    del in_flight[ref]
                    on_result(timeout_record(task, now - started))
    finally:
        for ref in in_flight:
            # Best effort on the way out: the exception that brought us here is the one to report.
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
