"""Small text helpers shared by messages and tables."""

from __future__ import annotations

import re
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


# the first numeric component of a module path: its layer in every layer stack of the schemas
_LAYER_COMPONENT = re.compile(r"^(?P<head>(?:[^.]+\.)*?)(?P<layer>\d+)(?P<tail>(?:\.[^.]+)*)$")


def refused_listing(refused: Iterable[tuple[str, str]], limit: int = 6) -> str:
    """(module path, reason) pairs as one sentence's worth: paths that differ only in their layer and share a reason
    become one entry, `model.layers.N.self_attn.q_b_proj on layers 0-2 (reason)`, in first-seen order; past `limit`
    entries the rest is counted. [("m.layers.0.q", "r"), ("m.layers.1.q", "r"), ("lm_head", "s")] ->
    "m.layers.N.q on layers 0-1 (r); lm_head (s)"."""
    entries: dict[tuple[str, str], tuple[str, set[int]]] = {}  # (template, reason) -> (first path, layers)
    for path, reason in refused:
        match = _LAYER_COMPONENT.match(path)
        template = f"{match['head']}N{match['tail']}" if match else path
        first, layers = entries.setdefault((template, reason), (path, set()))
        if match:
            layers.add(int(match["layer"]))
    shown = []
    for (template, reason), (first, layers) in list(entries.items())[:limit]:
        where = f"{template} on layers {spans(layers)}" if len(layers) > 1 else first
        shown.append(f"{where} ({reason})")
    rest = len(entries) - limit
    return "; ".join(shown) + (f"; and {rest} more" if rest > 0 else "")


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
