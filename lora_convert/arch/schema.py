"""Architecture schemas: which LoRA-able modules a base model has, on which layers, with which shapes.

One JSON file per family lives in `schemas/` (shipped as `lora_convert.schemas`) and is read with
`importlib.resources`. Files are validated strictly: an unknown key anywhere is a SchemaError that names the
file and the key path. The vocabulary is documented in docs/schemas.md; in short:

    family, match{model_type, architectures}, text_config, num_layers, expert_count, mtp_layers,
    checkpoint_prefix, wrapped_checkpoint_prefix, stack_prefixes, mtp_prefixes, vision_prefixes,
    let{name: expr}, layer_types{type: expr over i}, groups[...], top_level[...], _note

A group is one LoRA target of the serving layout (a fused `qkv_proj`, `gate_up_proj`,
`fused_qkv_a_proj_with_mqa`, a routed-experts parameter, a plain `o_proj`): its canonical path after
`layers.N.`, the layer types it sits on, `in` and each slice's `out` as expressions, the source names
(aliases) that map to one slice, and `merged` source names that cover several slices.

`bind()` evaluates every expression once per distinct set of layer types and builds a dict from source
name to (group, slices), so `Architecture.resolve()` is O(1) per module. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Iterable

from lora_convert.errors import BaseConfigError, SchemaError
from lora_convert.arch.expr import compile_expression, evaluate, names_in

if TYPE_CHECKING:  # pragma: no cover
    from lora_convert.peft.adapter import LoraModule
    from lora_convert.arch.base_config import BaseConfig

SCHEMA_PACKAGE = "lora_convert.schemas"

KINDS = frozenset({
    "attention", "mla", "linear_attention", "mamba", "mlp", "shared_expert", "routed_experts", "router", "latent",
    "embedding", "lm_head",
})


# ------------------------------------------------------------------------------------------ public specs
@dataclass(frozen=True)
class SliceSpec:
    name: str  # canonical source module name of this slice: q_proj, kv_a_proj_with_mqa, gate_proj, z, ...
    out_features: int
    in_features: int


@dataclass(frozen=True)
class GroupSpec:
    name: str  # group name as the last path component(s): qkv_proj, experts.gate_up_proj, lm_head, ...
    path: str  # full module path in the base's checkpoint naming
    layer: int | None
    in_features: int
    slices: tuple[SliceSpec, ...]  # in output-row order
    experts: int | None  # E for routed-expert groups
    gated: bool | None  # for MLP / expert gate_up groups
    kind: str
    local_path: str = ""  # path after `layers.N.` (or the whole path for top-level groups)

    @property
    def out_features(self) -> int:
        return sum(s.out_features for s in self.slices)

    def slice_offsets(self) -> list[int]:
        """Row offset of each slice in the fused output (slice i starts at offsets[i])."""
        offsets, total = [], 0
        for s in self.slices:
            offsets.append(total)
            total += s.out_features
        return offsets

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": self.path, "layer": self.layer, "kind": self.kind,
            "in": self.in_features, "out": self.out_features,
            "slices": [{"name": s.name, "out": s.out_features} for s in self.slices],
            "gated": self.gated, "experts": self.experts,
        }


@dataclass(frozen=True)
class ModuleMatch:
    group: GroupSpec
    slice_indices: tuple[int, ...]  # the slices this source module covers
    canonical: str  # canonical source name: q_proj, experts.gate_proj, experts.gate_up_proj, in_proj_qkv, ...
    expert: int | None  # for per-expert 2-D modules
    expected_in: int  # what lora_A's in-dim must be
    expected_out: int  # what lora_B's out-dim must be (sum over the covered slices)


@dataclass(frozen=True)
class Location:
    """Where `Architecture.locate` put a module: `status` is `ok` (with `match`) or why it has no place."""

    status: str  # ok | vision | unknown-prefix | past-end | mtp | unknown | not-on-layer-type | experts-on-dense
    match: ModuleMatch | None = None
    detail: str = ""
    layer_types: frozenset[str] = frozenset()
    group_kind: str | None = None  # for not-on-layer-type / experts-on-dense: the kind of the family's group


# ------------------------------------------------------------------------------------ parsed definitions
@dataclass(frozen=True)
class SliceDef:
    name: str
    out: str
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class MergedDef:
    name: str
    slices: tuple[str, ...]
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class GroupDef:
    path: str
    name: str
    kind: str
    on: tuple[str, ...]
    when: str | None
    in_: str
    slices: tuple[SliceDef, ...]
    merged: tuple[MergedDef, ...]
    experts: bool
    gated: bool | None
    wrapped_path: str | None = None  # top-level groups only

    def sources(self) -> Iterable[tuple[str, tuple[int, ...], str]]:
        """(source name, slice indices, canonical) for every alias of this group."""
        parent = self.name.rpartition(".")[0]
        canon = (lambda n: f"{parent}.{n}") if parent else (lambda n: n)
        for i, s in enumerate(self.slices):
            for alias in s.aliases:
                yield alias, (i,), canon(s.name)
        index = {s.name: i for i, s in enumerate(self.slices)}
        for m in self.merged:
            covered = tuple(index[n] for n in m.slices)
            for alias in m.aliases:
                yield alias, covered, canon(m.name)


@dataclass(frozen=True)
class Schema:
    family: str
    file: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    text_config: str | None
    num_layers: str
    expert_count: str | None
    mtp_layers: str | None
    checkpoint_prefix: str
    wrapped_checkpoint_prefix: str | None
    stack_prefixes: tuple[str, ...]
    mtp_prefixes: tuple[str, ...]
    vision_prefixes: tuple[str, ...]
    let: tuple[tuple[str, str], ...]
    layer_types: tuple[tuple[str, str], ...]
    groups: tuple[GroupDef, ...]
    top_level: tuple[GroupDef, ...]
    note: str | None = None

    def expressions(self) -> list[tuple[str, str]]:
        """(where, expression) for every expression in the file."""
        out = [("num_layers", self.num_layers)]
        out += [(w, e) for w, e in (("expert_count", self.expert_count), ("mtp_layers", self.mtp_layers)) if e]
        out += [(f"let.{k}", e) for k, e in self.let]
        out += [(f"layer_types.{k}", e) for k, e in self.layer_types]
        for g in self.groups + self.top_level:
            out.append((f"{g.path}.in", g.in_))
            if g.when:
                out.append((f"{g.path}.when", g.when))
            out += [(f"{g.path}.{s.name}.out", s.out) for s in g.slices]
        return out

    def describe(self) -> dict[str, Any]:
        """The schema with its expressions unevaluated (for `schemas show FAMILY` without a config)."""
        return {
            "family": self.family,
            "file": self.file,
            "match": {"model_type": list(self.model_types), "architectures": list(self.architectures)},
            "text_config": self.text_config,
            "num_layers": self.num_layers,
            "expert_count": self.expert_count,
            "checkpoint_prefix": self.checkpoint_prefix,
            "wrapped_checkpoint_prefix": self.wrapped_checkpoint_prefix,
            "stack_prefixes": list(self.stack_prefixes),
            "let": dict(self.let),
            "layer_types": dict(self.layer_types),
            "groups": [_describe_group(g) for g in self.groups],
            "top_level": [_describe_group(g) for g in self.top_level],
        }


def _describe_group(g: GroupDef) -> dict[str, Any]:
    return {
        "name": g.name, "path": g.path, "kind": g.kind, "on": list(g.on), "when": g.when, "in": g.in_,
        "slices": [{"name": s.name, "out": s.out, "aliases": list(s.aliases)} for s in g.slices],
        "merged": [{"name": m.name, "slices": list(m.slices), "aliases": list(m.aliases)} for m in g.merged],
        "experts": g.experts, "gated": g.gated,
    }


# ------------------------------------------------------------------------------------ strict loading
_TOP_REQUIRED = {"family", "match", "num_layers", "checkpoint_prefix", "stack_prefixes", "layer_types", "groups"}
_TOP_OPTIONAL = {"_note", "text_config", "expert_count", "mtp_layers", "wrapped_checkpoint_prefix", "mtp_prefixes",
                 "vision_prefixes", "let", "top_level"}
_GROUP_REQUIRED = {"path", "kind", "on", "in", "slices"}
_GROUP_OPTIONAL = {"_note", "name", "when", "merged", "experts", "gated"}
_TOP_GROUP_REQUIRED = {"path", "kind", "in", "slices"}
_TOP_GROUP_OPTIONAL = {"_note", "name", "when", "wrapped_path", "merged"}
_SLICE_REQUIRED = {"name", "out"}
_SLICE_OPTIONAL = {"_note", "aliases"}
_MERGED_REQUIRED = {"name", "slices", "aliases"}
_MERGED_OPTIONAL = {"_note"}
_MATCH_KEYS = {"model_type", "architectures"}


class _Loader:
    def __init__(self, file: str):
        self.file = file

    def fail(self, where: str, message: str) -> SchemaError:
        return SchemaError(f"Schema file {self.file}: {where}: {message}",
                           hint="Fix the file; `lora-convert schemas check` validates every shipped schema.")

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

    def group(self, obj: Any, where: str, layer_types: set[str], top: bool) -> GroupDef:
        req, opt = (_TOP_GROUP_REQUIRED, _TOP_GROUP_OPTIONAL) if top else (_GROUP_REQUIRED, _GROUP_OPTIONAL)
        if isinstance(obj, dict) and isinstance(obj.get("path"), str):
            where = f"{where} ({obj['path']})"
        obj = self.keys(obj, where, req, opt)
        path = self.string(obj["path"], f"{where}.path")
        kind = self.string(obj["kind"], f"{where}.kind")
        if kind not in KINDS:
            raise self.fail(f"{where}.kind", f"unknown kind {kind!r} (known: {', '.join(sorted(KINDS))})")
        name = self.string(obj.get("name"), f"{where}.name", optional=True)
        if name is None:
            # `self_attn.qkv_proj` -> `qkv_proj`, `mlp.experts.gate_up_proj` -> `experts.gate_up_proj`;
            # top-level `model.embed_tokens` -> `embed_tokens`.
            name = path.rsplit(".", 1)[-1] if top else (path.split(".", 1)[1] if "." in path else path)
        on: tuple[str, ...] = ()
        if not top:
            on = self.strings(obj["on"], f"{where}.on")
            for t in on:
                if t not in layer_types:
                    raise self.fail(f"{where}.on", f"layer type {t!r} is not declared in layer_types")
        slices_raw = obj["slices"]
        if not isinstance(slices_raw, list) or not slices_raw:
            raise self.fail(f"{where}.slices", "expected a non-empty list of slices")
        slices = []
        for j, s in enumerate(slices_raw):
            sw = f"{where}.slices[{j}]"
            s = self.keys(s, sw, _SLICE_REQUIRED, _SLICE_OPTIONAL)
            slices.append(SliceDef(
                name=self.string(s["name"], f"{sw}.name"),
                out=self.expression(s["out"], f"{sw}.out"),
                aliases=self.strings(s.get("aliases", []), f"{sw}.aliases"),
            ))
        names = [s.name for s in slices]
        if len(set(names)) != len(names):
            raise self.fail(f"{where}.slices", "two slices share a name")
        if not isinstance(obj.get("merged", []), list):
            raise self.fail(f"{where}.merged", "expected a list")
        merged = []
        for j, m in enumerate(obj.get("merged", [])):
            mw = f"{where}.merged[{j}]"
            m = self.keys(m, mw, _MERGED_REQUIRED, _MERGED_OPTIONAL)
            covered = self.strings(m["slices"], f"{mw}.slices")
            for n in covered:
                if n not in names:
                    raise self.fail(f"{mw}.slices", f"names slice {n!r}, which the group does not have")
            merged.append(MergedDef(name=self.string(m["name"], f"{mw}.name"), slices=covered,
                                    aliases=self.strings(m["aliases"], f"{mw}.aliases")))
        experts = obj.get("experts", False)
        if not isinstance(experts, bool):
            raise self.fail(f"{where}.experts", "expected true or false")
        gated = obj.get("gated")
        if gated is not None and not isinstance(gated, bool):
            raise self.fail(f"{where}.gated", "expected true, false or null")
        if experts and kind != "routed_experts":
            raise self.fail(f"{where}.experts", "only groups of kind routed_experts have experts")
        group = GroupDef(
            path=path, name=name, kind=kind, on=on, when=self.expression(obj.get("when"), f"{where}.when", optional=True),
            in_=self.expression(obj["in"], f"{where}.in"), slices=tuple(slices), merged=tuple(merged),
            experts=experts, gated=gated,
            wrapped_path=self.string(obj.get("wrapped_path"), f"{where}.wrapped_path", optional=True) if top else None,
        )
        seen: set[str] = set()
        for alias, _, _ in group.sources():
            if alias in seen:
                raise self.fail(where, f"source name {alias!r} is listed twice")
            seen.add(alias)
        return group

    def schema(self, data: Any, family: str) -> Schema:
        data = self.keys(data, "top level", _TOP_REQUIRED, _TOP_OPTIONAL)
        declared = self.string(data["family"], "family")
        if declared != family:
            raise self.fail("family", f"is {declared!r} but the file is named {family}.json")
        match = self.keys(data["match"], "match", set(), _MATCH_KEYS)
        model_types = self.strings(match.get("model_type", []), "match.model_type")
        architectures = self.strings(match.get("architectures", []), "match.architectures")
        if not model_types and not architectures:
            raise self.fail("match", "needs at least one model_type or architecture")
        layer_types = self.expr_map(data["layer_types"], "layer_types")
        let = self.expr_map(data["let"], "let") if "let" in data else ()
        groups_raw = data["groups"]
        if not isinstance(groups_raw, list) or not groups_raw:
            raise self.fail("groups", "expected a non-empty list")
        declared_types = {k for k, _ in layer_types}
        groups = tuple(self.group(g, f"groups[{j}]", declared_types, top=False) for j, g in enumerate(groups_raw))
        paths = [g.path for g in groups]
        dupes = {p for p in paths if paths.count(p) > 1}
        # Two groups may share a path only when their `when` conditions differ (e.g. MLA with/without q_lora_rank).
        for p in dupes:
            whens = [g.when for g in groups if g.path == p]
            if len(set(whens)) != len(whens):
                raise self.fail("groups", f"path {p!r} is declared twice with the same `when`")
        top_raw = data.get("top_level", [])
        if not isinstance(top_raw, list):
            raise self.fail("top_level", "expected a list")
        top_level = tuple(self.group(g, f"top_level[{j}]", declared_types, top=True) for j, g in enumerate(top_raw))
        return Schema(
            family=family, file=self.file, model_types=model_types, architectures=architectures,
            text_config=self.string(data.get("text_config"), "text_config", optional=True),
            num_layers=self.expression(data["num_layers"], "num_layers"),
            expert_count=self.expression(data.get("expert_count"), "expert_count", optional=True),
            mtp_layers=self.expression(data.get("mtp_layers"), "mtp_layers", optional=True),
            checkpoint_prefix=self.string(data["checkpoint_prefix"], "checkpoint_prefix"),
            wrapped_checkpoint_prefix=self.string(data.get("wrapped_checkpoint_prefix"), "wrapped_checkpoint_prefix", optional=True),
            stack_prefixes=self.strings(data["stack_prefixes"], "stack_prefixes"),
            mtp_prefixes=self.strings(data.get("mtp_prefixes", []), "mtp_prefixes"),
            vision_prefixes=self.strings(data.get("vision_prefixes", []), "vision_prefixes"),
            let=let, layer_types=layer_types, groups=groups, top_level=top_level, note=data.get("_note"),
        )


def parse_schema(data: Any, family: str, file: str = "<memory>") -> Schema:
    """Validate an already-decoded schema document (used by load_schema and by tests)."""
    return _Loader(file).schema(data, family)


def _schema_files() -> dict[str, Any]:
    return {
        entry.name[: -len(".json")]: entry
        for entry in resources.files(SCHEMA_PACKAGE).iterdir()
        if entry.name.endswith(".json")
    }


def list_schemas() -> list[str]:
    """Every shipped schema family, sorted."""
    return sorted(_schema_files())


@lru_cache(maxsize=None)
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


def schema_for_config(config: dict) -> Schema:
    """The schema for a config: by `model_type`, then by `architectures`, then by a wrapper's text config."""
    schemas = [load_schema(f) for f in list_schemas()]
    candidates = [config]
    for name in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(name), dict):
            candidates.append(config[name])
    for cfg in candidates:
        model_type = cfg.get("model_type")
        if model_type:
            for s in schemas:
                if model_type in s.model_types:
                    return s
        for arch in cfg.get("architectures") or []:
            for s in schemas:
                if arch in s.architectures:
                    return s
    raise BaseConfigError(
        f"No schema matches model_type {config.get('model_type')!r} / architectures {config.get('architectures')!r}.",
        hint="`lora-convert schemas list` shows the supported families; a new family needs one JSON file in schemas/.",
    )


# ---------------------------------------------------------------------------------------------- binding
@dataclass
class _Template:
    """A group evaluated for one set of layer types (no layer index yet)."""

    definition: GroupDef
    in_features: int
    slices: tuple[SliceSpec, ...]
    experts: int | None


@dataclass
class _TypeSet:
    types: frozenset[str]
    templates: list[_Template]
    sources: dict[str, tuple[int, tuple[int, ...], str]]  # source name -> (template index, slices, canonical)
    layers: list[int] = field(default_factory=list)


class Architecture:
    """A schema bound to one config: dimensions evaluated, layer types known, source names indexed."""

    def __init__(self, schema: Schema, config: dict, *, top_config: dict | None = None, wrapped: bool = False,
                 name: str = "<config>"):
        self.schema = schema
        self.family = schema.family
        self.config = config
        self.top_config = top_config if top_config is not None else config
        self.wrapped = wrapped
        self.name = name
        self.variables: dict[str, Any] = {}
        for key, expression in schema.let:
            self.variables[key] = self._eval(expression, f"let.{key}")
        self.num_layers = self._int(schema.num_layers, "num_layers", allow_zero=True)
        self._expert_count = None
        if schema.expert_count:
            value = self._eval(schema.expert_count, "expert_count")
            self._expert_count = None if value is None else self._check_int(value, "expert_count")
        self.mtp_layers = 0
        if schema.mtp_layers:
            self.mtp_layers = int(self._eval(schema.mtp_layers, "mtp_layers") or 0)
        self.checkpoint_prefix = (schema.wrapped_checkpoint_prefix if wrapped and schema.wrapped_checkpoint_prefix
                                  else schema.checkpoint_prefix)
        self._stack_prefixes = frozenset(schema.stack_prefixes)
        self._typesets: list[_TypeSet] = []
        self._layer_typeset: list[int] = []
        by_types: dict[frozenset[str], int] = {}
        for i in range(self.num_layers):
            types = self._types_of(i)
            if types not in by_types:
                by_types[types] = len(self._typesets)
                self._typesets.append(self._build_typeset(types))
            self._typesets[by_types[types]].layers.append(i)
            self._layer_typeset.append(by_types[types])
        self._group_cache: dict[int, list[GroupSpec]] = {}
        self._top_groups, self._top_sources = self._build_top_level()
        # Family-wide index of source names (every group, whatever its layer types or `when`), to tell
        # "not on this layer type" and "experts on a dense layer" from "unknown".
        self._family_sources: dict[str, GroupDef] = {}
        for g in schema.groups:
            for alias, _, _ in g.sources():
                self._family_sources.setdefault(alias, g)

    # -- evaluation helpers
    def _eval(self, expression: str, where: str, **extra: Any) -> Any:
        try:
            return evaluate(expression, self.config, **self.variables, **extra)
        except SchemaError as exc:
            raise BaseConfigError(
                f"The base config {self.name} does not fit schema {self.family} ({self.schema.file}) at {where}: "
                f"{exc.message}",
                hint="Check that --base is the adapter's base model; a config of another family needs another schema.",
            ) from None

    def _check_int(self, value: Any, where: str, *, allow_zero: bool = False, expression: str | None = None) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
            missing = ""
            if value is None and expression is not None:
                absent = sorted(n for n in names_in(expression)
                                if n not in self.variables and self.config.get(n) is None)
                missing = f"; missing (None) field(s): {', '.join(absent)}" if absent else ""
            raise BaseConfigError(
                f"The base config {self.name} gives {where} = {value!r} under schema {self.family} "
                f"({self.schema.file}); a {'non-negative' if allow_zero else 'positive'} integer is needed{missing}.",
                hint="Check the config fields this dimension is computed from (`lora-convert schemas show`).",
            )
        return value

    def _int(self, expression: str, where: str, *, allow_zero: bool = False, **extra: Any) -> int:
        return self._check_int(self._eval(expression, where, **extra), where, allow_zero=allow_zero,
                               expression=expression)

    def _types_of(self, i: int) -> frozenset[str]:
        return frozenset(t for t, e in self.schema.layer_types if self._eval(e, f"layer_types.{t} (i={i})", i=i))

    def _build_typeset(self, types: frozenset[str]) -> _TypeSet:
        templates: list[_Template] = []
        sources: dict[str, tuple[int, tuple[int, ...], str]] = {}
        for g in self.schema.groups:
            if not types.intersection(g.on):
                continue
            if g.when and not self._eval(g.when, f"{g.path}.when"):
                continue
            templates.append(self._template(g))
            for alias, covered, canonical in g.sources():
                if alias in sources:
                    other = templates[sources[alias][0]].definition.path
                    raise SchemaError(
                        f"Schema file {self.schema.file}: source name {alias!r} belongs to both {other} and {g.path} "
                        f"on layers of type {'+'.join(sorted(types))}.")
                sources[alias] = (len(templates) - 1, covered, canonical)
        return _TypeSet(types=types, templates=templates, sources=sources)

    def _template(self, g: GroupDef) -> _Template:
        in_features = self._int(g.in_, f"{g.path}.in")
        slices = tuple(SliceSpec(s.name, self._int(s.out, f"{g.path}.{s.name}.out"), in_features) for s in g.slices)
        experts = None
        if g.experts:
            if self._expert_count is None:
                raise BaseConfigError(
                    f"Schema {self.family} puts routed experts ({g.path}) on some layers, but the base config "
                    f"{self.name} gives no expert count ({self.schema.expert_count}).")
            experts = self._expert_count
        return _Template(definition=g, in_features=in_features, slices=slices, experts=experts)

    def _build_top_level(self) -> tuple[list[GroupSpec], dict[str, tuple[int, tuple[int, ...], str]]]:
        groups: list[GroupSpec] = []
        sources: dict[str, tuple[int, tuple[int, ...], str]] = {}
        for g in self.schema.top_level:
            if g.when and not self._eval(g.when, f"{g.path}.when"):
                continue
            t = self._template(g)
            path = g.wrapped_path if self.wrapped and g.wrapped_path else g.path
            groups.append(GroupSpec(name=g.name, path=path, layer=None, in_features=t.in_features, slices=t.slices,
                                    experts=None, gated=g.gated, kind=g.kind, local_path=path))
            for alias, covered, canonical in g.sources():
                sources[alias] = (len(groups) - 1, covered, canonical)
        return groups, sources

    # -- public API
    def expert_count(self) -> int | None:
        return self._expert_count

    def layer_types(self, layer: int) -> frozenset[str]:
        if 0 <= layer < self.num_layers:
            return self._typesets[self._layer_typeset[layer]].types
        try:
            return self._types_of(layer)
        except BaseConfigError:
            return frozenset()

    def groups(self, layer: int) -> list[GroupSpec]:
        """Every LoRA-able group at `layer`, in schema order."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside 0..{self.num_layers - 1} of {self.name}")
        cached = self._group_cache.get(layer)
        if cached is None:
            ts = self._typesets[self._layer_typeset[layer]]
            cached = [
                GroupSpec(name=t.definition.name, path=f"{self.checkpoint_prefix}.{layer}.{t.definition.path}",
                          layer=layer, in_features=t.in_features, slices=t.slices, experts=t.experts,
                          gated=t.definition.gated, kind=t.definition.kind, local_path=t.definition.path)
                for t in ts.templates
            ]
            self._group_cache[layer] = cached
        return cached

    def top_level_groups(self) -> list[GroupSpec]:
        return list(self._top_groups)

    def layer_type_sets(self) -> list[tuple[frozenset[str], list[int]]]:
        """Each distinct set of layer types with the layers that have it, in order of first appearance."""
        return [(ts.types, list(ts.layers)) for ts in self._typesets]

    def vision_module(self, module_path: str) -> bool:
        from lora_convert.peft.naming import VISION_SEGMENTS

        if any(module_path == p or module_path.startswith(p + ".") for p in self.schema.vision_prefixes):
            return True
        return any(segment in VISION_SEGMENTS for segment in module_path.split("."))

    def resolve(self, module: "LoraModule") -> ModuleMatch | None:
        """Map an adapter module (any alias, prefix or transformers version) to its group; None if it has none."""
        return self.locate(module).match

    def locate(self, module: "LoraModule") -> Location:
        """Like resolve, but says why a module has no place (used by shape_check for its findings)."""
        path = module.module
        if module.is_vision or self.vision_module(path):
            return Location("vision", detail="vision tower or multimodal projector")
        layer = module.layer
        if layer is None:
            hit = self._top_sources.get(path)
            if hit is not None:
                index, covered, canonical = hit
                group = self._top_groups[index]
                return Location("ok", self._match(group, covered, canonical, None))
            if any(path == p or path.startswith(p + ".") for p in self.schema.mtp_prefixes):
                return Location("mtp", detail="multi-token-prediction (MTP) module outside the main layer stack")
            return Location("unknown", detail="not a module of this architecture")
        prefix = module.stack_prefix or ""
        if prefix in self.schema.mtp_prefixes:
            return Location("mtp", detail=f"multi-token-prediction (MTP) layer under `{prefix}.`")
        stack = f"{prefix}.layers" if prefix else "layers"
        if stack not in self._stack_prefixes:
            return Location("unknown-prefix",
                            detail=f"layer stack `{stack}` is not one of {', '.join(sorted(self._stack_prefixes))}")
        if layer >= self.num_layers:
            return Location("past-end")
        ts = self._typesets[self._layer_typeset[layer]]
        local = module.local_name
        hit = ts.sources.get(local)
        if hit is not None:
            index, covered, canonical = hit
            template = ts.templates[index]
            is_fused = module.kind == "fused_experts"
            if template.experts is None and (module.expert is not None or is_fused):
                return Location("unknown", detail=f"{local} carries an expert index but {template.definition.name} "
                                "is not a routed-experts module", layer_types=ts.types)
            if template.experts is not None and module.expert is None and not is_fused:
                return Location("unknown", detail=f"{local} is a routed-experts module but has no expert index "
                                "and is not a 3-D expert parameter", layer_types=ts.types)
            group = self.groups(layer)[index]
            return Location("ok", self._match(group, covered, canonical, module.expert), layer_types=ts.types)
        definition = self._family_sources.get(local)
        if definition is None:
            return Location("unknown", detail=f"`{local}` is not a module name of {self.family}", layer_types=ts.types)
        if definition.when and not self._eval(definition.when, f"{definition.path}.when"):
            return Location("unknown", detail=f"`{local}` exists in {self.family} only when `{definition.when}`, "
                            "which this config does not satisfy", layer_types=ts.types, group_kind=definition.kind)
        status = "experts-on-dense" if definition.kind == "routed_experts" else "not-on-layer-type"
        return Location(status, detail=f"`{local}` sits on {'/'.join(definition.on)} layers",
                        layer_types=ts.types, group_kind=definition.kind)

    @staticmethod
    def _match(group: GroupSpec, covered: tuple[int, ...], canonical: str, expert: int | None) -> ModuleMatch:
        return ModuleMatch(group=group, slice_indices=covered, canonical=canonical, expert=expert,
                           expected_in=group.in_features,
                           expected_out=sum(group.slices[j].out_features for j in covered))

    def table(self) -> dict[str, Any]:
        """Everything `schemas show` prints: per distinct set of layer types, the groups with numbers."""
        out = []
        for ts in self._typesets:
            first = ts.layers[0]
            out.append({
                "types": sorted(ts.types),
                "layers": list(ts.layers),
                "groups": [
                    {**g.to_json(), "path": f"{self.checkpoint_prefix}.{{layer}}.{g.local_path}", "layer": None}
                    for g in self.groups(first)
                ],
            })
        return {
            "family": self.family,
            "schema_file": self.schema.file,
            "num_layers": self.num_layers,
            "mtp_layers": self.mtp_layers,
            "expert_count": self._expert_count,
            "checkpoint_prefix": self.checkpoint_prefix,
            "wrapped": self.wrapped,
            "layer_types": out,
            "top_level": [g.to_json() for g in self._top_groups],
        }


def bind(base: "BaseConfig | dict", *, schema: Schema | str | None = None) -> Architecture:
    """Bind the matching schema (or the one given) to a base config, unwrapping a wrapper's text config."""
    from lora_convert.arch.base_config import BaseConfig, unwrap_text_config

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
    if schema.text_config:
        text = unwrap_text_config(top, schema.text_config)
    elif _matches(schema, top):
        text = top
    else:  # matched through a wrapper's text config (schema_for_config's fallback): unwrap generically
        text = unwrap_text_config(top)
    return Architecture(schema, text, top_config=top, wrapped=text is not top, name=name)


def _matches(schema: Schema, config: dict) -> bool:
    return config.get("model_type") in schema.model_types or any(
        a in schema.architectures for a in config.get("architectures") or [])
