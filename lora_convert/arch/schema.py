"""Architecture schemas: which LoRA-able modules a base model has, on which layers, with which shapes.

One JSON file per family lives in `schemas/` (shipped as `lora_convert.schemas`) and is read with
`importlib.resources`. Files are validated strictly: an unknown key anywhere is a SchemaError that names the
file and the key path. The vocabulary is documented in docs/schemas.md; in short:

    family, match{model_type, architectures}, text_config, num_layers, expert_count, shared_expert_count,
    mtp_layers, checkpoint_prefix, wrapped_checkpoint_prefix, stack_prefixes, mtp_prefixes, vision_prefixes,
    let{name: expr}, layer_types{type: expr over i}, tp_head_counts[...], groups[...], top_level[...], _note

A group is one LoRA target of the serving layout (a fused `qkv_proj`, `gate_up_proj`, a routed-experts
parameter, a plain `o_proj`): its canonical path after `layers.N.`, its kind (the role it plays), how tensor
parallelism splits it (`tp`), the layer types it sits on, `in` and each slice's `out` as expressions, the source
names (aliases) that map to one slice, and `merged` source names that cover several slices.

This module is the entry point: matching a config to its schema, `bind()`, and the family-wide `source_kinds()`.
The parts live beside it: `schema_model.py` (the dataclasses), `schema_loader.py` (strict loading) and
`architecture.py` (a schema bound to one config). Nothing here imports torch.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from lora_convert.arch.architecture import Architecture
from lora_convert.arch.schema_loader import (
    KINDS,
    SCHEMA_PACKAGE,
    list_schemas,
    load_schema,
    parse_schema,
    schema_claiming,
)
from lora_convert.arch.schema_model import (
    GroupDef,
    GroupSpec,
    Location,
    MergedDef,
    ModuleMatch,
    Schema,
    SliceDef,
    SliceSpec,
)
from lora_convert.errors import BaseConfigError

if TYPE_CHECKING:  # pragma: no cover
    from lora_convert.arch.base_config import BaseConfig

__all__ = [
    "KINDS",
    "SCHEMA_PACKAGE",
    "Architecture",
    "GroupDef",
    "GroupSpec",
    "Location",
    "MergedDef",
    "ModuleMatch",
    "Schema",
    "SliceDef",
    "SliceSpec",
    "bind",
    "list_schemas",
    "load_schema",
    "parse_schema",
    "schema_for_config",
    "source_kinds",
]


def schema_for_config(config: dict) -> Schema:
    """The schema for a config: a family that claims this wrapper around its own text config (`wrapped_in`), then
    by `model_type`, then by `architectures`, then by a wrapper's text config."""
    schemas = [load_schema(f) for f in list_schemas()]
    candidates = [config]
    for name in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(name), dict):
            candidates.append(config[name])
    for inner in candidates[1:]:
        for s in schemas:
            if config.get("model_type") in s.wrapped_in and inner.get("model_type") in s.model_types:
                return s
    for cfg in candidates:
        if (claimed := schema_claiming(cfg, schemas)) is not None:
            return claimed
    raise BaseConfigError(
        f"No schema matches model_type {config.get('model_type')!r} / architectures {config.get('architectures')!r}.",
        hint="`lora-convert schemas list` shows the supported families; a new family needs one JSON file in schemas/.",
    )


def bind(base: BaseConfig | dict, *, schema: Schema | str | None = None) -> Architecture:
    """Bind the matching schema (or the one given) to a base config, unwrapping a wrapper's text config."""
    from lora_convert.arch.base_config import BaseConfig, follow_text_path, unwrap_text_config

    if isinstance(base, BaseConfig):
        top, name = base.config, base.name
    elif isinstance(base, dict):
        top, name = base, str(base.get("_name_or_path") or base.get("model_type") or "<config>")
    else:
        raise TypeError(f"bind() takes a BaseConfig or a dict, not {type(base).__name__}")
    if isinstance(schema, str):
        schema = load_schema(schema)
    if schema is None:
        schema = schema_for_config(top)
    whole = True
    if schema.text_config:
        # an inner wrapper saved on its own (only the path's tail leads to its text config) is not the wrapper whose
        # checkpoint layout `wrapped_checkpoint_prefix` names: it keeps `checkpoint_prefix`
        text, whole = follow_text_path(top, schema.text_config)
    elif _matches(schema, top):
        text = top
    else:  # matched through a wrapper's text config (schema_for_config's fallback): unwrap generically
        text = unwrap_text_config(top)
    return Architecture(schema, text, top_config=top, wrapped=whole and text is not top, name=name)


@cache
def source_kinds() -> dict[str, str]:
    """Source name (an alias after the layer stack, or a top-level path) -> its group's kind, over every shipped
    schema: what a module *is* when no base config is known (`inspect`). A name two families give different kinds
    (`self_attn.q_proj`: attention, or mla in DeepSeek-V3) takes the kind most schemas give it."""
    votes: dict[str, dict[str, int]] = {}
    for family in list_schemas():
        schema = load_schema(family)
        for g in schema.groups + schema.top_level:
            for alias, _, _ in g.sources():
                counts = votes.setdefault(alias, {})
                counts[g.kind] = counts.get(g.kind, 0) + 1
    return {alias: max(sorted(counts), key=counts.__getitem__) for alias, counts in votes.items()}


def _matches(schema: Schema, config: dict) -> bool:
    return config.get("model_type") in schema.model_types or any(
        a in schema.architectures for a in config.get("architectures") or []
    )
