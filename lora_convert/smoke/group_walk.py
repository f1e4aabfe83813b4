"""The walk over the plan's groups: each chosen group read or built, put on the device, given its input and checked
(an expert group at once, dense groups in batches of one shape class)."""

from __future__ import annotations

import zlib
from collections.abc import Callable

from lora_convert.smoke.group_checks import DENSE_BATCH, check_dense_groups, check_expert_group
from lora_convert.smoke.report import GroupCheck
from lora_convert.smoke.stacked import stacked_mismatch


def check_groups(
    target, layers, staging, *, tokens: int, seed: int, progress: Callable[[str], None] | None
) -> list[GroupCheck]:
    """The checks of the groups in the chosen layers, in the plan's order."""
    timer, device = staging.timer, staging.device
    checks: list[GroupCheck | None] = []
    dense = DenseBatches(checks, target.rank, device, timer)
    for group in target.plan.groups:
        if not layers.holds(group):
            continue
        A = B = None
        group_tag = target.tag
        if target.read_stacked is not None:
            with timer("read"):
                A, B = target.read_stacked(group)
            failed = stacked_mismatch(group, A, B, target.rank)
            if failed is not None:
                checks.append(failed)
                continue
            from lora_convert.io.dtypes import dtype_tag

            group_tag = dtype_tag(A.dtype)
        A, B, reader = staging.stage(group, A, B)
        x = draw_input(group, tokens, seed, device, A.dtype)
        if group.experts:
            checks.append(
                check_expert_group(
                    group, A, B, target.rank, group_tag, x, reader, device, seed_for(seed, group.key), timer
                )
            )
        else:
            dense.add(group, A, B, group_tag, x, reader)
        if progress:
            progress(group.key)
    dense.flush_all()
    return checks


def seed_for(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31)


def draw_input(group, tokens: int, seed: int, device: str, dtype):
    """The group's random input [tokens, in_features], seeded by the run's seed and the group's key.

    It is drawn where it is used: on a GPU from a CUDA generator (seeded the same way, so a run is reproducible on
    its device). perf: the host generator drew ~400M normals for the 482 groups of a full-size DeepSeek-V3 adapter,
    seconds of one CPU core, then copied them over."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed_for(seed, group.key))
    return torch.randn(tokens, group.in_features, generator=gen, dtype=torch.float32, device=device).to(dtype)


class DenseBatches:
    """Dense groups waiting for one batched launch per shape class (in_features, dtype), each holding its place in
    `checks` until its batch runs."""

    def __init__(self, checks: list[GroupCheck | None], rank: int, device: str, timer):
        self.checks, self.rank, self.device, self.timer = checks, rank, device, timer
        self.pending: dict[tuple, list[tuple[int, tuple]]] = {}

    def add(self, group, A, B, tag: str, x, reader) -> None:
        # Its float64 source factors are taken now: on a GPU the next group's sources replace this one's
        # (DeviceSources).
        for sl in group.slices:
            if sl.dense_source is not None:
                reader(sl.dense_source.module.lora_A.key)
                reader(sl.dense_source.module.lora_B.key)
        batch_key = (group.in_features, str(A.dtype))
        batch = self.pending.setdefault(batch_key, [])
        batch.append((len(self.checks), (group, A, B, tag, x, reader)))
        self.checks.append(None)
        if len(batch) >= DENSE_BATCH:
            self.flush(batch_key)

    def flush(self, batch_key) -> None:
        batch = self.pending.pop(batch_key)
        judged = check_dense_groups([item for _, item in batch], self.rank, self.device, self.timer)
        for (at, _), check in zip(batch, judged, strict=True):
            self.checks[at] = check

    def flush_all(self) -> None:
        for batch_key in list(self.pending):
            self.flush(batch_key)
