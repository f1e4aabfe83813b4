"""How tensor parallelism splits a LoRA module, and which head counts it must divide, as the schemas say.

Each schema group carries `tp` (column | row | replicated | heads) and the schema lists `tp_head_counts`; see
docs/schemas.md. With a bound architecture the module's own group answers. Without one (no base, a base of an
unknown family, or a module the base does not place), the answer is the one most shipped schemas give the
module's source name, then its last name component, the way `source_kinds()` answers for kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from lora_convert.arch.expr import evaluate
from lora_convert.arch.schema import list_schemas, load_schema
from lora_convert.arch.schema_model import HeadCount
from lora_convert.errors import SchemaError

if TYPE_CHECKING:  # pragma: no cover
    from lora_convert.arch.architecture import Architecture
    from lora_convert.peft.adapter import LoraModule

# A module no schema knows is split like most linear layers in a tensor-parallel block: by output rows.
DEFAULT_SPLIT = "column"


@dataclass(frozen=True)
class Split:
    tp: str  # column | row | replicated | heads
    parts: int = 1  # equal slices of the output rows, each split over the ranks on its own (gate|up of a gated MLP)


def _split_of(tp: str, gated: bool | None, covered: int) -> Split:
    return Split(tp, covered if gated and covered > 1 else 1)


def module_split(module: LoraModule, arch: Architecture | None) -> Split:
    """How tensor parallelism splits `module`: from its group in `arch`, else from the shipped schemas."""
    if arch is not None:
        match = arch.resolve(module)
        if match is not None:
            return _split_of(match.group.tp, match.group.gated, len(match.slice_indices))
    by_name, by_leaf = _shipped_splits()
    name = module.local_name if module.layer is not None else module.module
    return by_name.get(name) or by_leaf.get(module.leaf) or Split(DEFAULT_SPLIT)


def head_counts(arch: Architecture | None, text_config: dict) -> list[HeadCount]:
    """The head counts tensor parallelism must divide: the bound schema's, or (with a config but no schema) every
    shipped schema's count that the config gives, each with the source names of every family that has it."""
    if arch is not None:
        return arch.tp_head_counts()
    if not text_config:
        return []
    found: dict[str, HeadCount] = {}
    for family in list_schemas():
        schema = load_schema(family)
        for h in schema.tp_head_counts:
            value = _count(h.count, text_config)
            if value is None:
                continue
            sources = h.sources(schema.groups)
            known = found.get(h.count)
            if known is not None:
                sources |= known.sources
            found[h.count] = HeadCount(h.count, value, sources, h.may_replicate)
    return list(found.values())


def _count(expression: str, config: dict) -> int | None:
    """A count evaluated against a config with no schema's `let`: a positive integer, or None."""
    try:
        value = evaluate(expression, config)
    except SchemaError:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


@cache
def _shipped_splits() -> tuple[dict[str, Split], dict[str, Split]]:
    """(source name -> split, last name component -> split), each the split most shipped schemas give it."""
    by_name: dict[str, dict[Split, int]] = {}
    by_leaf: dict[str, dict[Split, int]] = {}
    for family in list_schemas():
        schema = load_schema(family)
        for g in schema.groups + schema.top_level:
            for alias, covered, _ in g.sources():
                split = _split_of(g.tp, g.gated, len(covered))
                for table, key in ((by_name, alias), (by_leaf, alias.rsplit(".", 1)[-1])):
                    votes = table.setdefault(key, {})
                    votes[split] = votes.get(split, 0) + 1
    return _winners(by_name), _winners(by_leaf)


def _winners(votes: dict[str, dict[Split, int]]) -> dict[str, Split]:
    return {
        key: max(sorted(counts, key=lambda s: (s.tp, s.parts)), key=counts.__getitem__) for key, counts in votes.items()
    }
