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
from lora_convert.scan.local import TaskFn, limit_worker_threads, schedule
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


def _scan_one(task_fn: TaskFn, task: ScanTask, options: ScanOptions) -> dict:
    """What runs on a Ray worker: the scan's task function (run_task) on one adapter."""
    limit_worker_threads()  # as in the local workers
    return task_fn(task, options)


def _crash_message(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"the Ray task failed: {type(exc).__name__}" + (f": {first}" if first else "")


class _InFlight:
    """The tasks submitted to Ray and not finished, in submission order, each with its clock (None until it is
    among the `slots` oldest, when Ray runs it); at most `limit` of them."""

    def __init__(self, ray, options: ScanOptions, task_fn: TaskFn, jobs: int | None) -> None:
        self.ray = ray
        self.options = options
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.slots = min(jobs, cpus) if jobs else cpus
        # Queued tasks beyond `slots` only where every CPU is ours to fill; with --jobs below the cluster's CPUs a
        # queued task would start at once on a free CPU, and --jobs would not cap anything.
        self.limit = 2 * self.slots if self.slots >= cpus else self.slots
        self.remote = ray.remote(num_cpus=1, max_retries=0, retry_exceptions=False)(_scan_one)
        self.fn_ref = ray.put(task_fn)
        self.options_ref = ray.put(options)  # sent once, not with every task
        # ref -> [task, clock start or None], in submission order (the order Ray starts them in).
        self.refs: OrderedDict[Any, list] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self.refs)

    def submit(self, pending: deque[ScanTask]) -> None:
        """Submit from the front of `pending` up to `limit` in flight."""
        while pending and len(self.refs) < self.limit:
            task = pending.popleft()
            options = self.remote.options(memory=_memory_for(task), name=f"scan:{task.id}"[:200])
            self.refs[options.remote(self.fn_ref, task, self.options_ref)] = [task, None]

    def wait(self) -> list:
        """Start the clocks of the `slots` oldest; wait until a task finishes or the earliest clock runs out, and
        return every finished one (all that are there, not one per round trip)."""
        now = time.monotonic()
        for entry in list(self.refs.values())[: self.slots]:
            if entry[1] is None:
                entry[1] = now
        deadline = min(e[1] + self.options.timeout_s for e in self.refs.values() if e[1] is not None)
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=max(0.0, deadline - now))
        if ready:
            ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
        return ready

    def hand_on(self, ready: list, on_result: Callable[[dict], None]) -> None:
        """The record of each finished task; `crashed` for one whose worker died or that could not run."""
        for ref in ready:
            task, _started = self.refs.pop(ref)
            try:
                record = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                record = crash_record(task, _crash_message(exc))
            on_result(record)

    def cancel_overdue(self, on_result: Callable[[dict], None]) -> None:
        """Cancel with force (its worker process is killed) and record `timeout` each task past the timeout."""
        now = time.monotonic()
        for ref, (task, started) in list(self.refs.items()):
            if started is not None and now - started >= self.options.timeout_s:
                self.ray.cancel(ref, force=True)
                del self.refs[ref]
                on_result(timeout_record(task, now - started))

    def cancel_all(self) -> None:
        for ref in self.refs:
            # Best effort on the way out: the exception that brought us here is the one to report.
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)


def _connect(ray, address: str | None, jobs: int | None) -> bool:
    """Initialise Ray unless it is already (then that instance is used); True if this call started it."""
    if ray.is_initialized():
        return False
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
    return True


def run_all(
    tasks: list[ScanTask],
    options: ScanOptions,
    *,
    on_result: Callable[[dict], None],
    jobs: int | None = None,
    address: str | None = None,
    task_fn: TaskFn = run_task,
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
    started_here = _connect(ray, address, jobs)
    in_flight = _InFlight(ray, options, task_fn, jobs)
    try:
        while pending or in_flight:
            in_flight.submit(pending)
            in_flight.hand_on(in_flight.wait(), on_result)
            in_flight.cancel_overdue(on_result)
    finally:
        in_flight.cancel_all()
        if started_here:
            ray.shutdown()
