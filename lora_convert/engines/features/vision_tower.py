"""Features of the base's vision tower as an engine builds it: text-layer LoRA that lands on vision layers too."""

from __future__ import annotations

from lora_convert.engines.features.buffer_width import engine_targets
from lora_convert.engines.features.context import Context, examples, layers_text, module_keys


def f_vision_layers_targeted(ctx: Context, params: dict):
    """Text modules whose target name is also the leaf of a vision-tower linear that sits under `layers.N.` in the
    engine's vision encoder, at a layer index that encoder has. An engine that wraps every module whose leaf is a
    target (no per-model filter) and files it by its `layers.N.` index puts the vision linear of layer N next to the
    text one, and loads the text module's LoRA into it.

    params: `vision_linears` maps the base's `vision_config.model_type` to the leaves of those vision linears (as
    the engine names them); `target_names` maps a PEFT target leaf to the engine's name for it (q_proj -> qkv_proj).
    The adapter's targets: buffer_width.engine_targets."""
    top = getattr(ctx.arch, "top_config", None) or {}
    vision = top.get("vision_config") if isinstance(top, dict) else None
    if not isinstance(vision, dict):
        return None
    linears = set(params.get("vision_linears", {}).get(vision.get("model_type"), ()))
    depth = vision.get("num_hidden_layers")
    if not linears or not isinstance(depth, int):
        return None
    names = params.get("target_names", {})

    def engine_name(leaf: str) -> str:
        return names.get(leaf, leaf)

    shared = linears & engine_targets(ctx, names)
    mods = [
        m
        for m in ctx.modules
        if not m.is_vision
        and m.expert is None
        and m.layer is not None
        and m.layer < depth
        and engine_name(m.leaf) in shared
    ]
    if not mods:
        return None
    return {
        "count": len(mods),
        "layers": layers_text([m.layer for m in mods]),
        "names": ", ".join(sorted({engine_name(m.leaf) for m in mods})),
        "vision_type": vision.get("model_type"),
        "vision_layers": depth,
        "examples": examples([m.module for m in mods]),
        "keys": module_keys(mods),
    }
