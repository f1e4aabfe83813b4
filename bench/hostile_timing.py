"""How fast hostile input is refused: the timing targets that tests/test_hostile.py and
tests/test_hostile_properties.py check for behaviour only (timings never appear in tests).

Each row runs one refusal in this process, as the tests do (the CLI through typer's CliRunner, the header parser
directly), and compares its wall time with a target. The hostile inputs are the tests' own (imported from
tests/test_hostile.py), so the bench and the tests cannot drift apart.

    .venv/bin/python bench/hostile_timing.py          # prints one row per case; exit 1 when a target is missed
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub row must fail fast offline, as in the tests

from typer.testing import CliRunner  # noqa: E402

from lora_convert.cli import app  # noqa: E402
from lora_convert.errors import AdapterFormatError  # noqa: E402
from lora_convert.io.tensor_files import read_safetensors_header  # noqa: E402
from test_hostile import HOSTILE_FILES, make  # noqa: E402

# Targets (seconds). The CLI rows include CliRunner and the first imports; the checks themselves take milliseconds.
CLI_REFUSAL_S = 5.0
HUGE_HEADER_S = 0.5  # refused from the 8-byte length prefix alone, without reading 300 MB
FIFO_S = 5.0  # refused, not waited on
HUB_OFFLINE_S = 10.0
RANDOM_BYTES_S = 2.0  # per input, the budget hypothesis examples in test_hostile_properties.py used to assert
RANDOM_INPUTS = 150


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def validate(spec: str, *extra: str):
    result = CliRunner().invoke(app, ["validate", spec, "--format", "json", "--no-smoke", *extra])
    # A fast time only counts for a real refusal: an error exit code, not a crash.
    if result.exit_code not in (1, 3) or (result.exception and not isinstance(result.exception, SystemExit)):
        raise SystemExit(f"validate {spec}: exit {result.exit_code}, {result.exception!r}\n{result.output[-2000:]}")
    return result


def huge_header(tmp: Path) -> Path:
    path = tmp / "huge.safetensors"
    size = 300 * 1024 * 1024
    with open(path, "wb") as handle:  # sparse: takes no disk and no time
        handle.write(struct.pack("<Q", size))
        handle.truncate(size + 8)
    return path


def parse_refusing(path: Path) -> None:
    with contextlib.suppress(AdapterFormatError):
        read_safetensors_header(path)


def random_bytes_worst(tmp: Path) -> float:
    rng = random.Random(0)
    path = tmp / "random.safetensors"
    worst = 0.0
    for _ in range(RANDOM_INPUTS):
        body = rng.randbytes(rng.randrange(0, 512))
        if rng.random() < 0.5:  # a plausible length prefix, so the JSON parser sees the body too
            body = struct.pack("<Q", len(body)) + body
        path.write_bytes(body)
        worst = max(worst, timed(lambda: parse_refusing(path)))
    return worst


def main() -> int:
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for case in sorted(HOSTILE_FILES):
            folder = make(tmp / case, HOSTILE_FILES[case])
            rows.append((f"validate {case}", timed(lambda f=folder: validate(str(f))), CLI_REFUSAL_S))
        path = huge_header(tmp)
        rows.append(("header of 300 MB (parser)", timed(lambda: parse_refusing(path)), HUGE_HEADER_S))
        fifo = make(tmp / "fifo", None)
        os.mkfifo(fifo / "adapter_model.safetensors")
        rows.append(("validate a FIFO", timed(lambda: validate(str(fifo))), FIFO_S))
        cache = str(tmp / "hf")
        rows.append(
            (
                "validate a Hub id offline",
                timed(lambda: validate("someorg/some-adapter", "--cache-dir", cache)),
                HUB_OFFLINE_S,
            )
        )
        rows.append((f"parse random bytes (worst of {RANDOM_INPUTS})", random_bytes_worst(tmp), RANDOM_BYTES_S))
    missed = [r for r in rows if r[1] >= r[2]]
    width = max(len(r[0]) for r in rows)
    for label, seconds, target in rows:
        print(f"{label:<{width}}  {seconds:8.3f} s  (target < {target:g} s){'  MISSED' if seconds >= target else ''}")
    print(json.dumps({"missed": [r[0] for r in missed]}))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
