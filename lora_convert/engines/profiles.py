"""Engine profiles: what a serving engine would do with each feature of an adapter.

The engines' behaviour is data: `lora_convert/engines/<engine>.json` holds a list of rules, each citing the engine
version it describes and its source (a section of the reference notes, an issue, a PR):

    {"id", "engine_version", "feature", "params"?, "outcome": exact|wrong|dropped|load-failure, "severity",
     "message" (with {placeholders} filled from the feature), "fix", "source"}

This module computes *features* of the adapter (and of the base architecture, when it resolved): generic,
parameterised detectors (`leaf_present`, `companion_missing`, `pattern_scale`, ...) whose parameters -- which
module names, which config fields -- come from the rules. A rule fires when its feature is present; each fired
rule becomes a Finding with code `engine.<engine>.<rule id>`, the outcome and the engine version in `actual`,
and the rule's fix (with ADAPTER replaced by the adapter that was checked).
"""

from __future__ import annotations

import json
import math
import string
from collections import defaultdict
from functools import lru_cache
from importlib import resources
from typing import Callable

from lora_convert.errors import SchemaError
from lora_convert.findings import Finding, Severity
from lora_convert.text import spans

ENGINE_PACKAGE = "lora_convert.engines"
OUTCOMES = ("exact", "wrong", "dropped", "load-failure")
RULE_FIELDS = {"id", "engine_version", "feature", "outcome", "severity", "message", "fix", "source"}
OPTIONAL_FIELDS = {"params", "_note"}
MAX_EXAMPLES = 3
MAX_KEYS = 50


# ------------------------------------------------------------------------------------------------ rule files
@lru_cache(maxsize=None)
def load_rules(engine: str) -> tuple[dict, ...]:
    """The rules of one engine, validated: unknown fields, features or outcomes are a SchemaError."""
    try:
        text = resources.files(ENGINE_PACKAGE).joinpath(f"{engine}.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SchemaError(f"No engine profile {engine}.json is installed.") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"engines/{engine}.json is not valid JSON ({exc}).") from None
    rules = doc.get("rules") if isinstance(doc, dict) else None
    if not isinstance(rules, list):
        raise SchemaError(f"engines/{engine}.json must be an object with a `rules` list.")
    seen = set()
    for i, rule in enumerate(rules):
        where = f"engines/{engine}.json rules[{i}]"
        if not isinstance(rule, dict):
            raise SchemaError(f"{where} is not an object.")
        missing = RULE_FIELDS - set(rule)
        unknown = set(rule) - RULE_FIELDS - OPTIONAL_FIELDS
        if missing or unknown:
            raise SchemaError(f"{where} ({rule.get('id')}): missing {sorted(missing)}, unknown {sorted(unknown)}.")
        if rule["feature"] not in FEATURES:
            raise SchemaError(f"{where} ({rule['id']}): unknown feature {rule['feature']!r}.")
        if rule["outcome"] not in OUTCOMES:
            raise SchemaError(f"{where} ({rule['id']}): outcome must be one of {OUTCOMES}.")
        if rule["severity"] not in ("error", "warning", "info"):
            raise SchemaError(f"{where} ({rule['id']}): severity must be error, warning or info.")
        if rule["id"] in seen:
            raise SchemaError(f"{where}: duplicate rule id {rule['id']!r}.")
        seen.add(rule["id"])
    return tuple(rules)


def engine_info(engine: str) -> dict:
    text = resources.files(ENGINE_PACKAGE).joinpath(f"{engine}.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    return {k: v for k, v in doc.items() if k != "rules"}


# ------------------------------------------------------------------------------------------------- context
class Context:
    """What the feature detectors look at: the adapter, the architecture (or None), the base text config."""

    def __init__(self, adapter, arch, text_config: dict, scan, engine: str):
        self.adapter = adapter
        self.arch = arch
        self.config = dict(getattr(arch, "config", None) or text_config or {})
        self.scan = scan
        self.engine = engine
        self.family = getattr(arch, "family", None)
        self.modules = [m for m in adapter.modules]

    def num_layers(self) -> int | None:
        if self.arch is not None:
            return int(self.arch.num_layers)
        n = self.config.get("num_hidden_layers")
        return n if isinstance(n, int) else None

    def container(self, mod) -> str:
        """`self_attn` for `self_attn.q_proj`; `mlp.experts` for an expert module."""
        local = mod.local_name or mod.module
        return local.rsplit(".", 1)[0] if "." in local else ""


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_EXAMPLES])
    return shown + (f" (+{len(items) - MAX_EXAMPLES} more)" if len(items) > MAX_EXAMPLES else "")


def _layers_text(layers) -> str:
    return spans(sorted(set(layers)))


def _keys(mods) -> list[str]:
    return [k for m in mods for k in m.keys][:MAX_KEYS]


def _in_families(ctx: Context, params: dict) -> bool:
    families = params.get("families")
    return not families or ctx.family in families or (ctx.family is None and params.get("unknown_family", True))


# ------------------------------------------------------------------------------------------------ features
# Each returns None (absent) or a dict: placeholders for the message, plus "keys" for the finding.
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
    return {"r": cfg.r, "ranks": ", ".join(map(str, ranks)), "factor": factor, "factor_value": round(hi, 4),
            "alpha": f"{cfg.lora_alpha:g}", "keys": ["use_rslora"]}


def _engine_scale(cfg, params: dict) -> float:
    r = cfg.r
    if r <= 0:
        return 0.0
    return cfg.lora_alpha / math.sqrt(r) if (cfg.use_rslora and params.get("rslora_honoured")) else cfg.lora_alpha / r


def f_rank_mismatch(ctx: Context, params: dict):
    cfg = ctx.adapter.config
    mods = [m for m in ctx.modules if m.rank and m.rank != cfg.r and m.kind != "fused_experts"]
    mods += [m for m in ctx.modules if m.kind == "fused_experts" and m.config_rank != cfg.r]
    if not mods:
        return None
    ranks = sorted({m.rank or m.config_rank for m in mods})
    return {"count": len(mods), "r": cfg.r, "ranks": ", ".join(map(str, ranks)),
            "examples": _examples([f"{m.target_name} (r={m.rank or m.config_rank})" for m in mods]), "keys": _keys(mods)}


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
    return {"count": len(wrong), "served": f"{served:g}",
            "factors": ", ".join(f"{f:.3g}x" for f in factors[:6]),
            "examples": _examples([f"{m.target_name} (trained {m.scaling:g}, served {served:g}: {f:.3g}x)" for m, f in wrong]),
            "keys": _keys([m for m, _ in wrong])}


def f_leaf_present(ctx: Context, params: dict):
    if not _in_families(ctx, params):
        return None
    leaves = set(params.get("leaves", []))
    within = tuple(params.get("containers", []))
    experts = params.get("experts")  # None: any; True: expert modules only; False: non-expert only
    mods = []
    for m in ctx.modules:
        if m.leaf not in leaves and not (params.get("local_contains") and params["local_contains"] in (m.local_name or "")):
            continue
        if within and not any(ctx.container(m) == c or ctx.container(m).endswith("." + c) for c in within):
            continue
        is_expert = m.expert is not None or m.kind == "fused_experts"
        if experts is not None and is_expert != experts:
            continue
        if params.get("not_vision", True) and m.is_vision:
            continue
        mods.append(m)
    if not mods:
        return None
    layers = [m.layer for m in mods if m.layer is not None]
    return {"count": len(mods), "layers": _layers_text(layers) if layers else "-", "n_layers": len(set(layers)),
            "leaves": ", ".join(sorted({m.leaf for m in mods})), "examples": _examples([m.module for m in mods]),
            "keys": _keys(mods)}


def f_companion_missing(ctx: Context, params: dict):
    """Layers (per container) where one of `present` is adapted but none of `absent` (and none of `unless`)."""
    if not _in_families(ctx, params):
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
    if not hit:
        return None
    out = {"count": len(hit), "layers": _layers_text([h[0] for h in hit]), "n_layers": len(hit),
           "present": ", ".join(sorted(present)), "absent": ", ".join(sorted(absent)),
           "examples": _examples([f"{h[2][0].module}" for h in hit]), "keys": _keys([m for h in hit for m in h[2]])}
    numbers = params.get("numbers")
    if numbers == "mla_kv_a":
        out.update(_mla_kv_a_numbers(ctx, [m for h in hit for m in h[2]]))
    return out


def _mla_kv_a_numbers(ctx: Context, q_a_mods) -> dict:
    cfg = ctx.config
    q = cfg.get("q_lora_rank")
    if not isinstance(q, int):
        q = next((m.out_features for m in q_a_mods if m.out_features), None)
    kv, rope = cfg.get("kv_lora_rank"), cfg.get("qk_rope_head_dim")
    r = next((m.rank for m in q_a_mods if m.rank), ctx.adapter.config.r)
    if isinstance(q, int) and isinstance(kv, int) and isinstance(rope, int):
        return {"q_lora_rank": q, "expected_rows": q + kv + rope, "actual_rows": 2 * q,
                "shape_detail": f"the fused B becomes [{2 * q}, {r}] (2 x q_lora_rank) instead of "
                                f"[{q + kv + rope}, {r}] (q_lora_rank {q} + kv_lora_rank {kv} + qk_rope_head_dim {rope})"}
    if isinstance(q, int):
        return {"q_lora_rank": q, "actual_rows": 2 * q,
                "shape_detail": f"the fused B becomes [{2 * q}, {r}] (2 x q_lora_rank) instead of "
                                f"[q_lora_rank + kv_lora_rank + qk_rope_head_dim, {r}] (pass --base for the numbers)"}
    return {"shape_detail": "the fused B gets 2 x q_lora_rank rows instead of q_lora_rank + kv_lora_rank + qk_rope_head_dim"}


def f_nemotron_in_proj(ctx: Context, params: dict):
    """Mamba `mixer.in_proj` LoRA (HF/PEFT layout, B over z|x|B|C|dt): which share only z and x carry."""
    if ctx.family is not None and ctx.family not in params.get("families", [ctx.family]):
        return None
    mods = [m for m in ctx.modules if m.leaf == "in_proj" and ctx.container(m).endswith("mixer") and not m.is_vision]
    if not mods:
        return None
    cfg = ctx.config
    heads, head_dim = cfg.get("mamba_num_heads"), cfg.get("mamba_head_dim")
    groups, state = cfg.get("n_groups"), cfg.get("ssm_state_size")
    out = {"count": len(mods), "layers": _layers_text([m.layer for m in mods if m.layer is not None]),
           "keys": _keys(mods), "examples": _examples([m.module for m in mods])}
    if all(isinstance(v, int) for v in (heads, head_dim, groups, state)):
        inner = heads * head_dim
        total = 2 * inner + 2 * groups * state + heads
        kept = 2 * inner
        out.update({"rows_total": total, "rows_kept": kept, "rows_lost": total - kept,
                    "row_share_lost": f"{100 * (total - kept) / total:.1f}%"})
        energy = ctx.scan.row_energy if ctx.scan is not None else {}
        lost = whole = 0.0
        have = 0
        for m in mods:
            rows = energy.get(m.module)
            if rows and len(rows) == total:
                whole += sum(rows)
                lost += sum(rows[kept:])
                have += 1
        if have and whole > 0:
            out["delta_share_lost"] = f"{100 * lost / whole:.1f}%"
            out["share_text"] = (f"{out['delta_share_lost']} of the in_proj delta (squared Frobenius norm of B @ A, over "
                                 f"{have} module(s)) sits in the {total - kept} B/C/dt rows of {total}")
        else:
            out["share_text"] = (f"{total - kept} of the {total} output rows ({out['row_share_lost']}) are B/C/dt rows "
                                 "(run with the data scan on for the share of the delta itself)")
    else:
        out["share_text"] = "the B/C/dt rows (2*n_groups*ssm_state_size + mamba_num_heads of them; pass --base for the numbers)"
    return out


def f_shared_experts_fusion(ctx: Context, params: dict):
    if not _in_families(ctx, params):
        return None
    mods = [m for m in ctx.modules if "shared_experts." in (m.local_name or "") + "." and m.expert is None and not m.is_vision]
    if not mods:
        return None
    cfg = ctx.config
    routed, shared = cfg.get("n_routed_experts"), cfg.get("n_shared_experts")
    fused_by_default = None
    if isinstance(routed, int) and isinstance(shared, int):
        fused_by_default = routed in params.get("fused_routed", []) and shared in params.get("fused_shared", [])
        if not fused_by_default:
            return None
    condition = ("which is on by default for this base "
                 f"({routed} routed experts, {shared} shared)" if fused_by_default else
                 "which is on by default for DeepSeek-V3/Kimi bases with 256 or 384 routed experts and 1 shared expert")
    return {"count": len(mods), "layers": _layers_text([m.layer for m in mods if m.layer is not None]),
            "condition": condition, "keys": _keys(mods), "examples": _examples([m.module for m in mods])}


def f_dora(ctx: Context, params: dict):
    mags = [m for m in ctx.modules if m.magnitude is not None]
    if not ctx.adapter.config.use_dora and not mags:
        return None
    return {"count": len(mags), "keys": _keys(mags) or ["use_dora"]}


def f_added_tokens(ctx: Context, params: dict):
    vocab = ctx.config.get("vocab_size")
    widths = []
    for m in ctx.modules:
        if m.layer is not None or m.lora_A is None or m.lora_B is None:
            continue
        if m.kind == "embedding" or m.leaf in ("embed_tokens", "embeddings", "word_embeddings"):
            widths.append((m, m.lora_A.shape[-1]))
        elif m.leaf in ("lm_head", "output"):
            widths.append((m, m.lora_B.shape[0]))
    added = ctx.adapter.added_tokens or {}
    beyond = [i for i in added.values() if isinstance(vocab, int) and i >= vocab] if isinstance(vocab, int) else list(added.values())
    wide = [(m, w) for m, w in widths if isinstance(vocab, int) and w > vocab]
    if not beyond and not wide:
        return None
    n = max([len(beyond)] + [w - vocab for _, w in wide]) if isinstance(vocab, int) else len(beyond)
    return {"count": n, "vocab": vocab if vocab is not None else "unknown",
            "keys": _keys([m for m, _ in wide]) + (["added_tokens.json"] if beyond else [])}


def f_layers_past_end(ctx: Context, params: dict):
    n = ctx.num_layers()
    if n is None:
        return None
    mods = [m for m in ctx.modules if m.layer is not None and m.layer >= n and not m.is_vision]
    if not mods:
        return None
    return {"count": len(mods), "layers": _layers_text([m.layer for m in mods]), "num_layers": n, "keys": _keys(mods)}


def f_router(ctx: Context, params: dict):
    leaves = set(params.get("leaves", ["gate"]))
    mods = [m for m in ctx.modules if (m.leaf in leaves or (m.param or "") in leaves) and not m.is_vision
            and m.expert is None and m.layer is not None]
    tparams = [t for t in ctx.adapter.config.target_parameters if t.split(".")[-2:-1] == ["gate"] or t == "gate.weight"]
    if not mods and not tparams:
        return None
    return {"count": len(mods), "layers": _layers_text([m.layer for m in mods]) if mods else "-",
            "keys": _keys(mods) or ["target_parameters"], "examples": _examples([m.module for m in mods] or tparams)}


_GATE = {"gate_proj", "w1"}
_UP = {"up_proj", "w3"}
_DOWN = {"down_proj", "w2"}


def _expert_projections(ctx: Context) -> dict[tuple, set[str]]:
    """(layer, container) -> the projections present among the routed experts: gate, up, down."""
    found: dict[tuple, set[str]] = defaultdict(set)
    for m in ctx.modules:
        if m.layer is None or not (m.expert is not None or m.kind == "fused_experts"):
            continue
        place = (m.layer, ctx.container(m) if m.expert is not None else (m.local_name or "").rsplit(".", 1)[0])
        leaf = m.param or m.leaf
        if leaf in _GATE:
            found[place].add("gate")
        elif leaf in _UP:
            found[place].add("up")
        elif leaf in _DOWN:
            found[place].add("down")
        elif leaf == "gate_up_proj":
            found[place] |= {"gate", "up"}
    return found


def _gated(ctx: Context, layer: int) -> bool:
    if ctx.arch is not None:
        try:
            for g in ctx.arch.groups(layer):
                if g.experts and g.gated is not None:
                    return bool(g.gated)
        except Exception:  # noqa: BLE001 - a schema without that layer
            pass
    return ctx.family != "nemotron_h"


def f_partial_expert_projections(ctx: Context, params: dict):
    hits = []
    for (layer, container), present in sorted(_expert_projections(ctx).items()):
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
    mods = [m for m in ctx.modules if m.layer in {h[0] for h in hits} and (m.expert is not None or m.kind == "fused_experts")]
    return {"count": len(hits), "layers": _layers_text([h[0] for h in hits]), "missing": ", ".join(missing), "keys": _keys(mods)}


def f_prefix_mismatch(ctx: Context, params: dict):
    if ctx.arch is None:
        return None
    expected = getattr(ctx.arch, "checkpoint_prefix", None)
    if not expected:
        return None
    equivalent = set(params.get("equivalent", {}).get(ctx.family or "", [])) | {expected}
    mods = [m for m in ctx.modules if m.layer is not None and not m.is_vision
            and ((f"{m.stack_prefix}.layers" if m.stack_prefix else "layers") not in equivalent)]
    if not mods:
        return None
    used = sorted({(f"{m.stack_prefix}.layers" if m.stack_prefix else "layers") for m in mods})
    return {"count": len(mods), "used": ", ".join(used), "expected": expected, "keys": _keys(mods)}


def f_full_weights(ctx: Context, params: dict):
    from lora_convert.peft.naming import Factor

    kinds = {Factor.FULL_WEIGHT, Factor.FULL_BIAS} if params.get("bias", True) else {Factor.FULL_WEIGHT}
    keys = [k for k, p in ctx.adapter.parsed.items() if p.factor in kinds]
    cfg = ctx.adapter.config
    if not keys and not cfg.modules_to_save:
        return None
    return {"count": len(keys), "modules": ", ".join(cfg.modules_to_save) or "-", "keys": keys[:MAX_KEYS] or ["modules_to_save"],
            "examples": _examples(keys)}


def f_bias(ctx: Context, params: dict):
    cfg = ctx.adapter.config
    from lora_convert.peft.naming import Factor

    keys = [k for k, p in ctx.adapter.parsed.items() if p.factor in (Factor.LORA_BIAS, Factor.FULL_BIAS)]
    if not keys and not cfg.lora_bias and cfg.bias == "none":
        return None
    return {"count": len(keys), "bias": cfg.bias, "lora_bias": cfg.lora_bias, "keys": keys[:MAX_KEYS] or ["bias", "lora_bias"],
            "examples": _examples(keys)}


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


def f_fused_experts(ctx: Context, params: dict):
    mods = [m for m in ctx.modules if m.kind == "fused_experts"]
    if not mods:
        return None
    return {"count": len(mods), "layers": _layers_text([m.layer for m in mods if m.layer is not None]),
            "params": ", ".join(sorted({m.param or "?" for m in mods})), "keys": _keys(mods)}


def f_vision(ctx: Context, params: dict):
    mods = [m for m in ctx.modules if m.is_vision or (ctx.arch is not None and ctx.arch.vision_module(m.module))]
    if params.get("with_layer_index"):
        import re

        mods = [m for m in mods if re.search(r"layers\.\d+\.", m.module + ".")]
    if not mods:
        return None
    return {"count": len(mods), "examples": _examples([m.module for m in mods]), "keys": _keys(mods)}


def f_adapter_name(ctx: Context, params: dict):
    keys = [k for k, p in ctx.adapter.parsed.items() if p.adapter_name is not None and p.factor.value.startswith("lora_")]
    if not keys:
        return None
    return {"count": len(keys), "name": sorted({ctx.adapter.parsed[k].adapter_name for k in keys})[0], "keys": keys[:MAX_KEYS]}


def f_max_rank(ctx: Context, params: dict):
    ranks = [m.rank or m.config_rank for m in ctx.modules if (m.rank or m.config_rank)]
    top = max(ranks + [ctx.adapter.config.r])
    if top <= params.get("above", 0):
        return None
    allowed = params.get("allowed", [])
    suggestion = next((a for a in allowed if a >= top), top)
    return {"rank": top, "suggested": suggestion, "keys": ["r"]}


FEATURES: dict[str, Callable[[Context, dict], dict | None]] = {
    "config_flag": f_config_flag,
    "rslora": f_rslora,
    "rank_mismatch": f_rank_mismatch,
    "pattern_scale": f_pattern_scale,
    "leaf_present": f_leaf_present,
    "companion_missing": f_companion_missing,
    "nemotron_in_proj": f_nemotron_in_proj,
    "shared_experts_fusion": f_shared_experts_fusion,
    "dora": f_dora,
    "added_tokens": f_added_tokens,
    "layers_past_end": f_layers_past_end,
    "router_lora": f_router,
    "partial_expert_projections": f_partial_expert_projections,
    "prefix_mismatch": f_prefix_mismatch,
    "full_weights": f_full_weights,
    "bias": f_bias,
    "target_names": f_target_names,
    "regex_targets": f_regex_targets,
    "fused_experts": f_fused_experts,
    "vision_modules": f_vision,
    "adapter_name_segment": f_adapter_name,
    "max_rank": f_max_rank,
}


# ------------------------------------------------------------------------------------------------ evaluation
class _Values(dict):
    def __missing__(self, key):
        return "{" + key + "}"


def _render(template: str, values: dict) -> str:
    try:
        return string.Formatter().vformat(template, (), _Values(values))
    except (ValueError, IndexError, KeyError, AttributeError):
        return template


def compute_features(engine: str, adapter, arch, text_config: dict | None = None, scan=None) -> dict[str, dict]:
    """rule id -> the feature values that made it fire (for tests and the JSON report)."""
    ctx = Context(adapter, arch, text_config or {}, scan, engine)
    fired = {}
    for rule in load_rules(engine):
        values = FEATURES[rule["feature"]](ctx, rule.get("params") or {})
        if values:
            fired[rule["id"]] = values
    return fired


def evaluate_engine(engine: str, adapter, arch, text_config: dict | None = None, scan=None) -> list[Finding]:
    info_ = engine_info(engine)
    findings = []
    spec = adapter.source.spec if getattr(adapter, "source", None) is not None else "ADAPTER"
    rules = {r["id"]: r for r in load_rules(engine)}
    for rule_id, values in compute_features(engine, adapter, arch, text_config, scan).items():
        rule = rules[rule_id]
        values = dict(values)
        values.setdefault("engine", info_.get("engine_name", engine))
        values.setdefault("version", rule["engine_version"])
        message = _render(rule["message"], values)
        fix = _render(rule["fix"], values).replace("ADAPTER", spec) if rule.get("fix") else None
        findings.append(Finding(
            code=f"engine.{engine}.{rule_id}",
            severity=Severity(rule["severity"]),
            message=f"[{info_.get('label', rule['engine_version'])}: {rule['outcome']}] {message} (source: {rule['source']})",
            keys=list(values.get("keys", []))[:MAX_KEYS],
            expected=values.get("expected_rows", "exact"),
            actual=values.get("actual_rows", rule["outcome"]),
            fix=fix,
        ))
    return findings


def row_energy_modules(adapter, arch) -> list[str]:
    """Modules whose per-row delta norms the data scan should compute (Nemotron-H mamba in_proj)."""
    return [m.module for m in adapter.modules if m.leaf == "in_proj" and (m.local_name or "").startswith("mixer.")]
