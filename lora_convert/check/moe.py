"""The `moe` check: per-expert (2-D) layouts with experts or projections missing, and the 3-D expert wrapper
findings made while reading the adapter."""

from __future__ import annotations

from collections import defaultdict

from lora_convert.check.context import MAX_KEYS, Check, CheckContext, Outcome, adapter_findings
from lora_convert.codes import finding
from lora_convert.findings import Finding
from lora_convert.text import spans


def run(ctx: CheckContext) -> Outcome:
    return Outcome(adapter_findings(ctx, "moe") + moe_findings(ctx.adapter, ctx.arch))


CHECK = Check("moe", run)


def moe_findings(adapter, arch) -> list[Finding]:
    """Per-expert (2-D) layouts: experts missing in a layer, and projections missing for some experts."""
    out: list[Finding] = []
    by_layer: dict[tuple, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    keys_by_layer: dict[tuple, list[str]] = defaultdict(list)
    for mod in adapter.modules:
        if mod.expert is None or mod.layer is None:
            continue
        container = mod.local_name.rsplit(".", 1)[0]  # e.g. mlp.experts
        by_layer[(mod.layer, container)][mod.leaf].add(mod.expert)
        keys_by_layer[(mod.layer, container)].extend(mod.keys)
    if not by_layer:
        return out
    expected = None
    if arch is not None:
        try:
            expected = int(arch.expert_count())
        except Exception:  # noqa: BLE001 - a dense schema or no expert count
            expected = None
    if expected is None:
        expected = 1 + max(e for projs in by_layer.values() for es in projs.values() for e in es)
        guessed = True
    else:
        guessed = False
    missing_experts: dict[int, list[int]] = {}
    missing_proj: list[str] = []
    missing_proj_keys: list[str] = []
    for (layer, container), projs in sorted(by_layer.items()):
        present = set().union(*projs.values())
        gap = sorted(set(range(expected)) - present)
        if gap:
            missing_experts[layer] = gap
        for proj, experts in sorted(projs.items()):
            lacking = sorted(present - experts)
            if lacking:
                missing_proj.append(f"layer {layer} {container}.{proj}: experts {spans(lacking)}")
                missing_proj_keys.extend(keys_by_layer[(layer, container)][:2])
    if missing_experts:
        first = next(iter(missing_experts))
        out.append(
            finding(
                "experts.missing",
                f"{len(missing_experts)} layer(s) have LoRA on only some routed experts (of {expected}"
                f"{', counted from the adapter' if guessed else ''}); e.g. layer {first} lacks experts "
                f"{spans(missing_experts[first])}. PEFT adapts every expert of a targeted layer; the adapter is incomplete.",
                keys=[
                    k
                    for layer in list(missing_experts)[:5]
                    for k in keys_by_layer[next(c for c in by_layer if c[0] == layer)][:2]
                ],
                expected=expected,
                actual={str(k): v[:20] for k, v in list(missing_experts.items())[:20]},
            )
        )
    if missing_proj:
        out.append(
            finding(
                "experts.missing-projection",
                f"Some experts lack projections that other experts of the same layer have: {'; '.join(missing_proj[:5])}"
                f"{' ...' if len(missing_proj) > 5 else ''}. vLLM requires all three expert projections per expert.",
                keys=missing_proj_keys[:MAX_KEYS],
                actual=missing_proj[:20],
            )
        )
    return out
