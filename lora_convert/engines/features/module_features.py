"""Features of which modules an adapter adapts: names present, companions missing, layer stacks, routers."""

from __future__ import annotations

import re
from collections import defaultdict

from lora_convert.engines.features.context import (
    Context,
    examples,
    in_classes,
    in_containers,
    in_families,
    layers_text,
    module_keys,
)
from lora_convert.peft.adapter import ModuleKind


def f_leaf_present(ctx: Context, params: dict):
    if not in_families(ctx, params) or not in_classes(ctx, params):
        return None
    leaves = set(params.get("leaves", []))
    within = tuple(params.get("containers", []))
    experts = params.get("experts")  # None: any; True: expert modules only; False: non-expert only
    contains = params.get("local_contains")
    listed = _listed_targets(ctx) if params.get("listed_in_targets") else None  # only leaves a target list names
    mods = []
    for m in ctx.modules:
        if m.leaf not in leaves and not (contains and contains in (m.local_name or "")):
            continue
        if listed is not None and m.leaf not in listed:
            continue
        if within and not in_containers(ctx, m, within):
            continue
        is_expert = m.expert is not None or m.kind == ModuleKind.FUSED_EXPERTS
        if experts is not None and is_expert != experts:
            continue
        if params.get("fused") is False and m.kind == ModuleKind.FUSED_EXPERTS:  # per-expert 2-D modules only
            continue
        if params.get("not_vision", True) and m.is_vision:
            continue
        mods.append(m)
    if not mods:
        return None
    layers = [m.layer for m in mods if m.layer is not None]
    return {
        "count": len(mods),
        "layers": layers_text(layers) if layers else "-",
        "n_layers": len(set(layers)),
        "leaves": ", ".join(sorted({m.leaf for m in mods})),
        "examples": examples([m.module for m in mods]),
        "keys": module_keys(mods),
    }


def _listed_targets(ctx: Context) -> set[str]:
    """The last components of a list-valued target_modules (empty for `all-linear` or a regex)."""
    targets = ctx.adapter.config.target_modules
    return {t.rsplit(".", 1)[-1] for t in targets} if isinstance(targets, list) else set()


def f_companion_missing(ctx: Context, params: dict):
    """Layers (per container) where one of `present` is adapted but none of `absent` (and none of `unless`). With
    `base_lacks_absent`, only where the base itself has none of `absent` there either (the schema's group of the
    present module has no such slice: a base that reads the present module's output in its place)."""
    if not in_families(ctx, params) or not in_classes(ctx, params):
        return None
    present, absent, unless = set(params["present"]), set(params["absent"]), set(params.get("unless", []))
    by_place: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for m in ctx.modules:
        if m.layer is None or m.is_vision or m.expert is not None:
            continue
        by_place[(m.layer, ctx.container(m))][m.leaf].append(m)
    hit = []
    for (layer, container), leaves in sorted(by_place.items()):
        if present & set(leaves) and not (absent & set(leaves)) and not (unless & set(leaves)):
            hit.append((layer, container, [m for leaf in present & set(leaves) for m in leaves[leaf]]))
    if params.get("base_lacks_absent"):
        hit = [h for h in hit if all(_base_lacks(ctx, m, absent) for m in h[2])]
    if not hit:
        return None
    out = {
        "count": len(hit),
        "layers": layers_text([h[0] for h in hit]),
        "n_layers": len(hit),
        "present": ", ".join(sorted(present)),
        "absent": ", ".join(sorted(absent)),
        "examples": examples([f"{h[2][0].module}" for h in hit]),
        "keys": module_keys([m for h in hit for m in h[2]]),
    }
    if params.get("numbers") == "fused_rows":
        out.update(fused_rows_numbers(ctx, [m for h in hit for m in h[2]], params))
    return out


def _base_lacks(ctx: Context, mod, names: set[str]) -> bool:
    """Whether the base's group at `mod`'s place (the schema, bound to the base config) has no slice named in
    `names`; False without a bound base, where that is unknown."""
    match = ctx.match(mod)
    return match is not None and not any(s.name in names for s in match.group.slices)


def fused_rows_numbers(ctx: Context, present_mods, params: dict) -> dict:
    """What an engine that zero-fills each missing slice of a fused group *shaped like the present one* builds:
    n_slices x the present slice's rows instead of the group's real rows, with the widths from the schema."""
    r = next((m.rank for m in present_mods if m.rank), ctx.adapter.config.r)
    names = sorted(params["present"]) + sorted(params["absent"])
    match = next((x for x in map(ctx.match, present_mods) if x is not None), None)
    if match is not None:
        group, schema_group = match.group, _group_definition(ctx, match.group)
        width = match.expected_out
        actual, expected = len(group.slices) * width, group.out_features
        parts = " + ".join(
            f"{s.name} {s.out_features}" + (f" ({expr})" if expr else "")
            for s, expr in zip(group.slices, _slice_expressions(schema_group, group), strict=True)
        )
        return {
            "shape_detail": f"the fused B becomes [{actual}, {r}] ({len(group.slices)} x {match.canonical} rows) "
            f"instead of [{expected}, {r}] ({parts})",
        }
    width = next((m.out_features for m in present_mods if m.out_features), None)
    if isinstance(width, int):
        return {
            "shape_detail": f"the fused B becomes [{len(names) * width}, {r}] ({len(names)} x "
            f"{'/'.join(sorted(params['present']))} rows) instead of "
            f"[{' + '.join(names)} rows, {r}] (pass --base for the numbers)",
        }
    return {
        "shape_detail": f"the fused B gets {len(names)} x {'/'.join(sorted(params['present']))} rows instead of "
        f"{' + '.join(names)} rows"
    }


def _group_definition(ctx: Context, group):
    return next((g for g in ctx.arch.schema.groups if g.name == group.name and g.path == group.local_path), None)


def _slice_expressions(definition, group) -> list[str | None]:
    """Each slice's `out` expression as the schema writes it (None for a plain field or number: nothing to add)."""
    if definition is None:
        return [None] * len(group.slices)
    return [None if s.out.isdigit() else s.out for s in definition.slices]


def f_router(ctx: Context, params: dict):
    leaves = set(params.get("leaves", ["gate"]))
    mods = [
        m
        for m in ctx.modules
        if (m.leaf in leaves or (m.param or "") in leaves)
        and not m.is_vision
        and m.expert is None
        and m.layer is not None
    ]
    tparams = [t for t in ctx.adapter.config.target_parameters if t.split(".")[-2:-1] == ["gate"] or t == "gate.weight"]
    if not mods and not tparams:
        return None
    return {
        "count": len(mods),
        "layers": layers_text([m.layer for m in mods]) if mods else "-",
        "keys": module_keys(mods) or ["target_parameters"],
        "examples": examples([m.module for m in mods] or tparams),
    }


def f_layers_past_end(ctx: Context, params: dict):
    n = ctx.num_layers()
    if n is None:
        return None
    mods = [m for m in ctx.modules if m.layer is not None and m.layer >= n and not m.is_vision]
    if not mods:
        return None
    return {
        "count": len(mods),
        "layers": layers_text([m.layer for m in mods]),
        "num_layers": n,
        "keys": module_keys(mods),
    }


def f_prefix_mismatch(ctx: Context, params: dict):
    if ctx.arch is None:
        return None
    expected = getattr(ctx.arch, "checkpoint_prefix", None)
    if not expected:
        return None
    # names the engine maps onto each other for this family (a model class's weights mapper); they are the base's
    # only where the base's own layer stack is one of them (Gemma-3: the VL class maps `model.language_model.` to
    # `language_model.model.`, the text-only class maps neither)
    names = set(params.get("equivalent", {}).get(ctx.family or "", []))
    equivalent = names | {expected} if expected in names else {expected}
    if getattr(ctx.arch, "wrapped", False):  # a multimodal wrapper whose text stack the engine also finds by the
        equivalent |= set(params.get("wrapper_text_names", []))  # text model's own names
    mods = [
        m
        for m in ctx.modules
        if m.layer is not None
        and not m.is_vision
        and ((f"{m.stack_prefix}.layers" if m.stack_prefix else "layers") not in equivalent)
    ]
    if not mods:
        return None
    used = sorted({(f"{m.stack_prefix}.layers" if m.stack_prefix else "layers") for m in mods})
    return {"count": len(mods), "used": ", ".join(used), "expected": expected, "keys": module_keys(mods)}


def f_fused_experts(ctx: Context, params: dict):
    if not in_classes(ctx, params) or not in_families(ctx, params):
        return None
    mods = [m for m in ctx.modules if m.kind == ModuleKind.FUSED_EXPERTS]
    if not mods:
        return None
    return {
        "count": len(mods),
        "layers": layers_text([m.layer for m in mods if m.layer is not None]),
        "params": ", ".join(sorted({m.param or "?" for m in mods})),
        "keys": module_keys(mods),
    }


def f_vision(ctx: Context, params: dict):
    """Vision-tower and projector modules. `kinds` / `not_kinds` keep or leave out module kinds (an engine may load
    a vision Linear it does not apply but refuse a vision Embedding); `listed_in_targets` keeps those whose leaf is
    the last component of a name in a list-valued target_modules (an engine that sizes a buffer per target name);
    `with_layer_index` those with `layers.N.` in their path; `not_leaves` leaves out those leaf names; `classes` /
    `not_classes` are conditions on the base's model class."""
    if not in_classes(ctx, params):
        return None
    mods = [m for m in ctx.modules if m.is_vision or (ctx.arch is not None and ctx.arch.vision_module(m.module))]
    mods = [m for m in mods if m.leaf not in params.get("not_leaves", ())]
    if "kinds" in params:
        mods = [m for m in mods if m.kind in params["kinds"]]
    mods = [m for m in mods if m.kind not in params.get("not_kinds", ())]
    if params.get("listed_in_targets"):
        listed = _listed_targets(ctx)
        mods = [m for m in mods if m.leaf in listed]
    if params.get("with_layer_index"):
        mods = [m for m in mods if re.search(r"layers\.\d+\.", m.module + ".")]
    if not mods:
        return None
    return {
        "count": len(mods),
        "examples": examples([m.module for m in mods]),
        "names": ", ".join(sorted({m.leaf for m in mods})),
        "keys": module_keys(mods),
    }
