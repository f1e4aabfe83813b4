"""The inspect report: what an adapter holds, from headers and config alone (`lora-convert inspect`).

The JSON document (schema version 1; its fields are documented in docs/api.md, section inspect_adapter) is built
here; the CLI renders it.
"""

from __future__ import annotations

from collections import Counter
from operator import attrgetter
from typing import Any

from lora_convert.arch.schema import source_kinds
from lora_convert.codes import PEFT_LAYOUT_CODES, finding
from lora_convert.findings import Finding, has_errors
from lora_convert.peft.adapter import Adapter, LoraModule, ModuleKind, cyclic_gc_paused
from lora_convert.peft.config import PeftConfig


def module_family(mod: LoraModule) -> str:
    """The module's kind for the table. inspect knows no base, so the kind is the one the architecture schemas
    give the module's name (over every shipped family: `arch.schema.source_kinds`); expert modules are
    `routed_experts` and vision-tower ones `vision` whatever their name; a name no schema knows is `other`."""
    if mod.is_vision:
        return "vision"
    if mod.kind == ModuleKind.FUSED_EXPERTS or mod.expert is not None:
        return "routed_experts"
    kind = source_kinds().get(mod.local_name if mod.layer is not None else mod.module)
    if kind is not None:
        return kind
    return "embedding" if mod.kind == ModuleKind.EMBEDDING else "other"


def build_report(adapter: Adapter) -> dict[str, Any]:
    # perf: the report of the 94,000-tensor stress adapter holds ~50,000 module documents; building them with the
    # cyclic collector paused saves its repeated passes over a heap that is all acyclic (docs/benchmarks.md).
    with cyclic_gc_paused():
        return _build_report(adapter)


def _build_report(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    dtypes = Counter(map(attrgetter("dtype"), adapter.index.tensors.values()))
    # perf: the modules are grouped by (family, table name) in one pass, and each entry's numbers are counted
    # over its group afterwards (C-level Counter and set building) rather than updated module by module.
    by_family: dict[str, dict[str, list[LoraModule]]] = {}
    family_of: dict[tuple, str] = {}  # module_family depends only on these (see its docstring)
    for mod in adapter.modules:
        has_layer = mod.layer is not None
        name = mod.local_name if has_layer else mod.module
        what = (name, has_layer, mod.is_vision, mod.kind, mod.expert is not None)
        family = family_of.get(what)
        if family is None:
            family = family_of[what] = module_family(mod)
        names = by_family.get(family)
        if names is None:
            names = by_family[family] = {}
        group = names.get(name)
        if group is None:
            names[name] = [mod]
        else:
            group.append(mod)
    families: dict[str, dict[str, Any]] = {}
    for family, names in sorted(by_family.items()):
        families[family] = {
            "modules": sum(len(mods) for mods in names.values()),
            "entries": [_family_entry(name, names[name]) for name in sorted(names)],
        }
    findings = list(adapter.findings) + inspect_warnings(adapter)
    if adapter.stacked_layout is not None:
        findings = [f for f in findings if f.code not in PEFT_LAYOUT_CODES]
    return {
        "schema_version": 1,
        "ok": not has_errors(findings),
        "adapter": adapter.source.describe(),
        "origin": adapter.source.origin,
        "base_model": cfg.base_model_name_or_path,
        "file_format": adapter.file_format,
        "files": [p.name for p in adapter.files],
        "stacked": adapter.stacked_layout is not None,
        "tensors": len(adapter.index),
        "dtypes": dict(sorted(dtypes.items())),
        "total_bytes": adapter.total_bytes,
        "total_params": adapter.total_params,
        "config": config_section(cfg),
        "expert_layout": adapter.expert_layout,
        "module_count": len(adapter.modules),
        "families": families,
        "modules": [m.to_json() for m in adapter.modules],
        "findings": [f.to_json() for f in findings],
    }


def _family_entry(name: str, mods: list[LoraModule]) -> dict[str, Any]:
    """One row of a family's table: the modules (in adapter order) that share a table name."""
    layers = {m.layer for m in mods}
    layers.discard(None)
    experts = {m.expert for m in mods}
    experts.discard(None)
    for m in mods:
        if m.experts:
            experts.update(range(m.experts))
    ranks = Counter([m.rank for m in mods])
    scalings = Counter([round(m.scaling, 6) if m.scaling_known else None for m in mods])
    return {
        "name": name,
        "count": len(mods),
        "layers": sorted(layers),
        "experts": len(experts) or None,
        "ranks": {_number_key(k): v for k, v in sorted(ranks.items(), key=_none_last)},
        "scalings": {_number_key(k): v for k, v in sorted(scalings.items(), key=_none_last)},
    }


def _none_last(item: tuple) -> tuple:
    return (item[0] is None, item[0] or 0)


def _number_key(value) -> str:
    return "unknown" if value is None else str(value)


CONFIG_SHOWN = (
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "target_parameters",
    "modules_to_save",
    "bias",
    "lora_bias",
)


def config_section(cfg: PeftConfig) -> dict[str, Any]:
    """The config as the file states it: a field that is missing or invalid is null (never the placeholder
    the parser keeps), and `errors` says which key is wrong, expected vs actual."""
    section: dict[str, Any] = {
        "valid": cfg.is_valid,
        "invalid_fields": list(cfg.invalid),
        "errors": [f.to_json() for f in cfg.errors],
    }
    for name in CONFIG_SHOWN:
        section[name] = None if name in cfg.invalid else getattr(cfg, name)
    return section


def inspect_warnings(adapter: Adapter) -> list[Finding]:
    cfg = adapter.config
    out: list[Finding] = []
    dora = [m.module for m in adapter.modules if m.magnitude is not None]
    if cfg.use_dora or dora:
        out.append(
            finding(
                "serving.dora",
                f"DoRA adapter ({len(dora)} magnitude vectors): its delta depends on the base weights; "
                "SGLang and vLLM reject it.",
                keys=dora[:10],
            )
        )
    if cfg.bias != "none" or cfg.lora_bias:
        out.append(
            finding(
                "config.bias",
                f"bias={cfg.bias!r}, lora_bias={cfg.lora_bias}: serving engines ignore or misread bias tensors.",
                keys=["bias"],
            )
        )
    if cfg.modules_to_save:
        out.append(
            finding(
                "config.modules-to-save",
                f"modules_to_save={cfg.modules_to_save}: full module copies are not LoRA; engines reject or ignore them.",
                keys=["modules_to_save"],
            )
        )
    if cfg.has_patterns:
        out.append(
            finding(
                "serving.patterns",
                f"rank_pattern {cfg.rank_pattern or '{}'} / alpha_pattern {cfg.alpha_pattern or '{}'} present: "
                "engines that ignore them serve wrong scales; `normalize` folds them into the tensors.",
                keys=["rank_pattern", "alpha_pattern"],
            )
        )
    for name, description in cfg.variants.items():
        out.append(
            finding(
                "serving.unsupported-variant",
                f"{name} is set: {description}; no serving engine computes this variant.",
                keys=[name],
            )
        )
    return out
