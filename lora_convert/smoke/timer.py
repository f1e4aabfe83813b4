"""Seconds per phase of the smoke forward, as its report shows them."""

from __future__ import annotations

import time
from contextlib import contextmanager


class PhaseTimer:
    """Seconds spent per phase (build, to_device, kernels, reference). On CUDA each phase is bracketed by a
    synchronize, so kernel time is kernel time and not launch time."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: dict[str, float] = {}
        self.bytes_to_device = 0

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
