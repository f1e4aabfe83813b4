"""Features of how an engine sizes a LoRA buffer: from one config field, for layers whose width is another."""

from __future__ import annotations

from lora_convert.engines.features.context import Context, examples, in_classes, module_keys


def engine_targets(ctx: Context, names: dict) -> set[str]:
    """The adapter's targets as an engine that renames PEFT leaves by `names` (q_proj -> qkv_proj) sees them: the
    list-valued target_modules' last components, else the leaves (and 3-D parameters) of its modules."""
    targets = ctx.adapter.config.target_modules
    if isinstance(targets, list):
        return {names.get(t.rsplit(".", 1)[-1], t.rsplit(".", 1)[-1]) for t in targets}
    return {names.get(m.param or m.leaf, m.param or m.leaf) for m in ctx.modules}


def f_buffer_width_differs(ctx: Context, params: dict):
    """The engine allocates the buffer of target `target` `buffer` wide (a base-config field) and also wraps layers
    of that name that are `width` wide (another field): fires when the adapter targets `target` and the base sets
    `width` to something other than `buffer` (or leaves `buffer` unset: the config class's default, a dense-model
    width). params: target, width, buffer, target_names (PEFT leaf -> engine name); `classes` / `not_classes` on the
    base's `architectures` (a model class whose own hidden-dim hook sizes the layer right is left out)."""
    if not in_classes(ctx, params):
        return None
    width = ctx.config.get(params["width"])
    if not isinstance(width, int):
        return None  # the base has no such layers
    buffer = ctx.config.get(params["buffer"])
    if buffer == width:
        return None
    names = params.get("target_names", {})
    target = params["target"]
    if target not in engine_targets(ctx, names):
        return None
    mods = [m for m in ctx.modules if names.get(m.param or m.leaf, m.param or m.leaf) == target]
    return {
        "count": len(mods),
        "target": target,
        "width_field": params["width"],
        "width": width,
        "buffer_field": params["buffer"],
        "buffer": buffer if isinstance(buffer, int) else "unset",
        "examples": examples([m.module for m in mods]) or "target_modules",
        "keys": module_keys(mods) or ["target_modules"],
    }
