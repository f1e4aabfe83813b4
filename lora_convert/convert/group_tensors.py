"""The stacked tensors of each planned group, built from the source factors one group at a time.

Each source tensor is read once per group and each group's A and B built once (numpy arrays), so peak memory is
one output group plus its sources, not the adapter. Scaling is folded into B in float32 and rounded once to the output
dtype; A is copied exactly. Every layout writes from here: the stacked layout writes the groups as they are,
the engine layouts cut modules out of them (lora_convert.convert.engine_layouts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lora_convert.convert import factors
from lora_convert.convert.plan import Plan, PlannedGroup
from lora_convert.io.safetensors_writer import TensorSpec
from lora_convert.io.tensor_files import numpy_dtype

OUTPUT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def output_dtype(plan: Plan, requested: str) -> str:
    """The safetensors dtype tag of the output: `requested`, or for `keep` the sources' one float dtype."""
    if requested != "keep":
        return OUTPUT_DTYPES[requested]
    tags = {
        t.dtype
        for g in plan.groups
        for s in g.slices
        for src in s.sources()
        for t in (src.module.lora_A, src.module.lora_B)
    }
    floats = [t for t in ("F64", "F32", "BF16", "F16") if t in tags]
    if len(floats) == 1:
        return floats[0]
    # Mixed (or non-float) source dtypes: float32 holds every source without loss.
    return "F32"


def stacked_specs(plan: Plan, dtype: str) -> list[TensorSpec]:
    """Every tensor of the stacked layout, in write order: each group's A then B."""
    specs = []
    for g in plan.groups:
        specs.append(TensorSpec(f"base_model.model.{g.key}.lora_A.weight", dtype, g.a_shape(plan.rank)))
        specs.append(TensorSpec(f"base_model.model.{g.key}.lora_B.weight", dtype, g.b_shape(plan.rank)))
    return specs


class GroupBuffers:
    """One reusable byte buffer each for the A and the B of the group being built (perf, docs/benchmarks.md).

    Fresh memory is expensive to touch on the benchmark VM (~0.15 s per GB in page faults, against 0.04 s to
    rewrite memory already mapped), and zero-filling every output group touched a fresh 2 GB per 2 GB adapter.
    Every group is built into a prefix of the same two buffers instead, grown to the largest group. Only one
    group's A and B exist at a time: an array handed out is overwritten by the next group, so callers must be
    done with it (the streaming writer is) before asking for the next one.
    """

    def __init__(self) -> None:
        self._raw: dict[str, np.ndarray] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: np.dtype, *, zero: bool) -> np.ndarray:
        nbytes = math.prod(shape) * dtype.itemsize
        raw = self._raw.get(role)
        if raw is None or raw.size < nbytes:
            self._raw[role] = raw = None  # drop the old buffer before allocating the larger one
            self._raw[role] = raw = np.empty(nbytes, dtype=np.uint8)
        out = raw[:nbytes].view(dtype).reshape(shape)
        if zero:
            out.fill(0)
        return out


def _fully_covered(group: PlannedGroup, R: int) -> bool:
    """Every row of the group's A and B gets written (no zero-filled slice, padded rank or missing expert)."""
    for sl in group.slices:
        if sl.rank != R:
            return False
        if group.experts and sl.fused_source is None and len(sl.expert_sources) != group.experts:
            return False
        if not group.experts and sl.dense_source is None:
            return False
    return True


def build_group_tensors(
    plan: Plan, group: PlannedGroup, dtype_tag: str, read: Callable[[str], Any], buffers: GroupBuffers | None = None
):
    """The stacked A and B of one group (slice positions: lora_convert.convert.factors).

    With `buffers`, A and B are views into reused memory that the next call overwrites (see GroupBuffers)."""
    out_dtype = numpy_dtype(dtype_tag)
    R = plan.rank
    # perf: zero-fill only when some row is not written below (a zero-filled slice, rank < R, a missing expert).
    zero = not _fully_covered(group, R)
    if buffers is not None:
        A = buffers.get("A", group.a_shape(R), out_dtype, zero=zero)
        B = buffers.get("B", group.b_shape(R), out_dtype, zero=zero)
    else:
        alloc = np.zeros if zero else np.empty
        A = alloc(group.a_shape(R), dtype=out_dtype)
        B = alloc(group.b_shape(R), dtype=out_dtype)
    if group.experts:
        for i, sl in enumerate(group.slices):
            if sl.fused_source is not None:
                src = sl.fused_source
                a, b = read(src.module.lora_A.key), read(src.module.lora_B.key)
                factors.place_source(A, B, i, sl, src, a, b, R, experts=group.experts)
                del a, b
                continue
            for e, src in sl.expert_sources.items():
                factors.place_source(
                    A, B, i, sl, src, read(src.module.lora_A.key), read(src.module.lora_B.key), R, expert=e
                )
        return A, B
    cache: dict[str, Any] = {}  # a pre-merged source feeds several slices: read it once
    for i, sl in enumerate(group.slices):
        src = sl.dense_source
        if src is None:
            continue
        mod = src.module
        if mod.lora_A.key not in cache:
            cache[mod.lora_A.key] = read(mod.lora_A.key)
            cache[mod.lora_B.key] = read(mod.lora_B.key)
        factors.place_source(A, B, i, sl, src, cache[mod.lora_A.key], cache[mod.lora_B.key], R)
    return A, B


def iter_group_tensors(
    plan: Plan, groups: list[PlannedGroup], dtype_tag: str, read: Callable[[str], Any] | None = None
) -> Iterator[tuple[PlannedGroup, Any, Any]]:
    """Each group's A and B in order. They live in reused buffers: consume them before the next step."""
    buffers = GroupBuffers()
    read = read or plan.adapter.read
    for group in groups:
        A, B = build_group_tensors(plan, group, dtype_tag, read, buffers)
        yield group, A, B
