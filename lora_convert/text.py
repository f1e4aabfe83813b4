"""Small text helpers shared by messages and tables."""

from __future__ import annotations

from collections.abc import Iterable

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
