"""The `smoke` check: a forward pass through the kernels compared with PEFT's reference (lora_convert/smoke/runner.py).

It runs when asked (`--smoke`) or by default where it is cheap (a GPU, or a CPU and an adapter up to 50 MB), and not
for adapters that already have errors or for stacked outputs.

By default a smoke forward that does not run is a note (`smoke.skipped`; `smoke.not-installed` without torch and
triton, the `[smoke]` extra: the light core is what the pre-commit hook and the Action install, so a missing extra is
their normal state, not a problem of the adapter). A forward pass the caller asked for (--smoke) is never a pass when
it did not run: the machine that cannot run it (the extra missing, no CUDA for --device cuda) is an
EnvironmentProblem (exit 3, with what to install or pass), an adapter it cannot run on (a stacked output, no base
architecture, errors found before it) is the error `smoke.unchecked`; --allow-unchecked turns both into the warning
`smoke.unchecked-allowed` (lora_convert.check.context.not_checked), with the other checks' report.
"""

from __future__ import annotations

import os
import sys

from lora_convert.check.context import Check, CheckContext, Outcome, not_checked, unchecked_text
from lora_convert.codes import finding
from lora_convert.errors import EnvironmentProblem, LoraConvertError
from lora_convert.findings import has_errors
from lora_convert.smoke.availability import (
    SMOKE_INSTALL,
    missing_smoke_packages,
    not_installed_reason,
    require_smoke_packages,
)
from lora_convert.smoke.runner import run_smoke, smoke_machine
from lora_convert.smoke.target import peft_target

SMOKE_CPU_LIMIT_BYTES = 50 * 1024 * 1024  # default smoke on a CPU only for adapters up to this size


# Device files and driver entries without which torch.cuda.is_available() is False: NVIDIA's driver, ROCm's kernel
# driver (torch.cuda on AMD), WSL2's GPU paravirtualisation.
GPU_DRIVER_PATHS = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/kfd", "/dev/dxg")


def gpu_driver_present() -> bool:
    """Whether a GPU driver that torch.cuda could use is installed here (Linux: its device files; elsewhere: assumed
    yes, except macOS, which has no CUDA). False means torch.cuda.is_available() would be False, so the default
    smoke decision for a large adapter needs no torch import."""
    if sys.platform == "darwin":
        return False
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in GPU_DRIVER_PATHS)


def _unchecked(ctx: CheckContext, reason: str, message: str, fix: str) -> Outcome:
    """The --smoke forward pass that did not run: `smoke.unchecked`, or `smoke.unchecked-allowed`."""
    allowed = ctx.options.allow_unchecked
    gap = finding(
        "smoke.unchecked-allowed" if allowed else "smoke.unchecked", **unchecked_text(allowed, message, fix.rstrip("."))
    )
    return not_checked(ctx, reason, gap)


def _environment(ctx: CheckContext, reason: str, problem: EnvironmentProblem) -> Outcome:
    """--smoke on a machine that cannot run it: exit 3 (the README's code for it), unless --allow-unchecked."""
    if not ctx.options.allow_unchecked:
        raise problem
    return _unchecked(ctx, reason, problem.message, problem.hint or "Run it on a machine that can")


def run(ctx: CheckContext) -> Outcome:
    """The check's steps: asked for at all, installed here, an adapter it can run on, a device, the forward."""
    if ctx.options.smoke is False:
        return Outcome(skipped="--no-smoke")
    missing = missing_smoke_packages()
    if missing:
        return _not_installed(ctx, missing)
    not_runnable = _adapter_not_runnable(ctx)
    if not_runnable is not None:
        return not_runnable
    device = _choose_device(ctx)
    if isinstance(device, Outcome):
        return device
    return _forward(ctx, device)


def _not_run(ctx: CheckContext, reason: str, message: str, fix: str | None = None) -> Outcome:
    """A forward that did not run: the error `smoke.unchecked` when --smoke asked for it, else the note
    `smoke.skipped`."""
    if ctx.options.smoke:
        fix = fix or "Fix what the message names, or pass --no-smoke to validate without the forward pass"
        return _unchecked(ctx, reason, message, fix)
    return Outcome([finding("smoke.skipped", message, fix=fix)], skipped=reason)


def _not_installed(ctx: CheckContext, missing: list[str]) -> Outcome:
    """torch or triton missing: exit 3 with the install command for --smoke, else the note `smoke.not-installed`."""
    if ctx.options.smoke:
        try:
            require_smoke_packages()
        except EnvironmentProblem as exc:  # the install command
            return _environment(ctx, not_installed_reason(missing), exc)
    names = " and ".join(missing)
    message = f"The smoke forward did not run: {names} {'is' if len(missing) == 1 else 'are'} not installed here."
    fix = f"{SMOKE_INSTALL} to run it, or pass --no-smoke to skip it."
    return Outcome([finding("smoke.not-installed", message, fix=fix)], skipped=not_installed_reason(missing))


def _adapter_not_runnable(ctx: CheckContext) -> Outcome | None:
    """Why the forward cannot run on this adapter (a stacked output, no architecture, errors found), or None."""
    if ctx.stacked:
        return _not_run(
            ctx,
            "stacked output",
            "The smoke forward of a stacked output compares it with the adapter it came "
            "from; validate does not know that adapter.",
            fix="Run `lora-convert smoke OUT --original ADAPTER`.",
        )
    if ctx.arch is None:
        return _not_run(
            ctx,
            "no base architecture",
            "The smoke forward needs the base architecture; none was resolved.",
            fix="Pass --base.",
        )
    if has_errors(ctx.findings):
        return _not_run(
            ctx,
            "the adapter has errors",
            "The smoke forward was not run because the checks above found errors; fix those first.",
        )
    return None


def _too_large_for_cpu(ctx: CheckContext) -> Outcome:
    return _not_run(
        ctx,
        "CPU and adapter > 50 MB",
        f"No GPU, and the adapter is {ctx.adapter.total_bytes / 2**20:.0f} MB (> 50 MB): "
        "the CPU smoke forward is off by default.",
        fix="Pass --smoke to run it anyway.",
    )


def _choose_device(ctx: CheckContext) -> str | Outcome:
    """ "cuda" or "cpu", or the outcome when none will do: by default no CPU forward for an adapter over 50 MB."""
    smoke, device = ctx.options.smoke, ctx.options.device
    large = ctx.adapter.total_bytes > SMOKE_CPU_LIMIT_BYTES
    if smoke is None and device == "auto" and large and not gpu_driver_present():
        return _too_large_for_cpu(ctx)  # decided without importing torch (1-1.6 s here): no driver, no CUDA device
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        if smoke:
            problem = EnvironmentProblem(
                "--device cuda was given but no CUDA device is available.",
                hint="Use --device cpu, or --no-smoke to skip the forward pass.",
            )
            return _environment(ctx, "no CUDA device", problem)
        return _not_run(
            ctx, "no CUDA device", "--device cuda was given but no CUDA device is available; no forward pass was run."
        )
    chosen = "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"
    if smoke is None and chosen == "cpu" and large:
        return _too_large_for_cpu(ctx)
    return chosen


def _forward(ctx: CheckContext, device: str) -> Outcome:
    """The forward itself, on the prepared adapter's plan (the one the engine rules use: planned once)."""
    try:
        machine = smoke_machine(device)
        target = peft_target(ctx.prepared.source, ctx.prepared.plan(drop_unsupported=True))
        result = run_smoke(target, machine)
    except EnvironmentProblem as exc:
        if ctx.options.smoke:
            return _environment(ctx, "environment", exc)
        return _not_run(ctx, "environment", "The smoke forward could not run on this machine.")
    except LoraConvertError as exc:
        return _not_run(
            ctx, "not normalizable", f"The smoke forward could not prepare the adapter: {exc.message}", fix=exc.hint
        )
    found = result.findings()
    if found:
        return Outcome(found)
    layers = ", ".join(map(str, result.layers_checked[:8]))
    message = f"Smoke forward on {device}: {len(result.groups)} group(s) match PEFT's reference (layers {layers})."
    return Outcome([finding("smoke.passed", message)])


CHECK = Check("smoke", run)
