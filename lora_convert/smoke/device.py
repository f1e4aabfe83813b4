"""The smoke forward's data on a GPU: each source tensor copied to the device once, the stacked tensors built there.

The CPU path builds the stacked group with numpy (lora_convert.convert.group_tensors, the bytes normalize writes) and
hands it to torch. On a GPU that costs more than the check itself: at full DeepSeek-V3 size (9.3 GB, 3-D experts)
the CPU build was 18.0 s of a 69.4 s run and the pageable host-to-device copy 2.05 s (H200, docs/benchmarks.md),
while the card copies 55 GB/s from pinned memory. So here each group's source tensors are read straight from the
file into one reused pinned host buffer, copied to the device once, and the stacked A and B are built on the
device with the same index arithmetic (convert/factors.py's place_source, with its torch element operations).
The float64 reference then reads the same device copies.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from lora_convert.convert import factors
from lora_convert.io.dtypes import TORCH_DTYPE_NAMES


class DeviceSources:
    """One group's source tensors on the device, each read once from disk into a pinned host buffer (reused and
    grown to the largest group) and copied from there: pinned copies run at the card's full rate (55 GB/s on the
    H200, against 9.2 GB/s from pageable memory) and need no staging copy inside the driver."""

    def __init__(self, index, read: Callable[[str], Any], device: str, timer):
        self.index, self.read_numpy, self.device, self.timer = index, read, device, timer
        self._pinned = None
        self._tensors: dict[str, Any] = {}
        self._threads = None
        self.bytes_copied = 0

    def _pool(self):
        from concurrent.futures import ThreadPoolExecutor

        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        return self._threads

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown()
            self._threads = None

    def _buffer(self, nbytes: int):
        import torch

        if self._pinned is None or self._pinned.numel() < nbytes:
            self._pinned = None
            self._pinned = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        return self._pinned

    def load(self, keys: list[str]) -> None:
        """Copy `keys` to the device, replacing the previous group's tensors."""
        import torch

        from lora_convert.io.dtypes import dtype_tag
        from lora_convert.io.tensor_files import raw_view

        self._tensors = {}
        infos = [self.index.tensors.get(k) for k in keys]
        # Each tensor starts on a 64-byte boundary: a dtype view of the copied bytes needs its element alignment.
        total = sum(_aligned(info.nbytes) if info is not None else 0 for info in infos)
        with self.timer("read"):
            staged = []
            pinned = None
            offset = 0
            direct = all(info is not None and k not in self.index._eager for k, info in zip(keys, infos, strict=True))
            if direct:
                pinned = self._buffer(total)
                view = memoryview(pinned.numpy())
                jobs = []
                for key, info in zip(keys, infos, strict=True):
                    for lo in range(0, info.nbytes, _CHUNK):  # a 3-D factor is one 59 MB tensor: split it too
                        hi = min(info.nbytes, lo + _CHUNK)
                        jobs.append((info, lo, view[offset + lo : offset + hi]))
                    staged.append((key, offset, info.nbytes, info.dtype, info.shape))
                    offset += _aligned(info.nbytes)
                # perf: one thread copied 4.8 GB/s out of the page cache (2.07 s of the full-size DeepSeek-V3
                # smoke, H200 machine); readinto releases the GIL, so a few threads read the group's tensors at once.
                list(self._pool().map(lambda job: _read_into(*job), jobs))
            else:  # a legacy .bin adapter (torch.load'ed): copy from its arrays
                arrays = [self.read_numpy(k) for k in keys]
                pinned = self._buffer(sum(_aligned(a.nbytes) for a in arrays))
                flat = pinned.numpy()
                for key, arr in zip(keys, arrays, strict=True):
                    flat[offset : offset + arr.nbytes] = raw_view(arr).reshape(-1).view("uint8")
                    staged.append((key, offset, arr.nbytes, dtype_tag(arr.dtype), tuple(arr.shape)))
                    offset += _aligned(arr.nbytes)
        with self.timer("to_device"):
            whole = pinned[:offset].to(self.device, non_blocking=True)
            for key, start, nbytes, tag, shape in staged:
                dtype = getattr(torch, TORCH_DTYPE_NAMES[tag])
                self._tensors[key] = whole[start : start + nbytes].view(dtype).view(shape)
        self.bytes_copied += offset

    def __call__(self, key: str):
        return self._tensors[key]


def _aligned(nbytes: int) -> int:
    return (nbytes + 63) // 64 * 64


_CHUNK = 16 << 20


def _read_into(info, skip: int, view: memoryview) -> None:
    """Bytes [skip, skip + len(view)) of a tensor into `view`, positioned reads."""
    from lora_convert.errors import AdapterFormatError

    want = len(view)
    got = 0
    with open(info.path, "rb", buffering=0) as handle:
        while got < want:
            n = os.preadv(handle.fileno(), [view[got:]], info.start + skip + got)
            if not n:
                break
            got += n
    if got != want:
        raise AdapterFormatError(
            f"{info.path}: tensor {info.key} should have {info.nbytes} bytes but only {skip + got} could be read.",
            hint="The file changed or was truncated while it was being read.",
        )


def build_group_on_device(plan, group, tag: str, sources: DeviceSources):
    """The stacked A and B of one group, built on the device from the source tensors (what
    lora_convert.convert.group_tensors.build_group_tensors builds on the CPU, with the same factors.place_group)."""
    import torch

    dtype = getattr(torch, TORCH_DTYPE_NAMES[tag])
    R = plan.rank
    A = torch.zeros(group.a_shape(R), dtype=dtype, device=sources.device)
    B = torch.zeros(group.b_shape(R), dtype=dtype, device=sources.device)
    factors.place_group(A, B, group, R, sources, ops=factors.TORCH_OPS)
    return A, B
