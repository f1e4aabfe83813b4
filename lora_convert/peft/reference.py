"""PEFT's delta, computed in float64 from the ORIGINAL adapter tensors and adapter_config.json.

This is the yardstick the smoke forward holds normalized output to, so it never looks at stacked
tensors. Rules (PEFT 0.21): dW = s * B @ A with s = alpha/r (or alpha/sqrt(r) with use_rslora), r and alpha
from rank_pattern / alpha_pattern; a 3-D ParamWrapper stores A [E*r, in] expert-major and B [out, r*E]
rank-major (column k*E + e), so dW[e] = s * B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e]. For a
parameter stored [E, in, out] in an experts class without `is_transposed` (Llama-4), PEFT swaps the sides: A
[E*r, out] is the OUTPUT side and B [in, r*E] the input side (`a_on_output`; peft==0.21.2:
peft/tuners/lora/layer.py:2436-2439, 2565-2568), so the input-side factor of expert e is B.reshape(in, r, E)[:, :, e].T.
"""

from __future__ import annotations

from collections.abc import Callable

from lora_convert.peft.adapter import LoraModule, ModuleKind


def module_factors(
    mod: LoraModule,
    read: Callable[[str], object],
    *,
    expert: int | None = None,
    device=None,
    a_on_output: bool = False,
):
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
        if a_on_output:
            a, b = b.reshape(b.shape[0], r, E)[:, :, expert].T, a.reshape(E, r, a.shape[1])[expert].T
        else:
            a = a.reshape(E, r, a.shape[1])[expert]
            b = b.reshape(b.shape[0], r, E)[:, :, expert]
    return a, b, float(mod.scaling)


def fused_expert_factors(mod: LoraModule, read: Callable[[str], object], *, device=None, a_on_output: bool = False):
    """(A [E, r, in], B [E, out, r], s) of a 3-D module as float64, every expert at once (the same PEFT rule as
    module_factors, for a batched reference: one gather per routed pair instead of a Python loop over experts)."""
    import torch

    if mod.kind != ModuleKind.FUSED_EXPERTS:
        raise ValueError("fused_expert_factors is for 3-D expert modules")
    a = read(mod.lora_A.key).to(device=device, dtype=torch.float64)
    b = read(mod.lora_B.key).to(device=device, dtype=torch.float64)
    r = int(mod.rank)
    E = a.shape[0] // r
    if a_on_output:  # A [E*r, out] is the output side, B [in, r*E] the input side
        a, b = b.reshape(b.shape[0], r, E).permute(2, 1, 0), a.reshape(E, r, a.shape[1]).permute(0, 2, 1)
        return a, b, float(mod.scaling)
    a = a.reshape(E, r, a.shape[1])
    b = b.reshape(b.shape[0], r, E).permute(2, 0, 1)  # [E, out, r]: column k*E + e is expert e's rank-k column
    return a, b, float(mod.scaling)
