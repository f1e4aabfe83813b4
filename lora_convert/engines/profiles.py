"""Engine profiles: what a serving engine would do with each feature of an adapter.

The engines' behaviour is data: `lora_convert/engines/<engine>-<version>.json` holds a list of rules, each citing the engine
version it describes and its source (a section of the reference notes, an issue, a PR):

    {"id", "engine_version", "feature", "params"?, "outcome" (a key of codes.ENGINE_OUTCOMES, which gives its
     severity), "message" (with {placeholders} filled from the feature), "fix", "source"}

The rule files are read by `rules.py`; the features are the generic, parameterised detectors of `features/`
(`leaf_present`, `companion_missing`, `partial_row_split`, ...) whose parameters -- which module names, which
slices -- come from the rules, and whose numbers come from the architecture schema. A rule fires when its feature
is present; each fired rule becomes a Finding with code `engine.<engine>.<rule id>`, the outcome and the engine
version in `actual`, and the rule's fix (with ADAPTER replaced by the adapter that was checked).
"""

from __future__ import annotations

import string

from lora_convert.codes import engine_finding
from lora_convert.engines.features import FEATURES
from lora_convert.engines.features.context import MAX_KEYS, Context
from lora_convert.engines.features.row_split import split_modules
from lora_convert.engines.rules import (
    OUTCOMES,
    PLANNED_GROUP,
    engine_info,
    installed_engines,
    load_rules,
    resolve_engine,
)
from lora_convert.findings import Finding

__all__ = [
    "FEATURES",
    "OUTCOMES",
    "compute_features",
    "engine_info",
    "evaluate_engine",
    "load_rules",
    "render",
    "row_energy_modules",
    "rule_finding",
]


# ------------------------------------------------------------------------------------------------ evaluation
class _Values(dict):
    def __missing__(self, key):
        return "{" + key + "}"


def render(template: str, values) -> str:
    """A rule's text with its {placeholders} filled from `values`; a placeholder without a value stays as written."""
    try:
        return string.Formatter().vformat(template, (), _Values(values))
    except (ValueError, IndexError, KeyError, AttributeError):
        return template


def compute_features(engine: str, adapter, arch, text_config: dict | None = None, scan=None) -> dict[str, dict]:
    """rule id -> the feature values that made it fire (for tests and the JSON report)."""
    ctx = Context(adapter, arch, text_config or {}, scan, engine)
    fired = {}
    for rule in load_rules(engine):
        if rule["feature"] == PLANNED_GROUP:  # rules on the normalize plan: lora_convert/check/engine.py
            continue
        values = FEATURES[rule["feature"]](ctx, rule.get("params") or {})
        if values:
            fired[rule["id"]] = values
    return fired


def evaluate_engine(engine: str, adapter, arch, text_config: dict | None = None, scan=None) -> list[Finding]:
    rules = {r["id"]: r for r in load_rules(engine)}
    return [
        rule_finding(engine, rules[rule_id], values, adapter)
        for rule_id, values in compute_features(engine, adapter, arch, text_config, scan).items()
    ]


def rule_finding(engine: str, rule: dict, values: dict, adapter) -> Finding:
    """The finding `engine.<engine>.<rule id>` of a fired rule (a feature rule, or a planned_group rule of
    lora_convert/check/engine.py): its message and fix rendered from the values it fired with, the engine release's
    label, outcome and source in the message, the first MAX_KEYS of its `keys`, ADAPTER in the fix replaced by the
    adapter that was checked."""
    info_ = engine_info(engine)
    spec = adapter.source.spec if getattr(adapter, "source", None) is not None else "ADAPTER"
    values = dict(values)
    values.setdefault("engine", info_.get("engine_name", engine))
    values.setdefault("version", rule["engine_version"])
    message = render(rule["message"], values)
    fix = render(rule["fix"], values).replace("ADAPTER", spec) if rule.get("fix") else None
    label = info_.get("label", rule["engine_version"])
    return engine_finding(
        resolve_engine(engine).engine,
        rule["id"],
        rule["outcome"],
        message=f"[{label}: {rule['outcome']}] {message} (source: {rule['source']})",
        keys=list(values.get("keys", []))[:MAX_KEYS],
        expected="exact",  # every engine finding: what PEFT computes vs what the engine does (its widths, if any,
        actual=rule["outcome"],  # are in the message)
        fix=fix,
    )


def row_energy_modules(adapter, arch) -> list[str]:
    """Modules whose per-row delta norms the data scan should compute: those some engine's `partial_row_split`
    rule is about (the share of the delta in the rows that engine drops)."""
    ctx = Context(adapter, arch, {}, None, "")
    wanted: list[str] = []
    for engine in installed_engines():
        for rule in load_rules(engine):  # the pinned release of each engine
            if rule["feature"] == "partial_row_split":
                wanted += [m.module for m in split_modules(ctx, rule["params"]) if m.module not in wanted]
    return wanted
