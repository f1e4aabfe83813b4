"""A schema bound to one base config: every expression evaluated once per distinct set of layer types, and a
dict from source name to (group, slices) per set, so that `Architecture.resolve()` is O(1) per module.

Three parts, one job each: `_Evaluator` evaluates the schema's expressions against the config (and says which
field is missing when one fails), `_LayerIndex` builds the groups and source names of each set of layer types,
and `Architecture` answers questions about layers and modules (`groups`, `resolve`, `locate`, `table`; and
`resolve_path` for a base checkpoint's module, named by its path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_convert.arch.expr import evaluate, names_in
from lora_convert.arch.schema_model import GroupDef, GroupSpec, HeadCount, Location, ModuleMatch, Schema, SliceSpec
from lora_convert.errors import BaseConfigError, SchemaError
from lora_convert.peft.adapter import LoraModule, ModuleKind
from lora_convert.peft.naming import PEFT_PREFIX, parse_key

Sources = dict[str, tuple[int, tuple[int, ...], str]]  # source name -> (group index, covered slices, canonical)


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
    sources: Sources
    layers: list[int] = field(default_factory=list)


class _Evaluator:
    """The schema's expressions against one config, `let` variables included; failures name the config."""

    def __init__(self, schema: Schema, config: dict, name: str):
        self.schema = schema
        self.config = config
        self.name = name
        self.variables: dict[str, Any] = {}
        for key, expression in schema.let:
            self.variables[key] = self.eval(expression, f"let.{key}")

    def eval(self, expression: str, where: str, **extra: Any) -> Any:
        try:
            return evaluate(expression, self.config, **self.variables, **extra)
        except SchemaError as exc:
            raise BaseConfigError(
                f"The base config {self.name} does not fit schema {self.schema.family} ({self.schema.file}) at "
                f"{where}: {exc.message}",
                hint="Check that --base is the adapter's base model; a config of another family needs another schema.",
            ) from None

    def check_int(self, value: Any, where: str, *, allow_zero: bool = False, expression: str | None = None) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
            missing = ""
            if value is None and expression is not None:
                absent = sorted(
                    n for n in names_in(expression) if n not in self.variables and self.config.get(n) is None
                )
                missing = f"; missing (None) field(s): {', '.join(absent)}" if absent else ""
            raise BaseConfigError(
                f"The base config {self.name} gives {where} = {value!r} under schema {self.schema.family} "
                f"({self.schema.file}); a {'non-negative' if allow_zero else 'positive'} integer is needed{missing}.",
                hint="Check the config fields this dimension is computed from (`lora-convert schemas show`).",
            )
        return value

    def int(self, expression: str, where: str, *, allow_zero: bool = False, **extra: Any) -> int:
        return self.check_int(
            self.eval(expression, where, **extra), where, allow_zero=allow_zero, expression=expression
        )

    def optional_int(self, expression: str | None, where: str, *, allow_zero: bool = False) -> int | None:
        """An optional count (`expert_count`, `shared_expert_count`): None when the schema or the config has none."""
        if not expression:
            return None
        value = self.eval(expression, where)
        return None if value is None else self.check_int(value, where, allow_zero=allow_zero)

    def types_of(self, i: int) -> frozenset[str]:
        return frozenset(t for t, e in self.schema.layer_types if self.eval(e, f"layer_types.{t} (i={i})", i=i))

    def holds(self, group: GroupDef) -> bool:
        """Whether the group's `when` (if any) holds for this config."""
        return not group.when or bool(self.eval(group.when, f"{group.path}.when"))

    def template(self, g: GroupDef, expert_count: int | None) -> _Template:
        in_features = self.int(g.in_, f"{g.path}.in")
        slices = tuple(SliceSpec(s.name, self.int(s.out, f"{g.path}.{s.name}.out"), in_features) for s in g.slices)
        experts = None
        if g.experts:
            if expert_count is None:
                raise BaseConfigError(
                    f"Schema {self.schema.family} puts routed experts ({g.path}) on some layers, but the base config "
                    f"{self.name} gives no expert count ({self.schema.expert_count})."
                )
            experts = expert_count
        return _Template(definition=g, in_features=in_features, slices=slices, experts=experts)


class _LayerIndex:
    """Layers grouped by their set of layer types; per set, the groups evaluated and their source names."""

    def __init__(self, evaluator: _Evaluator, num_layers: int, expert_count: int | None):
        self.evaluator = evaluator
        self.expert_count = expert_count
        self.typesets: list[_TypeSet] = []
        self.layer_typeset: list[int] = []
        by_types: dict[frozenset[str], int] = {}
        for i in range(num_layers):
            types = evaluator.types_of(i)
            if types not in by_types:
                by_types[types] = len(self.typesets)
                self.typesets.append(self._build(types))
            self.typesets[by_types[types]].layers.append(i)
            self.layer_typeset.append(by_types[types])

    def of(self, layer: int) -> _TypeSet:
        return self.typesets[self.layer_typeset[layer]]

    def _build(self, types: frozenset[str]) -> _TypeSet:
        schema = self.evaluator.schema
        templates: list[_Template] = []
        sources: Sources = {}
        for g in schema.groups:
            if not types.intersection(g.on) or not self.evaluator.holds(g):
                continue
            templates.append(self.evaluator.template(g, self.expert_count))
            for alias, covered, canonical in g.sources():
                if alias in sources:
                    other = templates[sources[alias][0]].definition.path
                    raise SchemaError(
                        f"Schema file {schema.file}: source name {alias!r} belongs to both {other} and {g.path} "
                        f"on layers of type {'+'.join(sorted(types))}."
                    )
                sources[alias] = (len(templates) - 1, covered, canonical)
        return _TypeSet(types=types, templates=templates, sources=sources)


def _with_expert(match: ModuleMatch | None, expert: int | None) -> ModuleMatch | None:
    """`match` for the module with expert index `expert` (a place's match is shared by all its experts)."""
    if match is None or match.expert == expert:
        return match
    return ModuleMatch(  # built directly: dataclasses.replace costs 4x as much
        match.group,
        match.slice_indices,
        match.canonical,
        expert,
        match.expected_in,
        match.expected_out,
        match.interleaved,
        match.a_on_output,
    )


class Architecture:
    """A schema bound to one config: dimensions evaluated, layer types known, source names indexed."""

    def __init__(
        self,
        schema: Schema,
        config: dict,
        *,
        top_config: dict | None = None,
        wrapped: bool = False,
        name: str = "<config>",
    ):
        self.schema = schema
        self.family = schema.family
        self.config = config
        self.top_config = top_config if top_config is not None else config
        self.wrapped = wrapped
        self.name = name
        self._evaluator = _Evaluator(schema, config, name)
        self.variables = self._evaluator.variables
        self.num_layers = self._evaluator.int(schema.num_layers, "num_layers", allow_zero=True)
        self._expert_count = self._evaluator.optional_int(schema.expert_count, "expert_count")
        self._shared_expert_count = self._evaluator.optional_int(
            schema.shared_expert_count, "shared_expert_count", allow_zero=True
        )
        self.mtp_layers = int(self._evaluator.eval(schema.mtp_layers, "mtp_layers") or 0) if schema.mtp_layers else 0
        self.checkpoint_prefix = (
            schema.wrapped_checkpoint_prefix
            if wrapped and schema.wrapped_checkpoint_prefix
            else schema.checkpoint_prefix
        )
        self._stack_prefixes = frozenset(schema.stack_prefixes)
        self._layers = _LayerIndex(self._evaluator, self.num_layers, self._expert_count)
        self._located: dict[tuple, Location] = {}
        self._group_cache: dict[int, list[GroupSpec]] = {}
        self._top_groups, self._top_sources = self._build_top_level()
        # Family-wide index of source names (every group, whatever its layer types or `when`), to tell
        # "not on this layer type" and "experts on a dense layer" from "unknown".
        self._family_sources: dict[str, GroupDef] = {}
        for g in schema.groups:
            for alias, _, _ in g.sources():
                self._family_sources.setdefault(alias, g)

    def _build_top_level(self) -> tuple[list[GroupSpec], Sources]:
        groups: list[GroupSpec] = []
        sources: Sources = {}
        for g in self.schema.top_level:
            if not self._evaluator.holds(g):
                continue
            t = self._evaluator.template(g, self._expert_count)
            path = g.wrapped_path if self.wrapped and g.wrapped_path else g.path
            groups.append(
                GroupSpec(
                    name=g.name,
                    path=path,
                    layer=None,
                    in_features=t.in_features,
                    slices=t.slices,
                    experts=None,
                    gated=g.gated,
                    kind=g.kind,
                    local_path=path,
                    tp=g.tp,
                    interleaved=g.interleaved_sources(),
                )
            )
            for alias, covered, canonical in g.sources():
                sources[alias] = (len(groups) - 1, covered, canonical)
        return groups, sources

    # -- counts and layers
    def expert_count(self) -> int | None:
        return self._expert_count

    def shared_expert_count(self) -> int | None:
        """How many shared experts the config fuses into its shared MLP (None: the schema does not say)."""
        return self._shared_expert_count

    def experts_gated(self, layer: int | None = None) -> bool | None:
        """Whether the routed experts have a gate projection: at `layer` if it has experts, else family-wide."""
        if layer is not None and 0 <= layer < self.num_layers:
            for g in self.groups(layer):
                if g.experts and g.gated is not None:
                    return g.gated
        return next((g.gated for g in self.schema.groups if g.experts and g.gated is not None), None)

    def tp_head_counts(self) -> list[HeadCount]:
        """The schema's `tp_head_counts` evaluated for this config; a count the config does not give (None, or
        not a positive integer) is left out: there is nothing to divide."""
        out = []
        for j, h in enumerate(self.schema.tp_head_counts):
            try:
                value = self._evaluator.eval(h.count, f"tp_head_counts[{j}].count")
            except BaseConfigError:
                continue
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                continue
            out.append(HeadCount(h.count, value, h.sources(self.schema.groups), h.may_replicate))
        return out

    def layer_types(self, layer: int) -> frozenset[str]:
        if 0 <= layer < self.num_layers:
            return self._layers.of(layer).types
        try:
            return self._evaluator.types_of(layer)
        except BaseConfigError:
            return frozenset()

    def groups(self, layer: int) -> list[GroupSpec]:
        """Every LoRA-able group at `layer`, in schema order."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside 0..{self.num_layers - 1} of {self.name}")
        cached = self._group_cache.get(layer)
        if cached is None:
            cached = [
                GroupSpec(
                    name=t.definition.name,
                    path=f"{self.checkpoint_prefix}.{layer}.{t.definition.path}",
                    layer=layer,
                    in_features=t.in_features,
                    slices=t.slices,
                    experts=t.experts,
                    gated=t.definition.gated,
                    kind=t.definition.kind,
                    local_path=t.definition.path,
                    tp=t.definition.tp,
                    expert_storage=t.definition.expert_storage,
                    peft_lora_a=t.definition.peft_lora_a,
                    interleaved=t.definition.interleaved_sources(),
                    param_3d=t.definition.param_3d() if t.definition.experts else "",
                    base_fused=t.definition.base_fused(),
                    peft_cannot_apply=t.definition.peft_cannot_apply,
                )
                for t in self._layers.of(layer).templates
            ]
            self._group_cache[layer] = cached
        return cached

    def top_level_groups(self) -> list[GroupSpec]:
        return list(self._top_groups)

    def layer_type_sets(self) -> list[tuple[frozenset[str], list[int]]]:
        """Each distinct set of layer types with the layers that have it, in order of first appearance."""
        return [(ts.types, list(ts.layers)) for ts in self._layers.typesets]

    # -- modules
    def vision_module(self, module_path: str) -> bool:
        from lora_convert.peft.naming import VISION_SEGMENTS

        if any(module_path == p or module_path.startswith(p + ".") for p in self.schema.vision_prefixes):
            return True
        return any(segment in VISION_SEGMENTS for segment in module_path.split("."))

    def resolve(self, module: LoraModule) -> ModuleMatch | None:
        """Map an adapter module (any alias, prefix or transformers version) to its group; None if it has none."""
        return self.locate(module).match

    def resolve_path(self, module_path: str, param: str | None = None) -> ModuleMatch | None:
        """The group of a base-model module named by its path, as a checkpoint names it (`model.layers.3.mlp.
        experts.2.gate_proj`); `param` names the 3-D expert parameter of an `experts` container (`gate_up_proj`).
        None if it has no place. The path is read with the LoRA key grammar of peft/naming.py (one grammar)."""
        parsed = parse_key(f"{PEFT_PREFIX}{module_path}.lora_A.weight")
        local = f"{parsed.local_name}.{param}" if param is not None else parsed.local_name
        loc = self._place_of(
            module_path, parsed.layer, parsed.expert, local, parsed.stack_prefix, parsed.is_vision, param is not None
        )
        return _with_expert(loc.match, parsed.expert)

    def locate(self, module: LoraModule) -> Location:
        """Like resolve, but says why a module has no place (used by shape_check for its findings)."""
        fused = module.kind == ModuleKind.FUSED_EXPERTS
        loc = self._place_of(
            module.module, module.layer, module.expert, module.local_name, module.stack_prefix, module.is_vision, fused
        )
        m = loc.match
        if m is None or m.expert == module.expert:
            return loc
        return Location(loc.status, _with_expert(m, module.expert), loc.detail, loc.layer_types, loc.group_kind)

    def _place_of(
        self,
        path: str,
        layer: int | None,
        expert: int | None,
        local: str,
        stack_prefix: str | None,
        is_vision: bool,
        fused: bool,
    ) -> Location:
        """Where the module at `path` sits (what a LoRA module and a checkpoint module have in common; `fused` for
        a 3-D expert parameter). A match in a layer may carry another module's expert index: see _with_expert."""
        if layer is None:
            return self._locate(path, layer, expert, local, stack_prefix, is_vision, fused)
        # perf: a per-expert adapter has ~47,000 modules (DeepSeek-V3: 58 MoE layers x 256 experts x 3) but a few
        # hundred distinct places; the answer depends on the module's path up to its expert index (the vision
        # segments, the stack, the layer and the local name) and on whether it is a 3-D parameter, so it is
        # computed once per place.
        key = (stack_prefix, layer, local, fused, expert is None, is_vision)
        loc = self._located.get(key)
        if loc is None:
            loc = self._located[key] = self._locate(path, layer, expert, local, stack_prefix, is_vision, fused)
        return loc

    def _locate(self, path, layer, expert, local, stack_prefix, is_vision, fused) -> Location:
        if is_vision or self.vision_module(path):
            return Location("vision", detail="vision tower or multimodal projector")
        if layer is None:
            return self._locate_top_level(path)
        prefix = stack_prefix or ""
        if prefix in self.schema.mtp_prefixes:
            return Location("mtp", detail=f"multi-token-prediction (MTP) layer under `{prefix}.`")
        stack = f"{prefix}.layers" if prefix else "layers"
        if stack not in self._stack_prefixes:
            return Location(
                "unknown-prefix",
                detail=f"layer stack `{stack}` is not one of {', '.join(sorted(self._stack_prefixes))}",
                expected=tuple(f"{s}.N" for s in sorted(self._stack_prefixes)),
                actual=f"{stack}.N",
            )
        if layer >= self.num_layers:
            return Location("past-end")
        return self._locate_in_layer(layer, expert, local, fused)

    def _locate_top_level(self, path: str) -> Location:
        hit = self._top_sources.get(path)
        if hit is not None:
            index, covered, canonical = hit
            return Location("ok", self._match(self._top_groups[index], covered, canonical, None))
        if any(path == p or path.startswith(p + ".") for p in self.schema.mtp_prefixes):
            return Location("mtp", detail="multi-token-prediction (MTP) module outside the main layer stack")
        return Location(
            "unknown",
            detail="not a module of this architecture",
            expected=(*self._top_sources, *(f"{s}.N.<module>" for s in sorted(self._stack_prefixes))),
        )

    def _locate_in_layer(self, layer: int, expert: int | None, local: str, fused: bool) -> Location:
        ts = self._layers.of(layer)
        hit = ts.sources.get(local)
        if hit is None:
            return self._locate_elsewhere(local, ts)
        index, covered, canonical = hit
        template = ts.templates[index]
        if template.experts is None and (expert is not None or fused):
            return Location(
                "unknown",
                detail=f"{local} carries an expert index but {template.definition.name} is not a routed-experts module",
                layer_types=ts.types,
                expected=(f"{local} without an expert index",),
                actual=f"{local} with an expert index" if expert is not None else f"{local} as a 3-D parameter",
            )
        if template.experts is not None and expert is None and not fused:
            return Location(
                "unknown",
                detail=f"{local} is a routed-experts module but has no expert index and is not a 3-D expert parameter",
                layer_types=ts.types,
                expected=(f"{local} with an expert index", f"{local} as a 3-D expert parameter"),
                actual=f"{local} without an expert index",
            )
        group = self.groups(layer)[index]
        match = self._match(group, covered, canonical, expert, fused_3d=fused)
        return Location("ok", match, layer_types=ts.types)

    def _locate_elsewhere(self, local: str, ts: _TypeSet) -> Location:
        """A name this layer's types do not have: another layer type's, one this config lacks, or unknown."""
        definition = self._family_sources.get(local)
        types = ts.types
        here = tuple(ts.sources)  # the module names this layer has, in schema order
        if definition is None:
            return Location(
                "unknown", detail=f"`{local}` is not a module name of {self.family}", layer_types=types, expected=here
            )
        if not self._evaluator.holds(definition):
            return Location(
                "unknown",
                detail=f"`{local}` exists in {self.family} only when `{definition.when}`, "
                "which this config does not satisfy",
                layer_types=types,
                group_kind=definition.kind,
                expected=here,
            )
        status = "experts-on-dense" if definition.kind == "routed_experts" else "not-on-layer-type"
        return Location(
            status,
            detail=f"`{local}` sits on {'/'.join(definition.on)} layers",
            layer_types=types,
            group_kind=definition.kind,
        )

    @staticmethod
    def _match(
        group: GroupSpec, covered: tuple[int, ...], canonical: str, expert: int | None, *, fused_3d: bool = False
    ) -> ModuleMatch:
        width_in, width_out = group.in_features, sum(group.slices[j].out_features for j in covered)
        # PEFT's lora_A sits on the output side of this 3-D parameter (schema `peft_lora_a`): its factors'
        # widths swap (A [E*r, out], B [in, r*E]); a per-expert 2-D module is an ordinary nn.Linear.
        a_on_output = fused_3d and group.peft_lora_a == "out"
        return ModuleMatch(
            group=group,
            slice_indices=covered,
            canonical=canonical,
            expert=expert,
            expected_in=width_out if a_on_output else width_in,
            expected_out=width_in if a_on_output else width_out,
            interleaved=canonical in group.interleaved,
            a_on_output=a_on_output,
        )

    def table(self) -> dict[str, Any]:
        """Everything `schemas show` prints: per distinct set of layer types, the groups with numbers."""
        out = []
        for ts in self._layers.typesets:
            first = ts.layers[0]
            out.append(
                {
                    "types": sorted(ts.types),
                    "layers": list(ts.layers),
                    "groups": [
                        {
                            **g.to_json(),
                            "path": f"{self.checkpoint_prefix}.{{layer}}.{g.local_path}",
                            "layer": None,
                            "tp": g.tp,
                        }
                        for g in self.groups(first)
                    ],
                }
            )
        return {
            "family": self.family,
            "schema_file": self.schema.file,
            "num_layers": self.num_layers,
            "mtp_layers": self.mtp_layers,
            "expert_count": self._expert_count,
            "checkpoint_prefix": self.checkpoint_prefix,
            "wrapped": self.wrapped,
            "layer_types": out,
            "top_level": [{**g.to_json(), "tp": g.tp} for g in self._top_groups],
            "tp_head_counts": [
                {"count": h.label, "value": h.value, "may_replicate": h.may_replicate} for h in self.tp_head_counts()
            ],
        }
