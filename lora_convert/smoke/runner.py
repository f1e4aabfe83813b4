"""The smoke forward: run stacked groups through the Triton kernels and hold them to PEFT's semantics.

For each group: a random input x (more than 128 rows by default: some kernel bugs only show past 128 rows),
the kernel output, and a float64 reference computed from the ORIGINAL adapter's factors with PEFT's rules
(lora_convert.peft.reference), never from the stacked tensors. A group passes when ||out - ref|| / ||ref|| is within
the dtype's tolerance, nothing is NaN, every slice whose source is non-zero changes the output, and every
zero-filled slice leaves its rows exactly untouched. Errors are attributed per slice, so a report names the
slice that is wrong (swapped rows, a doubled scale, an expert's factors taken from its neighbour).

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) and, unless `layers="all"`, a sample
of layers is checked: the first, one of each layer type, and the last.

The steps live beside this module, one job each: availability (can it run here), device_choice, target (what is
checked), layers, staging (a group's tensors on the device), reference, group_checks, group_walk, stacked, report.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lora_convert.errors import UsageError
from lora_convert.smoke.availability import require_smoke_packages
from lora_convert.smoke.device_choice import prepare_device, select_device
from lora_convert.smoke.group_walk import check_groups
from lora_convert.smoke.layers import choose_layers
from lora_convert.smoke.report import SmokeReport
from lora_convert.smoke.staging import GroupStaging
from lora_convert.smoke.target import open_target
from lora_convert.smoke.timer import PhaseTimer


def run_smoke(
    adapter_spec: str,
    *,
    base: str | None = None,
    original: str | None = None,
    device: str = "auto",
    tokens: int = 160,
    layers: str = "auto",
    seed: int = 0,
    cache_dir=None,
    token=None,
    progress: Callable[[str], None] | None = None,
) -> SmokeReport:
    """Smoke-test a raw PEFT adapter (normalized in memory) or a stacked output against its original."""
    require_smoke_packages()  # before anything imports torch: exit 3 with the install command, not a traceback
    import torch  # noqa: F401  (its import, a second or more, is not part of the set-up phase timed below)

    started = time.perf_counter()
    if tokens < 1:
        raise UsageError(
            "--tokens must be at least 1.", hint="The default, 160 tokens, is enough to exercise every slice."
        )
    torch_device, interpreter = select_device(device)
    target = open_target(adapter_spec, original, base=base, cache_dir=cache_dir, token=token)
    selection = choose_layers(target.plan, layers, interpreter)
    # The set-up phase: resolving and planning (headers only), the CUDA context and the kernel modules' import
    # (triton), so that the per-group phases hold only per-group work.
    prepare_device(torch_device)
    timer = PhaseTimer(cuda=torch_device == "cuda")
    timer.seconds["setup"] = time.perf_counter() - started
    staging = GroupStaging(target, torch_device, timer)
    checks = check_groups(target, selection, staging, tokens=tokens, seed=seed, progress=progress)
    staging.close()
    return SmokeReport(
        adapter=target.source.describe(),
        original=original,
        device=torch_device,
        interpreter=interpreter,
        tokens=tokens,
        seed=seed,
        rank=target.rank,
        layers_checked=selection.chosen,
        layers_total=len(selection.present),
        sampled=selection.sampled,
        groups=checks,
        seconds=time.perf_counter() - started,
        phases=dict(timer.seconds),
        bytes_to_device=staging.bytes_to_device,
    )
