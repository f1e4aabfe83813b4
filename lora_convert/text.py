"""Small text helpers shared by messages and tables."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from lora_convert.errors import InternalError


def spans(values: Iterable[int]) -> str:
    """Integers as compact ranges, the one rendering of layer (and expert) sets in messages and tables:
    [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"; [] -> "-". Any order, repeats allowed: [2, 0, 1, 1] -> "0-2"."""
    values = sorted(set(values))
    if not values:
        return "-"
    parts, start, prev = [], values[0], values[0]
    for value in values[1:] + [None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ",".join(parts)


def replace_generated_section(text: str, begin: str, end: str, body: str) -> str:
    """`text` with what lies between the markers `begin` and `end` (a generated part of a doc) replaced by `body`.
    Raises InternalError when either marker is missing."""
    head, found_begin, rest = text.partition(begin)
    _, found_end, tail = rest.partition(end)
    if not found_begin or not found_end:
        raise InternalError(f"The generated section's markers are missing: {begin} ... {end}.")
    return f"{head}{begin}{body}{end}{tail}"


def generated_doc_main(argv: list[str], markdown, render_into, usage: str) -> int:
    """The command line of a doc generator (`python -m lora_convert.codes`, tests/architecture_map.py, ...): no
    argument or `--markdown` prints the generated part, `--write PATH` rewrites it inside PATH (`render_into` gets
    the file's text); anything else prints `usage` to stderr and returns 2."""
    if not argv or argv == ["--markdown"]:
        sys.stdout.write(markdown())
        return 0
    if len(argv) == 2 and argv[0] == "--write":
        path = Path(argv[1])
        path.write_text(render_into(path.read_text(encoding="utf-8")), encoding="utf-8")
        return 0
    sys.stderr.write(f"usage: {usage}\n")
    return 2
