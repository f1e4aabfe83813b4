"""In-process timings of one code tree, for old-against-new comparisons on the same machine and hour.

The tree is whatever `lora_convert` PYTHONPATH finds: check out the old commit beside this one and alternate,
e.g. `git worktree add /tmp/lc-old COMMIT`, then

    PYTHONPATH=/tmp/lc-old .venv/bin/python bench/ab_compare.py scan pe9      # data scan, 3 calls
    PYTHONPATH=.           .venv/bin/python bench/ab_compare.py scan pe9
    ... stacked|sglang|peft|vllm f3d12  (normalize in that layout)   load stress  (load_adapter)

Adapters are read from the third argument, a bench/run_bench.py --workdir (default /tmp/lc-bench-t1). One JSON line
per call.
"""

import json
import shutil
import statistics
import sys
import time

import lora_convert
from lora_convert.check.data_scan import scan_adapter
from lora_convert.peft.adapter import load_adapter
from lora_convert.pipeline.commands import normalize

what, name = sys.argv[1], sys.argv[2]
path = f"{sys.argv[3] if len(sys.argv) > 3 else '/tmp/lc-bench-t1'}/{name}"
out = "/tmp/abcmp-out"
times = []
cpu = []  # process CPU time (all threads, user + system): less stretched than wall time by other load
for _ in range(3):
    if what == "scan":
        a = load_adapter(path)
        t, cpu_start = time.perf_counter(), time.process_time()
        scan_adapter(a)
        times.append(time.perf_counter() - t)
    elif what == "load":
        t, cpu_start = time.perf_counter(), time.process_time()
        load_adapter(path)
        times.append(time.perf_counter() - t)
    else:
        shutil.rmtree(out, ignore_errors=True)
        time.sleep(2)
        t, cpu_start = time.perf_counter(), time.process_time()
        normalize(path, out, base="deepseek-v3", layout=what, drop_unsupported=True)
        times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - cpu_start)
shutil.rmtree(out, ignore_errors=True)
print(
    json.dumps(
        {
            "tree": lora_convert.__file__.split("/lora_convert")[0],
            "what": what,
            "adapter": name,
            "times": [round(x, 3) for x in times],
            "median": round(statistics.median(times), 3),
            "cpu": [round(x, 3) for x in cpu],
            "cpu_median": round(statistics.median(cpu), 3),
        }
    )
)
