"""Old against new slice arithmetic (lora_convert/convert/factors.py) in one process, alternating, on real groups.

Loads a second copy of factors.py from a path (e.g. the file of an older tree: `git show COMMIT:lora_convert/convert/
factors.py > /tmp/factors_old.py`) beside the importable one, checks that both give the same bytes, then times
them alternately: wall and thread CPU time per round, median of the rounds. CPU time is the figure to compare on a
shared machine (other processes stretch wall time, not it).

    .venv/bin/python bench/ab_factors.py /tmp/factors_old.py peft3d /tmp/lc-bench-t1/pe9     # --layout peft's B
    .venv/bin/python bench/ab_factors.py /tmp/factors_old.py build /tmp/lc-bench-t1/f3d12    # stacked build
    .venv/bin/python bench/ab_factors.py /tmp/factors_old.py plan-sglang /tmp/lc-bench-t1/pe9  # engine layout plan

`peft3d` and `build` take the first `--groups` routed-expert groups of the adapter (default 2: one MoE layer of
the DeepSeek-dimension bench adapters); `plan-LAYOUT` times plan_engine_layout with each module's shares_one_a.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time

import numpy as np

from lora_convert.convert import engine_layouts
from lora_convert.convert import factors as new
from lora_convert.io.dtypes import numpy_dtype
from lora_convert.pipeline.commands import plan_normalize


def _bits(x) -> np.ndarray:
    return np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")


def _load(path: str):
    spec = importlib.util.spec_from_file_location("factors_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peft3d(mod, plan, group, buffers):
    A, B = buffers[group.key]
    rank = plan.rank * (1 if mod.shares_one_a(group.slices) else len(group.slices))
    return mod.peft_3d_module(A, B, group, plan.rank, rank)


def _build(mod, plan, group, buffers):
    A, B = buffers[group.key]
    mod.place_group(A, B, group, plan.rank, plan.adapter.read)
    return A, B


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old_factors")
    p.add_argument("what")
    p.add_argument("adapter")
    p.add_argument("--base", default="deepseek-v3")
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    old = _load(args.old_factors)
    plan = plan_normalize(args.adapter, base=args.base, drop_unsupported=True)
    groups = [g for g in plan.groups if g.experts][: args.groups]
    dtype = numpy_dtype("BF16")
    buffers = {g.key: (np.zeros(g.a_shape(plan.rank), dtype), np.zeros(g.b_shape(plan.rank), dtype)) for g in groups}
    if args.what == "peft3d":
        for g in groups:  # the stacked groups themselves are built once, by the new code
            new.place_group(*buffers[g.key], g, plan.rank, plan.adapter.read)
        step = _peft3d
    elif args.what == "build":
        step = _build
    elif args.what.startswith("plan-"):
        layout = args.what.removeprefix("plan-")
        own = {old: old.shares_one_a, new: new.shares_one_a}  # engine_layouts calls factors (new) by attribute

        def step(mod, plan, group, buffers):
            new.shares_one_a = own[mod]
            return engine_layouts.plan_engine_layout(plan, layout, drop_unsupported=True)

        groups = groups[:1]  # one call plans every group
    else:
        p.error(f"unknown measurement {args.what!r}")
    if not args.what.startswith("plan-"):
        for g in groups:  # each result is checked before the next call overwrites the reused buffers
            got = [_bits(x).copy() for x in step(new, plan, g, buffers)]
            want = step(old, plan, g, buffers)
            if not all(np.array_equal(x, _bits(y)) for x, y in zip(got, want, strict=True)):
                print(f"the two give different bytes for {g.key}", file=sys.stderr)
                return 1

    def run(mod) -> None:
        for g in groups:
            step(mod, plan, g, buffers)

    samples: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name, mod in (("old", old), ("new", new)):
            samples[name].append(_timed(lambda mod=mod: run(mod)))
    if args.what.startswith("plan-"):
        new.shares_one_a = own[new]
    for name, runs in samples.items():
        print(
            json.dumps(
                {
                    "code": name,
                    "what": args.what,
                    "adapter": args.adapter,
                    "groups": [g.key for g in groups] if not args.what.startswith("plan-") else "all",
                    "wall_median": round(statistics.median(w for w, _ in runs), 3),
                    "cpu_median": round(statistics.median(c for _, c in runs), 3),
                    "wall": [round(w, 3) for w, _ in runs],
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
