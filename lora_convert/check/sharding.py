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
    out: list[Finding] = []
    if tp % ep:
        out.append(
            finding(
                "sharding.ep",
                f"--ep {ep} does not divide --tp {tp}; the MoE tensor-parallel size would be {tp}/{ep}.",
                expected=f"a divisor of {tp}",
                actual=ep,
            )
        )
        return out
    moe_tp = tp // ep
    problems: dict[tuple, dict] = {}

    def note(what, dim, value, divisor, key):
        entry = problems.setdefault((what, value, divisor), {"keys": [], "dim": dim})
        if len(entry["keys"]) < MAX_KEYS:
            entry["keys"].append(key)

    expert_counts = set()
    for mod in adapter.modules:
        if mod.in_features is None or mod.out_features is None or mod.is_vision:
            continue
        is_expert = mod.expert is not None or mod.kind == ModuleKind.FUSED_EXPERTS
        if mod.kind == ModuleKind.FUSED_EXPERTS and mod.experts:
            expert_counts.add(mod.experts)
        size = moe_tp if is_expert else tp  # routed experts use the MoE tensor-parallel size (tp / ep)
        split = module_split(mod, arch)
        # A module split by heads is checked through its head counts below; a replicated one is whole on every rank.
        if size == 1 or split.tp == "replicated" or (split.tp == "heads" and not is_expert):
            continue
        name = mod.local_name or mod.module
        row = split.tp == "row"
        dim = mod.in_features if row else mod.out_features // split.parts
        if dim % size:
            note(name, "input" if row else "output", dim, size, mod.keys[0] if mod.keys else mod.module)
    if arch is not None and ep > 1:
        with contextlib.suppress(Exception):
            expert_counts.add(int(arch.expert_count()))
    per_expert = {m.expert for m in adapter.modules if m.expert is not None}
    if per_expert and not expert_counts:
        expert_counts.add(max(per_expert) + 1)
    for count in expert_counts:
        if ep > 1 and count % ep:
            out.append(
                finding(
                    "sharding.ep",
                    f"{count} routed experts do not divide evenly over --ep {ep}.",
                    expected=f"a multiple of {ep}",
                    actual=count,
                )
            )
    adapted = {m.local_name if m.layer is not None else m.module for m in adapter.modules if not m.is_vision}
    for heads in head_counts(arch, text_config) if tp > 1 else []:
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
    for (what, value, divisor), entry in sorted(problems.items(), key=lambda kv_: str(kv_[0])):
        out.append(
            finding(
                "sharding.tp",
                f"{what}: its {entry['dim']} dimension {value} is not divisible by the tensor-parallel size {divisor}.",
                keys=entry["keys"],
                expected=f"a multiple of {divisor}",
                actual=value,
            )
        )
    return out
