"""Engine rule files (`lora_convert/engines/<engine>.json`), read and validated strictly."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from lora_convert.codes import ENGINE_OUTCOMES
from lora_convert.engines.features import FEATURES
from lora_convert.errors import SchemaError

ENGINE_PACKAGE = "lora_convert.engines"
OUTCOMES = tuple(ENGINE_OUTCOMES)  # the severity of each outcome is written once, in lora_convert/codes.py
RULE_FIELDS = {"id", "engine_version", "feature", "outcome", "message", "fix", "source"}
OPTIONAL_FIELDS = {"params", "_note"}


def installed_engines() -> list[str]:
    """Every engine with a rule file, sorted."""
    return sorted(
        e.name[: -len(".json")] for e in resources.files(ENGINE_PACKAGE).iterdir() if e.name.endswith(".json")
    )


@cache
def load_rules(engine: str) -> tuple[dict, ...]:
    """The rules of one engine, validated: unknown fields, features or outcomes are a SchemaError."""
    rules = _document(engine).get("rules")
    if not isinstance(rules, list):
        raise SchemaError(f"engines/{engine}.json must be an object with a `rules` list.")
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        _check_rule(rule, f"engines/{engine}.json rules[{i}]", seen)
    return tuple(rules)


def engine_info(engine: str) -> dict:
    """The rule file's fields other than its rules (engine name, label, version)."""
    return {k: v for k, v in _document(engine).items() if k != "rules"}


def _document(engine: str) -> dict:
    try:
        text = resources.files(ENGINE_PACKAGE).joinpath(f"{engine}.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SchemaError(f"No engine profile {engine}.json is installed.") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"engines/{engine}.json is not valid JSON ({exc}).") from None
    if not isinstance(doc, dict):
        raise SchemaError(f"engines/{engine}.json must be an object with a `rules` list.")
    return doc


def _check_rule(rule, where: str, seen: set[str]) -> None:
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
    if rule["id"] in seen:
        raise SchemaError(f"{where}: duplicate rule id {rule['id']!r}.")
    seen.add(rule["id"])
