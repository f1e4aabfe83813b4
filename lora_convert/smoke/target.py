"""What the smoke forward checks: a PEFT adapter (normalized in memory) or a stacked output and its original.

Both are built from a plan the caller made once (lora_convert.pipeline.prepared.PreparedAdapter.plan); nothing here
reads an adapter again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_convert.errors import UsageError
from lora_convert.io.small_files import read_small_json
from lora_convert.peft.adapter import LAYOUT_NAME
from lora_convert.smoke.stacked import stacked_reader


@dataclass
class SmokeTarget:
    source: Any  # the resolved adapter source (lora_convert.io.source)
    plan: Any  # the normalize plan of the PEFT adapter the reference reads
    rank: int
    tag: str | None  # the dtype the in-memory normalize builds; None for a stacked output (its file decides)
    read_stacked: Callable[[Any], tuple[Any, Any]] | None  # group -> stacked (A, B); None: built from the plan


def stacked_layout_of(source) -> dict | None:
    """The lora_layout.json of a stacked output, or None for a PEFT adapter. A FIFO, an LFS pointer, bad or too deeply
    nested JSON, not an object: UsageError naming the file."""
    if not (source.path / LAYOUT_NAME).exists():
        return None
    return read_small_json(
        source.path / LAYOUT_NAME,
        UsageError,
        hint="Re-create the output with lora-convert normalize; the file is written by it.",
    )


def peft_target(source, plan) -> SmokeTarget:
    """A PEFT adapter, checked through its stacked plan built in memory (`plan`: with drop_unsupported)."""
    from lora_convert.convert.group_tensors import output_dtype  # numpy: not imported by `validate --no-smoke`

    return SmokeTarget(source, plan, plan.rank, output_dtype(plan, "keep"), None)


def stacked_target(source, stacked_layout: dict, original_plan) -> SmokeTarget:
    """A stacked output, checked against the plan of the adapter it was normalized from."""
    rank = int(stacked_layout.get("rank", original_plan.rank))
    return SmokeTarget(source, original_plan, rank, None, stacked_reader(source.path))
