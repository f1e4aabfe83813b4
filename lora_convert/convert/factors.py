"""Where every slice's factors live: the one home of slice, expert and scaling arithmetic.

A stacked group holds its slices side by side (docs/stacked-layout.md), at one rank R:

- slice i's A rows are [i*R, i*R + r_i) (r_i its source's rank; the rest of the R-block is zero padding);
- its B rows are [out_offset, out_offset + out_features), B columns [0, r_i);
- an expert group has a leading expert axis on both.

A source module may feed several slices (a pre-merged `qkv_proj`, a state-space `in_proj`): slice j then takes the
source's B rows [row_start, row_stop). PEFT's fused 3-D expert factors (target_parameters) hold every expert
in one pair: A [E*r, in] expert-major (expert e's rows [e*r, (e+1)*r)), B [out, r*E] rank-major (expert e's
rank-k column is k*E + e). Scaling is folded into B once, in float32.

The stacked writer, the engine layouts (which cut modules back out of a stacked group) and the smoke check
all take their indices from here. The PEFT reference (lora_convert.peft.reference) keeps its own copy of the
3-D rule on purpose: it is the yardstick these are checked against, so it must not share their code.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lora_convert.convert.plan import PlannedGroup, PlannedSlice, SourceRef
from lora_convert.io.dtypes import DTYPES
from lora_convert.io.tensor_files import raw_view


# ------------------------------------------------------------------------------------- stacked positions
def a_rows(index: int, R: int, rank: int | None = None) -> slice:
    """Rows of slice `index`'s A in a stacked group of rank R: its whole R-block, or its first `rank` rows."""
    return slice(index * R, index * R + (R if rank is None else rank))


def b_rows(sl: PlannedSlice) -> slice:
    """Rows of a slice's output in its group's B."""
    return slice(sl.out_offset, sl.out_offset + sl.out_features)


def span_rows(slices: Sequence[PlannedSlice]) -> slice:
    """Rows of a run of consecutive slices in their group's B (from the first's start to the last's end)."""
    return slice(slices[0].out_offset, slices[-1].out_offset + slices[-1].out_features)


def kernel_offsets(group: PlannedGroup) -> list[int]:
    """Each slice's first output row, then the group's width: the `offsets` the expand/MoE kernels take."""
    return [s.out_offset for s in group.slices] + [group.out_features]


# ---------------------------------------------------------------------------------------------- sources
def source_rows(ref: SourceRef) -> slice:
    """Rows of the source module's B that feed the slice (a step > 1 for interleaved merged sources)."""
    return slice(ref.row_start, ref.row_stop, ref.row_step if ref.row_step != 1 else None)


def slice_source(sl: PlannedSlice, expert: int | None = None) -> tuple[SourceRef | None, int | None]:
    """(source feeding the slice, expert index inside it): for one expert of an expert group, the per-expert
    module (index None) or the fused 3-D module (index `expert`); None when the slice or expert is zero-filled."""
    if sl.dense_source is not None:
        return sl.dense_source, None
    if sl.fused_source is not None:
        return sl.fused_source, expert
    if expert is None:
        return None, None
    return sl.expert_sources.get(expert), None


def shares_one_a(slices: Sequence[PlannedSlice]) -> bool:
    """Whether a run of slices has one A factor, so it can be written as one module of rank R: each slice fed by
    the same source module (per expert, for an expert group), or all of them zero-filled. A pre-merged source has
    one A for every slice it feeds. Decided from the plan alone, without reading data."""
    if len(slices) <= 1:
        return True  # nothing to compare with (an engine layout asks this of each per-expert module)
    first = _feeders(slices[0])
    return all(_feeders(sl) == first for sl in slices[1:])


def _feeders(sl: PlannedSlice) -> dict[Any, int]:
    if sl.dense_source is not None:
        return {None: id(sl.dense_source.module)}
    if sl.fused_source is not None:
        return {"all experts": id(sl.fused_source.module)}
    return {e: id(s.module) for e, s in sl.expert_sources.items()}


# ------------------------------------------------------------------------------------- PEFT 3-D experts
def fused_expert_a(a, experts: int, rank: int):
    """PEFT's 3-D A [E*r, in] (expert-major) as [E, r, in] (a view)."""
    return a.reshape(experts, rank, a.shape[-1])


TRANSPOSE_BLOCK = 128  # source rows per block of the cache-blocked transpose in fused_expert_b

_reused = threading.local()


def reused_buffer(role: str, shape: tuple[int, ...], dtype, *, zero: bool = False) -> np.ndarray:
    """An array of `shape` in memory reused across calls, one buffer per thread and role; the next call for the
    same role overwrites it, so the caller is done with it first. Reused because touching fresh pages costs far
    more than rewriting mapped ones, and glibc maps every block over 32 MB fresh: a new transpose target per expert
    group was most of the time of the 3-D layout's transposes (docs/benchmarks.md, "Hot paths")."""
    store = getattr(_reused, "buffers", None)
    if store is None:
        store = _reused.buffers = {}
    return view_in(store, role, shape, np.dtype(dtype), zero=zero)


def view_in(store: dict[str, np.ndarray], role: str, shape: tuple[int, ...], dtype: np.dtype, *, zero: bool):
    """An array of `shape` and `dtype` at the start of `store[role]`, a byte buffer grown (never shrunk) to the
    largest request: the reuse behind reused_buffer and group_tensors.GroupBuffers."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = store.get(role)
    if raw is None or raw.size < nbytes:
        store[role] = raw = None  # drop the old buffer before allocating the larger one
        store[role] = raw = np.empty(nbytes, dtype=np.uint8)
    out = raw[:nbytes].view(dtype).reshape(shape)
    if zero:
        out.fill(0)
    return out


def fused_expert_b(b, experts: int, rank: int, rows: slice = slice(None), *, reuse: bool = False):
    """PEFT's 3-D B [out, r*E] (rank-major: column k*E + e), rows `rows`, as a contiguous [E, rows, r].

    Viewing the rows as [rows*r, E] gives the transpose of the expert-major [E, rows*r] wanted here: one contiguous
    2-D transpose copy, then a contiguous fold, instead of folding through the permuted 3-D view, which reads with
    stride E. The copy moves raw integers of the same width: exact, and numpy's transpose of ml_dtypes' bfloat16
    goes element by element through the dtype's generic copy. It goes in blocks of TRANSPOSE_BLOCK source rows so
    that each block's reads and writes stay in cache (timings: docs/benchmarks.md, "Hot paths").
    `reuse`: the result lives in a reused per-thread buffer (`reused_buffer`), valid until the next such call."""
    part = b[rows]
    n = part.shape[0]
    src = raw_view(part).reshape(n * rank, experts)
    if reuse:
        moved = reused_buffer("fused_expert_b", (experts, n * rank), src.dtype)
    else:
        moved = np.empty((experts, n * rank), dtype=src.dtype)
    for start in range(0, n * rank, TRANSPOSE_BLOCK):
        moved[:, start : start + TRANSPOSE_BLOCK] = src[start : start + TRANSPOSE_BLOCK].T
    return moved.view(part.dtype).reshape(experts, n, rank)


FOLD_BAND = 1 << 17  # source elements per band of fold_expert_major_into (256 KB of 16-bit values: in cache)


def fold_expert_major_into(dest, b, experts: int, rank: int, rows: slice, scaling: float) -> None:
    """dest[...] = fused_expert_b(b, experts, rank, rows) * scaling (fold_into's arithmetic): PEFT's rank-major 3-D
    B read straight into its expert-major place in a stacked group's B (dest [E, rows, r], a view).

    The plain form (the oracle in tests/test_factors_fast_paths.py) moves the whole B to expert-major order in one
    buffer and folds from there, one more pass through memory of B's size. Here B goes in bands of whole rows: each
    band is folded in its own order into a small per-thread buffer, then moved to its expert-major place from the
    cache (raw integers of the same width, exact; the fold is element by element, so its order changes no bit)."""
    part = b[rows]
    n = part.shape[0]
    if n == 0 or rank == 0 or experts == 0:
        return
    step = max(1, FOLD_BAND // (rank * experts))
    band = reused_buffer("fold_expert_major_band", (min(step, n), rank * experts), dest.dtype)
    moved = raw_view(dest)
    for start in range(0, n, step):
        stop = min(start + step, n)
        folded = band[: stop - start]
        fold_into(folded, part[start:stop], scaling)
        moved[:, start:stop] = raw_view(folded).reshape(stop - start, rank, experts).transpose(2, 0, 1)


def swapped_expert_factors(a, b, experts: int, rank: int, expert_b=None) -> tuple[Any, Any]:
    """PEFT's 3-D pair of a parameter whose lora_A is the OUTPUT side (lora_A [E*r, out], lora_B [in, r*E]) as
    the ordinary pair (A [E*r, in] expert-major, B [out, r*E] rank-major) with the same per-expert delta.

    Expert e's forward is x @ lora_B_e @ lora_A_e (the parameter is [E, in, out]), so its input-side factor is
    lora_B_e^T [r, in] and its output-side factor lora_A_e^T [out, r]. Both results are new arrays. The map is its own
    inverse: given an ordinary pair it returns PEFT's swapped pair (what `--layout peft` writes for Llama-4)."""
    expert_b = fused_expert_b if expert_b is None else expert_b
    n_in, n_out = b.shape[0], a.shape[-1]
    ordinary_a = _permuted(expert_b(b, experts, rank), (0, 2, 1)).reshape(experts * rank, n_in)  # [E, r, in]
    ordinary_b = _permuted(a.reshape(experts, rank, n_out), (2, 1, 0)).reshape(n_out, rank * experts)  # k*E + e
    return ordinary_a, ordinary_b


def interleave_rows(b, slices: int):
    """B [n*w, r] of `slices` equal consecutive slices (the stacked order) with its rows interleaved: row j of
    slice i goes to row j*slices + i (the base's order for an interleaved merged projection: gpt-oss gate_up).
    The inverse of reading slice i as rows i::slices (source_rows). A new array."""
    width = b.shape[0] // slices
    return np.ascontiguousarray(b.reshape(slices, width, *b.shape[1:]).swapaxes(0, 1)).reshape(b.shape)


def _permuted(x, axes: tuple[int, ...]):
    """x with its axes permuted, copied contiguous (numpy arrays or torch tensors)."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x.transpose(axes))
    return x.permute(axes).contiguous()


def expert_factors(a, b, experts: int, rank: int, expert: int) -> tuple[Any, Any]:
    """Expert `expert`'s own (A [r, in], B [out, r]) from PEFT's 3-D pair (views)."""
    return fused_expert_a(a, experts, rank)[expert], b.reshape(b.shape[0], rank, experts)[:, :, expert]


# --------------------------------------------------------------------------------------------- writing
def fold_into(dest: np.ndarray, b: np.ndarray, scaling: float) -> None:
    """dest[...] = b * scaling, computed in float32 and rounded once to dest's dtype: what the torch path wrote.

    That path was `torch.mul(b, s, out=dest)` for one shared bf16/f16/f32 dtype (torch's CPU kernels multiply
    reduced precision in float32 by float32(s) and round once) and `(b.float() * s).to(dtype)` otherwise (f64
    rounded to f32 first, the product widened again for f64 output). One ufunc with a float32 loop is exactly
    that: numpy casts b to float32 and the product to dest's dtype in small buffered blocks, so there is no
    full-size float32 temporary (astype copies were ~4x slower: docs/benchmarks.md).
    NaN stays NaN with its sign; its other bits are not torch's (which differ even within one torch call)."""
    if _fold_power_of_two(dest, b, scaling):
        return
    with np.errstate(over="ignore", invalid="ignore"):  # overflow gives inf, as in torch
        np.multiply(b, np.float32(scaling), out=dest, dtype=np.float32, casting="unsafe")


# (exponent shift, exponent mask, largest finite exponent field) of the 16-bit float dtypes, by dtype name
_EXPONENT_FIELDS = {
    d.name: (d.mantissa_bits, d.exponent_mask, d.largest_exponent_field) for d in DTYPES if d.ieee and d.size == 2
}
POW2_CHUNK = 1 << 16  # elements per exponent test: 128 KB of 16-bit values, in cache between the test and the add


def _fold_power_of_two(dest: np.ndarray, b: np.ndarray, scaling: float) -> bool:
    """fold_into for a power-of-two scaling (alpha = r, 2r, r/2: the usual choices) and one 16-bit dtype: done and
    True, or False to take the general path. Multiplying a normal bf16/f16 value by 2^k whose result stays normal
    is exact, and only adds k to the exponent field; the float32 multiply and rounding of the general path give the
    same bits. So a chunk whose every value is normal and stays normal is folded with one integer add of
    k << mantissa bits to the raw values; a chunk holding a zero, a subnormal, an inf or NaN, or a value that
    would leave the normal range takes the general path. tests/test_factors.py compares both paths on every
    bf16 and f16 bit pattern for k in -24..24.

    Why a fast path: numpy's float32 multiply through ml_dtypes' casts was most of the build stage of a per-expert
    normalize; the integer add is 2-3x faster (docs/benchmarks.md, "Hot paths")."""
    mantissa, k = math.frexp(scaling)
    fields = _EXPONENT_FIELDS.get(dest.dtype.name)
    if fields is None or mantissa != 0.5 or b.dtype != dest.dtype or dest.shape != b.shape:
        return False
    if not (dest.flags.c_contiguous and b.flags.c_contiguous):
        # one routed-expert slice of a stacked group (B[:, rows, :]): each expert's block is contiguous
        if dest.ndim == 3 and dest[0].flags.c_contiguous and b[0].flags.c_contiguous:
            return all(_fold_power_of_two(d, s, scaling) for d, s in zip(dest, b, strict=True))
        return False
    k -= 1  # scaling = 0.5 * 2**k
    shift, mask, top = fields
    if abs(k) >= top:
        return False
    lowest, highest = max(1, 1 - k) << shift, min(top, top - k) << shift
    add = np.uint16((k << shift) & 0xFFFF)  # two's complement for k < 0: the exponent never borrows past the sign
    flat_b, flat_dest = b.reshape(-1), dest.reshape(-1)
    src, out = flat_b.view(np.uint16), flat_dest.view(np.uint16)
    exponents = np.empty(min(POW2_CHUNK, src.size), dtype=np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, src.size, POW2_CHUNK):
            stop = start + POW2_CHUNK
            part = src[start:stop]
            field = exponents[: part.size]
            np.bitwise_and(part, np.uint16(mask), out=field)
            if field.min() >= lowest and field.max() <= highest:
                np.add(part, add, out=out[start:stop])
            else:
                np.multiply(
                    flat_b[start:stop],
                    np.float32(scaling),
                    out=flat_dest[start:stop],
                    dtype=np.float32,
                    casting="unsafe",
                )
    return True


def copy_into(dest: np.ndarray, a: np.ndarray) -> None:
    """dest[...] = a: exact for one dtype, else through float32 as torch's `copy_` did (f64 -> f32 -> bf16 is
    rounded twice, which a direct f64 -> bf16 cast would not do)."""
    if a.dtype == dest.dtype:
        np.copyto(dest, a)
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow gives inf, as in torch
            np.positive(a, out=dest, dtype=np.float32, casting="unsafe")


# ------------------------------------------------------------------------------- torch tensors (smoke on a GPU)
# The same three element operations on torch tensors, for the smoke forward, which builds the stacked tensors on the
# device from the original factors. The index arithmetic stays the functions above: place_source takes the element
# operations as `ops` and nothing else differs. torch is imported by the caller (the smoke stage), never here.
def fused_expert_b_torch(b, experts: int, rank: int, rows: slice = slice(None)):
    """fused_expert_b for a torch tensor: the same [rows*r, E] view, transposed and made contiguous (on a GPU the
    16-bit transpose is one kernel; numpy's raw-integer detour is not needed)."""
    part = b[rows]
    n = part.shape[0]
    return part.reshape(n * rank, experts).t().contiguous().reshape(experts, n, rank)


def fold_into_torch(dest, b, scaling: float) -> None:
    """fold_into for torch tensors: b widened to float32, times float32(scaling), rounded once to dest's dtype (the
    rounding fold_into and the old torch path produce: one float32 product, one round-to-nearest-even)."""
    # out of place: b.float() is b itself when b is float32, and b is the source the reference reads next
    dest.copy_(b.float() * float(np.float32(scaling)))


def copy_into_torch(dest, a) -> None:
    """copy_into for torch tensors: exact for one dtype, else through float32."""
    dest.copy_(a if a.dtype == dest.dtype else a.float())


class FactorOps:
    """Element operations for place_source other than numpy's: TORCH_OPS, for the smoke build on a GPU."""

    def __init__(self, copy, fold, expert_b):
        self.copy, self.fold, self.expert_b = copy, fold, expert_b


TORCH_OPS = FactorOps(copy_into_torch, fold_into_torch, fused_expert_b_torch)


def place_source(
    A,
    B,
    index: int,
    sl: PlannedSlice,
    ref: SourceRef,
    a,
    b,
    R: int,
    *,
    expert: int | None = None,
    experts: int | None = None,
    ops: FactorOps | None = None,
) -> None:
    """Write one source's factors into slice `index` of a stacked group's A and B (scaling folded into B).

    Dense: A [c*R, in], B [out, R]. `expert`: one per-expert 2-D source into that expert of A [E, c*R, in],
    B [E, out, R]. `experts`: a PEFT 3-D source covering every expert at once. `ops`: None for numpy arrays (this
    module's functions, looked up at call time) or TORCH_OPS for torch tensors."""
    if ops is None:  # B's expert-major copy is folded into B at once: a reused buffer serves every group
        copy, fold, expert_b = copy_into, fold_into, _fused_expert_b_reused
    else:
        copy, fold, expert_b = ops.copy, ops.fold, ops.expert_b
    r = ref.rank
    rows_a, rows_b = a_rows(index, R, r), b_rows(sl)
    if experts is not None:
        if ref.a_on_output:  # PEFT's lora_A is the output side: A_e = lora_B_e^T, B_e = lora_A_e^T
            a, b = swapped_expert_factors(a, b, experts, r, expert_b)
        copy(A[:, rows_a, :], fused_expert_a(a, experts, r))
        if ops is None:
            fold_expert_major_into(B[:, rows_b, :r], b, experts, r, source_rows(ref), ref.scaling)
        else:
            fold(B[:, rows_b, :r], expert_b(b, experts, r, source_rows(ref)), ref.scaling)
        return
    if expert is not None:
        A, B = A[expert], B[expert]
    copy(A[rows_a, :], a)
    fold(B[rows_b, :r], b[source_rows(ref)], ref.scaling)


def _fused_expert_b_reused(b, experts: int, rank: int, rows: slice = slice(None)):
    return fused_expert_b(b, experts, rank, rows, reuse=True)


def cut_module(A, B, group: PlannedGroup, slices: Sequence[int], R: int, expert: int | None = None) -> tuple[Any, Any]:
    """A run of slices of a stacked group as one module of rank R: (A [R, in], B [rows, R]) views; the run must
    share one A (`shares_one_a`), so the first slice's A-block stands for all of them."""
    if expert is not None:
        A, B = A[expert], B[expert]
    run = [group.slices[i] for i in slices]
    return A[a_rows(slices[0], R)], B[span_rows(run)]


def pad_rank(a, b, rank: int):
    """(a [r, in], b [out, r]) as rank `rank` >= r, padded with zeros (the same delta: b @ a is unchanged)."""
    r = a.shape[0]
    a2 = np.zeros((rank, a.shape[1]), dtype=a.dtype)
    b2 = np.zeros((b.shape[0], rank), dtype=b.dtype)
    a2[:r] = a
    b2[:, :r] = b
    return a2, b2


def peft_3d_module(A, B, group: PlannedGroup, R: int, rank: int):
    """A stacked routed-expert group (A [E, n*R, in], B [E, out, R]) as PEFT's 3-D parameter LoRA of rank `rank`:
    A [E*rank, in] (expert-major rows) and B [out, rank*E] (column k*E + e is rank k of expert e).

    Slices that share one A (a 3-D source: gate and up were one module) keep it; otherwise each slice's A-block
    is stacked and B is block-diagonal over the slices, so every expert's delta B_e @ A_e is unchanged. A is the
    stacked A itself (a view, consumed before the next group like every module cut) when its rows already are the
    answer. B lives in a reused per-thread buffer (valid until the next group's B), written in its final order:
    each slice's rows go straight to their rank-major place (expert_minor_into) and only the off-diagonal blocks
    are zero-filled, so there is no expert-major intermediate and no whole-tensor transpose
    (docs/benchmarks.md, "Hot paths")."""
    E = group.experts
    out = group.out_features
    shared = shares_one_a(group.slices)
    n = len(group.slices)
    if shared and rank == R:
        A3 = A[:, :R]
    elif not shared and rank == n * R:
        A3 = A  # slice i's A-block already sits at rows [i*R, (i+1)*R)
    else:
        A3 = np.zeros((E, rank, group.in_features), dtype=A.dtype)
        for i in range(1 if shared else n):
            A3[:, i * R : (i + 1) * R] = A[:, a_rows(i, R)]
    a3 = np.ascontiguousarray(A3).reshape(E * rank, group.in_features)
    b3 = reused_buffer("peft_3d_b", (out, rank, E), B.dtype)
    if shared:
        expert_minor_into(b3[:, :R], B)
        b3[:, R:] = 0
    else:
        if sum(s.out_features for s in group.slices) != out:
            b3.fill(0)  # rows no slice writes (never in a planned group; kept exact all the same)
        for i, s in enumerate(group.slices):
            rows = b_rows(s)
            b3[rows, : i * R] = 0
            b3[rows, (i + 1) * R :] = 0
            expert_minor_into(b3[rows, i * R : (i + 1) * R], B[:, rows])
    return a3, b3.reshape(out, rank * E)


TRANSPOSE_BAND = 128  # elements of each expert's rows per band of expert_minor_into (the band: E x 256 bytes)


def expert_minor_into(dest, src) -> None:
    """dest[o, k, e] = src[e, o, k]: an expert-major block [E, n, r] (rows of a stacked group's B) written in
    PEFT's rank-major 3-D order, dest [n, r, E] (a view whose last axis is contiguous).

    The plain form is `dest[...] = src.transpose(1, 2, 0)` (the oracle in tests/test_factors_fast_paths.py). numpy
    copies in dest's order, so that reads src with the stride of a whole expert for every element, a new page each
    time. Here each band of rows is first copied, expert by expert (contiguous runs), into a small per-thread buffer
    and transposed from there, in cache; the copies move raw integers of the same width (exact)."""
    E, n, r = src.shape
    if E == 0 or n == 0 or r == 0:
        return
    s, d = raw_view(src), raw_view(dest)
    step = max(1, TRANSPOSE_BAND // r)
    band = reused_buffer("expert_minor_band", (E, min(step, n), r), s.dtype)
    for start in range(0, n, step):
        stop = min(start + step, n)
        part = band[:, : stop - start]
        np.copyto(part, s[:, start:stop])
        d[start:stop] = part.transpose(1, 2, 0)


def place_group(A, B, group, R: int, read: Callable[[str], Any], *, ops: FactorOps | None = None) -> None:
    """Place every source of `group` into its stacked A and B (the caller allocates them, zeroed where nothing is
    placed). `read(key)` gives a source tensor: on the CPU a numpy view (ops None), on a GPU a torch tensor
    (TORCH_OPS). A fused 3-D expert source fills every expert of its slice at once."""

    def factors_of(module) -> tuple[Any, Any]:
        return read(module.lora_A.key), read(module.lora_B.key)

    if group.experts:
        for i, sl in enumerate(group.slices):
            if sl.fused_source is not None:
                a, b = factors_of(sl.fused_source.module)
                place_source(A, B, i, sl, sl.fused_source, a, b, R, experts=group.experts, ops=ops)
                continue
            for e, src in sl.expert_sources.items():
                a, b = factors_of(src.module)
                place_source(A, B, i, sl, src, a, b, R, expert=e, ops=ops)
        return
    read_once: dict[str, tuple[Any, Any]] = {}  # a pre-merged source feeds several slices: read it once
    for i, sl in enumerate(group.slices):
        src = sl.dense_source
        if src is None:
            continue
        if src.module.lora_A.key not in read_once:
            read_once[src.module.lora_A.key] = factors_of(src.module)
        a, b = read_once[src.module.lora_A.key]
        place_source(A, B, i, sl, src, a, b, R, ops=ops)
