"""The stacked tensors of each planned group, built from the source factors one group at a time.

Each source tensor is read once per group and each group's A and B built once (numpy arrays), so peak memory is
one output group plus its sources, not the adapter. Scaling is folded into B in float32 and rounded once to the output
dtype; A is copied exactly. Every layout writes from here: the stacked layout writes the groups as they are,
the engine layouts cut modules out of them (lora_convert.convert.engine_layouts).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lora_convert.convert import factors
from lora_convert.convert.plan import Plan, PlannedGroup
from lora_convert.io.safetensors_writer import TensorSpec
from lora_convert.io.tensor_files import ReadArena, numpy_dtype

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
        return factors.view_in(self._raw, role, shape, dtype, zero=zero)


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


def _output_bytes(plan: Plan, group: PlannedGroup, dtype_tag: str) -> int:
    """Bytes of a group's stacked A and B in the output dtype."""
    itemsize = numpy_dtype(dtype_tag).itemsize
    return (math.prod(group.a_shape(plan.rank)) + math.prod(group.b_shape(plan.rank))) * itemsize


def group_source_keys(group: PlannedGroup) -> list[str]:
    """The keys of every source tensor a group is built from, each once, in the order the builder uses them."""
    keys = (k for sl in group.slices for src in sl.sources() for k in (src.module.lora_A.key, src.module.lora_B.key))
    return list(dict.fromkeys(keys))


# Groups in flight at once: one written by the consumer while the next is built and the one after it read (2 sets
# of output buffers for the large groups, 2 read arenas, which hold memory maps rather than copies). Peak memory
# is bounded by twice the largest group's sources plus twice its output; a third set bought nothing measurable on
# the 2-core benchmark machine, where the three stages already share two cores (docs/benchmarks.md, "Issue 16:
# the light core").
PIPELINE_DEPTH = 2
_POLL_S = 0.05  # how often a blocked stage looks whether another stage failed
# A group whose A and B together are at most this many bytes is built into fresh arrays instead of a reused set of
# output buffers, and up to SMALL_GROUPS_IN_FLIGHT of them may wait for the writer beyond the `depth` large ones.
# perf: DeepSeek-V3's attention groups (~1 MB) sit between each layer's two 75-150 MB expert groups; holding a
# buffer set each, one of them stalled the builder until the writer had finished the large group before it, so
# building and writing alternated instead of overlapping (timeline of the 2 GB per-expert normalize: in-process
# wall 1.86 s with the builder idle ~40% of the time).
SMALL_GROUP_BYTES = 8 << 20
SMALL_GROUPS_IN_FLIGHT = 16


class _Stop(Exception):
    """Raised inside a stage thread when another stage failed or the consumer went away."""


class _Pipeline:
    """Reader thread -> builder thread -> the consumer (the writer), through bounded queues.

    The reader fetches each group's sources (neighbouring tensors in one read, into a reused arena), the builder
    folds them into a reused set of output buffers, the consumer writes. numpy's copies and casts and file I/O
    release the GIL, so the three overlap. A set of output buffers goes back to the builder only when the consumer
    asks for the next group (the contract of iter_group_tensors: done with a group before asking for the next), an
    arena goes back to the reader once its group is built. The first failure in any stage is raised in the
    consumer, and stops the other stages."""

    def __init__(self, plan: Plan, groups: list[PlannedGroup], dtype_tag: str, read, depth: int) -> None:
        self.plan, self.groups, self.tag, self.read = plan, groups, dtype_tag, read
        self.stop = threading.Event()
        self.failure: BaseException | None = None
        self.free_arenas: queue.Queue = queue.Queue()
        self.free_buffers: queue.Queue = queue.Queue()
        for _ in range(depth):
            self.free_arenas.put(ReadArena())
            self.free_buffers.put(GroupBuffers())
        self.read_q: queue.Queue = queue.Queue(maxsize=depth)
        self.built_q: queue.Queue = queue.Queue(maxsize=depth + SMALL_GROUPS_IN_FLIGHT)
        self.threads = [
            threading.Thread(target=self._run, args=(self._reader,), name="lora-convert-read", daemon=True),
            threading.Thread(target=self._run, args=(self._builder,), name="lora-convert-build", daemon=True),
        ]

    # -- blocking steps that give up when another stage failed
    def _get(self, q: queue.Queue):
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def _put(self, q: queue.Queue, item) -> None:
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _run(self, stage) -> None:
        try:
            stage()
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - carried to the consumer and raised there, whatever it is
            if self.failure is None:
                self.failure = exc
            self.stop.set()

    def _reader(self) -> None:
        for group in self.groups:
            arena = self._get(self.free_arenas)
            keys = group_source_keys(group)
            if self.read is None:
                sources = self.plan.adapter.read_many(keys, arena)
            else:
                sources = {k: self.read(k) for k in keys}
            self._put(self.read_q, (group, sources, arena))
            del sources

    def _builder(self) -> None:
        for _ in self.groups:
            group, sources, arena = self._get(self.read_q)
            small = _output_bytes(self.plan, group, self.tag) <= SMALL_GROUP_BYTES
            buffers = None if small else self._get(self.free_buffers)
            A, B = build_group_tensors(self.plan, group, self.tag, sources.__getitem__, buffers)
            del sources  # the arena's views: dropped before the arena is handed back
            self.free_arenas.put(arena)
            self._put(self.built_q, (group, A, B, buffers))
            del A, B

    def __iter__(self) -> Iterator[tuple[PlannedGroup, Any, Any]]:
        for t in self.threads:
            t.start()
        try:
            for _ in self.groups:
                item = None
                while item is None:
                    try:
                        item = self.built_q.get(timeout=_POLL_S)
                    except queue.Empty:
                        if self.stop.is_set():
                            break
                if item is None:
                    raise self.failure if self.failure is not None else RuntimeError("normalize pipeline stopped")
                group, A, B, buffers = item
                del item
                yield group, A, B
                del A, B
                if buffers is not None:
                    self.free_buffers.put(buffers)  # the consumer is done with this group: the builder may reuse it
        finally:
            self.stop.set()
            for t in self.threads:
                t.join()
        if self.failure is not None:
            raise self.failure


def iter_group_tensors(
    plan: Plan,
    groups: list[PlannedGroup],
    dtype_tag: str,
    read: Callable[[str], Any] | None = None,
    *,
    depth: int | None = None,
) -> Iterator[tuple[PlannedGroup, Any, Any]]:
    """Each group's A and B in order. They live in reused buffers: consume them before the next step.

    With `depth` >= 1 (default PIPELINE_DEPTH), reading, building and the consumer's writing overlap (_Pipeline); with 0,
    each group is read and built in the caller's thread, one at a time. Same arrays either way."""
    depth = PIPELINE_DEPTH if depth is None else depth
    if depth >= 1 and len(groups) > 1:
        yield from _Pipeline(plan, groups, dtype_tag, read, depth)
        return
    buffers = GroupBuffers()
    arena = ReadArena()
    for group in groups:
        if read is None:
            sources = plan.adapter.read_many(group_source_keys(group), arena)
            A, B = build_group_tensors(plan, group, dtype_tag, sources.__getitem__, buffers)
            del sources
        else:
            A, B = build_group_tensors(plan, group, dtype_tag, read, buffers)
        yield group, A, B
