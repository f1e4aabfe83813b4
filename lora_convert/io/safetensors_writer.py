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

from lora_convert.io.tensor_files import DTYPE_SIZES, TORCH_DTYPE_NAMES

_TORCH_TO_TAG = {v: k for k, v in TORCH_DTYPE_NAMES.items()}


def dtype_tag(torch_dtype) -> str:
    return _TORCH_TO_TAG[str(torch_dtype).removeprefix("torch.")]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


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

    def write(self, name: str, tensor) -> None:
        spec = self.specs[self._next]
        if name != spec.name:
            raise RuntimeError(f"writer expected tensor {spec.name!r} next, got {name!r}")
        if tuple(tensor.shape) != spec.shape or dtype_tag(tensor.dtype) != spec.dtype:
            raise RuntimeError(
                f"tensor {name!r} is {dtype_tag(tensor.dtype)} {list(tensor.shape)}; "
                f"the plan said {spec.dtype} {list(spec.shape)}"
            )
        data = tensor.contiguous().view(-1)
        if data.numel():
            # `view(uint8)` reinterprets the bytes without a copy (bf16 has no numpy dtype, so no .numpy() here).
            import torch

            self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            self._handle.close()
            raise RuntimeError(f"only {self._next} of {len(self.specs)} planned tensors were written")
        self._handle.flush()
        self._handle.close()

    def abort(self) -> None:
        self._handle.close()
