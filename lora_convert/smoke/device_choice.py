"""Which device the smoke forward runs on (CUDA, or the CPU through Triton's interpreter), and making it ready."""

from __future__ import annotations

import os

from lora_convert.errors import EnvironmentProblem, UsageError
from lora_convert.smoke.availability import require_smoke_packages


def select_device(device: str) -> tuple[str, bool]:
    """Return (torch device, interpreter?) or raise EnvironmentProblem (exit 3)."""
    require_smoke_packages()
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise EnvironmentProblem(
            "--device cuda was asked for, but torch sees no CUDA device here.",
            hint="Use --device cpu (the Triton interpreter) or --device auto, or run on a GPU machine.",
        )
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(
            f"--device must be auto, cpu or cuda, not {device!r}.", hint="auto picks CUDA when present, else the CPU."
        )
    if device == "cuda" or (device == "auto" and has_cuda):
        return "cuda", False
    # The interpreter must be requested before the kernel modules are imported (triton.jit decides then).
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu", True


def prepare_device(torch_device: str) -> None:
    """Import the kernel modules (triton) and create the CUDA context: set-up work, kept out of the per-group phases
    that are timed."""
    import torch

    import lora_convert.kernels.expand  # noqa: F401
    import lora_convert.kernels.moe  # noqa: F401
    import lora_convert.kernels.shrink  # noqa: F401

    if torch_device == "cuda":
        torch.zeros(1, device=torch_device)
        torch.cuda.synchronize()
