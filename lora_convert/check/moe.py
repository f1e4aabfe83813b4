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
    experts = _ExpertsByLayer(adapter)
    if not experts.projections:
        return []
    expected, guessed = _expected_experts(arch, experts)
    return [
        *_missing_experts_findings(experts, expected, guessed),
        *_missing_projection_findings(experts),
    ]


class _ExpertsByLayer:
    """The per-expert modules of an adapter, per (layer, expert container such as `mlp.experts`): which experts
    each projection has, and the tensor keys."""

    def __init__(self, adapter) -> None:
        self.projections: dict[tuple, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        self.keys: dict[tuple, list[str]] = defaultdict(list)
        for mod in adapter.modules:
            if mod.expert is None or mod.layer is None:
                continue
            container = mod.local_name.rsplit(".", 1)[0]  # e.g. mlp.experts
            self.projections[(mod.layer, container)][mod.leaf].add(mod.expert)
            self.keys[(mod.layer, container)].extend(mod.keys)

    def highest_expert(self) -> int:
        return max(e for projs in self.projections.values() for es in projs.values() for e in es)


def _expected_experts(arch, experts: _ExpertsByLayer) -> tuple[int, bool]:
    """(routed experts per layer, whether that was counted from the adapter for want of an architecture count)."""
    if arch is not None:
        try:
            return int(arch.expert_count()), False
        except Exception:  # noqa: BLE001 - a dense schema or no expert count
            pass
    return 1 + experts.highest_expert(), True


def _missing_experts_findings(experts: _ExpertsByLayer, expected: int, guessed: bool) -> list[Finding]:
    """Layers where some of the `expected` experts have no LoRA at all."""
    missing: dict[int, list[int]] = {}
    for (layer, _), projs in sorted(experts.projections.items()):
        gap = sorted(set(range(expected)) - set().union(*projs.values()))
        if gap:
            missing[layer] = gap
    if not missing:
        return []
    first = next(iter(missing))
    return [
        finding(
            "experts.missing",
            f"{len(missing)} layer(s) have LoRA on only some routed experts (of {expected}"
            f"{', counted from the adapter' if guessed else ''}); e.g. layer {first} lacks experts "
            f"{spans(missing[first])}. PEFT adapts every expert of a targeted layer; the adapter is incomplete.",
            keys=[
                k
                for layer in list(missing)[:5]
                for k in experts.keys[next(c for c in experts.projections if c[0] == layer)][:2]
            ],
            expected=expected,
            actual={str(k): v[:20] for k, v in list(missing.items())[:20]},
        )
    ]


def _missing_projection_findings(experts: _ExpertsByLayer) -> list[Finding]:
    """Experts that lack a projection other experts of the same layer have."""
    missing: list[str] = []
    keys: list[str] = []
    for (layer, container), projs in sorted(experts.projections.items()):
        present = set().union(*projs.values())
        for proj, have in sorted(projs.items()):
            lacking = sorted(present - have)
            if lacking:
                missing.append(f"layer {layer} {container}.{proj}: experts {spans(lacking)}")
                keys.extend(experts.keys[(layer, container)][:2])
    if not missing:
        return []
    return [
        finding(
            "experts.missing-projection",
            f"Some experts lack projections that other experts of the same layer have: {'; '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}. vLLM requires all three expert projections per expert.",
            keys=keys[:MAX_KEYS],
            actual=missing[:20],
        )
    ]
