"""Strict loading of `schemas/<family>.json` (shipped as `lora_convert.schemas`, read with importlib.resources).

`lora_convert.schemas` is a folder without `__init__.py` (a namespace package): inside the installed package in a
wheel, bound to the checkout's top-level schemas/ by lora_convert/__init__.py otherwise; importlib.resources reads
either the same way (Python 3.10 on; tests/test_import_path.py).

Every file is checked against SCHEMA_SPEC by the one loader of shipped data (lora_convert/io/shipped_data.py: an
unknown key anywhere is a SchemaError that names the file and the key path), then for what the spec cannot say;
every expression is compiled (never evaluated) at load time. The vocabulary is documented in docs/schemas.md.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from lora_convert.arch.expr import compile_expression
from lora_convert.arch.schema_model import GroupDef, HeadCountDef, MergedDef, Schema, SliceDef
from lora_convert.errors import SchemaError
from lora_convert.io.shipped_data import (
    BOOL,
    EXPRESSION,
    STRING,
    Choice,
    ListOf,
    MapOf,
    Nullable,
    Object,
    check,
    fail,
    read_resource,
    shipped_files,
)

SCHEMA_PACKAGE = "lora_convert.schemas"

# The roles a group may play: what engine rules, checks and `inspect` ask of a module, shared by families.
KINDS = frozenset(
    {
        "attention",
        "mla",
        "linear_attention",
        "mamba",
        "mlp",
        "shared_expert",
        "routed_experts",
        "router",
        "latent",
        "embedding",
        "lm_head",
    }
)

# How a 3-D routed-expert parameter is stored (in memory and in the checkpoint): `out_in` is [E, out, in] (most
# transformers-5 MoE classes), `in_out` is [E, in, out] (gpt-oss, Llama-4: the forward computes x @ W[e]).
EXPERT_STORAGE = ("out_in", "in_out")
# Which side of a 3-D parameter PEFT's ParamWrapper puts lora_A on: `in` normally; `out` when the parameter is
# stored [E, in, out] but transformers' experts class lacks `is_transposed` (PEFT then swaps in/out, so lora_A
# [E*r, out] is the output side and lora_B [in, r*E] the input side: Llama-4). peft==0.21.2:
# peft/tuners/lora/layer.py:2436-2439 (swap unless is_transposed), 2565-2568 (delta einsum per orientation).
PEFT_LORA_A_SIDES = ("in", "out")
# How a merged source's output rows are shared among its slices: `consecutive` (slice after slice) or `interleaved`
# (row j belongs to slice j mod n: gpt-oss gate_up, gate = rows 0::2, up = rows 1::2).
MERGED_ROWS = ("consecutive", "interleaved")

# How tensor parallelism splits a group (the `sharding` check asks): `column` splits the output rows (each slice of
# a gated group on its own), `row` the input columns, `replicated` keeps it whole on every rank, and `heads` splits
# it by attention heads, so what must divide is a head count of `tp_head_counts`, not a width.
TP_SPLITS = ("column", "row", "replicated", "heads")

_NAMES = ListOf(STRING, unique=True)
_SLICE = Object(required={"name": STRING, "out": EXPRESSION}, optional={"aliases": _NAMES})
_MERGED = Object(
    required={"name": STRING, "slices": _NAMES, "aliases": _NAMES},
    optional={"rows": Choice(MERGED_ROWS), "base": BOOL},
)
_ANY_GROUP = {
    "path": STRING,
    "kind": Choice(tuple(sorted(KINDS))),
    "tp": Choice(TP_SPLITS),
    "in": EXPRESSION,
    "slices": ListOf(_SLICE, non_empty=True),
}
_GROUP = Object(
    required={**_ANY_GROUP, "on": _NAMES},
    optional={
        "name": STRING,
        "when": EXPRESSION,
        "merged": ListOf(_MERGED),
        "experts": BOOL,
        "gated": Nullable(BOOL),
        "expert_storage": Choice(EXPERT_STORAGE),
        "peft_lora_a": Choice(PEFT_LORA_A_SIDES),
        "peft_cannot_apply": STRING,
    },
    label="path",
)
_TOP_GROUP = Object(
    required=_ANY_GROUP,
    optional={"name": STRING, "when": EXPRESSION, "wrapped_path": STRING, "merged": ListOf(_MERGED)},
    label="path",
)
_HEAD_COUNT = Object(
    required={"count": EXPRESSION, "groups": ListOf(STRING, non_empty=True, unique=True)},
    optional={"slices": _NAMES, "may_replicate": BOOL},
)
_EXPRESSIONS = MapOf(EXPRESSION, non_empty=True)  # name -> expression
SCHEMA_SPEC = Object(
    required={
        "family": STRING,
        "match": Object(optional={"model_type": _NAMES, "architectures": _NAMES, "wrapped_in": _NAMES}),
        "num_layers": EXPRESSION,
        "checkpoint_prefix": STRING,
        "stack_prefixes": _NAMES,
        "layer_types": _EXPRESSIONS,
        "groups": ListOf(_GROUP, non_empty=True),
    },
    optional={
        "text_config": STRING,
        "expert_count": EXPRESSION,
        "shared_expert_count": EXPRESSION,
        "mtp_layers": EXPRESSION,
        "wrapped_checkpoint_prefix": STRING,
        "mtp_prefixes": _NAMES,
        "vision_prefixes": _NAMES,
        "let": _EXPRESSIONS,
        "top_level": ListOf(_TOP_GROUP),
        "tp_head_counts": ListOf(_HEAD_COUNT),
    },
)


class _Semantics:
    """What SCHEMA_SPEC cannot say, checked on a document that fits it: expressions compile, names refer to what
    the schema declares, and the combinations of fields make sense."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, where: str, message: str) -> SchemaError:
        return fail(self.file, where, message)

    def expression(self, value: Any, where: str) -> str | None:
        """The expression's text, compiled (never evaluated); None for an absent optional one."""
        if value is None:
            return None
        text = str(value)
        try:
            compile_expression(text)
        except SchemaError as exc:
            raise self.fail(where, exc.message) from None
        return text

    def expr_map(self, value: dict, where: str) -> tuple[tuple[str, str], ...]:
        return tuple((k, self.expression(v, f"{where}.{k}")) for k, v in value.items())


class _GroupLoader(_Semantics):
    """One group of `groups` or `top_level`: its name, kind, layer types, slices, merged sources and flags."""

    def group(self, obj: dict, where: str, layer_types: set[str], top: bool) -> GroupDef:
        where = f"{where} ({obj['path']})"
        path, kind = obj["path"], obj["kind"]
        slices = self.slices(obj["slices"], f"{where}.slices")
        experts = obj.get("experts", False)
        if experts and kind != "routed_experts":
            raise self.fail(f"{where}.experts", "only groups of kind routed_experts have experts")
        group = GroupDef(
            path=path,
            name=obj.get("name") or self.default_name(path, top),
            kind=kind,
            on=() if top else self.layer_types_of(obj["on"], f"{where}.on", layer_types),
            when=self.expression(obj.get("when"), f"{where}.when"),
            in_=self.expression(obj["in"], f"{where}.in"),
            slices=slices,
            merged=self.merged(obj.get("merged", []), f"{where}.merged", [s.name for s in slices]),
            experts=experts,
            gated=obj.get("gated"),
            expert_storage=obj.get("expert_storage", "out_in"),
            peft_lora_a=obj.get("peft_lora_a", "in"),
            peft_cannot_apply=obj.get("peft_cannot_apply", ""),
            tp=self.tp_split(obj["tp"], f"{where}.tp", kind, top),
            wrapped_path=obj.get("wrapped_path") if top else None,
        )
        self.check_unique_sources(group, where)
        if not experts and ("expert_storage" in obj or "peft_lora_a" in obj):
            raise self.fail(where, "expert_storage and peft_lora_a describe 3-D routed-expert parameters only")
        return group

    def tp_split(self, split: str, where: str, kind: str, top: bool) -> str:
        # tp_head_counts name per-layer groups, and a routed expert is never split by heads.
        if split == "heads" and (top or kind == "routed_experts"):
            raise self.fail(where, "only per-layer groups that are not routed experts can be split by heads")
        return split

    @staticmethod
    def default_name(path: str, top: bool) -> str:
        # `self_attn.qkv_proj` -> `qkv_proj`, `mlp.experts.gate_up_proj` -> `experts.gate_up_proj`;
        # top-level `model.embed_tokens` -> `embed_tokens`.
        return path.rsplit(".", 1)[-1] if top else (path.split(".", 1)[1] if "." in path else path)

    def layer_types_of(self, on: list[str], where: str, declared: set[str]) -> tuple[str, ...]:
        for t in on:
            if t not in declared:
                raise self.fail(where, f"layer type {t!r} is not declared in layer_types")
        return tuple(on)

    def slices(self, value: list[dict], where: str) -> tuple[SliceDef, ...]:
        slices = tuple(
            SliceDef(
                name=s["name"],
                out=self.expression(s["out"], f"{where}[{j}].out"),
                aliases=tuple(s.get("aliases", ())),
            )
            for j, s in enumerate(value)
        )
        names = [s.name for s in slices]
        if len(set(names)) != len(names):
            raise self.fail(where, "two slices share a name")
        return slices

    def merged(self, value: list[dict], where: str, slice_names: list[str]) -> tuple[MergedDef, ...]:
        merged = []
        for j, m in enumerate(value):
            mw = f"{where}[{j}]"
            for n in m["slices"]:
                if n not in slice_names:
                    raise self.fail(f"{mw}.slices", f"names slice {n!r}, which the group does not have")
            interleaved = m.get("rows", "consecutive") == "interleaved"
            if interleaved and len(m["slices"]) < 2:
                raise self.fail(f"{mw}.rows", "interleaved rows need at least two slices")
            merged.append(
                MergedDef(
                    name=m["name"],
                    slices=tuple(m["slices"]),
                    aliases=tuple(m["aliases"]),
                    interleaved=interleaved,
                    base=m.get("base", False),
                )
            )
        return tuple(merged)

    def check_unique_sources(self, group: GroupDef, where: str) -> None:
        seen: set[str] = set()
        for alias, _, _ in group.sources():
            if alias in seen:
                raise self.fail(where, f"source name {alias!r} is listed twice")
            seen.add(alias)


class _SchemaLoader(_GroupLoader):
    """A whole schema file: the top-level keys, the match, the groups and the top-level groups."""

    def schema(self, data: dict, family: str) -> Schema:
        if data["family"] != family:
            raise self.fail("family", f"is {data['family']!r} but the file is named {family}.json")
        match = data["match"]
        if not match.get("model_type") and not match.get("architectures"):
            raise self.fail("match", "needs at least one model_type or architecture")
        layer_types = self.expr_map(data["layer_types"], "layer_types")
        declared_types = {k for k, _ in layer_types}
        groups = self.groups(data["groups"], declared_types)
        return Schema(
            family=family,
            file=self.file,
            model_types=tuple(match.get("model_type", ())),
            architectures=tuple(match.get("architectures", ())),
            wrapped_in=tuple(match.get("wrapped_in", ())),
            text_config=data.get("text_config"),
            num_layers=self.expression(data["num_layers"], "num_layers"),
            expert_count=self.expression(data.get("expert_count"), "expert_count"),
            shared_expert_count=self.expression(data.get("shared_expert_count"), "shared_expert_count"),
            mtp_layers=self.expression(data.get("mtp_layers"), "mtp_layers"),
            checkpoint_prefix=data["checkpoint_prefix"],
            wrapped_checkpoint_prefix=data.get("wrapped_checkpoint_prefix"),
            stack_prefixes=tuple(data["stack_prefixes"]),
            mtp_prefixes=tuple(data.get("mtp_prefixes", ())),
            vision_prefixes=tuple(data.get("vision_prefixes", ())),
            let=self.expr_map(data.get("let", {}), "let"),
            layer_types=layer_types,
            groups=groups,
            top_level=tuple(
                self.group(g, f"top_level[{j}]", declared_types, top=True)
                for j, g in enumerate(data.get("top_level", []))
            ),
            note=data.get("_note"),
            tp_head_counts=self.head_counts(data.get("tp_head_counts"), groups),
        )

    def groups(self, raw: list[dict], declared_types: set[str]) -> tuple[GroupDef, ...]:
        groups = tuple(self.group(g, f"groups[{j}]", declared_types, top=False) for j, g in enumerate(raw))
        paths = [g.path for g in groups]
        # Two groups may share a path only when their `when` conditions differ (e.g. MLA with/without q_lora_rank) or
        # they sit on different layer types (MiniMax: qkv_proj of lightning attention and of softmax attention).
        for p in {p for p in paths if paths.count(p) > 1}:
            same = [g for g in groups if g.path == p]
            for j, first in enumerate(same):
                for second in same[j + 1 :]:
                    if first.when == second.when and set(first.on) & set(second.on):
                        raise self.fail(
                            "groups", f"path {p!r} is declared twice with the same `when` on one layer type"
                        )
        return groups

    def head_counts(self, value: list[dict] | None, groups: tuple[GroupDef, ...]) -> tuple[HeadCountDef, ...]:
        """`tp_head_counts`: every group split by `heads` is named by at least one count, or nothing would check
        how it divides."""
        heads = sorted({g.path for g in groups if g.tp == "heads"})
        if value is None:
            if heads:
                raise self.fail(
                    "top level", f"missing required key 'tp_head_counts' (groups split by heads: {heads[0]})"
                )
            return ()
        counts = tuple(self.head_count(entry, f"tp_head_counts[{j}]", groups) for j, entry in enumerate(value))
        counted = {path for h in counts for path in h.groups}
        for path in heads:
            if path not in counted:
                raise self.fail("tp_head_counts", f"no count covers group {path!r}, which is split by heads")
        return counts

    def head_count(self, entry: dict, where: str, groups: tuple[GroupDef, ...]) -> HeadCountDef:
        """One count, naming groups of this schema (by path) and, optionally, slices of them."""
        named = tuple(entry["groups"])
        paths = {g.path for g in groups}
        for path in named:
            if path not in paths:
                raise self.fail(f"{where}.groups", f"names group {path!r}, which the schema does not have")
        slices = tuple(entry.get("slices", ()))
        known = {s.name for g in groups if g.path in named for s in g.slices}
        for name in slices:
            if name not in known:
                raise self.fail(f"{where}.slices", f"names slice {name!r}, which none of its groups has")
        return HeadCountDef(
            count=self.expression(entry["count"], f"{where}.count"),
            groups=named,
            slices=slices,
            may_replicate=entry.get("may_replicate", False),
        )


def parse_schema(data: Any, family: str, file: str = "<memory>") -> Schema:
    """Check an already-decoded schema document against SCHEMA_SPEC, then its semantics (used by load_schema and by
    tests)."""
    return _SchemaLoader(file).schema(check(data, SCHEMA_SPEC, file), family)


def _schema_files() -> dict[str, Any]:
    return {name[: -len(".json")]: entry for name, entry in shipped_files(SCHEMA_PACKAGE).items()}


def list_schemas() -> list[str]:
    """Every shipped schema family, sorted."""
    return sorted(_schema_files())


@cache
def load_schema(family: str) -> Schema:
    """Load and strictly validate `schemas/<family>.json`. Raises SchemaError naming the file and the key."""
    files = _schema_files()
    if family not in files:
        raise SchemaError(f"No schema named {family!r}.", hint=f"Shipped schemas: {', '.join(sorted(files))}.")
    file = f"schemas/{files[family].name}"
    return parse_schema(read_resource(files[family], file), family, file)


def schema_claiming(config: dict, schemas: list[Schema] | None = None) -> Schema | None:
    """The schema that names `config`'s own model_type, else one of its architectures (no wrapper unwrapped)."""
    schemas = schemas if schemas is not None else [load_schema(f) for f in list_schemas()]
    model_type = config.get("model_type")
    if model_type:
        for s in schemas:
            if model_type in s.model_types:
                return s
    for arch in config.get("architectures") or []:
        for s in schemas:
            if arch in s.architectures:
                return s
    return None
