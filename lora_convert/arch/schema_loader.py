"""Strict loading of `schemas/<family>.json` (shipped as `lora_convert.schemas`, read with importlib.resources).

`lora_convert.schemas` is a folder without `__init__.py` (a namespace package): inside the installed package in a
wheel, bound to the checkout's top-level schemas/ by lora_convert/__init__.py otherwise; importlib.resources reads
either the same way (Python 3.10 on; tests/test_import_path.py).

An unknown key anywhere is a SchemaError that names the file and the key path; every expression is compiled
(never evaluated) at load time. The vocabulary is documented in docs/schemas.md.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from lora_convert.arch.expr import compile_expression
from lora_convert.arch.schema_model import GroupDef, HeadCountDef, MergedDef, Schema, SliceDef
from lora_convert.errors import SchemaError

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

_TOP_REQUIRED = {"family", "match", "num_layers", "checkpoint_prefix", "stack_prefixes", "layer_types", "groups"}
_TOP_OPTIONAL = {
    "_note",
    "text_config",
    "expert_count",
    "shared_expert_count",
    "mtp_layers",
    "wrapped_checkpoint_prefix",
    "mtp_prefixes",
    "vision_prefixes",
    "let",
    "top_level",
    "tp_head_counts",
}
_GROUP_REQUIRED = {"path", "kind", "tp", "on", "in", "slices"}
_GROUP_OPTIONAL = {"_note", "name", "when", "merged", "experts", "gated", "expert_storage", "peft_lora_a"}
_TOP_GROUP_REQUIRED = {"path", "kind", "tp", "in", "slices"}
_TOP_GROUP_OPTIONAL = {"_note", "name", "when", "wrapped_path", "merged"}
_SLICE_REQUIRED = {"name", "out"}
_SLICE_OPTIONAL = {"_note", "aliases"}
_MERGED_REQUIRED = {"name", "slices", "aliases"}
_MERGED_OPTIONAL = {"_note", "rows", "base"}
_MATCH_KEYS = {"model_type", "architectures"}
_HEAD_COUNT_REQUIRED = {"count", "groups"}
_HEAD_COUNT_OPTIONAL = {"_note", "slices", "may_replicate"}


class _Validator:
    """The JSON primitives of a schema file, each checked strictly with the key path in the message."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, where: str, message: str) -> SchemaError:
        return SchemaError(
            f"Schema file {self.file}: {where}: {message}",
            hint="Fix the file; `lora-convert schemas check` validates every shipped schema.",
        )

    def keys(self, obj: Any, where: str, required: set[str], optional: set[str]) -> dict:
        if not isinstance(obj, dict):
            raise self.fail(where, f"expected an object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - required - optional)
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(required | optional))})")
        missing = sorted(required - set(obj))
        if missing:
            raise self.fail(where, f"missing required key {missing[0]!r}")
        if "_note" in obj and not isinstance(obj["_note"], str):
            raise self.fail(f"{where}._note", "must be a string")
        return obj

    def string(self, value: Any, where: str, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"expected a non-empty string, got {value!r}")
        return value

    def strings(self, value: Any, where: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(where, f"expected a list of non-empty strings, got {value!r}")
        if len(set(value)) != len(value):
            raise self.fail(where, "lists the same string twice")
        return tuple(value)

    def expression(self, value: Any, where: str, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.fail(where, f"expected an expression (string or integer), got {value!r}")
        text = str(value)
        try:
            compile_expression(text)
        except SchemaError as exc:
            raise self.fail(where, exc.message) from None
        return text

    def expr_map(self, value: Any, where: str) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict) or not value:
            raise self.fail(where, "expected a non-empty object of name -> expression")
        return tuple((k, self.expression(v, f"{where}.{k}")) for k, v in value.items())

    def non_empty_list(self, value: Any, where: str, what: str) -> list:
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"expected a non-empty list{what}")
        return value


class _GroupLoader(_Validator):
    """One group of `groups` or `top_level`: its name, kind, layer types, slices, merged sources and flags."""

    def group(self, obj: Any, where: str, layer_types: set[str], top: bool) -> GroupDef:
        req, opt = (_TOP_GROUP_REQUIRED, _TOP_GROUP_OPTIONAL) if top else (_GROUP_REQUIRED, _GROUP_OPTIONAL)
        if isinstance(obj, dict) and isinstance(obj.get("path"), str):
            where = f"{where} ({obj['path']})"
        obj = self.keys(obj, where, req, opt)
        path = self.string(obj["path"], f"{where}.path")
        kind = self.kind(obj["kind"], f"{where}.kind")
        slices = self.slices(obj["slices"], f"{where}.slices")
        experts, gated = self.flags(obj, where, kind)
        group = GroupDef(
            path=path,
            name=self.group_name(obj.get("name"), path, where, top),
            kind=kind,
            on=() if top else self.layer_types_of(obj["on"], f"{where}.on", layer_types),
            when=self.expression(obj.get("when"), f"{where}.when", optional=True),
            in_=self.expression(obj["in"], f"{where}.in"),
            slices=slices,
            merged=self.merged(obj.get("merged", []), f"{where}.merged", [s.name for s in slices]),
            experts=experts,
            gated=gated,
            expert_storage=self.choice(obj.get("expert_storage", "out_in"), f"{where}.expert_storage", EXPERT_STORAGE),
            peft_lora_a=self.choice(obj.get("peft_lora_a", "in"), f"{where}.peft_lora_a", PEFT_LORA_A_SIDES),
            tp=self.tp_split(obj["tp"], f"{where}.tp", kind, top),
            wrapped_path=self.string(obj.get("wrapped_path"), f"{where}.wrapped_path", optional=True) if top else None,
        )
        self.check_unique_sources(group, where)
        if not experts and ("expert_storage" in obj or "peft_lora_a" in obj):
            raise self.fail(where, "expert_storage and peft_lora_a describe 3-D routed-expert parameters only")
        return group

    def flag(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, "expected true or false")
        return value

    def choice(self, value: Any, where: str, allowed: tuple[str, ...]) -> str:
        text = self.string(value, where)
        if text not in allowed:
            raise self.fail(where, f"unknown value {text!r} (known: {', '.join(allowed)})")
        return text

    def kind(self, value: Any, where: str) -> str:
        kind = self.string(value, where)
        if kind not in KINDS:
            raise self.fail(where, f"unknown kind {kind!r} (known: {', '.join(sorted(KINDS))})")
        return kind

    def tp_split(self, value: Any, where: str, kind: str, top: bool) -> str:
        split = self.string(value, where)
        if split not in TP_SPLITS:
            raise self.fail(where, f"unknown tensor-parallel split {split!r} (known: {', '.join(TP_SPLITS)})")
        # tp_head_counts name per-layer groups, and a routed expert is never split by heads.
        if split == "heads" and (top or kind == "routed_experts"):
            raise self.fail(where, "only per-layer groups that are not routed experts can be split by heads")
        return split

    def group_name(self, value: Any, path: str, where: str, top: bool) -> str:
        name = self.string(value, f"{where}.name", optional=True)
        if name is not None:
            return name
        # `self_attn.qkv_proj` -> `qkv_proj`, `mlp.experts.gate_up_proj` -> `experts.gate_up_proj`;
        # top-level `model.embed_tokens` -> `embed_tokens`.
        return path.rsplit(".", 1)[-1] if top else (path.split(".", 1)[1] if "." in path else path)

    def layer_types_of(self, value: Any, where: str, declared: set[str]) -> tuple[str, ...]:
        on = self.strings(value, where)
        for t in on:
            if t not in declared:
                raise self.fail(where, f"layer type {t!r} is not declared in layer_types")
        return on

    def slices(self, value: Any, where: str) -> tuple[SliceDef, ...]:
        slices = []
        for j, s in enumerate(self.non_empty_list(value, where, " of slices")):
            sw = f"{where}[{j}]"
            s = self.keys(s, sw, _SLICE_REQUIRED, _SLICE_OPTIONAL)
            slices.append(
                SliceDef(
                    name=self.string(s["name"], f"{sw}.name"),
                    out=self.expression(s["out"], f"{sw}.out"),
                    aliases=self.strings(s.get("aliases", []), f"{sw}.aliases"),
                )
            )
        names = [s.name for s in slices]
        if len(set(names)) != len(names):
            raise self.fail(where, "two slices share a name")
        return tuple(slices)

    def merged(self, value: Any, where: str, slice_names: list[str]) -> tuple[MergedDef, ...]:
        if not isinstance(value, list):
            raise self.fail(where, "expected a list")
        merged = []
        for j, m in enumerate(value):
            mw = f"{where}[{j}]"
            m = self.keys(m, mw, _MERGED_REQUIRED, _MERGED_OPTIONAL)
            covered = self.strings(m["slices"], f"{mw}.slices")
            for n in covered:
                if n not in slice_names:
                    raise self.fail(f"{mw}.slices", f"names slice {n!r}, which the group does not have")
            rows = self.choice(m.get("rows", "consecutive"), f"{mw}.rows", MERGED_ROWS)
            if rows == "interleaved" and len(covered) < 2:
                raise self.fail(f"{mw}.rows", "interleaved rows need at least two slices")
            merged.append(
                MergedDef(
                    name=self.string(m["name"], f"{mw}.name"),
                    slices=covered,
                    aliases=self.strings(m["aliases"], f"{mw}.aliases"),
                    interleaved=rows == "interleaved",
                    base=self.flag(m.get("base", False), f"{mw}.base"),
                )
            )
        return tuple(merged)

    def flags(self, obj: dict, where: str, kind: str) -> tuple[bool, bool | None]:
        experts = obj.get("experts", False)
        if not isinstance(experts, bool):
            raise self.fail(f"{where}.experts", "expected true or false")
        gated = obj.get("gated")
        if gated is not None and not isinstance(gated, bool):
            raise self.fail(f"{where}.gated", "expected true, false or null")
        if experts and kind != "routed_experts":
            raise self.fail(f"{where}.experts", "only groups of kind routed_experts have experts")
        return experts, gated

    def check_unique_sources(self, group: GroupDef, where: str) -> None:
        seen: set[str] = set()
        for alias, _, _ in group.sources():
            if alias in seen:
                raise self.fail(where, f"source name {alias!r} is listed twice")
            seen.add(alias)


class _SchemaLoader(_GroupLoader):
    """A whole schema file: the top-level keys, the match, the groups and the top-level groups."""

    def schema(self, data: Any, family: str) -> Schema:
        data = self.keys(data, "top level", _TOP_REQUIRED, _TOP_OPTIONAL)
        declared = self.string(data["family"], "family")
        if declared != family:
            raise self.fail("family", f"is {declared!r} but the file is named {family}.json")
        model_types, architectures = self.match(data["match"])
        layer_types = self.expr_map(data["layer_types"], "layer_types")
        declared_types = {k for k, _ in layer_types}
        groups = self.groups(data["groups"], declared_types)
        return Schema(
            family=family,
            file=self.file,
            model_types=model_types,
            architectures=architectures,
            text_config=self.string(data.get("text_config"), "text_config", optional=True),
            num_layers=self.expression(data["num_layers"], "num_layers"),
            expert_count=self.expression(data.get("expert_count"), "expert_count", optional=True),
            shared_expert_count=self.expression(data.get("shared_expert_count"), "shared_expert_count", optional=True),
            mtp_layers=self.expression(data.get("mtp_layers"), "mtp_layers", optional=True),
            checkpoint_prefix=self.string(data["checkpoint_prefix"], "checkpoint_prefix"),
            wrapped_checkpoint_prefix=self.string(
                data.get("wrapped_checkpoint_prefix"), "wrapped_checkpoint_prefix", optional=True
            ),
            stack_prefixes=self.strings(data["stack_prefixes"], "stack_prefixes"),
            mtp_prefixes=self.strings(data.get("mtp_prefixes", []), "mtp_prefixes"),
            vision_prefixes=self.strings(data.get("vision_prefixes", []), "vision_prefixes"),
            let=self.expr_map(data["let"], "let") if "let" in data else (),
            layer_types=layer_types,
            groups=groups,
            top_level=self.top_level(data.get("top_level", []), declared_types),
            note=data.get("_note"),
            tp_head_counts=self.head_counts(data.get("tp_head_counts"), groups),
        )

    def match(self, value: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        match = self.keys(value, "match", set(), _MATCH_KEYS)
        model_types = self.strings(match.get("model_type", []), "match.model_type")
        architectures = self.strings(match.get("architectures", []), "match.architectures")
        if not model_types and not architectures:
            raise self.fail("match", "needs at least one model_type or architecture")
        return model_types, architectures

    def groups(self, value: Any, declared_types: set[str]) -> tuple[GroupDef, ...]:
        raw = self.non_empty_list(value, "groups", "")
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

    def head_counts(self, value: Any, groups: tuple[GroupDef, ...]) -> tuple[HeadCountDef, ...]:
        """`tp_head_counts`: every group split by `heads` is named by at least one count, or nothing would check
        how it divides."""
        heads = sorted({g.path for g in groups if g.tp == "heads"})
        if value is None:
            if heads:
                raise self.fail(
                    "top level", f"missing required key 'tp_head_counts' (groups split by heads: {heads[0]})"
                )
            return ()
        if not isinstance(value, list):
            raise self.fail("tp_head_counts", "expected a list")
        counts = tuple(self.head_count(entry, f"tp_head_counts[{j}]", groups) for j, entry in enumerate(value))
        counted = {path for h in counts for path in h.groups}
        for path in heads:
            if path not in counted:
                raise self.fail("tp_head_counts", f"no count covers group {path!r}, which is split by heads")
        return counts

    def head_count(self, entry: Any, where: str, groups: tuple[GroupDef, ...]) -> HeadCountDef:
        """One count, naming groups of this schema (by path) and, optionally, slices of them."""
        entry = self.keys(entry, where, _HEAD_COUNT_REQUIRED, _HEAD_COUNT_OPTIONAL)
        named = self.strings(
            self.non_empty_list(entry["groups"], f"{where}.groups", " of group paths"), f"{where}.groups"
        )
        paths = {g.path for g in groups}
        for path in named:
            if path not in paths:
                raise self.fail(f"{where}.groups", f"names group {path!r}, which the schema does not have")
        slices = self.strings(entry.get("slices", []), f"{where}.slices")
        known = {s.name for g in groups if g.path in named for s in g.slices}
        for name in slices:
            if name not in known:
                raise self.fail(f"{where}.slices", f"names slice {name!r}, which none of its groups has")
        may_replicate = entry.get("may_replicate", False)
        if not isinstance(may_replicate, bool):
            raise self.fail(f"{where}.may_replicate", "expected true or false")
        return HeadCountDef(
            count=self.expression(entry["count"], f"{where}.count"),
            groups=named,
            slices=slices,
            may_replicate=may_replicate,
        )

    def top_level(self, value: Any, declared_types: set[str]) -> tuple[GroupDef, ...]:
        if not isinstance(value, list):
            raise self.fail("top_level", "expected a list")
        return tuple(self.group(g, f"top_level[{j}]", declared_types, top=True) for j, g in enumerate(value))


def parse_schema(data: Any, family: str, file: str = "<memory>") -> Schema:
    """Validate an already-decoded schema document (used by load_schema and by tests)."""
    return _SchemaLoader(file).schema(data, family)


def _schema_files() -> dict[str, Any]:
    return {
        entry.name[: -len(".json")]: entry
        for entry in resources.files(SCHEMA_PACKAGE).iterdir()
        if entry.name.endswith(".json")
    }


def list_schemas() -> list[str]:
    """Every shipped schema family, sorted."""
    return sorted(_schema_files())


@cache
def load_schema(family: str) -> Schema:
    """Load and strictly validate `schemas/<family>.json`. Raises SchemaError naming the file and the key."""
    files = _schema_files()
    if family not in files:
        raise SchemaError(f"No schema named {family!r}.", hint=f"Shipped schemas: {', '.join(sorted(files))}.")
    entry = files[family]
    file = f"schemas/{entry.name}"
    try:
        data = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"Cannot read schema file {file} ({exc}).") from None
    except json.JSONDecodeError as exc:
        raise SchemaError(f"Schema file {file} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    return parse_schema(data, family, file)
