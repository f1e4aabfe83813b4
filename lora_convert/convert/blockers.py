"""Which findings stop `normalize`: one decision, made here for `normalize` itself (lora_convert/convert/plan.py,
before it plans) and for `scan --normalize` (which converts an adapter exactly when this says normalize may).

A finding stops `normalize --layout L` when it counts against the verdict (an error; with `strict`, a warning too)
unless
- normalize decides it module by module: it refuses those modules, or with --drop-unsupported leaves them out,
  listed (the codes registry: `Code.per_module` in lora_convert/codes.py); or
- it is an engine finding `engine.E.<rule>` and L is E's own layout, which rewrites what the rule is about or
  refuses it itself (lora_convert/engines/rules.py `layout_treatment`, from E's rule file). A rule whose modules
  the layout writes unchanged (a property of the base, a server setting) still stops it: the output would carry
  the problem into serving.
"""

from __future__ import annotations

from collections.abc import Iterable

from lora_convert.codes import ENGINE_PREFIX, decided_per_module
from lora_convert.engines.rules import KEEPS, installed_engines, layout_treatment, load_rules
from lora_convert.findings import Finding, Severity

__all__ = ["normalize_blockers"]


def normalize_blockers(
    findings: Iterable[Finding], layout: str | None = None, *, strict: bool = False
) -> list[Finding]:
    """The findings that stop `normalize --layout layout` (None: before any layout is chosen), in their order."""
    fixed = _fixed_by_layout(layout)
    return [f for f in findings if _blocks(f, strict) and not decided_per_module(f.code) and f.code not in fixed]


def _blocks(f: Finding, strict: bool) -> bool:
    """An error blocks; under --strict a warning does too (the severities themselves are the registry's)."""
    return f.severity == Severity.ERROR or (strict and f.severity == Severity.WARNING)


def _fixed_by_layout(layout: str | None) -> frozenset[str]:
    """The engine finding codes that `layout` rewrites or refuses itself (empty for a layout with no engine)."""
    engine = (layout or "").partition("==")[0]
    if engine not in installed_engines():
        return frozenset()
    return frozenset(
        f"{ENGINE_PREFIX}{engine}.{rule['id']}" for rule in load_rules(layout) if layout_treatment(rule) != KEEPS
    )
