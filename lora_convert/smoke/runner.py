"""The smoke forward: run stacked groups through the Triton kernels and hold them to PEFT's semantics.

For each group: a random input x (more than 128 rows by default: some kernel bugs only show past 128 rows),
the kernel output, and a float64 reference computed from the ORIGINAL adapter's factors with PEFT's rules
(lora_convert.peft.reference), never from the stacked tensors. A group passes when ||out - ref|| / ||ref|| is within
the dtype's tolerance, nothing is NaN, every slice whose source is non-zero changes the output, and every
zero-filled slice leaves its rows exactly untouched. Errors are attributed per slice, so a report names the
slice that is wrong (swapped rows, a doubled scale, an expert's factors taken from its neighbour).

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) and, unless `layers="all"`, a sample
of layers is checked: the first, one of each layer type, and the last.

`smoke_machine` checks the machine first, then the caller opens the target (lora_convert/pipeline/commands.py reads
and plans the adapter once), then `run_smoke` runs. The steps live beside this module, one job each: availability
(can it run here), device_choice, target (what is checked), layers, staging (a group's tensors on the device),
reference, group_checks, group_walk, stacked, report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from lora_convert.errors import UsageError
from lora_convert.smoke.availability import require_smoke_packages
from lora_convert.smoke.device_choice import prepare_device, select_device
from lora_convert.smoke.group_walk import check_groups
from lora_convert.smoke.layers import choose_layers
from lora_convert.smoke.report import SmokeReport
from lora_convert.smoke.staging import GroupStaging
from lora_convert.smoke.target import SmokeTarget
from lora_convert.smoke.timer import PhaseTimer


@dataclass(frozen=True)
class SmokeMachine:
    """Where the smoke forward runs, checked before the adapter is read: the torch device, whether the kernels run in
    Triton's interpreter, and when the set-up began (the `setup` phase includes reading and planning)."""

    device: str
    interpreter: bool
    started: float


def smoke_machine(device: str = "auto", tokens: int = 160) -> SmokeMachine:
    """Check that this machine can run the smoke forward as asked (torch and triton installed: exit 3 with the
    install command otherwise, not a traceback; CUDA when --device cuda) and that `tokens` is usable."""
    require_smoke_packages()  # before anything imports torch
    import torch  # noqa: F401  (its import, a second or more, is not part of the set-up phase timed below)

    started = time.perf_counter()
    if tokens < 1:
        raise UsageError(
            "--tokens must be at least 1.", hint="The default, 160 tokens, is enough to exercise every slice."
        )
    torch_device, interpreter = select_device(device)
    return SmokeMachine(torch_device, interpreter, started)


def run_smoke(
    target: SmokeTarget,
    machine: SmokeMachine,
    *,
    original: str | None = None,
    tokens: int = 160,
    layers: str = "auto",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> SmokeReport:
    """Smoke-test `target` (lora_convert.smoke.target: a PEFT adapter normalized in memory, or a stacked output and
    its original) on `machine`. `original` is only what the report names."""
    selection = choose_layers(target.plan, layers, machine.interpreter)
    # The set-up phase: resolving and planning (headers only), the CUDA context and the kernel modules' import
    # (triton), so that the per-group phases hold only per-group work.
    prepare_device(machine.device)
    timer = PhaseTimer(cuda=machine.device == "cuda")
    timer.seconds["setup"] = time.perf_counter() - machine.started
    staging = GroupStaging(target, machine.device, timer)
    checks = check_groups(target, selection, staging, tokens=tokens, seed=seed, progress=progress)
    staging.close()
    return SmokeReport(
        adapter=target.source.describe(),
        original=original,
        device=machine.device,
        interpreter=machine.interpreter,
        tokens=tokens,
        seed=seed,
        rank=target.rank,
        layers_checked=selection.chosen,
        layers_total=len(selection.present),
        sampled=selection.sampled,
        groups=checks,
        seconds=time.perf_counter() - machine.started,
        phases=dict(timer.seconds),
        bytes_to_device=staging.bytes_to_device,
    )
