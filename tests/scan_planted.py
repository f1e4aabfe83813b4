"""The task function that tests/test_scan.py gives the scan executor in place of run_task: it plants a worker killed
mid-batch, an adapter that hangs and adapters that are slow.

Its own top-level module (tests/ is on pytest's pythonpath, which spawned workers inherit with the rest of sys.path):
a scan worker unpickles `planted_task` by module name, and a test module imported in importlib mode is named
`tests.test_...`, which only the repository root on sys.path would make importable.
"""

from __future__ import annotations

import os
import signal
import time

# In id order KILL is the 7th task, the 3rd of the 2nd batch of 4. HANG_IN_BATCH is the 10th task without KILL (the
# 2nd of the 3rd batch) and the 11th with it (the 3rd): inside a batch either way.
KILL = "fleet/a05-kill"
HANG_IN_BATCH = "fleet/a08-hang"
SLOW = "LORA_CONVERT_TEST_SLOW"  # ids (comma-separated) that planted_task holds for SLOW_S first, in the workers
SLOW_S = 3.5
# "PID:SECONDS": a process other than PID (a scan worker, which imports this module to unpickle planted_task,
# before it is READY) sleeps SECONDS here, as on a machine too loaded to start a worker quickly.
SLOW_START = "LORA_CONVERT_TEST_SLOW_START"
if os.environ.get(SLOW_START, "").partition(":")[0] not in ("", str(os.getpid())):
    time.sleep(float(os.environ[SLOW_START].partition(":")[2]))


def planted_task(task, options):
    """run_task, except on the planted adapters: `*-kill` kills its own worker (as a segfault or the OOM killer
    would: no exception, no record), `*-hang` never returns. Module-level: a worker process unpickles it by name."""
    from lora_convert.scan.task import run_task

    if task.id.endswith("-kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if task.id.endswith("-hang"):
        time.sleep(600)
    if task.id in os.environ.get(SLOW, "").split(","):
        time.sleep(SLOW_S)
    return run_task(task, options)
