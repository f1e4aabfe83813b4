"""The local executor of `lora-convert scan`: `--jobs N` worker processes on this machine.

Each worker is a process of its own that runs `run_task` on one adapter at a time, so that a hung adapter can be
stopped (the worker is killed and replaced: `status: timeout`) and a worker that dies (a segfault in a native
library, the OOM killer) costs only its adapter (`status: crashed`); the scan goes on either way. A pool such as
concurrent.futures cannot do either: it cannot kill one task, and one dead worker breaks the whole pool.

Largest adapters go first, so that the longest task does not start last and leave the other workers idle at the
end. Memory per worker is that of `validate` on one adapter: tensors are streamed one at a time.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from lora_convert.scan.task import ScanOptions, ScanTask, crash_record, run_task, timeout_record

__all__ = ["default_jobs", "run_all", "schedule"]


def default_jobs() -> int:
    """The cores this process may use (the affinity mask: a container or taskset limit, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


def schedule(tasks: list[ScanTask]) -> list[ScanTask]:
    """Largest first (ties by id, so the order is stable)."""
    return sorted(tasks, key=lambda t: (-t.nbytes, t.id))


def _worker(conn: Connection) -> None:
    """Run tasks until told to stop (None) or the parent goes away."""
    # The parent handles Ctrl-C and SIGTERM for the fleet and then stops its workers; a worker that also raised
    # KeyboardInterrupt would print a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch's pool costs more than it saves per small op (see cli/_app)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task, options = message
        record = run_task(task, options)
        try:
            conn.send(record)
        except (BrokenPipeError, OSError):
            return


@dataclass
class _Slot:
    process: Any
    conn: Connection
    task: ScanTask | None = None
    started: float = 0.0


def _signal_name(code: int | None) -> str:
    if code is None:
        return "the worker disappeared"
    if code < 0:
        try:
            return f"the worker was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"the worker was killed by signal {-code}"
    return f"the worker exited with status {code}"


def run_all(
    tasks: list[ScanTask],
    options: ScanOptions,
    *,
    on_result: Callable[[dict], None],
    jobs: int | None = None,
) -> None:
    """Run every task in `jobs` worker processes (default: the core count); `on_result(record)` gets each record
    as it arrives. Returns when every task has a record; an exception (KeyboardInterrupt, or one raised by
    on_result) stops the workers and propagates."""
    pending = deque(schedule(tasks))
    if not pending:
        return
    jobs = max(1, min(jobs or default_jobs(), len(pending)))
    # spawn, not fork: the parent may run a progress-bar thread, and forking a threaded process can deadlock.
    ctx = multiprocessing.get_context("spawn")
    slots: list[_Slot] = []

    def start() -> _Slot:
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(target=_worker, args=(child,), daemon=True, name="lora-convert-scan-worker")
        process.start()
        child.close()
        return _Slot(process, parent)

    def stop(slot: _Slot, kill: bool) -> None:
        if kill:
            slot.process.kill()
        else:
            try:
                slot.conn.send(None)
            except (BrokenPipeError, OSError):
                slot.process.kill()
        slot.process.join(timeout=5)
        if slot.process.is_alive():  # pragma: no cover - a worker that ignored the stop message
            slot.process.kill()
            slot.process.join()
        slot.conn.close()

    try:
        slots = [start() for _ in range(jobs)]
        while True:
            for i, slot in enumerate(slots):
                if slot.task is None and pending:
                    task = pending.popleft()
                    try:
                        slot.conn.send((task, options))
                    except (BrokenPipeError, OSError):  # the worker died while idle: replace it, keep the task
                        pending.appendleft(task)
                        stop(slot, kill=True)
                        slots[i] = start()
                        continue
                    slot.task, slot.started = task, time.monotonic()
            busy = [s for s in slots if s.task is not None]
            if not busy:
                if pending:
                    continue  # a worker was replaced before it got its task
                break
            now = time.monotonic()
            deadline = min(s.started + options.timeout_s for s in busy)
            ready = set(wait([s.conn for s in busy] + [s.process.sentinel for s in busy], max(0.0, deadline - now)))
            for i, slot in enumerate(slots):
                if slot.task is None:
                    continue
                record = None
                replace = False
                if slot.conn in ready:
                    try:
                        record = slot.conn.recv()
                    except (EOFError, OSError):
                        slot.process.join(timeout=5)
                        record = crash_record(slot.task, _signal_name(slot.process.exitcode))
                        replace = True
                elif slot.process.sentinel in ready:
                    slot.process.join(timeout=5)
                    record = crash_record(slot.task, _signal_name(slot.process.exitcode))
                    replace = True
                elif time.monotonic() - slot.started >= options.timeout_s:
                    record = timeout_record(slot.task, time.monotonic() - slot.started)
                    replace = True
                if record is None:
                    continue
                slot.task = None
                if replace:
                    stop(slot, kill=True)
                    slots[i] = start() if pending else _Slot(slot.process, slot.conn)
                on_result(record)
            slots = [s for s in slots if s.process.is_alive() or s.task is not None]
    finally:
        for slot in slots:
            if slot.process.is_alive():
                stop(slot, kill=slot.task is not None)
