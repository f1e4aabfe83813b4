"""Features of routed and shared experts: which projections each MoE layer adapts, shared-expert fusion."""

from __future__ import annotations

from collections import defaultdict

from lora_convert.engines.features.context import Context, examples, in_families, layers_text, module_keys
from lora_convert.peft.adapter import ModuleKind


def _expert_projections(ctx: Context, roles: dict[str, list[str]]) -> dict[tuple, set[str]]:
    """(layer, container) -> the projection roles (gate, up, down) present among the routed experts. `roles`
    (rule data) maps each parameter or leaf name to the roles it carries (`gate_up_proj` -> gate and up)."""
    found: dict[tuple, set[str]] = defaultdict(set)
    for m in ctx.modules:
        if m.layer is None or not (m.expert is not None or m.kind == ModuleKind.FUSED_EXPERTS):
            continue
        place = (m.layer, ctx.container(m) if m.expert is not None else (m.local_name or "").rsplit(".", 1)[0])
        found[place].update(roles.get(m.param or m.leaf, ()))
    return found


def _gated(ctx: Context, layer: int) -> bool:
    """Whether the routed experts at `layer` have a gate projection: the schema says; without a base, assume so."""
    gated = ctx.arch.experts_gated(layer) if ctx.arch is not None else None
    return True if gated is None else gated


def f_partial_expert_projections(ctx: Context, params: dict):
    hits = []
    for (layer, container), present in sorted(_expert_projections(ctx, params["roles"]).items()):
        need = {"gate", "up", "down"} if _gated(ctx, layer) else {"up", "down"}
        if params.get("one_side_only"):
            gate_up = {"gate", "up"} & present
            if bool(gate_up) != bool("down" in present):
                hits.append((layer, container, sorted(need - present)))
        elif need - present:
            hits.append((layer, container, sorted(need - present)))
    if not hits:
        return None
    missing = sorted({p for _, _, ps in hits for p in ps})
    layers = {h[0] for h in hits}
    mods = [
        m for m in ctx.modules if m.layer in layers and (m.expert is not None or m.kind == ModuleKind.FUSED_EXPERTS)
    ]
    return {
        "count": len(hits),
        "layers": layers_text([h[0] for h in hits]),
        "missing": ", ".join(missing),
        "keys": module_keys(mods),
    }


def f_shared_experts_fusion(ctx: Context, params: dict):
    """Shared-expert LoRA on a base where the engine fuses the shared experts into the routed ones by default
    (routed and shared counts from the schema's `expert_count` / `shared_expert_count`)."""
    if not in_families(ctx, params):
        return None
    contains = params["local_contains"]
    mods = [m for m in ctx.modules if contains in (m.local_name or "") + "." and m.expert is None and not m.is_vision]
    if not mods:
        return None
    routed = ctx.arch.expert_count() if ctx.arch is not None else None
    shared = ctx.arch.shared_expert_count() if ctx.arch is not None else None
    fused_by_default = None
    if isinstance(routed, int) and isinstance(shared, int):
        fused_by_default = routed in params.get("fused_routed", []) and shared in params.get("fused_shared", [])
        if not fused_by_default:
            return None
    condition = (
        f"which is on by default for this base ({routed} routed experts, {shared} shared)"
        if fused_by_default
        else f"which is on by default for {params['default_condition']}"
    )
    return {
        "count": len(mods),
        "layers": layers_text([m.layer for m in mods if m.layer is not None]),
        "condition": condition,
        "keys": module_keys(mods),
        "examples": examples([m.module for m in mods]),
    }


def f_expert_rank_mismatch(ctx: Context, params: dict):
    """Per-expert modules of one projection of one layer with different ranks."""
    ranks: dict[tuple, dict[int, list]] = {}
    for m in ctx.modules:
        if m.expert is None or m.layer is None or not m.rank:
            continue
        ranks.setdefault((m.layer, ctx.container(m).rsplit(".", 1)[0], m.leaf), {}).setdefault(m.rank, []).append(m)
    mixed = {place: by_rank for place, by_rank in sorted(ranks.items()) if len(by_rank) > 1}
    if not mixed:
        return None
    mods = [m for by_rank in mixed.values() for group in by_rank.values() for m in group]
    return {
        "count": len(mods),
        "examples": examples(
            [f"layer {layer} {leaf}: ranks {sorted(by_rank)}" for (layer, _, leaf), by_rank in mixed.items()]
        ),
        "keys": module_keys(mods),
    }
