"""The stacked tensors of each planned group, built from the source factors one group at a time.

Each source tensor is read once per group and each group's A and B built once (numpy arrays), so peak memory is
one output group plus its sources, not the adapter. Scaling is folded into B in float32 and rounded once to the output
dtype; A is copied exactly. Every layout writes from here: the stacked layout writes the groups as they are,
the engine layouts cut modules out of them (lora_convert.convert.engine_layouts).

Each group is checked for NaN and Inf before it is handed on (`FiniteCheck`: in its sources, and finite source
values the conversion would make infinite): they are in the data, not in the headers, so this is the one refusal
made while writing; the output is written to a temporary folder and swapped
in only when complete (lora_convert.io.output_folder), so a refusal leaves no output behind.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lora_convert.codes import REGISTRY
from lora_convert.convert import factors
from lora_convert.convert.plan import Plan, PlannedGroup
from lora_convert.errors import NonFiniteValuesError
from lora_convert.io.dtypes import BY_TAG, IEEE_FLOAT_DTYPES, KEEP, OUTPUT_DTYPES, numpy_dtype
from lora_convert.io.safetensors_writer import TensorSpec
from lora_convert.io.tensor_files import ReadArena


def output_dtype(plan: Plan, requested: str) -> str:
    """The safetensors dtype tag of the output: `requested`, or for `keep` the sources' one float dtype."""
    if requested != KEEP:
        return OUTPUT_DTYPES[requested]
    floats = IEEE_FLOAT_DTYPES & source_dtypes(plan)  # float8 sources are never kept: written as float32
    if len(floats) == 1:
        return next(iter(floats))
    # Mixed (or non-float) source dtypes: float32 holds every source without loss.
    return "F32"


def source_dtypes(plan: Plan) -> set[str]:
    """The safetensors dtype tags of every source factor of the plan's groups."""
    return {
        t.dtype
        for g in plan.groups
        for s in g.slices
        for src in s.sources()
        for t in (src.module.lora_A, src.module.lora_B)
    }


def stacked_specs(plan: Plan, dtype: str) -> list[TensorSpec]:
    """Every tensor of the stacked layout, in write order: each group's A then B."""
    specs = []
    for g in plan.groups:
        specs.append(TensorSpec(f"base_model.model.{g.key}.lora_A.weight", dtype, g.a_shape(plan.rank)))
        specs.append(TensorSpec(f"base_model.model.{g.key}.lora_B.weight", dtype, g.b_shape(plan.rank)))
    return specs


class GroupBuffers:
    """One reusable byte buffer each for the A and the B of the group being built.

    Fresh memory is expensive to touch (page faults, several times the cost of rewriting memory already mapped:
    docs/benchmarks.md), and zero-filling every output group touched a fresh 2 GB per 2 GB adapter.
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
    # Zero-fill (one more pass over the memory) only when some row is not written below (a zero-filled slice,
    # rank < R, a missing expert).
    zero = not _fully_covered(group, R)
    if buffers is not None:
        A = buffers.get("A", group.a_shape(R), out_dtype, zero=zero)
        B = buffers.get("B", group.b_shape(R), out_dtype, zero=zero)
    else:
        alloc = np.zeros if zero else np.empty
        A = alloc(group.a_shape(R), dtype=out_dtype)
        B = alloc(group.b_shape(R), dtype=out_dtype)
    factors.place_group(A, B, group, R, read)
    return A, B


# ------------------------------------------------------------------------------------------- non-finite values
# IEEE 754 floats (bfloat16 is the upper half of a float32) are NaN or infinite exactly when every exponent bit is
# set. With the sign bit on top and the exponent below it, that is: as unsigned integers, at least sign+exponent
# (a negative one); as signed integers, at least the exponent mask (a positive one). Two max-reductions of the
# same integer view, one cache-sized chunk at a time, allocate nothing and run at memory speed; np.isfinite
# allocates a bool array the size of the tensor and is several times slower (docs/benchmarks.md).
_NON_FINITE_FROM = {  # dtype name: (unsigned view, signed view, exponent mask)
    BY_TAG[tag].name: (np.dtype(f"u{BY_TAG[tag].size}"), np.dtype(f"i{BY_TAG[tag].size}"), BY_TAG[tag].exponent_mask)
    for tag in IEEE_FLOAT_DTYPES
}
FINITE_CHUNK_ELEMENTS = 1 << 18
MAX_NAMED_TENSORS = 4  # source tensors named one by one in a refusal


def all_finite(array: np.ndarray) -> bool:
    """Whether every value of a float array is finite (integer arrays always are)."""
    return largest_finite_magnitude(array) is not None


def largest_finite_magnitude(array: np.ndarray) -> float | None:
    """The largest |value| of an array (0.0 when empty), or None when some value is NaN or infinite.

    For the IEEE formats it costs nothing beyond the finiteness test: the two integer maxima it takes are the bits
    of the largest positive value (the signed maximum, when it is >= 0) and of the most negative one (the unsigned
    maximum less the sign bit, when the sign bit is set), and a finite float's magnitude grows with its bits."""
    flat = np.ascontiguousarray(array).reshape(-1)
    entry = _NON_FINITE_FROM.get(flat.dtype.name)
    if entry is None:
        if flat.dtype.kind in "iub":
            return float(np.abs(flat.astype(np.float64)).max()) if flat.size else 0.0
        largest = 0.0
        for start in range(0, flat.size, FINITE_CHUNK_ELEMENTS):
            chunk = flat[start : start + FINITE_CHUNK_ELEMENTS].astype(np.float64)
            if not np.isfinite(chunk).all():
                return None
            largest = max(largest, float(np.abs(chunk).max()))
        return largest
    unsigned, signed, exponent = entry
    sign = 1 << (8 * flat.dtype.itemsize - 1)
    as_unsigned, as_signed = flat.view(unsigned), flat.view(signed)
    largest_bits = 0
    for start in range(0, flat.size, FINITE_CHUNK_ELEMENTS):
        stop = start + FINITE_CHUNK_ELEMENTS
        top_unsigned, top_signed = int(as_unsigned[start:stop].max()), int(as_signed[start:stop].max())
        if top_unsigned >= sign | exponent or top_signed >= exponent:
            return None
        if top_signed >= 0:
            largest_bits = max(largest_bits, top_signed)
        if top_unsigned >= sign:
            largest_bits = max(largest_bits, top_unsigned - sign)
    return float(np.array(largest_bits, dtype=unsigned).view(flat.dtype))


def non_finite_counts(array: np.ndarray) -> tuple[int, int, int] | None:
    """(NaN count, Inf count, first flat index of either) of an array, or None when every value is finite."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.kind in "iub":
        return None
    nan = inf = 0
    first = None
    for start in range(0, flat.size, FINITE_CHUNK_ELEMENTS):
        chunk = flat[start : start + FINITE_CHUNK_ELEMENTS].astype(np.float64)  # exact for every float format
        is_nan, is_inf = np.isnan(chunk), np.isinf(chunk)
        bad = is_nan | is_inf
        if first is None and bad.any():
            first = start + int(np.argmax(bad))
        nan += int(is_nan.sum())
        inf += int(is_inf.sum())
    return (nan, inf, first) if first is not None else None


class FiniteCheck:
    """Refuses NaN and Inf in what is written (NonFiniteValuesError), naming the source tensor: NaN or Inf in a
    source, and a finite source value that the conversion makes infinite.

    The sources of each group are checked as they are read, in the pipeline's reader thread, which otherwise only
    maps them: the check is the first touch of their pages (faults the builder no longer pays) and runs beside the
    builder and the writer: its cost is one more pass over the data, less than checking the built A and B in the
    builder (docs/benchmarks.md, "Hot paths").

    Overflow (a float16 output, a float32 or float64 value beyond bfloat16's or float32's range, any value times a
    scaling > 1) is decided from the same pass: it yields each source's largest |value| (largest_finite_magnitude),
    which goes through the builder's own arithmetic (factors.copy_into for A, factors.fold_into for B: through
    float32, times float32(scaling), rounded to the output dtype); rounding is monotonic, so the largest value
    stays finite exactly when every value does. The built A and B are not read again. NaN, Inf or overflow only in
    `unwritten_keys` (source tensors of slices an engine layout leaves out) is not written: not refused."""

    def __init__(self, dtype_tag: str, unwritten_keys: frozenset[str] = frozenset()) -> None:
        self.tag = dtype_tag
        self.out_dtype = numpy_dtype(dtype_tag)
        self.unwritten_keys = unwritten_keys

    def check_sources(self, group: PlannedGroup, read: Callable[[str], Any]) -> None:
        keys = [k for k in group_source_keys(group) if k not in self.unwritten_keys]
        largest = {k: largest_finite_magnitude(read(k)) for k in keys}
        if all(v is not None for v in largest.values()):
            self._check_overflow(group, {k: (read(k).dtype, v) for k, v in largest.items()})
            return
        bad = [(key, *counts) for key in keys if (counts := non_finite_counts(read(key))) is not None]
        named = "; ".join(
            f"{key} holds {nan} NaN and {inf} infinite value(s), the first at flat index {first}"
            for key, nan, inf, first in bad[:MAX_NAMED_TENSORS]
        )
        more = f"; and {len(bad) - MAX_NAMED_TENSORS} more tensor(s)" if len(bad) > MAX_NAMED_TENSORS else ""
        raise NonFiniteValuesError(
            f"normalize refuses to write non-finite values into group {group.key}: {named}{more}. Expected finite "
            "factors: served, a NaN or infinite factor makes every output of the module NaN. Nothing was written.",
            hint=f"{REGISTRY['data.nan'].action} `lora-convert validate` lists every such tensor (codes data.nan and "
            "data.inf). To write the values as they are, pass --allow-non-finite.",
        )

    def _check_overflow(self, group: PlannedGroup, largest: dict[str, tuple[np.dtype, float]]) -> None:
        """Refuses a group whose finite sources the conversion would make infinite (`largest`: each checked
        source's dtype and largest |value|)."""
        overflows = []  # (key, largest |value|, scaling or None for a copied A)
        for sl in group.slices:
            for src in sl.sources():
                a_key, b_key = src.module.lora_A.key, src.module.lora_B.key
                # factors.place_source: A is copied, B folded; PEFT's output-side lora_A is placed as B
                copied, folded = (b_key, a_key) if src.a_on_output else (a_key, b_key)
                for key, scaling in ((copied, None), (folded, src.scaling)):
                    if key in largest and not self._stays_finite(*largest[key], scaling):
                        overflows.append((key, largest[key][1], scaling))
        if not overflows:
            return
        import ml_dtypes  # its finfo knows bfloat16 as well

        overflows = list(dict.fromkeys(overflows))
        top = float(ml_dtypes.finfo(self.out_dtype).max)
        named = "; ".join(
            f"{key}'s largest |value| {value:.6g}" + ("" if scaling is None else f" times its scaling {scaling:g}")
            for key, value, scaling in overflows[:MAX_NAMED_TENSORS]
        )
        more = f"; and {len(overflows) - MAX_NAMED_TENSORS} more" if len(overflows) > MAX_NAMED_TENSORS else ""
        wider = self.out_dtype.itemsize < 4 and all(
            self._stays_finite(np.dtype(np.float32), value, scaling, np.dtype(np.float32))
            for _, value, scaling in overflows
        )
        raise NonFiniteValuesError(
            f"normalize refuses to write non-finite values: converting group {group.key} to {self.tag} makes some "
            f"of its values infinite, though every source value is finite: {named}{more} (the largest finite "
            f"{self.tag} value is {top:.6g}). Nothing was written.",
            hint=(
                "Write float32 (--dtype fp32), which holds them, or pass --allow-non-finite to write the values "
                "as they are (infinite)."
                if wider
                else "No output dtype holds them (scaling is folded in float32): check how the adapter was "
                "trained, or pass --allow-non-finite to write the values as they are (infinite)."
            ),
        )

    def _stays_finite(self, source: np.dtype, value: float, scaling: float | None, out: np.dtype | None = None) -> bool:
        """Whether a source value of magnitude `value` is finite once written (`scaling` None: copied as A), by the
        builder's arithmetic (factors.copy_into / factors.fold_into), into `out` (default: the output dtype)."""
        out = self.out_dtype if out is None else out
        if scaling is None and source == out:
            return True  # copied exactly
        with np.errstate(over="ignore", invalid="ignore"):
            product = np.float32(value) if scaling is None else np.float32(value) * np.float32(abs(scaling))
            return bool(np.isfinite(np.asarray(product).astype(out)))


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
# Why: DeepSeek-V3's attention groups (~1 MB) sit between each layer's two large expert groups; holding a buffer
# set each, one of them stalled the builder until the writer had finished the large group before it, so building
# and writing alternated instead of overlapping (docs/benchmarks.md, "Hot paths").
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

    def __init__(
        self, plan: Plan, groups: list[PlannedGroup], dtype_tag: str, read, depth: int, finite: FiniteCheck | None
    ) -> None:
        self.plan, self.groups, self.tag, self.read, self.finite = plan, groups, dtype_tag, read, finite
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
            if self.finite is not None:
                self.finite.check_sources(group, sources.__getitem__)
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
    allow_non_finite: bool = False,
    unwritten_keys: frozenset[str] = frozenset(),
) -> Iterator[tuple[PlannedGroup, Any, Any]]:
    """Each group's A and B in order. They live in reused buffers: consume them before the next step.

    With `depth` >= 1 (default PIPELINE_DEPTH), reading, building and the consumer's writing overlap (_Pipeline); with 0,
    each group is read and built in the caller's thread, one at a time. Same arrays either way. Unless
    `allow_non_finite`, a group with NaN or Inf raises NonFiniteValuesError (FiniteCheck; NaN or Inf only in the
    source tensors `unwritten_keys`, which the caller leaves out, is let through)."""
    depth = PIPELINE_DEPTH if depth is None else depth
    finite = None if allow_non_finite else FiniteCheck(dtype_tag, unwritten_keys)
    if depth >= 1 and len(groups) > 1:
        yield from _Pipeline(plan, groups, dtype_tag, read, depth, finite)
        return
    buffers = GroupBuffers()
    arena = ReadArena()
    for group in groups:
        sources = plan.adapter.read_many(group_source_keys(group), arena) if read is None else None
        read_source = read if sources is None else sources.__getitem__
        if finite is not None:
            finite.check_sources(group, read_source)
        A, B = build_group_tensors(plan, group, dtype_tag, read_source, buffers)
        del sources, read_source  # the arena's views: dropped before the arena is reused
        yield group, A, B
