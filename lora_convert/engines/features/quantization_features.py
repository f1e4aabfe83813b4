"""Features of the base's quantization: LoRA on modules whose base weights are stored quantized.

Which scheme stores which module comes from the base config's `quantization_config` through
lora_convert/arch/quantization.json (docs/quantization.md); which schemes an engine serves LoRA on, and with which
server flags, comes from the rule's params and message (engines/*.json). Without a bound base nothing fires.
"""

from __future__ import annotations

from lora_convert.arch.expr import evaluate
from lora_convert.arch.quantization import base_quantization
from lora_convert.engines.features.context import Context, examples, in_families, layers_text, module_keys
from lora_convert.errors import SchemaError


def _quantization(ctx: Context):
    if ctx.arch is None:
        return None
    cache = getattr(ctx, "_quantization_cache", None)
    if cache is None:
        cache = (base_quantization(ctx.arch.top_config, ctx.arch.config),)
        ctx._quantization_cache = cache
    return cache[0]


def f_quantized_base(ctx: Context, params: dict):
    """Adapted modules whose base group is quantized by one of `schemes` (scheme ids of quantization.json; absent:
    any known scheme), narrowed to routed experts (`experts: true`) or to everything else (`experts: false`), and
    optionally to `families`, to modules whose local name contains `local_contains` (`shared_experts.`) and to bases
    whose text config satisfies `config_when` (an arch expression; a config without its fields does not)."""
    quant = _quantization(ctx)
    if quant is None or not quant.known or ("families" in params and not in_families(ctx, params)):
        return None
    if "config_when" in params and not _config_satisfies(ctx, params["config_when"]):
        return None
    contains = params.get("local_contains")
    wanted = set(params.get("schemes") or ())
    experts = params.get("experts")
    mods, labels, families = [], [], []
    for m in ctx.modules:
        if m.is_vision or (contains and contains not in (m.local_name or "") + "."):
            continue
        match = ctx.match(m)
        if match is None:
            continue
        is_expert = bool(match.group.experts)
        if experts is not None and is_expert != experts:
            continue
        stored = quant.classify(match.group)
        if stored.scheme is None or (wanted and stored.scheme.scheme.id not in wanted):
            continue
        mods.append(m)
        if stored.scheme.label not in labels:
            labels.append(stored.scheme.label)
        kind = match.group.kind.replace("_", " ")
        if kind not in families:
            families.append(kind)
    if not mods:
        return None
    layers = [m.layer for m in mods if m.layer is not None]
    return {
        "count": len(mods),
        "scheme": "; ".join(labels),
        "method": quant.method,
        "families": ", ".join(families),
        "layers": layers_text(layers) if layers else "-",
        "examples": examples([m.module for m in mods]),
        "keys": module_keys(mods),
    }


def _config_satisfies(ctx: Context, expression: str) -> bool:
    try:
        return bool(evaluate(expression, dict(ctx.arch.config)))
    except (SchemaError, TypeError, ValueError, ZeroDivisionError, KeyError):
        return False


def f_unknown_quantization(ctx: Context, params: dict):
    """A quantized base whose scheme quantization.json does not describe (what the engine does is unknown)."""
    quant = _quantization(ctx)
    if quant is None or quant.known:
        return None
    return {"method": quant.method, "keys": [quant.where]}


def f_quantization_method(ctx: Context, params: dict):
    """A base whose quantization_config names one of `methods` (quant_method values), whatever the adapter targets:
    for an engine that refuses the method when it reads the base's config, before any LoRA is loaded."""
    quant = _quantization(ctx)
    if quant is None or quant.method not in set(params.get("methods") or ()):
        return None
    return {"method": quant.method, "scheme": quant.label, "keys": [quant.where]}
