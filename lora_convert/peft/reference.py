"""PEFT's delta, computed in float64 from the ORIGINAL adapter tensors and adapter_config.json.

This is the yardstick the smoke forward and the tests hold normalized output to, so it never looks at stacked
tensors. Rules (PEFT 0.21): dW = s * B @ A with s = alpha/r (or alpha/sqrt(r) with use_rslora), r and alpha
from rank_pattern / alpha_pattern; a 3-D ParamWrapper stores A [E*r, in] expert-major and B [out, r*E]
rank-major (column k*E + e), so dW[e] = s * B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e].
"""

from __future__ import annotations

from typing import Callable

from lora_convert.peft.adapter import LoraModule, ModuleKind


def module_delta(mod: LoraModule, read: Callable[[str], object], *, expert: int | None = None):
    """dW of one module as float64: [out, in], or [E, out, in] for a 3-D module (one expert if `expert`)."""
    import torch

    a = read(mod.lora_A.key).to(torch.float64)
    b = read(mod.lora_B.key).to(torch.float64)
    s = float(mod.scaling)
    if mod.kind == ModuleKind.FUSED_EXPERTS:
        r = int(mod.rank)
        E = a.shape[0] // r
        a3 = a.reshape(E, r, a.shape[1])
        b3 = b.reshape(b.shape[0], r, E).permute(2, 0, 1)  # [E, out, r]
        if expert is not None:
            return s * b3[expert] @ a3[expert]
        return s * torch.bmm(b3, a3)
    return s * b @ a


def module_output_delta(mod: LoraModule, read: Callable[[str], object], x, *, expert: int | None = None):
    """PEFT's wrapped-minus-base output for input rows x [T, in]: x @ dW^T, in float64."""
    import torch

    delta = module_delta(mod, read, expert=expert)
    return x.to(torch.float64) @ delta.transpose(-1, -2)


def module_factors(mod: LoraModule, read: Callable[[str], object], *, expert: int | None = None, device=None):
    """(A [r, in], B [out, r], s) of a module as float64, for one expert of a 3-D module.

    Factored form lets a reference output be computed as s * (x @ A^T) @ B^T without forming dW, which at
    DeepSeek sizes (4096 x 7168 per expert) would dominate a smoke run.
    """
    import torch

    a = read(mod.lora_A.key).to(device=device, dtype=torch.float64)
    b = read(mod.lora_B.key).to(device=device, dtype=torch.float64)
    if mod.kind == ModuleKind.FUSED_EXPERTS:
        r = int(mod.rank)
        E = a.shape[0] // r
        if expert is None:
            raise ValueError("a 3-D expert module needs an expert index")
        a = a.reshape(E, r, a.shape[1])[expert]
        b = b.reshape(b.shape[0], r, E)[:, :, expert]
    return a, b, float(mod.scaling)
