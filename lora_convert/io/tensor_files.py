"""Header-first access to the tensor files of an adapter.

Listing keys, shapes and dtypes reads only the safetensors header (parsed here, strictly, so that a hostile or
truncated file gives one clear error instead of a crash or a hang). Tensor data is read per tensor, on request,
with one positioned read into a numpy array, or many at once as views of a memory map of the file (`map_many`):
memory stays bounded by the tensors asked for, never by the file. No torch: bfloat16 and the float8 types are numpy
dtypes through ml_dtypes. Only the legacy pickle format (`adapter_model.bin`) needs torch, imported there alone.

The header parser is ours rather than `safetensors.safe_open` because (a) it needs no torch import, which keeps
header-only commands fast to start, and (b) every malformed header is reported with what was expected: the
library's errors name neither the file nor the fix. Files it accepts are read back with the library in tests.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING, Any

from lora_convert.errors import AdapterFormatError, EnvironmentProblem
from lora_convert.io.dtypes import DTYPE_SIZES, numpy_dtype, tag_of_torch_name
from lora_convert.io.small_files import (
    LFS_HINT,
    LFS_POINTER_MAX_BYTES,
    LFS_POINTER_PREFIX,
    lfs_pointer_problem,
    parse_json,
)

if TYPE_CHECKING:
    import numpy as np

# numpy and ml_dtypes are imported where tensor data is touched, not here: the header-only commands (`inspect`)
# never need them, and importing them is a noticeable share of a small command's start-up (docs/benchmarks.md).


# The safetensors library refuses headers above 100 MB; a 94,000-tensor adapter has a ~15 MB header.
MAX_HEADER_BYTES = 100_000_000


class TensorInfo:
    """Where one tensor lives and what it is, from the header alone. Treated as immutable; equal when every field is.

    A slotted class with a plain __init__, not a frozen dataclass (whose __init__ sets each field through
    object.__setattr__): one is built per tensor of every header read (docs/benchmarks.md)."""

    __slots__ = ("key", "dtype", "shape", "path", "start", "nbytes")

    def __init__(self, key: str, dtype: str, shape: tuple[int, ...], path: Path, start: int, nbytes: int) -> None:
        self.key = key
        self.dtype = dtype
        self.shape = shape
        self.path = path
        self.start = start  # absolute byte offset of the data in `path`
        self.nbytes = nbytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _fields(self) -> tuple:
        return (self.key, self.dtype, self.shape, self.path, self.start, self.nbytes)

    def __eq__(self, other: object) -> bool:
        return type(other) is TensorInfo and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"TensorInfo(key={self.key!r}, dtype={self.dtype!r}, shape={self.shape!r}, path={self.path!r}, "
            f"start={self.start}, nbytes={self.nbytes})"
        )


# One C-level regex search per key instead of a Python loop over its characters: it runs once per tensor of every
# header (docs/benchmarks.md).
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _control_free(key: str) -> bool:
    return _CONTROL_CHARS.search(key) is None


def _checked_entry(name: str, key: str, entry: Any, path: Path, data_start: int, data_len: int) -> TensorInfo:
    """One header entry checked step by step: the TensorInfo, or an AdapterFormatError that says what is wrong."""
    # json.dumps(key) in messages escapes control characters so a message stays one readable line; it is only
    # computed on error, as it costs a call per key.
    if not _control_free(key):
        raise AdapterFormatError(
            f"{name}: tensor name {json.dumps(key)} contains control characters.",
            hint="No PEFT adapter has such names; the file was written by something else or is corrupt.",
        )
    if not isinstance(entry, dict):
        raise AdapterFormatError(
            f"{name}: header entry {json.dumps(key)} must be an object, got {type(entry).__name__}."
        )
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise AdapterFormatError(
            f"{name}: tensor {json.dumps(key)} has dtype {json.dumps(dtype)}, which is not a known safetensors dtype "
            f"(expected one of {', '.join(sorted(DTYPE_SIZES))}).",
        )
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise AdapterFormatError(
            f"{name}: tensor {json.dumps(key)} has shape {shape!r}; expected a list of non-negative integers."
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise AdapterFormatError(
            f"{name}: tensor {json.dumps(key)} has data_offsets {offsets!r}; "
            "expected [begin, end] with 0 <= begin <= end."
        )
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise AdapterFormatError(
            f"{name}: tensor {json.dumps(key)} ({dtype}, shape {shape}) should take {expected} bytes but its offsets "
            f"[{begin}, {end}] span {end - begin}.",
            hint="The header disagrees with itself: the file is corrupt.",
        )
    if end > data_len:
        raise AdapterFormatError(
            f"{name}: tensor {json.dumps(key)} ends at byte {end} of the data area, which has only {data_len} bytes.",
            hint="The file is truncated: download or save the adapter again.",
        )
    return TensorInfo(key, dtype, tuple(shape), path, data_start + begin, end - begin)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one safetensors header; return the tensors (in file-offset order) and the metadata.

    Every check that the format allows is made: header length within the file, JSON object, known dtypes,
    offsets inside the data area, byte counts equal to shape x dtype, no overlapping tensors.
    """
    name = str(path)
    size, header_len, raw = _read_header_bytes(path, name)
    header = _parse_header_object(raw, name)
    metadata = _take_metadata(header, name)
    data_start = 8 + header_len
    tensors = _tensor_infos(header, raw, path, name, data_start, size - data_start)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _read_header_bytes(path: Path, name: str) -> tuple[int, int, bytes]:
    """The file's size, its header's length and the header's bytes; any read failure is an AdapterFormatError."""
    try:
        size = _regular_file_size(path, name)
        with open(path, "rb") as handle:
            header_len = _checked_header_length(handle, name, size)
            return size, header_len, handle.read(header_len)
    except OSError as exc:
        raise AdapterFormatError(f"{name} could not be read: {exc.strerror or exc}.") from exc


def _regular_file_size(path: Path, name: str) -> int:
    stat = path.stat()
    if not S_ISREG(stat.st_mode):  # a FIFO or device would block or never end
        raise AdapterFormatError(
            f"{name} is not a regular file.", hint="Point at the folder PEFT's save_pretrained wrote."
        )
    return stat.st_size


def _checked_header_length(handle, name: str, size: int) -> int:
    """Read the 8-byte little-endian header length and check it against the file; a Git LFS pointer is named as such."""
    prefix = handle.read(8)
    if prefix == LFS_POINTER_PREFIX[:8]:  # "version ": read as a length, 2336927755350992246 bytes
        problem = lfs_pointer_problem(prefix + handle.read(LFS_POINTER_MAX_BYTES - 8), name)
        if problem is not None:
            raise AdapterFormatError(problem, hint=LFS_HINT)
    if len(prefix) < 8:
        raise AdapterFormatError(
            f"{name} is {size} bytes long, too short to be a safetensors file (it needs at least an 8-byte "
            "header length).",
            hint="The file is empty or truncated: download or save the adapter again.",
        )
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > size - 8:
        raise AdapterFormatError(
            f"{name}: the header says it is {header_len} bytes long but the file has only {size - 8} bytes "
            "after the length prefix.",
            hint="The file is truncated or not a safetensors file: download or save the adapter again.",
        )
    if header_len > MAX_HEADER_BYTES:
        raise AdapterFormatError(
            f"{name}: the header is {header_len} bytes; headers larger than {MAX_HEADER_BYTES} bytes are "
            "refused (the safetensors library refuses them too).",
            hint="This is not a normal adapter file; check where it came from.",
        )
    return header_len


def _parse_header_object(raw: bytes, name: str) -> dict[str, Any]:
    header = parse_json(
        raw,
        f"{name}: the safetensors header",
        AdapterFormatError,
        hint="The file is corrupt or not a safetensors file: download or save the adapter again.",
    )
    if not isinstance(header, dict):
        raise AdapterFormatError(
            f"{name}: the safetensors header must be a JSON object, got {type(header).__name__}.",
            hint="The file is corrupt or not a safetensors file.",
        )
    return header


def _take_metadata(header: dict[str, Any], name: str) -> dict:
    """Remove `__metadata__` from the header and return it ({} when absent)."""
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise AdapterFormatError(f"{name}: `__metadata__` must be an object of strings, got {type(metadata).__name__}.")
    return metadata


def _tensor_infos(
    header: dict[str, Any], raw: bytes, path: Path, name: str, data_start: int, data_len: int
) -> dict[str, TensorInfo]:
    """Every header entry checked and made a TensorInfo, in file-offset order; overlapping tensors are refused."""
    # JSON writes a control character inside a string only as an escape (or DEL raw), so a header without a
    # backslash or a DEL byte has no key to check one by one.
    if b"\\" not in raw and b"\x7f" not in raw:
        tensors = _well_formed_in_order(header, path, data_start, data_len)
        if tensors is not None:
            return tensors
    infos = [_checked_entry(name, key, entry, path, data_start, data_len) for key, entry in header.items()]
    return _offset_ordered(name, infos)


def _well_formed_in_order(
    header: dict[str, Any], path: Path, data_start: int, data_len: int
) -> dict[str, TensorInfo] | None:
    """The fast path of `_tensor_infos` for the usual header: the TensorInfos when every entry passes every check of
    `_checked_entry` (its oracle; key characters are the caller's concern) and each tensor starts at or after the
    end of the one before it, so that sorting and the overlap test would find nothing; None at the first doubt,
    and the plain path then names the problem.

    Exact-type tests, no generator for 2-D shapes (every LoRA factor) and no per-entry call, because this runs once
    per tensor of every header (docs/benchmarks.md)."""
    sizes = DTYPE_SIZES
    prod = math.prod
    tensors: dict[str, TensorInfo] = {}
    last_end = 0
    for key, entry in header.items():
        if type(entry) is not dict:
            return None
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (
            type(dtype) is not str
            or (itemsize := sizes.get(dtype)) is None
            or type(shape) is not list
            or type(offsets) is not list
            or len(offsets) != 2
        ):
            return None
        begin, end = offsets
        if not (type(begin) is int and type(end) is int and last_end <= begin <= end <= data_len):
            return None
        if len(shape) == 2:
            rows, cols = shape
            if not (type(rows) is int and type(cols) is int and rows >= 0 and cols >= 0):
                return None
            if rows * cols * itemsize != end - begin:
                return None
        elif not (all(type(d) is int and d >= 0 for d in shape) and prod(shape) * itemsize == end - begin):
            return None
        tensors[key] = TensorInfo(key, dtype, tuple(shape), path, data_start + begin, end - begin)
        last_end = end
    return tensors


def _offset_ordered(name: str, tensors: list[TensorInfo]) -> dict[str, TensorInfo]:
    """The tensors of one file in offset order; an AdapterFormatError names the first two that overlap."""
    tensors.sort(key=lambda t: t.start)
    for before, after in itertools.pairwise(tensors):
        if after.start < before.start + before.nbytes:
            raise AdapterFormatError(
                f"{name}: tensors {json.dumps(before.key)} and {json.dumps(after.key)} overlap in the file.",
                hint="The header is corrupt; no writer produces overlapping tensors.",
            )
    return {t.key: t for t in tensors}


@dataclass
class TensorIndex:
    """All tensors of an adapter across its files; data is read lazily per tensor."""

    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # key -> the files that hold it
    _eager: dict[str, Any] = field(default_factory=dict, repr=False)  # .bin torch tensors, mmap'd by torch.load

    def add_all(self, infos: dict[str, TensorInfo]) -> None:
        """`add` each of one file's tensors (`read_safetensors_header`), in order."""
        if self.tensors.keys().isdisjoint(infos):
            self.tensors.update(infos)  # one C-level update rather than an `add` call per tensor
            return
        for info in infos.values():
            self.add(info)

    def add(self, info: TensorInfo) -> None:
        if info.key in self.tensors:
            self.duplicates.setdefault(info.key, [str(self.tensors[info.key].path)]).append(str(info.path))
            return
        self.tensors[info.key] = info

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def read(self, key: str) -> np.ndarray:
        """Return one tensor as a numpy array (its stored dtype; bfloat16 and float8 through ml_dtypes)."""
        info = self.tensors[key]
        if key in self._eager:
            return _torch_to_numpy(self._eager[key], info.dtype)
        return read_tensor_data(info)

    def read_many(self, keys: list[str], arena: ReadArena | None = None) -> dict[str, np.ndarray]:
        """Several tensors with as few reads as possible (neighbours in a file are one read, `read_runs`). With
        an `arena`, the arrays are views of its memory, valid until the arena's next use: read-only views of a
        memory map of the files when the arena maps (the default, `map_many`), else copies into its reused memory."""
        out: dict[str, np.ndarray] = {}
        infos = []
        for key in dict.fromkeys(keys):
            if key in self._eager:
                out[key] = self.read(key)
            else:
                infos.append(self.tensors[key])
        if arena is not None and arena.mapped:
            mapped = map_many(infos)
            if mapped is not None:
                out.update(mapped)
                return {k: out[k] for k in dict.fromkeys(keys)}
        runs = read_runs(infos)
        spans = [(run_span(r) + 63) // 64 * 64 for r in runs]  # 64-byte aligned places: every dtype's alignment
        memory = arena.get(sum(spans)) if arena is not None else None
        at = 0
        handles: dict[Path, Any] = {}
        try:
            for run, span in zip(runs, spans, strict=True):
                # One open per file, not per run: a per-expert group is hundreds of runs (docs/benchmarks.md).
                path = run[0].path
                if path not in handles:
                    try:
                        handles[path] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
                    except OSError as exc:
                        raise AdapterFormatError(f"{path} could not be read: {exc.strerror or exc}.") from exc
                arrays = read_run(run, None if memory is None else memory[at : at + span], handle=handles[path])
                out.update((info.key, a) for info, a in zip(run, arrays, strict=True))
                at += span
        finally:
            for h in handles.values():
                h.close()
        return {k: out[k] for k in dict.fromkeys(keys)}


def map_many(infos: list[TensorInfo]) -> dict[str, np.ndarray] | None:
    """Read-only views of `infos` in memory maps of their files, one map per file over the window they span; None
    when a file cannot be mapped (some network and FUSE file systems), and the caller reads instead.

    A mapped tensor is the page cache itself, so reading it costs page-table entries instead of a copy into
    process memory (docs/benchmarks.md measures both). Only the pages touched count in RSS, and a map is released with the last
    view of it, so memory stays what the caller keeps alive. The file's size is checked before mapping: a
    truncated file is an AdapterFormatError, as a short read is. (A file truncated by another process while it is
    mapped would still end the process with SIGBUS; the same is true of every mmap-based reader, safetensors' own.)"""
    import mmap

    import numpy as np

    by_file: dict[Path, list[TensorInfo]] = {}
    for info in infos:
        by_file.setdefault(info.path, []).append(info)
    out: dict[str, np.ndarray] = {}
    for path, file_infos in by_file.items():
        start = min(t.start for t in file_infos)
        end = max(t.start + t.nbytes for t in file_infos)
        base = start - start % mmap.ALLOCATIONGRANULARITY
        raw = np.empty(0, dtype=np.uint8)
        if end > start:
            try:
                with open(path, "rb", buffering=0) as handle:
                    size = os.fstat(handle.fileno()).st_size
                    if size < end:
                        first = max(file_infos, key=lambda t: t.start + t.nbytes)
                        raise AdapterFormatError(
                            f"{path}: tensor {json.dumps(first.key)} should end at byte {end} of the file, which has "
                            f"only {size} bytes.",
                            hint="The file changed or was truncated while it was being read.",
                        )
                    window = mmap.mmap(handle.fileno(), end - base, offset=base, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # mmap refuses some file systems (OSError) and special files (ValueError)
                return None
            raw = np.frombuffer(window, dtype=np.uint8)  # the array keeps the map alive; its last view unmaps it
        for info in file_infos:
            at = info.start - base
            out[info.key] = raw[at : at + info.nbytes].view(numpy_dtype(info.dtype)).reshape(info.shape)
    return out


class ReadArena:
    """Where `TensorIndex.read_many` puts what it reads. `mapped` (the default): read-only views of memory maps of
    the files (`map_many`; no copy, no process memory); a file that cannot be mapped, or `mapped=False`, is read
    into reused memory instead (fresh pages cost far more in page faults than rewriting mapped ones:
    docs/benchmarks.md), which grows to the largest request and keeps that size."""

    def __init__(self, *, mapped: bool = True) -> None:
        import numpy as np

        self.mapped = mapped
        self._raw = np.empty(0, dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return int(self._raw.nbytes)

    def get(self, nbytes: int) -> np.ndarray:
        import numpy as np

        if self._raw.size < nbytes:
            self._raw = np.empty(0, dtype=np.uint8)  # drop the old memory before allocating the larger one
            self._raw = np.empty(nbytes, dtype=np.uint8)
        return self._raw[:nbytes]


def raw_view(array: np.ndarray) -> np.ndarray:
    """The same bytes as unsigned integers of the same width (exact; what torch.from_numpy and bit tests take)."""
    return array.view(f"u{array.dtype.itemsize}")


def read_tensor_data(info: TensorInfo) -> np.ndarray:
    """One positioned read of exactly this tensor's bytes into a fresh numpy array."""
    import numpy as np

    dtype = numpy_dtype(info.dtype)
    # Read straight into uninitialised memory (np.empty): a zero-filled bytearray touched every page twice (its
    # zeroing was 0.52 s of a 3.9 s normalize of a 0.68 GB 3-D adapter, pyinstrument, fresh pages being dear here).
    raw = np.empty(info.nbytes, dtype=np.uint8)
    if info.nbytes:
        with open(info.path, "rb", buffering=0) as handle:
            handle.seek(info.start)
            _read_exact(handle, memoryview(raw), f"tensor {json.dumps(info.key)}", info.path)
    return raw.view(dtype).reshape(info.shape)


# Tensors closer together than this in one file are read with one read, gap included: a syscall and a seek cost
# more than reading 64 KiB already in the page cache, and a group's sources are interleaved with other modules'
# tensors in PEFT's name-ordered files (an expert's down_proj lies between its gate_proj and its up_proj).
COALESCE_GAP = 64 * 1024


def _read_exact(handle, view: memoryview, what: str, path: Path) -> None:
    got = 0
    while got < len(view):  # an unbuffered readinto may return short counts
        n = handle.readinto(view[got:])
        if not n:
            break
        got += n
    if got != len(view):
        raise AdapterFormatError(
            f"{path}: {what} should have {len(view)} bytes but only {got} could be read.",
            hint="The file changed or was truncated while it was being read.",
        )


def read_runs(infos: list[TensorInfo], *, gap: int = COALESCE_GAP) -> list[list[TensorInfo]]:
    """`infos` cut into runs that one read can fetch: same file, in offset order, gaps of at most `gap` bytes."""
    runs: list[list[TensorInfo]] = []
    for info in sorted(infos, key=lambda t: (str(t.path), t.start)):
        if runs:
            last = runs[-1][-1]
            end = last.start + last.nbytes
            if info.path == last.path and end <= info.start <= end + gap:
                runs[-1].append(info)
                continue
        runs.append([info])
    return runs


def run_span(run: list[TensorInfo]) -> int:
    """Bytes one read of `run` fetches (its tensors and the gaps between them)."""
    return run[-1].start + run[-1].nbytes - run[0].start


def read_run(run: list[TensorInfo], out: np.ndarray | None = None, *, handle=None) -> list[np.ndarray]:
    """One positioned read of a run (read_runs) into `out` (uint8, at least run_span bytes; reused memory avoids
    the page faults of fresh memory) or a fresh buffer; each tensor is a view of it, in `run` order.

    The views alias `out`: the caller keeps `out` unchanged for as long as it uses them. `handle`: an unbuffered
    handle of the run's file, kept open by a caller that reads many runs of it."""
    import numpy as np

    span = run_span(run)
    raw = np.empty(span, dtype=np.uint8) if out is None else out[:span]
    if span:
        with contextlib.nullcontext(handle) if handle is not None else open(run[0].path, "rb", buffering=0) as f:
            f.seek(run[0].start)
            what = f"tensor {json.dumps(run[0].key)}" + (f" (and {len(run) - 1} more)" if len(run) > 1 else "")
            _read_exact(f, memoryview(raw), what, run[0].path)
    base = run[0].start
    arrays = []
    for info in run:
        at = info.start - base
        arrays.append(raw[at : at + info.nbytes].view(numpy_dtype(info.dtype)).reshape(info.shape))
    return arrays


def _torch_to_numpy(tensor, tag: str) -> np.ndarray:
    """A tensor of a legacy .bin as numpy, through its raw bytes (exact for bfloat16/float8, which numpy lacks)."""
    import numpy as np
    import torch

    flat = tensor.contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, dtype=np.uint8)
    return raw.view(numpy_dtype(tag)).reshape(tuple(tensor.shape))


def _refuse_lfs_pointer(path: Path) -> None:
    """A Git LFS pointer in place of a pickle checkpoint: named as such, not as an unreadable pickle."""
    try:
        if not S_ISREG(path.stat().st_mode):  # never open a FIFO: the open itself may block
            return
        with open(path, "rb") as handle:
            head = handle.read(LFS_POINTER_MAX_BYTES)
    except OSError:
        return  # the loader reports it
    problem = lfs_pointer_problem(head, str(path))
    if problem is not None:
        raise AdapterFormatError(problem, hint=LFS_HINT)


def load_bin_index(path: Path) -> TensorIndex:
    """Index a legacy `adapter_model.bin` without running arbitrary pickle code.

    `weights_only=True` refuses any pickle that would import code; `mmap=True` keeps the data on disk until a
    tensor is touched.
    """
    import pickle

    _refuse_lfs_pointer(path)
    try:
        import torch
    except ImportError:
        raise EnvironmentProblem(
            f"{path} is a legacy pickle checkpoint (adapter_model.bin); reading it needs torch, which is not "
            "installed.",
            hint="pip install 'lora-convert[smoke]' (or convert the adapter to safetensors on a machine with torch).",
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe pickle"
        raise AdapterFormatError(
            f"{path} needs full unpickling to load, which could run arbitrary code; it was refused ({first_line}).",
            hint="Ask for a safetensors copy of the adapter, or re-save it with PEFT's save_pretrained "
            "(safe_serialization=True) on a machine you trust.",
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterFormatError(
            f"{path} is not a readable torch checkpoint: {why}.",
            hint="Re-save the adapter with PEFT's save_pretrained, preferably as safetensors.",
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterFormatError(
            f"{path} does not hold a flat dict of tensors, which is what PEFT writes.",
            hint="Re-save the adapter with PEFT's save_pretrained.",
        )
    index = TensorIndex()
    for key, tensor in state.items():
        tag = tag_of_torch_name(str(tensor.dtype).removeprefix("torch.")) or "F32"
        info = TensorInfo(key, tag, tuple(tensor.shape), path, 0, tensor.numel() * tensor.element_size())
        index.add(info)
        index._eager[key] = tensor
    return index
