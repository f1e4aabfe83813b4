"""A group's stacked tensors and its reference reader on the device, ready for the kernels.

On a GPU the group's source tensors go to the device once and the stacked tensors are built there
(lora_convert.smoke.device); on the CPU they are built with numpy (lora_convert.convert.group_tensors, the bytes
normalize writes) and handed to torch. A stacked output's own tensors are copied over as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def to_torch(array):
    """A numpy array from the core (lora_convert.io reads numpy) as a CPU torch tensor on the same memory.

    bfloat16 and float8 are ml_dtypes types that torch.from_numpy does not know: their raw unsigned integers of the
    same width go across, then torch reinterprets them (exact, no copy)."""
    import torch

    from lora_convert.io.dtypes import BY_TAG, dtype_tag
    from lora_convert.io.tensor_files import raw_view

    dtype = BY_TAG[dtype_tag(array.dtype)]
    if dtype.from_ml_dtypes:
        return torch.from_numpy(raw_view(array)).view(getattr(torch, dtype.name))
    return torch.from_numpy(array)


class GroupStaging:
    """Puts each group's stacked A and B on the device, with the float64 reader its reference uses."""

    def __init__(self, target, device: str, timer):
        self.target, self.device, self.timer = target, device, timer
        self.sources = None
        if device == "cuda":
            from lora_convert.smoke.device import DeviceSources

            self.sources = DeviceSources(target.plan.adapter.index, target.plan.adapter.read, device, timer)

    def stage(self, group, A, B) -> tuple[Any, Any, Callable[[str], Any]]:
        """(A, B, reader) on the device: A and B are the stacked output's (numpy), or None to build them here."""
        if self.sources is not None:
            return self._stage_on_gpu(group, A, B)
        timer = self.timer
        if A is None:
            from lora_convert.convert.group_tensors import build_group_tensors

            plan = self.target.plan
            with timer("build"):
                A, B = build_group_tensors(plan, group, self.target.tag, plan.adapter.read)
        with timer("to_device"):
            A, B = to_torch(A).to(self.device), to_torch(B).to(self.device)
        timer.bytes_to_device += A.numel() * A.element_size() + B.numel() * B.element_size()
        return A, B, _group_reader(self.target.plan.adapter.read, self.device)

    def _stage_on_gpu(self, group, A, B):
        """GPU: the sources go to the device once; the stacked tensors are built there (smoke/device.py)."""
        from lora_convert.convert.group_tensors import group_source_keys
        from lora_convert.smoke.device import build_group_on_device

        timer, sources = self.timer, self.sources
        sources.load(group_source_keys(group))
        reader = _device_reader(sources)
        if A is None:
            with timer("build"):
                A, B = build_group_on_device(self.target.plan, group, self.target.tag, sources)
        else:
            with timer("to_device"):
                A, B = _pinned_to_device(A, self.device), _pinned_to_device(B, self.device)
            timer.bytes_to_device += A.numel() * A.element_size() + B.numel() * B.element_size()
        return A, B, reader

    @property
    def bytes_to_device(self) -> int:
        return self.timer.bytes_to_device + (self.sources.bytes_copied if self.sources is not None else 0)

    def close(self) -> None:
        if self.sources is not None:
            self.sources.close()


def _group_reader(read: Callable[[str], Any], device) -> Callable[[str], Any]:
    """Original tensors as float64 on the device, each read once per group (a 3-D expert module feeds every
    expert of its group: re-reading it per expert would read it E times)."""
    import torch

    cache: dict[str, Any] = {}

    def cached(key: str):
        if key not in cache:
            cache[key] = to_torch(read(key)).to(device=device, dtype=torch.float64)
        return cache[key]

    return cached


def _device_reader(sources) -> Callable[[str], Any]:
    """The reference's reader on a GPU: the group's source tensors already on the device (DeviceSources), as
    float64 there, each converted once per group."""
    import torch

    cache: dict[str, Any] = {}

    def cached(key: str):
        if key not in cache:
            cache[key] = sources(key).to(torch.float64)
        return cache[key]

    return cached


def _pinned_to_device(array, device):
    """A stacked tensor read from disk (numpy) to the device through pinned memory."""
    return to_torch(array).pin_memory().to(device, non_blocking=True)
