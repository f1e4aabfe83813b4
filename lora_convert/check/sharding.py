"""The `sharding` check (with --tp/--ep): dimensions and head counts that would not divide over the ranks."""

from __future__ import annotations

import contextlib

from lora_convert.arch.tensor_parallel import head_counts, module_split
from lora_convert.check.context import MAX_KEYS, Check, CheckContext, Outcome
from lora_convert.codes import finding
from lora_convert.findings import Finding
from lora_convert.peft.adapter import ModuleKind


def run(ctx: CheckContext) -> Outcome:
    tp, ep = ctx.options.tp, ctx.options.ep
    if not (tp or ep):
        return Outcome(skipped="no --tp/--ep")
    return Outcome(sharding_findings(ctx.adapter, ctx.arch, ctx.text_config, tp or 1, ep or 1))


CHECK = Check("sharding", run)


def sharding_findings(adapter, arch, text_config: dict, tp: int, ep: int) -> list[Finding]:
    """What would not divide over `tp` tensor-parallel and `ep` expert-parallel ranks: the expert counts, the head
    counts of adapted modules, then each adapted module's split dimension."""
    if tp % ep:
        return [
            finding(
                "sharding.ep",
                f"--ep {ep} does not divide --tp {tp}; the MoE tensor-parallel size would be {tp}/{ep}.",
                expected=f"a divisor of {tp}",
                actual=ep,
            )
        ]
    sized = [m for m in adapter.modules if m.in_features is not None and m.out_features is not None and not m.is_vision]
    return [
        *_expert_findings(_expert_counts(adapter, sized, arch, ep), ep),
        *_head_findings(adapter, arch, text_config, tp),
        *_dimension_findings(sized, arch, tp, tp // ep),
    ]


def _expert_counts(adapter, sized: list, arch, ep: int) -> set[int]:
    """The routed-expert counts in play: the 3-D expert modules' (of `sized`), the architecture's (with --ep), else
    one more than the highest per-expert index."""
    counts = {m.experts for m in sized if m.kind == ModuleKind.FUSED_EXPERTS and m.experts}
    if arch is not None and ep > 1:
        with contextlib.suppress(Exception):
            counts.add(int(arch.expert_count()))
    per_expert = {m.expert for m in adapter.modules if m.expert is not None}
    if per_expert and not counts:
        counts.add(max(per_expert) + 1)
    return counts


def _expert_findings(expert_counts: set[int], ep: int) -> list[Finding]:
    return [
        finding(
            "sharding.ep",
            f"{count} routed experts do not divide evenly over --ep {ep}.",
            expected=f"a multiple of {ep}",
            actual=count,
        )
        for count in expert_counts
        if ep > 1 and count % ep
    ]


def _head_findings(adapter, arch, text_config: dict, tp: int) -> list[Finding]:
    """Head counts (of modules the adapter adapts) that --tp can neither split nor, where allowed, replicate."""
    if tp <= 1:
        return []
    adapted = {m.local_name if m.layer is not None else m.module for m in adapter.modules if not m.is_vision}
    out = []
    for heads in head_counts(arch, text_config):
        if adapted.isdisjoint(heads.sources) or heads.fits(tp):
            continue
        if heads.may_replicate:
            message = (
                f"{heads.label}={heads.value} neither divides nor is divisible by --tp {tp}; "
                "these heads can be neither split nor replicated evenly."
            )
        else:
            message = (
                f"{heads.label}={heads.value} is not divisible by --tp {tp}; the adapted modules "
                "cannot be split across ranks."
            )
        out.append(
            finding(
                "sharding.tp",
                message,
                keys=[heads.label],
                expected=f"a multiple or divisor of {tp}" if heads.may_replicate else f"a multiple of {tp}",
                actual=heads.value,
            )
        )
    return out


def _dimension_findings(sized: list, arch, tp: int, moe_tp: int) -> list[Finding]:
    """Modules whose split dimension (input for row-parallel, output per part otherwise) the ranks do not divide,
    one finding per (module name, dimension, ranks)."""
    problems: dict[tuple, dict] = {}
    for mod in sized:
        is_expert = mod.expert is not None or mod.kind == ModuleKind.FUSED_EXPERTS
        size = moe_tp if is_expert else tp  # routed experts use the MoE tensor-parallel size (tp / ep)
        split = module_split(mod, arch)
        # A module split by heads is checked through its head counts; a replicated one is whole on every rank.
        if size == 1 or split.tp == "replicated" or (split.tp == "heads" and not is_expert):
            continue
        row = split.tp == "row"
        dim = mod.in_features if row else mod.out_features // split.parts
        if dim % size:
            entry = problems.setdefault(
                (mod.local_name or mod.module, dim, size), {"keys": [], "dim": "input" if row else "output"}
            )
            if len(entry["keys"]) < MAX_KEYS:
                entry["keys"].append(mod.keys[0] if mod.keys else mod.module)
    return [
        finding(
            "sharding.tp",
            f"{what}: its {entry['dim']} dimension {value} is not divisible by the tensor-parallel size {divisor}.",
            keys=entry["keys"],
            expected=f"a multiple of {divisor}",
            actual=value,
        )
        for (what, value, divisor), entry in sorted(problems.items(), key=lambda item: str(item[0]))
    ]
