"""The group checks: a group's kernel output held to PEFT's reference, slice by slice.

A group passes when ||out - ref|| / ||ref|| is within the dtype's tolerance, nothing is NaN, every slice whose source
is non-zero changes the output, and every zero-filled slice leaves its rows exactly untouched. Dense groups of one
shape class run in one batched launch; expert groups through the MoE kernel with a routing that reaches every expert.
"""

from __future__ import annotations

from lora_convert.smoke.reference import expert_slice_reference, reference_slice
from lora_convert.smoke.report import TOLERANCES, GroupCheck, SliceCheck
from lora_convert.smoke.timer import PhaseTimer


def relative_error(diff_norm: float, ref_norm: float) -> float:
    """||out - ref|| / ||ref||: 0 when both are zero, infinite when only the reference is."""
    if ref_norm == 0.0:
        return 0.0 if diff_norm == 0.0 else float("inf")
    return diff_norm / ref_norm


# Dense groups of one shape class waiting for one batched launch (kernels/batched.py): at most this many at a time,
# which bounds what they hold (their stacked A and B, input and float64 source factors; a few MB per group at
# DeepSeek-V3 size). 61 layers of DeepSeek-V3 make one launch per class.
DENSE_BATCH = 64


def check_dense_groups(items: list[tuple], R: int, device, timer: PhaseTimer) -> list[GroupCheck]:
    """Dense groups sharing in_features and dtype, (group, A, B, tag, x, read) each, in one shrink and one expand
    launch for all of them instead of two per group; each is then judged on its own."""
    import torch

    from lora_convert.convert.factors import kernel_offsets
    from lora_convert.kernels.batched import lora_shrink_expand_batched

    with timer("kernels"):
        ys = lora_shrink_expand_batched(
            [it[4] for it in items],
            [it[1] for it in items],
            [it[2] for it in items],
            [kernel_offsets(it[0]) for it in items],
            R,
            out_dtype=torch.float32,
        )
    return [
        _judge_dense(group, A, B, R, tag, x, y, read, device, timer)
        for (group, A, B, tag, x, read), y in zip(items, ys, strict=True)
    ]


def _judge_dense(group, A, B, R: int, tag: str, x, y, read, device, timer: PhaseTimer) -> GroupCheck:
    """Hold one dense group's kernel output y [T, out] (float32, the delta alone) to PEFT's reference."""
    import torch

    from lora_convert.convert.factors import b_rows, kernel_offsets
    from lora_convert.kernels.expand import lora_expand
    from lora_convert.kernels.shrink import lora_shrink

    x64 = x.to(torch.float64)
    slices: list[SliceCheck] = []
    diff_sq = ref_sq = 0.0
    problems = []
    if torch.isnan(y).any():
        problems.append(f"the kernel output holds {int(torch.isnan(y).sum())} NaN values")
    zero_rows = []
    for sl in group.slices:
        rows = b_rows(sl)
        got = y[:, rows].to(torch.float64)
        with timer("reference"):
            ref = reference_slice(sl, x64, read, device)
        slices.append(_judge_slice(sl.name, got, ref, tag))
        if ref is None:
            zero_rows.append(rows)
            continue
        diff_sq += float((got - ref).norm()) ** 2
        ref_sq += float(ref.norm()) ** 2
    if zero_rows:
        # Zero-filled slices must leave pre-existing output untouched, bit for bit.
        base = torch.randn(
            y.shape, dtype=torch.float32, device=device, generator=torch.Generator(device=device).manual_seed(1)
        )
        with timer("kernels"):
            after = lora_expand(lora_shrink(x, A), B, kernel_offsets(group), R, y=base.clone())
        for rows, sl_check in zip(zero_rows, [s for s in slices if s.zero_filled], strict=True):
            if not torch.equal(after[:, rows], base[:, rows]):
                sl_check.problem = "a zero-filled slice changed the output rows it owns"
    return GroupCheck(
        group.key, group.layer, group.kind, None, tag, relative_error(diff_sq**0.5, ref_sq**0.5), slices, problems
    )


def _judge_slice(name: str, got, ref, tag: str) -> SliceCheck:
    import torch

    tol = TOLERANCES.get(tag, 1e-5)
    if ref is None:
        untouched = bool(torch.count_nonzero(got) == 0)
        return SliceCheck(name, None, True, None if untouched else "a zero-filled slice changed the output")
    if torch.isnan(got).any():
        return SliceCheck(name, float("nan"), False, "NaN in the output")
    ref_norm = float(ref.norm())
    got_norm = float(got.norm())
    rel = relative_error(float((got - ref).norm()), ref_norm)
    if ref_norm > 0 and got_norm == 0:
        return SliceCheck(name, rel, False, "no-op: the source module is non-zero but the slice changes nothing")
    if rel > tol:
        return SliceCheck(name, rel, False, f"relative error {rel:.3g} exceeds {tol:g} for {tag}")
    return SliceCheck(name, rel, zero_filled=False)


def route_tokens(T: int, E: int, k: int, seed: int, device):
    """Top-k routing that reaches every expert: a seeded permutation of tokens, experts taken round-robin."""
    import torch

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(T, generator=g)
    ids = torch.empty(T, k, dtype=torch.int64)
    for j in range(k):
        ids[:, j] = (perm * k + j) % E
    return ids.to(device)


def check_expert_group(group, A, B, R: int, tag: str, x, read, device, seed: int, timer: PhaseTimer) -> GroupCheck:
    import torch

    from lora_convert.convert.factors import b_rows, kernel_offsets
    from lora_convert.kernels.moe import lora_moe

    E = group.experts
    T = x.shape[0]
    k = min(2, E)
    ids = route_tokens(T, E, k, seed, device)
    offsets = kernel_offsets(group)
    with timer("kernels"):
        y = lora_moe(x, A, B, ids, offsets, R, out_dtype=torch.float32)  # [T, k, out]
    problems = []
    if torch.isnan(y).any():
        problems.append(f"the kernel output holds {int(torch.isnan(y).sum())} NaN values")
    x64 = x.to(torch.float64)
    tok = torch.arange(T, device=device).repeat_interleave(k)
    eid = ids.reshape(-1)
    yp = y.reshape(T * k, -1)
    slices = []
    tol = TOLERANCES.get(tag, 1e-5)
    diff_sq = ref_sq = 0.0
    for sl in group.slices:
        got = yp[:, b_rows(sl)].to(torch.float64)
        with timer("reference"):
            out = expert_slice_reference(sl, x64, tok, eid, E, read, device)
        if out is None:
            touched = bool(torch.count_nonzero(got))
            slices.append(
                SliceCheck(sl.name, None, True, "a zero-filled slice changed the output" if touched else None)
            )
            continue
        ref, has = out
        zero_touched = bool(torch.count_nonzero(got[~has]))
        got, ref = got[has], ref[has]
        d2 = float((got - ref).norm()) ** 2
        r2 = float(ref.norm()) ** 2
        g2 = float(got.norm()) ** 2
        rel = relative_error(d2**0.5, r2**0.5)
        problem = None
        if zero_touched:
            problem = "a missing expert's zero-filled rows changed the output"
        elif r2 > 0 and g2 == 0:
            problem = "no-op: the source experts are non-zero but the slice changes nothing"
        elif rel > tol:
            problem = f"relative error {rel:.3g} exceeds {tol:g} for {tag}"
        slices.append(SliceCheck(sl.name, rel, False, problem))
        diff_sq += d2
        ref_sq += r2
    return GroupCheck(
        group.key, group.layer, group.kind, E, tag, relative_error(diff_sq**0.5, ref_sq**0.5), slices, problems
    )
