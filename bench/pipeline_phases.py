"""In-process phase timings of normalize: where the time goes, with and without the read/build/write pipeline.

The machine these numbers come from is shared, so wall times between separate runs are not comparable; this runs
the variants alternately in one process, several rounds, and reports each stage's busy time (summed per thread)
next to the wall time. Stages: read (Adapter.read_many), build (build_group_tensors: placing and folding),
write (StreamingSafetensorsWriter.write). With the pipeline, wall < read + build + write is the overlap.

    .venv/bin/python bench/pipeline_phases.py /tmp/lc-bench/f3d12 --layout stacked --depths 0,2 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from lora_convert.convert import group_tensors
from lora_convert.io.safetensors_writer import StreamingSafetensorsWriter
from lora_convert.peft.adapter import Adapter
from lora_convert.pipeline.commands import normalize

busy: dict[str, float] = defaultdict(float)
lock = threading.Lock()


def timed(name, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with lock:
                busy[name] += time.perf_counter() - t

    return wrapper


def blocked_fused_expert_b(b, experts: int, rank: int, rows: slice = slice(None)):
    """factors.fused_expert_b with its one transpose copy done 128 source rows at a time: numpy's plain transposed
    copy of [rows*r, E] walks the destination with stride rows*r and misses the cache on every element (0.37 s for
    a 58 MB down_proj B here); blocks of 128 rows keep both sides in cache (0.045 s). Same bytes."""
    import numpy as np

    from lora_convert.io.tensor_files import raw_view

    part = b[rows]
    n = part.shape[0]
    src = raw_view(part).reshape(n * rank, experts)
    moved = np.empty((experts, n * rank), dtype=src.dtype)
    for i in range(0, n * rank, 128):
        moved[:, i : i + 128] = src[i : i + 128].T
    return moved.view(part.dtype).reshape(experts, n, rank)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", type=Path)
    p.add_argument("--base", default="deepseek-v3")
    p.add_argument("--layout", default="stacked")
    p.add_argument("--depths", default="0,2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--blocked-transpose",
        action="store_true",
        help="measure the proposed convert/factors.py change: fused_expert_b's transpose in 128-row blocks",
    )
    args = p.parse_args(argv)
    if args.blocked_transpose:
        from lora_convert.convert import factors

        factors.fused_expert_b = blocked_fused_expert_b
        if hasattr(factors, "NUMPY_OPS"):  # the factor operations as a table (smoke on the GPU shares them)
            factors.NUMPY_OPS.expert_b = blocked_fused_expert_b
    out = args.out or args.adapter.parent / f"phases-out-{args.adapter.name}"
    Adapter.read_many = timed("read", Adapter.read_many)
    group_tensors.build_group_tensors = timed("build", group_tensors.build_group_tensors)
    StreamingSafetensorsWriter.write = timed("write", StreamingSafetensorsWriter.write)
    results: dict[int, list[dict[str, float]]] = defaultdict(list)
    for _ in range(args.rounds):
        for depth in [int(d) for d in args.depths.split(",")]:
            group_tensors.PIPELINE_DEPTH = depth
            shutil.rmtree(out, ignore_errors=True)
            busy.clear()
            load = os.getloadavg()[0]
            t = time.perf_counter()
            normalize(str(args.adapter), out, base=args.base, layout=args.layout, drop_unsupported=True)
            wall = time.perf_counter() - t
            results[depth].append({"wall": wall, **busy, "load": load})
            print(
                f"depth {depth}: wall {wall:6.2f} s  "
                + "  ".join(f"{k} {v:6.2f} s" for k, v in sorted(busy.items()))
                + f"  (load {load:.2f})",
                flush=True,
            )
    shutil.rmtree(out, ignore_errors=True)
    for depth, rows in results.items():
        med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in ("wall", "read", "build", "write", "load")}
        print(f"median depth {depth}: " + "  ".join(f"{k} {v:.2f}" for k, v in med.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
