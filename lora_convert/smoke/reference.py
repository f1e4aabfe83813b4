"""PEFT's float64 reference for one slice of a group, computed from the ORIGINAL adapter's factors with PEFT's rules
(lora_convert.peft.reference), never from the stacked tensors."""

from __future__ import annotations


def reference_slice(plan_slice, x64, read, device, expert=None):
    """s * (x @ A^T) @ B[rows]^T for the slice's source module, float64; None when zero-filled."""
    from lora_convert.convert.factors import slice_source, source_rows
    from lora_convert.peft.reference import module_factors

    src, inner_expert = slice_source(plan_slice, expert)
    if src is None:
        return None
    a, b, s = module_factors(src.module, read, expert=inner_expert, device=device, a_on_output=src.a_on_output)
    return s * (x64 @ a.T) @ b[source_rows(src)].T


def expert_slice_reference(sl, x64, tok, eid, E: int, read, device):
    """PEFT's float64 output of one slice for every routed (token, expert) pair at once: (ref [P, out], has [P]),
    `has` False where the pair's expert has no source (its rows must stay zero); None when the slice is zero-filled.

    Batched (perf): one shrink of every token against every expert's A, then one gathered batched product per
    pair. The per-expert Python loop it replaces was 30.1 s of a 69.4 s full-size DeepSeek-V3 smoke (H200)."""
    import torch

    from lora_convert.convert.factors import source_rows
    from lora_convert.peft.reference import fused_expert_factors, module_factors

    if sl.fused_source is not None:
        src = sl.fused_source
        # a [E, r, in], b [E, out, r]
        a, b, s = fused_expert_factors(src.module, read, device=device, a_on_output=src.a_on_output)
        b = b[:, source_rows(src)] * s
        has = torch.ones(E, dtype=torch.bool, device=device)
    elif sl.expert_sources:
        # Per-expert modules may differ in rank and scaling (rank_pattern): pad every expert to the largest rank
        # with zeros (adds exact zeros) and fold each expert's own s into its B (in float64).
        per = {e: (src, module_factors(src.module, read, device=device)) for e, src in sl.expert_sources.items()}
        r = max(f[0].shape[0] for _, f in per.values())
        a = torch.zeros((E, r, x64.shape[1]), dtype=torch.float64, device=device)
        b = torch.zeros((E, sl.out_features, r), dtype=torch.float64, device=device)
        has = torch.zeros(E, dtype=torch.bool, device=device)
        for e, (src, (ae, be, se)) in per.items():
            a[e, : ae.shape[0]] = ae
            b[e, :, : ae.shape[0]] = be[source_rows(src)] * se
            has[e] = True
    else:
        return None
    r = a.shape[1]
    h = (x64 @ a.reshape(E * r, a.shape[2]).T).view(x64.shape[0], E, r)[tok, eid]  # [P, r]
    ref = torch.bmm(b[eid], h.unsqueeze(-1)).squeeze(-1)  # [P, out]
    return ref, has[eid]
