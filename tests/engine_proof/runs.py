"""The proof of every release at once: each release's harness in its own process (run_release.py), several
releases in parallel, and the recorded truth of each release (tests/engine_proof/truth/<engine>-<version>.json).

A process per release, not per engine: every release imports its own `vllm`/`sglang` package and initializes global
state (process groups, model registries), so two releases cannot share an interpreter. The processes are independent,
so they run side by side: $LORA_CONVERT_PROOF_JOBS at a time (default: the number of CPU cores), slowest first.

The recorded truth is the run's table with machine-specific paths replaced (`<workdir>`, `<site-packages>`,
`<release>`) and the run's release, layout and adaptations added. `make proof-truth` (`python
tests/engine_proof/runs.py --record`) rewrites it; tests/test_proof_*.py hold the live run equal to it, and the proof
table of docs/engine-layouts.md (proof_table.py) is generated from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRUTH_DIR = HERE / "truth"
JOBS_ENV = "LORA_CONVERT_PROOF_JOBS"
# slowest first, so the last process to start is a short one: SGLang builds every base from its weights
_ENGINE_ORDER = {"sglang": 0, "vllm": 1}


def truth_path(release: str) -> Path:
    engine, _, version = release.partition("==")
    return TRUTH_DIR / f"{engine}-{version}.json"


def recorded(release: str) -> dict | None:
    path = truth_path(release)
    return json.loads(path.read_text()) if path.exists() else None


def unavailable(release: str) -> str | None:
    """Why `release` cannot run here (None: it can): its engine's harness needs the installed release's packages
    (tests/engine_proof/requirements.txt); a release other than the installed one needs its cached sources."""
    import importlib.util

    from engine_proof import releases

    engine, _ = releases.split(release)
    if importlib.util.find_spec(engine) is None:
        return f"{engine} is not installed (make setup installs tests/engine_proof/requirements.txt)"
    if not releases.is_installed(release) and releases.cached(release) is None:
        return f"{release} is not in the proof cache {releases.cache_root()} (make proof-cache fetches it)"
    return None


def run_release(release: str, workdir: Path, cases: tuple[str, ...] = (), timeout_s: int = 1800) -> dict:
    """Run the harness of `release` on `cases` (default all) in a fresh process; returns its recorded form."""
    from engine_proof import adaptations, releases

    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "truth.json"
    env = dict(os.environ, PYTHONHASHSEED="0")  # SGLang and vLLM print Python sets in some messages
    if int(os.environ.get(JOBS_ENV) or os.cpu_count() or 1) > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # releases side by side: one core each, not all of them each
    cmd = [sys.executable, str(HERE / "run_release.py"), release, "--truth", str(out), "--workdir", str(workdir)]
    start = time.monotonic()
    proc = subprocess.run([*cmd, *cases], capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"the proof of {release} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    engine, version = releases.split(release)
    table = json.loads(out.read_text())
    where = {
        str(workdir): "<workdir>",
        str(releases.release_dir(release)): "<release>",
        str(Path(adaptations.__file__).resolve().parents[1]): "<tests>",
        sysconfig.get_paths()["purelib"]: "<site-packages>",
    }
    record = {
        "_note": f"The {release} proof's record (tests/engine_proof/runs.py; `make proof-truth` rewrites it): per "
        "fixture, the original adapter and lora-convert's `--layout` output of the same release through the "
        "release's own LoRA loader (tests/engine_proof/run_release.py).",
        "engine": engine,
        "version": version,
        "layout_of": release,
        "adaptations": [a.name for a in adaptations.applicable(engine, version)],
        "cases": _declared_unrunnable(engine, version, _replace_paths(table, where)),
    }
    record["_seconds"] = round(time.monotonic() - start, 1)
    return record


def _declared_unrunnable(engine: str, version: str, table: dict) -> dict:
    """A harness error on a fixture the release is declared unable to run on here (adaptations.CANNOT_RUN) becomes a
    `cannot_run` record of the measured and the declared error, which the proof compares (common.check_cannot_run);
    for a `layout_only` declaration, only the layout output's load error does."""
    from engine_proof.adaptations import cannot_run

    for case, row in table.items():
        declared = cannot_run(engine, version, case)
        if declared is not None and declared.layout_only:
            error = (row.get("layout") or {}).get("load_error")
            if error is not None:
                row["layout"] = {"cannot_run": {"error": error, "expected": declared.error}}
            continue
        error = row.get("harness_error") or _refused_before_any_lora(row)
        if declared is not None and error is not None:
            record = {"cannot_run": {"error": error, "expected": declared.error}}
            table[case] = {"original": record, "layout": record}
    return table


def _refused_before_any_lora(row: dict) -> str | None:
    """The error of a row whose original adapter and layout output both failed with the same error (vLLM's harness
    records an engine that refuses the base's config as a load error of both)."""
    errors = {(row.get(side) or {}).get("load_error") for side in ("original", "layout")}
    return errors.pop() if len(errors) == 1 and None not in errors else None


def _replace_paths(value, where: dict[str, str]):
    if isinstance(value, str):
        for path, name in sorted(where.items(), key=lambda kv: -len(kv[0])):
            value = value.replace(path, name)
        return value
    if isinstance(value, dict):
        return {k: _replace_paths(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_paths(v, where) for v in value]
    return value


def live_path(path: str, workdir: Path) -> Path:
    """A path of a record (`served_base`) as it is on this machine for the run in `workdir`."""
    return Path(path.replace("<workdir>", str(workdir)).replace("<tests>", str(HERE.parent)))


def comparable(record: dict) -> dict:
    """What of a record must be the same from run to run: everything but its timing."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def check_run_equals_truth(release: str, live: dict, cases: list[str]) -> None:
    """(c) of the proof: a release's live run is its recorded truth (tests/engine_proof/truth/), case by case."""
    want = recorded(release)
    assert want is not None, f"{truth_path(release)} is missing: run `make proof-truth`"
    assert sorted(live["cases"]) == sorted(cases)
    differ = sorted(c for c in cases if live["cases"][c] != want["cases"].get(c))
    assert not differ, f"{release} now differs from {truth_path(release).name} on {differ} (`make proof-truth`)"
    assert comparable(live) == comparable(want)


def jobs() -> int:
    return max(1, int(os.environ.get(JOBS_ENV) or os.cpu_count() or 1))


class ProofRuns:
    """The runs of several releases, started together (`cases`: release -> its fixtures, () for all);
    `result(release)` waits for one."""

    def __init__(self, cases: dict[str, tuple[str, ...]], root: Path):
        self.root = root
        order = sorted(cases, key=lambda r: _ENGINE_ORDER.get(r.partition("==")[0], 9))
        self._pool = ThreadPoolExecutor(max_workers=jobs())
        self._runs: dict[str, Future] = {r: self._pool.submit(run_release, r, self.workdir(r), cases[r]) for r in order}

    def workdir(self, release: str) -> Path:
        return self.root / release.replace("==", "-")

    def result(self, release: str) -> dict:
        return self._runs[release].result()


def main(argv: list[str]) -> int:
    """`--record [RELEASE ...]`: run every release (default: all with a rule file) and rewrite its recorded truth."""
    import tempfile

    from engine_proof import releases

    if not argv or argv[0] != "--record":
        print(__doc__)
        return 2
    wanted = argv[1:] or releases.proof_releases()
    missing = {r: why for r in wanted if (why := unavailable(r))}
    if missing:
        print("\n".join(f"{r}: {why}" for r, why in missing.items()), file=sys.stderr)
        return 1
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lora-convert-proof-") as tmp:
        runs = ProofRuns(dict.fromkeys(wanted, ()), Path(tmp))
        for release in wanted:
            record = runs.result(release)
            TRUTH_DIR.mkdir(exist_ok=True)
            body = {k: v for k, v in record.items() if k != "_seconds"}
            truth_path(release).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
            print(f"{release}: {record['_seconds']} s -> {truth_path(release)}", file=sys.stderr)
    print(f"{len(wanted)} releases in {time.monotonic() - start:.0f} s ({jobs()} at a time)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(HERE.parent)]
    sys.exit(main(sys.argv[1:]))
