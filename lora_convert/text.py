"""Small text helpers shared by messages and tables."""

from __future__ import annotations


def spans(values: list[int]) -> str:
    """Sorted integers as compact ranges: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"; [] -> "-"."""
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
