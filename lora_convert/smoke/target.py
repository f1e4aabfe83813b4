"""What the smoke forward checks: a PEFT adapter (normalized in memory) or a stacked output and its original."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_convert.errors import UsageError
from lora_convert.smoke.stacked import stacked_reader


@dataclass
class SmokeTarget:
    source: Any  # the resolved adapter source (lora_convert.io.source)
    plan: Any  # the normalize plan of the PEFT adapter the reference reads
    rank: int
    tag: str | None  # the dtype the in-memory normalize builds; None for a stacked output (its file decides)
    read_stacked: Callable[[Any], tuple[Any, Any]] | None  # group -> stacked (A, B); None: built from the plan


def open_target(adapter_spec: str, original: str | None, *, base, cache_dir, token) -> SmokeTarget:
    """Resolve `adapter_spec` and plan the PEFT adapter behind it (headers only)."""
    from lora_convert.convert.group_tensors import output_dtype
    from lora_convert.convert.normalize import plan_normalize
    from lora_convert.io.small_files import read_small_json
    from lora_convert.io.source import resolve_adapter_source
    from lora_convert.peft.adapter import LAYOUT_NAME

    source = resolve_adapter_source(adapter_spec, cache_dir=cache_dir, token=token)
    if not (source.path / LAYOUT_NAME).exists():
        if original is not None:
            raise UsageError(
                f"--original is only for stacked outputs, and {adapter_spec} has no {LAYOUT_NAME}.",
                hint="Drop --original to smoke-test a PEFT adapter directly (it is normalized in memory).",
            )
        plan = plan_normalize(
            adapter_spec, base=base, rank=None, drop_unsupported=True, cache_dir=cache_dir, token=token
        )
        return SmokeTarget(source, plan, plan.rank, output_dtype(plan, "keep"), None)
    # A FIFO, an LFS pointer, bad or too deeply nested JSON, not an object: UsageError naming the file.
    stacked_layout = read_small_json(
        source.path / LAYOUT_NAME,
        UsageError,
        hint="Re-create the output with lora-convert normalize; the file is written by it.",
    )
    if original is None:
        raise UsageError(
            f"{adapter_spec} is a stacked output; the smoke check needs the original PEFT adapter to compare with.",
            hint="Pass --original PATH (the adapter it was normalized from).",
        )
    plan = plan_normalize(
        original,
        base=base or stacked_layout.get("base"),
        rank=None,
        drop_unsupported=bool(stacked_layout.get("dropped")),
        cache_dir=cache_dir,
        token=token,
    )
    rank = int(stacked_layout.get("rank", plan.rank))
    return SmokeTarget(source, plan, rank, None, stacked_reader(source.path))
