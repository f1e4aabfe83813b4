"""Features of adapter_config.json and of the adapter as a whole: scaling, ranks, variants, extra tensors."""

from __future__ import annotations

import math

from lora_convert.engines.features.context import MAX_KEYS, Context, examples, module_keys
from lora_convert.peft.adapter import ModuleKind


def f_config_flag(ctx: Context, params: dict):
    cfg = ctx.adapter.config
    value = getattr(cfg, params["field"], None)
    if not value or value == "none":
        return None
    return {"value": value, "keys": [params["field"]]}


def f_rslora(ctx: Context, params: dict):
    cfg = ctx.adapter.config
    if not cfg.use_rslora:
        return None
    ranks = sorted({m.rank for m in ctx.modules if m.rank} or {cfg.r})
    lo, hi = math.sqrt(ranks[0]), math.sqrt(ranks[-1])
    factor = f"{hi:.2f}" if lo == hi else f"{lo:.2f} to {hi:.2f}"
    return {
        "r": cfg.r,
        "ranks": ", ".join(map(str, ranks)),
        "factor": factor,
        "factor_value": round(hi, 4),
        "alpha": f"{cfg.lora_alpha:g}",
        "keys": ["use_rslora"],
    }


def _engine_scale(cfg, params: dict) -> float:
    r = cfg.r
    if r <= 0:
        return 0.0
    return cfg.lora_alpha / math.sqrt(r) if (cfg.use_rslora and params.get("rslora_honoured")) else cfg.lora_alpha / r


def f_rank_mismatch(ctx: Context, params: dict):
    cfg = ctx.adapter.config
    mods = [m for m in ctx.modules if m.rank and m.rank != cfg.r and m.kind != ModuleKind.FUSED_EXPERTS]
    mods += [m for m in ctx.modules if m.kind == ModuleKind.FUSED_EXPERTS and m.config_rank != cfg.r]
    if not mods:
        return None
    ranks = sorted({m.rank or m.config_rank for m in mods})
    return {
        "count": len(mods),
        "r": cfg.r,
        "ranks": ", ".join(map(str, ranks)),
        "examples": examples([f"{m.target_name} (r={m.rank or m.config_rank})" for m in mods]),
        "keys": module_keys(mods),
    }


def f_pattern_scale(ctx: Context, params: dict):
    """Modules whose PEFT scaling differs from the one scaling the engine applies (alpha/r from the top level)."""
    cfg = ctx.adapter.config
    if not cfg.has_patterns:
        return None
    served = _engine_scale(cfg, params)
    wrong = []
    for m in ctx.modules:
        if params.get("only_matching_rank") and (m.rank or m.config_rank) != cfg.r:
            continue
        trained = m.scaling
        if trained and not math.isclose(served, trained, rel_tol=1e-6):
            wrong.append((m, served / trained))
    if not wrong:
        return None
    factors = sorted({round(f, 4) for _, f in wrong})
    return {
        "count": len(wrong),
        "served": f"{served:g}",
        "factors": ", ".join(f"{f:.3g}x" for f in factors[:6]),
        "examples": examples(
            [f"{m.target_name} (trained {m.scaling:g}, served {served:g}: {f:.3g}x)" for m, f in wrong]
        ),
        "keys": module_keys([m for m, _ in wrong]),
    }


def f_dora(ctx: Context, params: dict):
    mags = [m for m in ctx.modules if m.magnitude is not None]
    if not ctx.adapter.config.use_dora and not mags:
        return None
    return {"count": len(mags), "keys": module_keys(mags) or ["use_dora"]}


def f_added_tokens(ctx: Context, params: dict):
    vocab = ctx.config.get("vocab_size")
    widths = []
    for m in ctx.modules:
        if m.layer is not None or m.lora_A is None or m.lora_B is None:
            continue
        if m.kind == ModuleKind.EMBEDDING or m.leaf in ("embed_tokens", "embeddings", "word_embeddings"):
            widths.append((m, m.lora_A.shape[-1]))
        elif m.leaf in ("lm_head", "output"):
            widths.append((m, m.lora_B.shape[0]))
    added = ctx.adapter.added_tokens or {}
    beyond = (
        [i for i in added.values() if isinstance(vocab, int) and i >= vocab]
        if isinstance(vocab, int)
        else list(added.values())
    )
    wide = [(m, w) for m, w in widths if isinstance(vocab, int) and w > vocab]
    if params.get("widths_only"):  # an engine that never reads added_tokens.json, only the factors' widths
        beyond = []
    if not beyond and not wide:
        return None
    n = max([len(beyond)] + [w - vocab for _, w in wide]) if isinstance(vocab, int) else len(beyond)
    return {
        "count": n,
        "vocab": vocab if vocab is not None else "unknown",
        "keys": module_keys([m for m, _ in wide]) + (["added_tokens.json"] if beyond else []),
    }


def f_full_weights(ctx: Context, params: dict):
    from lora_convert.peft.naming import Factor

    kinds = {Factor.FULL_WEIGHT, Factor.FULL_BIAS} if params.get("bias", True) else {Factor.FULL_WEIGHT}
    keys = [k for k, p in ctx.adapter.parsed.items() if p.factor in kinds]
    in_layers = params.get("in_layers")  # None: any; True/False: only whole weights inside / outside a layer
    if in_layers is not None:
        keys = [k for k in keys if (ctx.adapter.parsed[k].layer is not None) == in_layers]
        if not keys:
            return None
    cfg = ctx.adapter.config
    if not keys and not cfg.modules_to_save:
        return None
    return {
        "count": len(keys),
        "modules": ", ".join(cfg.modules_to_save) or "-",
        "keys": keys[:MAX_KEYS] or ["modules_to_save"],
        "examples": examples(keys),
    }


def f_bias(ctx: Context, params: dict):
    from lora_convert.peft.naming import Factor

    cfg = ctx.adapter.config
    keys = [k for k, p in ctx.adapter.parsed.items() if p.factor in (Factor.LORA_BIAS, Factor.FULL_BIAS)]
    if not keys and not cfg.lora_bias and cfg.bias == "none":
        return None
    return {
        "count": len(keys),
        "bias": cfg.bias,
        "lora_bias": cfg.lora_bias,
        "keys": keys[:MAX_KEYS] or ["bias", "lora_bias"],
        "examples": examples(keys),
    }


def f_target_names(ctx: Context, params: dict):
    targets = ctx.adapter.config.target_modules
    if not isinstance(targets, list):
        return None
    names = set(params["names"])
    hit = sorted({t for t in targets if t.rsplit(".", 1)[-1] in names})
    if not hit:
        return None
    return {"names": ", ".join(hit), "keys": ["target_modules"]}


def f_regex_targets(ctx: Context, params: dict):
    targets = ctx.adapter.config.target_modules
    if not isinstance(targets, str) or targets in params.get("allowed", []):
        return None
    return {"pattern": targets, "keys": ["target_modules"]}


def f_adapter_name(ctx: Context, params: dict):
    keys = [
        k for k, p in ctx.adapter.parsed.items() if p.adapter_name is not None and p.factor.value.startswith("lora_")
    ]
    if not keys:
        return None
    return {
        "count": len(keys),
        "name": sorted({ctx.adapter.parsed[k].adapter_name for k in keys})[0],
        "keys": keys[:MAX_KEYS],
    }


def f_max_rank(ctx: Context, params: dict):
    ranks = [m.rank or m.config_rank for m in ctx.modules if (m.rank or m.config_rank)]
    top = max(ranks + [ctx.adapter.config.r])
    if top <= params.get("above", 0):
        return None
    allowed = params.get("allowed", [])
    suggestion = next((a for a in allowed if a >= top), top)
    return {"rank": top, "suggested": suggestion, "keys": ["r"]}
