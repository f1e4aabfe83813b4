"""Times one `lora-convert` command line from two copies of the code, alternating, by the CPU time of each process.

    .venv/bin/python bench/ab_cli.py /tmp/speed/A /tmp/speed/B --repeat 5 -- \
        normalize /tmp/lc-bench-t1/pe9 --layout gguf --drop-unsupported -o /tmp/ab-cli-out

Each tree is a copy of the repository's files (`lora_convert/`, `schemas/`, `kernels/`; e.g. `rsync -a --exclude
.git --exclude .venv . /tmp/speed/A`), put first on PYTHONPATH so that its `lora_convert` is the one imported. The
runs alternate A, B, A, B, ...; each is its own process, and its user and system CPU time come from the kernel
(`os.wait4`), which other load on a shared machine stretches far less than wall time. With `-o DIR` in the command,
DIR is deleted before each run and the runs wait 5 s after it (a write into freshly freed page-cache pages is cheaper
on this VM: docs/benchmarks.md, "The machine"), and the output files of A and B must be byte-identical (sha256),
else the script stops before timing more. Prints one line per run and the medians per tree.
"""

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def output_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (the run's report is left out: it records wall time)."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "lora_convert_report.json":
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while block := handle.read(1 << 24):
                    digest.update(block)
            digests[str(path.relative_to(folder))] = digest.hexdigest()
    return digests


def run_once(tree: str, argv: list[str]) -> tuple[float, float, float]:
    """Wall, user and system seconds of `python -m lora_convert ARGV` with `tree` first on PYTHONPATH (and as the
    working directory, which `-m` puts first on sys.path: paths in ARGV must be absolute)."""
    env = dict(os.environ, PYTHONPATH=tree)
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "lora_convert", *argv],
        env=env,
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    error = child.stderr.read().decode() if child.stderr else ""
    if child.returncode not in (0, 1):
        raise SystemExit(f"{tree}: exit {child.returncode}\n{error}")
    return wall, usage.ru_utime, usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tree_a")
    parser.add_argument("tree_b")
    parser.add_argument("--repeat", type=int, default=5)
    if "--" not in sys.argv:
        parser.error("give the command line after --")
    split = sys.argv.index("--")
    args = parser.parse_args(sys.argv[1:split])
    argv = sys.argv[split + 1 :]
    out = Path(argv[argv.index("-o") + 1]) if "-o" in argv else None
    cpu: dict[str, list[float]] = {args.tree_a: [], args.tree_b: []}
    walls: dict[str, list[float]] = {args.tree_a: [], args.tree_b: []}
    digests: dict[str, dict[str, str]] = {}
    for round_number in range(args.repeat):
        for tree in (args.tree_a, args.tree_b):
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)
                time.sleep(5)
            wall, user, system = run_once(tree, argv)
            cpu[tree].append(user + system)
            walls[tree].append(wall)
            print(f"{round_number} {tree}: wall {wall:.2f} s, user {user:.2f} s, system {system:.2f} s", flush=True)
            if out is not None and round_number == 0:
                digests[tree] = output_digest(out)
        if round_number == 0 and out is not None and digests[args.tree_a] != digests[args.tree_b]:
            raise SystemExit(f"outputs differ: {digests}")
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    for tree in (args.tree_a, args.tree_b):
        print(
            f"{tree}: CPU (user + system) median {statistics.median(cpu[tree]):.2f} s "
            f"[{min(cpu[tree]):.2f}-{max(cpu[tree]):.2f}], wall median {statistics.median(walls[tree]):.2f} s"
        )


if __name__ == "__main__":
    main()
