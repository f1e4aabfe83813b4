"""The local executor of `lora-convert scan`: `--jobs N` worker processes on this machine.

Each worker is a process of its own, so that a hung adapter can be stopped (the worker is killed and replaced:
`status: timeout`) and a worker that dies (a segfault in a native library, the OOM killer) costs only the adapter
it was on (`status: crashed`); the scan goes on either way. The standard library's pools cannot do either:
concurrent.futures.ProcessPoolExecutor cannot stop a task once it runs (Future.cancel only withdraws one not yet
started) and one dead worker breaks the whole pool (BrokenProcessPool fails every pending future);
multiprocessing.Pool cannot kill one task either, and the task of a worker that died never completes. So `_Pool`
below is a small supervisor of multiprocessing.Process workers, one method per job: start a worker, feed it a batch,
wait for news until the earliest deadline, collect its records, kill and replace a hung or dead one.

Work is handed out in batches, so that a worker never waits for the parent. A small adapter is a few
milliseconds of work, about what one round trip through the parent costs on a busy machine (the parent wakes up,
takes the record, writes its report line, sends the next task), so one task per message left each worker idle
for a good part of every adapter. Instead:

- A batch is up to BATCH_MAX_TASKS adapters or BATCH_MAX_BYTES of tensors, in schedule order; an adapter of
  BATCH_MAX_BYTES or more goes alone. Batches shrink towards the end of the scan (`_batch_limit`), so that the
  workers finish together.
- Each worker holds its running batch and one more queued behind it (QUEUED_BATCHES), so that when it finishes
  a batch the next is already in its pipe. Nothing is queued behind a batch of large adapters: its small ones
  would wait there while another worker may be idle.
- The worker sends one message per finished adapter: its record. The report still grows adapter by adapter.
- The parent's own work per adapter is small (taking the record, on_result writing its report line, ~0.1 ms),
  but on a machine with as many cores as workers it is taken from a worker, and so is every wake-up: while every
  worker has a batch queued, the parent sleeps PARENT_NAP_S between reads and takes the records that came in.

The per-adapter timeout holds inside a batch. A worker runs its tasks in the order it got them, one at a time, and
starts the next one as soon as it has sent a record, so the parent knows which adapter each worker is on (the
first of its tasks without a record) and when it started: when the previous record arrived, when the batch was
sent to an idle worker, or, for a new worker, when it said READY (spawning it and importing lora-convert is not the
adapter's time: on a loaded machine it takes seconds). The parent learns of a message after it was sent, so that
clock can only start late, never early. When an adapter runs past `options.timeout_s`, or its worker dies (any
record it had already sent is taken first), that adapter alone is recorded (`timeout_record` / `crash_record`),
the worker is replaced, and the rest of its tasks, which never ran, go back to the front of the queue: each adapter
gets exactly one record.

Largest adapters go first, so that the longest task does not start last and leave the other workers idle at the
end, with one exception: adapters stored as a legacy `adapter_model.bin` are read through torch, whose import costs
each worker that does it ~0.9 s of CPU and ~300 MB, so they go to one worker (`_Queue`). Memory per worker is that
of `validate` on one adapter: tensors are streamed one at a time.

At the end every worker is told to stop before any is waited for, and a worker exits without the interpreter's
teardown (a third of a second each, after the last record).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from lora_convert.scan.task import ScanOptions, ScanTask, crash_record, run_task, timeout_record

__all__ = ["BATCH_MAX_BYTES", "BATCH_MAX_TASKS", "QUEUED_BATCHES", "default_jobs", "run_all", "schedule"]

# A batch: at most this many adapters, or this many tensor bytes (an adapter this large or larger goes alone).
# 16 small adapters of the bench registry are ~40 ms of work and a message costs the parent ~0.1 ms: larger
# batches would save little, and cost balance at the end of the scan.
BATCH_MAX_TASKS = 16
BATCH_MAX_BYTES = 4 * 1024 * 1024
# Batches queued on a worker behind the one it runs.
QUEUED_BATCHES = 1
# While every worker has a batch queued, none can run dry soon: the parent then reads records at most every
# PARENT_NAP_S, several at a time, rather than waking up (and taking a core from a worker) for each one. Measured on
# the bench registry (2 cores, --jobs 2): half the parent's wake-ups and a third of its CPU time.
PARENT_NAP_S = 0.005

# Adapters in a legacy .bin waiting per worker that has imported torch, above which another worker takes some too.
# Importing torch costs a worker ~0.9 s; a small .bin adapter is ~3 ms of work.
TORCH_JOIN = 256

TaskFn = Callable[[ScanTask, ScanOptions], dict]

# A worker's first message: it has started (spawned, imported) and runs its tasks from now on. Its first adapter's
# clock starts then, not when the batch was sent; until then it has WORKER_START_S (or --timeout, if longer) to
# start, which on a loaded machine takes seconds, not the adapter's time.
READY = "ready"
WORKER_START_S = 120.0


def default_jobs() -> int:
    """The cores this process may use (the affinity mask: a container or taskset limit, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


def schedule(tasks: list[ScanTask]) -> list[ScanTask]:
    """Largest first (ties by id, so the order is stable)."""
    return sorted(tasks, key=lambda t: (-t.nbytes, t.id))


def _batch_limit(remaining: int, jobs: int) -> int:
    """Adapters in the next batch: BATCH_MAX_TASKS, down to 1 as the queue empties (each worker holds up to
    1 + QUEUED_BATCHES batches, so about a quarter of a worker's share of what is left keeps the end balanced)."""
    return max(1, min(BATCH_MAX_TASKS, remaining // (2 * (1 + QUEUED_BATCHES) * jobs)))


def _take_batch(pending: deque[ScanTask], limit: int) -> list[ScanTask]:
    """The next batch from the front of `pending` (in order): up to `limit` adapters and BATCH_MAX_BYTES."""
    first = pending.popleft()
    batch, size = [first], first.nbytes
    if size >= BATCH_MAX_BYTES:
        return batch
    while pending and len(batch) < limit and size + pending[0].nbytes < BATCH_MAX_BYTES:
        task = pending.popleft()
        batch.append(task)
        size += task.nbytes
    return batch


class _Queue:
    """The tasks not handed out yet, largest first, in two lanes: adapters stored as a legacy .bin (reading one
    imports torch: ~0.9 s of CPU and ~300 MB in every worker that does) and the rest. The .bin lane goes to one
    worker (the first to be fed while it is not empty, or the next one if that worker is lost), which takes them
    before anything else; another worker takes .bin adapters only when nothing else is left and more than
    TORCH_JOIN of them per worker holding torch are waiting (else importing torch would cost it more than it saves)."""

    def __init__(self, tasks: list[ScanTask]) -> None:
        self.torch: deque[ScanTask] = deque()
        self.plain: deque[ScanTask] = deque()
        for task in schedule(tasks):
            (self.torch if task.legacy_bin else self.plain).append(task)
        self._torch_tasks = set(self.torch)

    def __len__(self) -> int:
        return len(self.torch) + len(self.plain)

    def lane(self, has_torch: bool, torch_workers: int) -> deque[ScanTask] | None:
        """Where the next batch of a worker comes from (None: nothing for it now)."""
        if self.torch and (has_torch or not torch_workers):
            return self.torch
        if self.plain:
            return self.plain
        if len(self.torch) > TORCH_JOIN * torch_workers:
            return self.torch
        return None

    def put_back(self, tasks: list[ScanTask]) -> None:
        """Tasks that were handed out and never ran: back to the front of their lane, in order."""
        for task in reversed(tasks):
            (self.torch if task in self._torch_tasks else self.plain).appendleft(task)


def limit_worker_threads() -> None:
    """One OpenMP thread in a scan worker (local or Ray), unless the user set it: torch's pool costs more than it
    saves per small op (see cli/_app), and the workers already fill the cores."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _worker(conn: Connection, options: ScanOptions, task_fn: TaskFn) -> None:
    """Say READY once started, then run batches of tasks, one record sent per task in order, until told to stop
    (None) or the parent goes away."""
    # The parent handles Ctrl-C and SIGTERM for the fleet and then stops its workers; a worker that also raised
    # KeyboardInterrupt would print a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_worker_threads()
    # What every task imports is the worker's start-up, not its first adapter's time (a second or more on a loaded
    # machine, which a short --timeout would otherwise charge to that adapter).
    importlib.import_module("lora_convert.check.validate")
    try:
        conn.send(READY)
    except (BrokenPipeError, OSError):
        return
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            # Everything this worker did is with the parent (records) or closed (normalize's files): exit without
            # the interpreter's teardown, which takes longer than a few small adapters (a third of a second here).
            os._exit(0)
        for task in batch:
            record = task_fn(task, options)
            try:
                conn.send(record)
            except (BrokenPipeError, OSError):
                return


@dataclass
class _Worker:
    """One worker process as the parent sees it: the tasks it holds and the clock of the one it is on."""

    process: Any
    conn: Connection
    # Tasks sent and without a record yet, in the order the worker runs them: tasks[0] is the one it is on.
    tasks: deque[ScanTask] = field(default_factory=deque)
    batches: deque[int] = field(default_factory=deque)  # sizes of the batches in `tasks` (the first one shrinks)
    big: bool = False  # the batch it runs is one large adapter: queue nothing behind it
    torch: bool = False  # it has been given an adapter stored as a legacy .bin (so it has imported torch)
    started: float = 0.0  # when tasks[0] started, as far as the parent knows (never earlier than it did)
    ready: bool = False  # it has said READY: started and imported; until then its clock is WORKER_START_S

    def can_take(self, depth: int) -> bool:
        """Whether it holds fewer than `depth` batches, and no large adapter to queue something behind."""
        return len(self.batches) < depth and not (self.batches and self.big)

    def took(self, batch: list[ScanTask], from_torch_lane: bool) -> None:
        """`batch` was sent to it: an idle worker starts its first task's clock now."""
        self.torch = self.torch or from_torch_lane
        if not self.tasks:
            self.started = time.monotonic()
            self.big = batch[0].nbytes >= BATCH_MAX_BYTES
        self.tasks.extend(batch)
        self.batches.append(len(batch))

    def finished_one(self) -> None:
        """tasks[0] has its record: the worker is on the next one from now."""
        self.tasks.popleft()
        self.batches[0] -= 1
        if not self.batches[0]:
            self.batches.popleft()
            self.big = bool(self.tasks) and self.tasks[0].nbytes >= BATCH_MAX_BYTES
        self.started = time.monotonic()

    def limit(self, timeout_s: float) -> float:
        """How long tasks[0] may take from `started`: --timeout once the worker is ready."""
        return timeout_s if self.ready else max(timeout_s, WORKER_START_S)

    def overdue(self, timeout_s: float) -> bool:
        return time.monotonic() - self.started >= self.limit(timeout_s)

    def signal_stop(self, kill: bool) -> None:
        """Tell it to exit (or kill it), without waiting: see reap()."""
        if kill:
            self.process.kill()
            return
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            self.process.kill()

    def reap(self) -> None:
        """Wait for it to exit (killing one that ignored the stop message) and close its pipe."""
        self.process.join(timeout=5)
        if self.process.is_alive():  # pragma: no cover - a worker that ignored the stop message
            self.process.kill()
            self.process.join()
        self.conn.close()


def _signal_name(code: int | None) -> str:
    if code is None:
        return "the worker disappeared"
    if code < 0:
        try:
            return f"the worker was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"the worker was killed by signal {-code}"
    return f"the worker exited with status {code}"


class _Pool:
    """The supervisor of one `run_all`: its workers, the tasks not handed out yet and where each record goes.

    A worker's life is start_worker, feed (a batch), collect (its records), and, when it hangs or dies,
    replace (killed; a fresh worker takes its place). `run` is the loop: feed every worker, wait for news until
    the earliest deadline, collect it, stop what is overdue."""

    def __init__(
        self, queue: _Queue, options: ScanOptions, task_fn: TaskFn, on_result: Callable[[dict], None], jobs: int
    ) -> None:
        self.queue = queue
        self.options = options
        self.task_fn = task_fn
        self.on_result = on_result
        self.jobs = jobs
        # spawn, not fork: the parent may run a progress-bar thread, and forking a threaded process can deadlock.
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []

    def start_worker(self) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(
            target=_worker, args=(child, self.options, self.task_fn), daemon=True, name="lora-convert-scan-worker"
        )
        process.start()
        child.close()
        self.workers.append(_Worker(process, parent))

    def feed(self, worker: _Worker, depth: int) -> bool:
        """Send `worker` a batch if it holds fewer than `depth` (at most 1 + QUEUED_BATCHES, and nothing behind a
        large adapter); False if it died before taking it (the batch is back in the queue)."""
        if not worker.can_take(depth):
            return True
        lane = self.queue.lane(worker.torch, sum(w.torch for w in self.workers))
        if lane is None:
            return True
        batch = _take_batch(lane, _batch_limit(len(self.queue), self.jobs))
        try:
            worker.conn.send(batch)
        except (BrokenPipeError, OSError):  # it died while idle, or mid-batch: see collect()
            self.queue.put_back(batch)
            return False
        worker.took(batch, lane is self.queue.torch)
        return True

    def feed_all(self) -> None:
        """A batch to run for every worker before a batch to queue for any."""
        for depth in range(1, 2 + QUEUED_BATCHES):
            for worker in list(self.workers):
                if not self.feed(worker, depth):
                    self.died(worker)

    def collect(self, worker: _Worker) -> bool:
        """Hand on every record `worker` has sent; False if it is dead (its pipe is closed). Only the pipe's errors
        mean that: an OSError out of on_result (the report's disk full) propagates, as any exception of it does."""
        while True:
            try:
                if not worker.conn.poll():
                    return True
                message = worker.conn.recv()
            except (EOFError, OSError):
                return False
            if message == READY:
                worker.ready = True
                worker.started = time.monotonic()  # the clock of the adapter it is on starts now
                continue
            if not worker.tasks:  # pragma: no cover - a record nobody asked for: the protocol is broken
                raise RuntimeError("a scan worker sent a record without a task")
            worker.finished_one()
            self.on_result(message)

    def replace(self, worker: _Worker, record: dict | None) -> None:
        """Kill `worker` (dead or hung) and start another if work is left; `record` is that of the task it was on;
        its other tasks never started and go back to the front of the queue."""
        worker.signal_stop(kill=True)
        worker.reap()
        self.workers.remove(worker)
        if worker.tasks:
            worker.tasks.popleft()
            self.queue.put_back(list(worker.tasks))
        if self.queue:
            self.start_worker()
        if record is not None:
            self.on_result(record)

    def died(self, worker: _Worker) -> None:
        """`worker` is gone: hand on the records it sent before, record `crashed` for the task it was on."""
        self.collect(worker)
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        self.replace(worker, crash_record(worker.tasks[0], _signal_name(code)) if worker.tasks else None)

    def wait_for_news(self, busy: list[_Worker]) -> None:
        """Sleep until a busy worker sends something or exits, or the earliest clock runs out; collect the news."""
        if PARENT_NAP_S and (not self.queue or all(len(w.batches) > QUEUED_BATCHES for w in self.workers)):
            time.sleep(PARENT_NAP_S)
        deadline = min(w.started + w.limit(self.options.timeout_s) for w in busy)
        ready = set(
            wait(
                [w.conn for w in busy] + [w.process.sentinel for w in busy],
                max(0.0, deadline - time.monotonic()),
            )
        )
        for worker in busy:
            exited = worker.process.sentinel in ready
            # A worker that exited is dead even if its pipe still looked open (collect() reads what it sent first).
            if (exited or worker.conn in ready) and (not self.collect(worker) or exited):
                self.died(worker)

    def stop_overdue(self) -> None:
        """Kill and replace every worker whose task ran past its limit (`timeout`; `crashed` if it never started)."""
        timeout_s = self.options.timeout_s
        for worker in [w for w in self.workers if w.tasks]:
            if not worker.overdue(timeout_s):
                continue
            if not self.collect(worker):  # a record may have come in since the wait
                self.died(worker)
            elif worker.tasks and (seconds := time.monotonic() - worker.started) >= worker.limit(timeout_s):
                task = worker.tasks[0]
                if worker.ready:
                    self.replace(worker, timeout_record(task, seconds))
                else:
                    self.replace(worker, crash_record(task, f"the worker did not start within {seconds:.0f} s"))

    def run(self) -> None:
        """Start the workers and supervise them until every task has a record."""
        for _ in range(self.jobs):
            self.start_worker()
        while True:
            self.feed_all()
            busy = [w for w in self.workers if w.tasks]
            if not busy:
                if self.queue:
                    continue  # a worker was replaced before it got its batch
                return
            self.wait_for_news(busy)
            self.stop_overdue()

    def close(self) -> None:
        """Stop every worker: all are told first and then waited for, so that they exit together. One still on a
        task (an exception or Ctrl-C came mid-scan) is killed."""
        for worker in self.workers:
            worker.signal_stop(kill=bool(worker.tasks))
        for worker in self.workers:
            worker.reap()


def run_all(
    tasks: list[ScanTask],
    options: ScanOptions,
    *,
    on_result: Callable[[dict], None],
    jobs: int | None = None,
    task_fn: TaskFn = run_task,
) -> None:
    """Run every task in `jobs` worker processes (default: the core count); `on_result(record)` gets each record
    as it arrives. Returns when every task has a record; an exception (KeyboardInterrupt, or one raised by
    on_result) stops the workers and propagates. `task_fn` is what a worker runs on each task (run_task; tests
    pass one that hangs or kills its worker): it is pickled by reference, so it must be a module-level function."""
    queue = _Queue(tasks)
    if not queue:
        return
    pool = _Pool(queue, options, task_fn, on_result, jobs=max(1, min(jobs or default_jobs(), len(queue))))
    try:
        pool.run()
    finally:
        pool.close()
