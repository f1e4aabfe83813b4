"""The data scan of `validate`: read every tensor once, one at a time, and report what the numbers say.

Per tensor: NaN count and first flat index, Inf count and first flat index, whether a B factor is all zero (the
module is a no-op), and the RMS. Across the adapter: the RMS of each tensor against the median of its factor kind
(lora_A, lora_B, magnitude), which catches a module whose factors were saved unscaled, in the wrong dtype or
from the wrong checkpoint.

Memory: tensors are read in batches of neighbours (at most SCAN_BATCH_BYTES, or one larger tensor) through memory
maps of the file (no copy; a file that cannot be mapped is read into a reused arena per thread), on SCAN_THREADS
threads, and upcast in cache-sized chunks, so peak memory is a few batches (or the largest tensor) plus one chunk
per thread, whatever the adapter's size. For the few modules whose delta split `engine_profiles` needs (Nemotron-H
`in_proj`), A and B are read again after the scan: the squared norm of rows S of B @ A is sum over i in S of b_i^T
(A A^T) b_i, with no [out, in] product built.

Dtypes are checked from the headers (`dtype_findings`), so they are reported with `--no-data` too.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from lora_convert.codes import finding
from lora_convert.findings import Finding
from lora_convert.io.dtypes import BY_TAG, FLOAT_DTYPES, IEEE_FLOAT_DTYPES, smallest_normal
from lora_convert.io.tensor_files import ReadArena, read_runs
from lora_convert.peft.naming import Factor

FAST_NORM_DTYPES = IEEE_FLOAT_DTYPES
SIXTEEN_BIT = frozenset(t for t in IEEE_FLOAT_DTYPES if BY_TAG[t].size == 2)  # norms from exact float32 squares
SMALLEST_NORMAL = {t: smallest_normal(t) for t in IEEE_FLOAT_DTYPES}
FLOAT32_MAX = float(np.finfo(np.float32).max)
CHUNK_ELEMENTS = 1 << 24  # 16M elements: 64 MB of float32 per chunk
NORM_CHUNK_ELEMENTS = 1 << 18  # 2 MB of float64: stays in cache between the upcast and the dot product
OUTLIER_RATIO = 100.0  # RMS more than this many times above (or below) the median of its kind
MIN_FOR_MEDIAN = 4  # fewer tensors of a kind than this and there is no meaningful median
MAX_KEYS = 50  # keys listed in one finding
MAX_PER_TENSOR_FINDINGS = 25  # NaN/Inf findings listed one by one before they are summed up

ProgressFn = Callable[[int, int], None]  # (bytes just read, total bytes)


@dataclass
class TensorStats:
    key: str
    dtype: str
    numel: int
    factor: str
    nan: int = 0
    first_nan: int | None = None
    inf: int = 0
    first_inf: int | None = None
    all_zero: bool = False
    rms: float = 0.0


@dataclass
class DataScanResult:
    stats: dict[str, TensorStats] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0
    # module path -> squared norm of each output row of B @ A (only for modules asked for)
    row_energy: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "tensors_read": len(self.stats),
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
            "nan_tensors": sum(1 for s in self.stats.values() if s.nan),
            "inf_tensors": sum(1 for s in self.stats.values() if s.inf),
            "zero_b_tensors": sum(1 for s in self.stats.values() if s.all_zero and s.factor == "lora_B"),
        }


def _factor_kind(factor: Factor) -> str:
    if factor in (Factor.LORA_A, Factor.EMBEDDING_A):
        return "lora_A"
    if factor in (Factor.LORA_B, Factor.EMBEDDING_B):
        return "lora_B"
    if factor is Factor.MAGNITUDE:
        return "magnitude"
    return factor.value


def _scan_order(adapter) -> list[str]:
    """Each module's A right before its B (so a Gram matrix lives briefly), then every other tensor."""
    order: list[str] = []
    seen: set[str] = set()
    for mod in adapter.modules:
        for t in (mod.lora_A, mod.lora_B, mod.magnitude, mod.lora_bias):
            if t is not None and t.key not in seen:
                order.append(t.key)
                seen.add(t.key)
    order.extend(k for k in adapter.index.tensors if k not in seen)
    return order


def _as_float32(chunk: np.ndarray) -> np.ndarray:
    """A chunk as float32: exact for every stored float dtype but F64 (rounded, as the torch path's upcast was)."""
    return chunk.astype(np.float32, copy=chunk.dtype != np.float32)


_scratch = threading.local()


def _norm_scratch() -> np.ndarray:
    """One float64 chunk buffer per thread, reused: a fresh 2 MB buffer per tensor is a fresh mapping (glibc mmaps
    blocks this large) whose page faults cost more than the arithmetic."""
    buf = getattr(_scratch, "buf", None)
    if buf is None:
        buf = _scratch.buf = np.empty(NORM_CHUNK_ELEMENTS, dtype=np.float64)
    return buf


def _sum_sq_16bit(flat: np.ndarray) -> float:
    """Sum of squares of a bfloat16 or float16 tensor, a cache-sized chunk at a time: each element widened to
    float32 (bf16: its bits shifted into the upper half of a float32, exact; f16: numpy's cast, exact), squared and
    summed by one BLAS dot product per chunk, the chunks' sums added in float64. A square of a 16-bit float is exact
    in float32 (8 or 11 significant bits squared fit in 24); only the chunk sums round (relative ~1e-6, against the
    bf16/f16 rounding of the norm, 4e-3 / 5e-4, that follows). A sum that overflows float32 (bf16 values above
    ~1e19) gives inf and sends the tensor down the exact path, as torch's float32 accumulation did.

    Why not the float64 path of `_norm_in_stored_dtype`: ml_dtypes' element-by-element cast to float64 makes it
    several times slower (docs/benchmarks.md, "Hot paths")."""
    raw = flat.view(np.uint16)
    words = _norm_scratch().view(np.uint32)
    floats = words.view(np.float32)
    sum_sq = 0.0
    bf16 = flat.dtype != np.float16
    if bf16 and raw.size >= PAIRED_MIN_ELEMENTS and raw.size % 2 == 0 and raw.ctypes.data % 4 == 0:
        # Two bf16 in each aligned 32-bit word: the upper one is already a float32 once the lower half is masked
        # off, the lower one once shifted up. Same-width integer operations on half as many words, faster than
        # widening each bf16 on its own (docs/benchmarks.md).
        pairs = raw.view(np.uint32)
        half = words.size // 2
        low, high = words[:half], words[half : 2 * half]
        for start in range(0, pairs.size, half):
            part = pairs[start : start + half]
            n = part.size
            np.left_shift(part, 16, out=low[:n])
            np.bitwise_and(part, np.uint32(0xFFFF0000), out=high[:n])
            a, b = low[:n].view(np.float32), high[:n].view(np.float32)
            sum_sq += float(np.dot(a, a)) + float(np.dot(b, b))
        return sum_sq
    for start in range(0, raw.size, words.size):
        part = raw[start : start + words.size]
        n = part.size
        if bf16:
            np.left_shift(part, 16, out=words[:n], dtype=np.uint32, casting="unsafe")
        else:
            np.copyto(floats[:n], flat[start : start + n], casting="unsafe")
        chunk = floats[:n]
        sum_sq += float(np.dot(chunk, chunk))
    return sum_sq


def _norm_in_stored_dtype(flat: np.ndarray) -> float:
    """The 2-norm as the torch path reported it: `torch.linalg.vector_norm` returns the stored dtype, so the norm
    of a bf16/f16 tensor was rounded to bf16/f16 (an f16 norm above 65504 was inf, which sent the tensor down the
    exact path). Here the sum of squares is accumulated in float64 (f32/f64 tensors) or per chunk in float32 from
    exact squares (bf16/f16, `_sum_sq_16bit`), a cache-sized chunk at a time, and the norm rounded to the stored
    dtype. Only the unrounded norm's last bits can differ from torch's (summation order and accumulator width),
    which after rounding is at most 1 ulp of bf16/f16 on a rounding boundary, ~1e-7 relative for f32: RMS is
    compared with a 100x outlier ratio and printed to 3 significant digits, so no finding changes
    (tests/test_data_scan.py compares the scan with the torch one on the fixtures and hostile values)."""
    if flat.dtype.itemsize == 2:
        norm = math.sqrt(_sum_sq_16bit(flat))  # inf or nan stay so
        return float(np.float64(norm).astype(flat.dtype))
    sum_sq = 0.0
    buf = _norm_scratch()
    for start in range(0, flat.size, NORM_CHUNK_ELEMENTS):
        part = flat[start : start + NORM_CHUNK_ELEMENTS]
        sq = buf[: part.size]
        # multiply and numpy's (pairwise) sum, not np.dot: BLAS ddot wakes OpenBLAS's thread pool for every chunk,
        # which on a loaded machine costs more than the arithmetic (docs/benchmarks.md).
        np.copyto(sq, part, casting="unsafe")
        np.multiply(sq, sq, out=sq)
        sum_sq += float(sq.sum())
    norm = math.sqrt(sum_sq)  # inf or nan stay so
    return float(np.float64(norm).astype(flat.dtype))


def tensor_stats(key: str, dtype: str, tensor: np.ndarray, factor: str) -> TensorStats:
    """NaN/Inf/zero/RMS of one tensor, upcasting at most CHUNK_ELEMENTS elements at a time."""
    stats = TensorStats(key=key, dtype=dtype, numel=int(tensor.size), factor=factor)
    if stats.numel == 0:
        return stats
    flat = tensor.reshape(-1)
    if dtype not in FLOAT_DTYPES:  # reported by dtype_findings; only "all zero" makes sense here
        stats.all_zero = not bool(flat.any())
        return stats
    if dtype in FAST_NORM_DTYPES:
        # Fast path: a finite, non-zero norm proves there is no NaN, no Inf and not all zeros; only then is RMS all
        # we need (its ~0.3% rounding in bf16 is nothing next to the 100x outlier ratio). The chunked path below
        # runs only when the norm is not finite (NaN/Inf to count and locate) or zero (all-zero or underflow).
        with np.errstate(over="ignore", invalid="ignore"):
            norm = _norm_in_stored_dtype(flat)
        # A subnormal norm has lost precision in the stored dtype (torch's float32 squares had underflowed to 0
        # there): take the exact path, as torch's zero norm did.
        if math.isfinite(norm) and norm >= SMALLEST_NORMAL[dtype]:
            stats.rms = norm / math.sqrt(stats.numel)
            return stats
    sum_sq = 0.0
    finite_count = 0
    nonzero = False
    for start in range(0, stats.numel, CHUNK_ELEMENTS):
        with np.errstate(over="ignore", invalid="ignore"):
            chunk = _as_float32(flat[start : start + CHUNK_ELEMENTS])
        bad = None
        for kind, test in (("nan", np.isnan), ("inf", np.isinf)):
            mask = test(chunk)
            count = int(np.count_nonzero(mask))
            if not count:
                continue
            if getattr(stats, f"first_{kind}") is None:
                setattr(stats, f"first_{kind}", start + int(mask.argmax()))
            setattr(stats, kind, getattr(stats, kind) + count)
            bad = mask if bad is None else bad | mask
        if bad is not None:
            chunk = chunk[~bad]
        if chunk.size:
            as64 = chunk.astype(np.float64)
            np.multiply(as64, as64, out=as64)  # not np.dot: see _norm_in_stored_dtype
            sum_sq += float(as64.sum())
            nonzero = nonzero or bool(chunk.any())
            finite_count += int(chunk.size)
    stats.rms = math.sqrt(sum_sq / finite_count) if finite_count else 0.0
    stats.all_zero = not nonzero and stats.nan == 0 and stats.inf == 0
    return stats


# Small tensors are read and tested together: neighbours in the file in one read (up to SCAN_BATCH_BYTES) and the
# norms of a batch's same-dtype tensors in one pass (per-tensor open/seek/read and a Python-level stats call were
# most of the scan of adapters of many small tensors: docs/benchmarks.md). A tensor larger than the batch is read
# alone.
SCAN_BATCH_BYTES = 16 << 20
# Vectorized together: tensors of at most SMALL_TENSOR_ELEMENTS, SCAN_BATCH_ELEMENTS at a time (512 KB of float64
# squares, which stay in cache). Larger tensors go one by one: batched through one large float64 array they lose
# the cache-resident temporaries, while tensors of a few hundred elements pay a Python call each one by one
# (docs/benchmarks.md).
SMALL_TENSOR_ELEMENTS = 4096
PAIRED_MIN_ELEMENTS = 1 << 20
SCAN_BATCH_ELEMENTS = 1 << 16
# Threads that each take a batch, read it (a memory map: no copy, see tensor_files.map_many) and test it. numpy's
# conversions and dot products release the GIL, so two threads use both cores of the 2-core bench machine; the
# stats of one tensor never depend on which thread computed them. At most this many batches are held at once.
SCAN_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _scan_batches(adapter) -> list[list[str]]:
    """Every tensor key, in file order, cut into batches of neighbouring tensors (one read each)."""
    eager = [k for k in adapter.index.tensors if k in adapter.index._eager]
    infos = [t for k, t in adapter.index.tensors.items() if k not in adapter.index._eager]
    batches: list[list[str]] = [[k] for k in eager]
    for run in read_runs(infos):
        batch: list[str] = []
        size = 0
        for info in run:
            if batch and size + info.nbytes > SCAN_BATCH_BYTES:
                batches.append(batch)
                batch, size = [], 0
            batch.append(info.key)
            size += info.nbytes
        if batch:
            batches.append(batch)
    return batches


def _scanned_batches(adapter, batches: list[list[str]], threads: int) -> Iterator[tuple[dict[str, TensorStats], int]]:
    """(stats, bytes) of each batch, in order: each batch read and tested by one of `threads` threads (1: in the
    caller's thread). A failure in any batch is raised here, after the other threads have stopped."""

    def scan_batch(keys: list[str]) -> tuple[dict[str, TensorStats], int]:
        arena = _thread_arena()
        arrays = adapter.read_many(keys, arena)
        items = []
        for key, tensor in arrays.items():
            parsed = adapter.parsed.get(key)
            kind = _factor_kind(parsed.factor) if parsed is not None else "unknown"
            items.append((key, adapter.index.tensors[key].dtype, tensor, kind))
        nbytes = sum(adapter.index.tensors[k].nbytes for k in arrays)
        del arrays
        return _batch_stats(items), nbytes

    if threads <= 1 or len(batches) <= 1:
        yield from map(scan_batch, batches)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lora-convert-scan")
    try:
        pending: deque = deque()
        todo = iter(batches)
        for keys in itertools.islice(todo, 2 * threads):  # bounded: at most 2 x threads batches in flight
            pending.append(pool.submit(scan_batch, keys))
        while pending:
            done = pending.popleft().result()
            for keys in itertools.islice(todo, 1):
                pending.append(pool.submit(scan_batch, keys))
            yield done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _thread_arena() -> ReadArena:
    """One ReadArena per thread (it maps; a file that cannot be mapped is read into its reused memory)."""
    arena = getattr(_scratch, "arena", None)
    if arena is None:
        arena = _scratch.arena = ReadArena()
    return arena


def _batch_stats(items: list[tuple[str, str, np.ndarray, str]]) -> dict[str, TensorStats]:
    """tensor_stats of many small tensors: the fast path's norms in one pass per dtype (np.add.reduceat of float64
    squares), the exact path only for tensors whose norm is not finite or not normal (NaN/Inf/zero to locate)."""
    out: dict[str, TensorStats] = {}
    by_dtype: dict[str, list[tuple[str, np.ndarray, str]]] = defaultdict(list)
    wide_16bit: dict[str, list[tuple[str, np.ndarray, str]]] = defaultdict(list)
    for key, dtype, tensor, factor in items:
        if dtype in FAST_NORM_DTYPES and 0 < tensor.size <= SMALL_TENSOR_ELEMENTS:
            by_dtype[dtype].append((key, tensor, factor))
        elif dtype in SIXTEEN_BIT and tensor.size:
            wide_16bit[dtype].append((key, tensor, factor))
        else:
            out[key] = tensor_stats(key, dtype, tensor, factor)
    # The larger bf16/f16 tensors (a per-expert adapter's 16 x 7168 factors) one dot product each, with the
    # per-tensor Python of tensor_stats (error state, rounding one scalar, the stats object) paid once per batch:
    # paid per tensor, it held the GIL long enough to keep a second scan thread from helping (docs/benchmarks.md).
    for dtype, group in wide_16bit.items():
        with np.errstate(over="ignore", invalid="ignore"):
            sums = np.array([_sum_sq_16bit(t.reshape(-1)) for _, t, _ in group])
        _stats_from_sums(out, dtype, group, sums)
    for dtype, group in by_dtype.items():
        start = 0
        while start < len(group):
            stop, count = start, 0
            while stop < len(group) and (stop == start or count + group[stop][1].size <= SCAN_BATCH_ELEMENTS):
                count += group[stop][1].size
                stop += 1
            part = group[start:stop]
            sizes = np.array([t.size for _, t, _ in part])
            flat = np.concatenate([t.reshape(-1) for _, t, _ in part]).astype(np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                np.multiply(flat, flat, out=flat)
                sums = np.add.reduceat(flat, np.concatenate(([0], np.cumsum(sizes)[:-1])))
            if dtype in SIXTEEN_BIT:  # as _sum_sq_16bit's float32 sums: past float32's range is inf
                sums[sums > FLOAT32_MAX] = np.inf
            _stats_from_sums(out, dtype, part, sums)
            start = stop
    return out


def _stats_from_sums(
    out: dict[str, TensorStats], dtype: str, group: list[tuple[str, np.ndarray, str]], sums: np.ndarray
) -> None:
    """TensorStats of each tensor of one dtype from its sum of squares: the norm rounded to the stored dtype, as
    _norm_in_stored_dtype (and the torch path) did; a norm that is not finite or not normal sends the tensor down
    tensor_stats' exact path (NaN/Inf/zero to count and locate)."""
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(sums).astype(group[0][1].dtype).astype(np.float64)
    for (key, tensor, factor), norm in zip(group, norms.tolist(), strict=True):
        if math.isfinite(norm) and norm >= SMALLEST_NORMAL[dtype]:
            stats = TensorStats(key=key, dtype=dtype, numel=int(tensor.size), factor=factor)
            stats.rms = norm / math.sqrt(stats.numel)
            out[key] = stats
        else:
            out[key] = tensor_stats(key, dtype, tensor, factor)


def _row_energy(adapter, module) -> list[float] | None:
    """Squared norm of each output row of B @ A, through the r x r Gram matrix of A (no [out, in] product)."""
    a_info, b_info = adapter.index.tensors[module.lora_A.key], adapter.index.tensors[module.lora_B.key]
    if a_info.dtype not in FLOAT_DTYPES or b_info.dtype not in FLOAT_DTYPES:
        return None
    if len(a_info.shape) != 2 or len(b_info.shape) != 2:
        return None
    a = adapter.read(module.lora_A.key).astype(np.float64)
    gram = a @ a.T
    del a
    b = adapter.read(module.lora_B.key).astype(np.float64)
    if b.shape[1] != gram.shape[0]:
        return None
    return np.maximum(((b @ gram) * b).sum(axis=1), 0.0).tolist()


def scan_adapter(
    adapter,
    *,
    progress: ProgressFn | None = None,
    row_energy_modules: Iterable[str] = (),
    threads: int | None = None,
) -> DataScanResult:
    """Read every tensor of `adapter` once (batched, `_scan_batches`) and collect statistics and findings, on
    `threads` threads (default SCAN_THREADS; the result is the same for any number)."""
    started = time.monotonic()
    result = DataScanResult()
    wanted = set(row_energy_modules)
    total = adapter.total_bytes
    stats: dict[str, TensorStats] = {}
    for batch_stats, nbytes in _scanned_batches(
        adapter, _scan_batches(adapter), SCAN_THREADS if threads is None else threads
    ):
        stats.update(batch_stats)
        result.bytes_read += nbytes
        if progress is not None:
            progress(nbytes, total)
    # The order findings list tensors in: each module's A then B, then every other tensor.
    result.stats = {key: stats[key] for key in _scan_order(adapter)}
    for m in adapter.modules:
        if m.module in wanted and m.lora_A is not None and m.lora_B is not None:
            energy = _row_energy(adapter, m)
            if energy is not None:
                result.row_energy[m.module] = energy
    result.findings = stats_findings(result.stats)
    result.seconds = time.monotonic() - started
    return result


def _module_of(key: str) -> str:
    for marker in (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector"):
        if marker in key:
            return key.split(marker, 1)[0].removeprefix("base_model.model.")
    return key


def stats_findings(stats: dict[str, TensorStats]) -> list[Finding]:
    out: list[Finding] = []
    for count_attr, first_attr, what in (("nan", "first_nan", "NaN"), ("inf", "first_inf", "infinite")):
        bad = [s for s in stats.values() if getattr(s, count_attr)]
        for s in bad[:MAX_PER_TENSOR_FINDINGS]:
            out.append(
                finding(
                    "data.nan" if count_attr == "nan" else "data.inf",
                    f"{s.key} holds {getattr(s, count_attr)} {what} value(s) out of {s.numel} (first at flat index "
                    f"{getattr(s, first_attr)}); the served model would produce {what} outputs wherever this module is used.",
                    keys=[s.key],
                    expected=0,
                    actual=getattr(s, count_attr),
                    fix="Re-export the adapter from a checkpoint saved before training diverged.",
                )
            )
        if len(bad) > MAX_PER_TENSOR_FINDINGS:
            rest = bad[MAX_PER_TENSOR_FINDINGS:]
            out.append(
                finding(
                    "data.nan" if count_attr == "nan" else "data.inf",
                    f"{len(rest)} more tensor(s) hold {what} values ({sum(getattr(s, count_attr) for s in rest)} in all).",
                    keys=[s.key for s in rest[:MAX_KEYS]],
                    expected=0,
                    actual=sum(getattr(s, count_attr) for s in rest),
                )
            )
    zero_b = [s for s in stats.values() if s.factor == "lora_B" and s.all_zero and s.numel]
    if zero_b:
        total_b = sum(1 for s in stats.values() if s.factor == "lora_B")
        modules = sorted({_module_of(s.key) for s in zero_b})
        out.append(
            finding(
                "data.zero-b",
                f"{len(zero_b)} of {total_b} lora_B tensor(s) are all zero, "
                f"so {'that module is' if len(zero_b) == 1 else 'those modules are'} "
                f"a no-op (B @ A = 0): e.g. {modules[0]}. PEFT initialises B to zero; an adapter saved before any "
                "training step, or exported from the wrong state, looks like this.",
                keys=[s.key for s in zero_b[:MAX_KEYS]],
                expected="non-zero",
                actual="all zero",
                fix="Check that the adapter was saved after training." if len(zero_b) == total_b else None,
            )
        )
    by_kind: dict[str, list[TensorStats]] = defaultdict(list)
    for s in stats.values():
        if s.factor in ("lora_A", "lora_B", "magnitude") and s.rms > 0 and math.isfinite(s.rms):
            by_kind[s.factor].append(s)
    for kind, items in sorted(by_kind.items()):
        if len(items) < MIN_FOR_MEDIAN:
            continue
        median = statistics.median(s.rms for s in items)
        if median <= 0:
            continue
        high = [s for s in items if s.rms > OUTLIER_RATIO * median]
        low = [s for s in items if s.rms < median / OUTLIER_RATIO]
        for group, word in ((high, "above"), (low, "below")):
            if not group:
                continue
            group.sort(key=lambda s: -abs(math.log(s.rms / median)))
            worst = group[0]
            out.append(
                finding(
                    "data.magnitude-outlier",
                    f"{len(group)} {kind} tensor(s) have an RMS more than {OUTLIER_RATIO:g}x {word} the median of the "
                    f"adapter's {kind} tensors ({median:.3g}); the worst is {worst.key} at {worst.rms:.3g} "
                    f"({worst.rms / median:.3g}x). A module saved unscaled, or from another checkpoint, looks like this.",
                    keys=[s.key for s in group[:MAX_KEYS]],
                    expected=f"~{median:.3g}",
                    actual=f"{worst.rms:.3g}",
                )
            )
    return out


def dtype_findings(index) -> list[Finding]:
    """Header-only dtype census: integer or bool factors are errors; float64 and mixed dtypes are warnings."""
    out: list[Finding] = []
    census = Counter(t.dtype for t in index.tensors.values())
    if not census:
        return out
    non_float = [t.key for t in index.tensors.values() if t.dtype not in FLOAT_DTYPES]
    if non_float:
        kinds = sorted({index.tensors[k].dtype for k in non_float})
        out.append(
            finding(
                "data.integer-dtype",
                f"{len(non_float)} tensor(s) are stored as {', '.join(kinds)}; LoRA factors are floating point, and engines "
                "would cast these integers to the model dtype without scale.",
                keys=non_float[:MAX_KEYS],
                expected="F32, F16 or BF16",
                actual=kinds,
                fix="Re-export the adapter with floating-point factors.",
            )
        )
    f64 = [t.key for t in index.tensors.values() if t.dtype == "F64"]
    if f64:
        out.append(
            finding(
                "data.float64",
                f"{len(f64)} tensor(s) are float64: twice the size of float32 for no gain; engines cast them to the model dtype.",
                keys=f64[:MAX_KEYS],
                expected="F32, F16 or BF16",
                actual="F64",
                fix="lora-convert normalize ADAPTER -o OUT --dtype float32 (or bfloat16).",
            )
        )
    floats = {d: n for d, n in census.items() if d in FLOAT_DTYPES}
    if len(floats) > 1:
        minority = min(floats, key=floats.get)
        keys = [t.key for t in index.tensors.values() if t.dtype == minority]
        out.append(
            finding(
                "data.mixed-dtypes",
                "The adapter mixes dtypes ("
                + ", ".join(f"{d} x{n}" for d, n in sorted(floats.items()))
                + "); it was probably "
                "assembled from several exports. Engines cast everything to the model dtype, but check the source.",
                keys=keys[:MAX_KEYS],
                expected="one dtype",
                actual=dict(sorted(census.items())),
            )
        )
    elif any(d.startswith("F8") for d in floats):
        out.append(
            finding(
                "data.fp8",
                "The factors are stored in an 8-bit float format; precision is low for LoRA factors.",
                keys=[],
                actual=sorted(floats),
            )
        )
    return out
