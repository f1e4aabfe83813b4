"""A streaming safetensors writer: the header goes first, then each tensor's bytes as it is produced.

`safetensors.torch.save_file` needs every tensor in memory at once; an adapter of DeepSeek size does not fit
that way. Because a plan knows every output tensor's name, dtype and shape before any data is read, the whole
header (and so every offset) can be written up front and the data streamed after it, in plan order. Output is
byte-for-byte deterministic: same plan, same bytes. Files are read back with the safetensors library in tests.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from lora_convert.io.dtypes import DTYPE_SIZES, dtype_tag

# A tensor's bytes go to the kernel in pieces of this size: one write() of a tens-of-MB stacked expert tensor cost
# the kernel several times the system time of the same bytes in 256 KiB pieces on this workplace's VM
# (docs/benchmarks.md, issue 23's run); much smaller pieces only add calls.
WRITE_PIECE_BYTES = 256 * 1024

# A non-contiguous view whose sub-arrays along the first axis are at least this big is written sub-array by
# sub-array, so that a strided cut of a big stacked group (one slice of every expert) reaches the file without a
# copy of its size in fresh memory (page faults, dear on this workplace's VM: docs/benchmarks.md, "The machine");
# a view of smaller sub-arrays is copied whole, since a write() call per small sub-array costs more than the copy.
WRITE_PARTS_FROM_BYTES = 64 * 1024


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def write_array_plain(handle: BinaryIO, array: np.ndarray) -> None:
    """Write `array`'s bytes in C order to `handle` in one call (the oracle of `write_array`)."""
    handle.write(np.ascontiguousarray(array).tobytes())


def write_array(handle: BinaryIO, array: np.ndarray) -> None:
    """Write `array`'s bytes in C order to the binary file `handle`: the same bytes as `write_array_plain`, handed to
    the kernel in pieces of at most WRITE_PIECE_BYTES, and a large non-contiguous view written sub-array by
    sub-array instead of through a contiguous copy of it."""
    if array.size == 0:
        return
    if not array.flags.c_contiguous:
        if array.ndim > 1 and array.nbytes // len(array) >= WRITE_PARTS_FROM_BYTES:
            for part in array:
                write_array(handle, part)
            return
        array = np.ascontiguousarray(array)
    # viewed as uint8 because the buffer protocol does not know ml_dtypes' bfloat16/float8
    data = memoryview(array.reshape(-1).view(np.uint8))
    for start in range(0, len(data), WRITE_PIECE_BYTES):
        handle.write(data[start : start + WRITE_PIECE_BYTES])


def check_planned(spec: TensorSpec, name: str, array: np.ndarray) -> None:
    """Raise RuntimeError unless `array` named `name` is the tensor `spec` plans next (a writer's own invariant: the
    header, written first, already promised its name, dtype and shape)."""
    if name != spec.name:
        raise RuntimeError(f"writer expected tensor {spec.name!r} next, got {name!r}")
    if tuple(array.shape) != spec.shape or dtype_tag(array.dtype) != spec.dtype:
        raise RuntimeError(
            f"tensor {name!r} is {dtype_tag(array.dtype)} {list(array.shape)}; "
            f"the plan said {spec.dtype} {list(spec.shape)}"
        )


class StreamingSafetensorsWriter:
    """Write tensors in the declared order; `write(name, tensor)` must follow `specs` exactly."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = path
        self.specs = specs
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for spec in specs:
            if spec.name in header:  # a dict would keep one entry and the file's offsets would no longer add up
                raise ValueError(f"two tensors of one output are both named {spec.name!r}")
            header[spec.name] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        # Pad with spaces to an 8-byte boundary, as the reference writer does, so the data area is aligned.
        raw += b" " * (-len(raw) % 8)
        # Open across write() calls by design (one tensor at a time); close() or abort() ends it.
        self._handle: BinaryIO = open(path, "wb")  # noqa: SIM115
        self._handle.write(len(raw).to_bytes(8, "little"))
        self._handle.write(raw)

    def write(self, name: str, array: np.ndarray) -> None:
        check_planned(self.specs[self._next], name, array)
        write_array(self._handle, array)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            self._handle.close()
            raise RuntimeError(f"only {self._next} of {len(self.specs)} planned tensors were written")
        self._handle.flush()
        self._handle.close()

    def abort(self) -> None:
        self._handle.close()
