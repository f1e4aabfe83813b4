"""What an output layout needs to know about its loader, read from data.

`--layout sglang` / `--layout vllm` read the engine release's rule file (`lora_convert/engines/<engine>-<version>.json`,
through lora_convert.engines.rules.layout_document): its `layout` object says how a planned group is cut into the
engine's modules, renamed, and what to tell the user; the groups it REFUSES are that file's `planned_group` rules,
the same rules `validate --engine` reports, so the two can never disagree. `--layout peft` reads
`lora_convert/convert/peft_layout.json` (PEFT applies every module: cuts and renames only, no refusals; its
`vision_modules` says that vision-tower and projector modules are written, at the adapter's own paths).
A rule matches a planned group through `when`, by what the schema says about the group:

  kind      the schema's group kind (router, mla, mlp, shared_expert, ...)
  name      the group name (qkv_proj, experts.down_proj, in_proj_ba, ...); `leaf` its last component
  slices    the slice names, in order
  experts   whether it is a routed-expert group; `layered` whether it sits on a layer
  family    the schema family, only where the engine behaves per model class rather than per architecture
  architectures  the base config's `architectures` (the model class the engine builds: a text-only and a VL
            class of one family can differ)
  width_differs  {"width": "in" | "first_slice_out", "from": EXPR}: the group's width differs from EXPR, an
            expression of the base config and `layer` (lora_convert/arch/expr.py); {want} and {width} are
            then available to the rule's reason.
  not_architectures  the base's `architectures` has none of these (a class whose own hook avoids the problem)
  config_differs  {"field": F, "from": G}: the base config sets F to an integer and G to something else (or
            leaves G unset: the config class's default); an engine that sizes one buffer from G for layers that
            are F wide. {width_field}, {width}, {buffer_field}, {buffer} are then available to the reason.
  vision_tower  {"model_types": [...]}: the base's vision tower (top-level `vision_config`) is one of these and
            has the group's layer index (layer < its num_hidden_layers); an engine that files vision linears by
            their `layers.N.` index next to the text layer N. {vision_type} and {vision_layers} are then available.
  base_has_kind  [kind, ...]: some layer of the base holds a group of one of these kinds (the schema's
            `layer_types` and each group's `on`, evaluated on the base config), whether or not the adapter trains
            it; an engine that wraps the base's modules by name needs a LoRA buffer for a module the adapter never
            touched (a dense MLP layer's down_proj among MoE layers). {base_kind} and {base_kind_layers} are then
            available.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from lora_convert.arch.expr import evaluate
from lora_convert.convert.plan import PlannedGroup
from lora_convert.engines.profiles import render
from lora_convert.engines.rules import LAYOUT_SPEC, installed_engines, layout_document, resolve_engine
from lora_convert.io.shipped_data import load_shipped
from lora_convert.text import spans

CONVERT_PACKAGE = "lora_convert.convert"
PEFT_LAYOUT_FILE = "peft_layout.json"
STACKED_LAYOUT = "stacked"  # lora-convert's own layout (docs/stacked-layout.md): groups as planned, no rules
PEFT_LAYOUT = "peft"  # what PEFT loads: its rules are PEFT_LAYOUT_FILE


MLX_LAYOUT = "mlx"  # what mlx-lm's load_adapters loads: lora_convert/convert/mlx_layout.py
GGUF_LAYOUT = "gguf"  # what llama.cpp loads (one adapter.gguf file): lora_convert/convert/gguf_layout.py

BUILT_IN_LAYOUTS = (STACKED_LAYOUT, PEFT_LAYOUT, MLX_LAYOUT, GGUF_LAYOUT)  # the layouts that are not an engine's


def rule_layouts() -> tuple[str, ...]:
    """The layouts written through layout rules: `peft`, then one per engine with a rule file (an engine may also
    be named with its release: `sglang==0.5.23`)."""
    return (PEFT_LAYOUT, *installed_engines())


def output_layouts() -> tuple[str, ...]:
    """Every layout `normalize` writes: the built-in `stacked` and `peft`, then one per engine with a rule file."""
    return (*BUILT_IN_LAYOUTS, *installed_engines())


@dataclass(frozen=True)
class When:
    """A condition on a planned group (see the module docstring)."""

    fields: Mapping[str, Any]

    def match(
        self, group: PlannedGroup, family: str, config: Mapping, classes=(), top: Mapping | None = None, arch=None
    ) -> dict[str, Any] | None:
        """None when the group does not match; otherwise the values the rule's text may cite. `classes`: the base
        config's `architectures`; `top`: its top-level config (a VL base's, holding `vision_config`); `arch`: the
        bound base (lora_convert.arch.architecture.Architecture; `base_has_kind` reads it, and without it fails)."""
        f = self.fields
        if "architectures" in f and not set(classes) & set(f["architectures"]):
            return None
        if set(classes) & set(f.get("not_architectures", ())):
            return None
        leaf = group.name.rsplit(".", 1)[-1]
        checks = (("kind", group.kind), ("name", group.name), ("leaf", leaf), ("family", family))
        if any(key in f and value not in f[key] for key, value in checks):
            return None
        if "slices" in f and [s.name for s in group.slices] != f["slices"]:
            return None
        if "experts" in f and bool(group.experts) != f["experts"]:
            return None
        if "layered" in f and (group.layer is not None) != f["layered"]:
            return None
        values: dict[str, Any] = {}
        if "width_differs" in f:
            spec = f["width_differs"]
            width = group.in_features if spec["width"] == "in" else group.slices[0].out_features
            want = evaluate(spec["from"], config, layer=group.layer)
            if want == width:
                return None
            values.update(want=want, width=width)
        for key, condition in (("config_differs", _config_differs), ("vision_tower", _vision_tower)):
            if key in f:
                found = condition(f[key], group, config, top or {})
                if found is None:
                    return None
                values.update(found)
        if "base_has_kind" in f:
            found = _base_has_kind(f["base_has_kind"], arch)
            if found is None:
                return None
            values.update(found)
        return values


def _base_has_kind(kinds: list[str], arch) -> dict[str, Any] | None:
    """`base_has_kind` of a When (the module docstring): the values it gives, or None (no bound base: no match)."""
    if arch is None:
        return None
    layers: list[int] = []
    found: set[str] = set()
    for _, members in arch.layer_type_sets():  # one representative layer per set of layer types
        held = {g.kind for g in arch.groups(members[0])} & set(kinds)
        if held:
            found |= held
            layers += members
    if not layers:
        return None
    return {"base_kind": "/".join(sorted(found)), "base_kind_layers": spans(sorted(layers))}


def _config_differs(spec: Mapping, group: PlannedGroup, config: Mapping, top: Mapping) -> dict[str, Any] | None:
    """`config_differs` of a When (the module docstring): the values it gives, or None."""
    width, buffer = config.get(spec["field"]), config.get(spec["from"])
    if not isinstance(width, int) or isinstance(width, bool) or buffer == width:
        return None
    return {
        "width_field": spec["field"],
        "width": width,
        "buffer_field": spec["from"],
        "buffer": buffer if isinstance(buffer, int) else "unset",
    }


def _vision_tower(spec: Mapping, group: PlannedGroup, config: Mapping, top: Mapping) -> dict[str, Any] | None:
    """`vision_tower` of a When (the module docstring): the values it gives, or None."""
    vision = top.get("vision_config")
    if not isinstance(vision, Mapping) or vision.get("model_type") not in spec["model_types"]:
        return None
    depth = vision.get("num_hidden_layers")
    if not isinstance(depth, int) or group.layer is None or group.layer >= depth or group.experts:
        return None
    return {"vision_type": vision["model_type"], "vision_layers": depth}


@dataclass(frozen=True)
class Refusal:
    code: str  # engine.<engine>.<rule id>: the code validate --engine reports for the same groups
    when: When
    reason: str
    source: str
    outcome: str = "load-failure"  # what the engine does with the ORIGINAL adapter's modules of such a group


@dataclass(frozen=True)
class Cut:
    """A group written as the modules `modules` ((name, slice names) each). Slices no module holds are left out of
    the output; `unheld` says why, and the layout refuses the group when those slices carry a delta."""

    when: When
    modules: tuple[tuple[str, tuple[str, ...]], ...]
    unheld: Refusal | None


@dataclass(frozen=True)
class Rename:
    when: When
    names: Mapping[str, str]
    source: str


@dataclass(frozen=True)
class Note:
    when: When
    text: str
    source: str


@dataclass(frozen=True)
class LayoutRules:
    layout: str
    engine: str  # what the report and summary call the target (e.g. "SGLang 0.5.23")
    served_by: str  # who cannot serve a refused group, in the refusal message
    refuse: tuple[Refusal, ...]
    cuts: tuple[Cut, ...]
    renames: tuple[Rename, ...]
    container_renames: tuple[Rename, ...]  # path components of a group's container (Mixtral block_sparse_moe -> mlp)
    notes: tuple[Note, ...]
    embedding_leaf: str | None  # the leaf an embedding module must have (None: keep the base's own name)
    auto_detected_leaves: tuple[str, ...]  # targets the engine creates only by auto-detection (-> all-linear)
    auto_detected_note: str
    experts_3d_classes: tuple[str, ...] = ()  # model classes whose routed experts are written as PEFT 3-D params
    experts_3d_all: bool = False  # every model's routed experts as PEFT 3-D params (transformers 5 holds them so)
    # "module_leaves": the leaf names of the modules written; "module_paths_beside_vision": the same, but every module's
    # full path where the base is a multimodal wrapper with a vision tower (PEFT, which wraps a tower's projections of
    # the same leaf name too); "engine_names": the names the engine normalizes modules to (SGLang)
    target_modules: str = "module_leaves"
    keeps_vision: bool = False  # vision-tower and projector modules are written, not refused (`vision_modules`)
    # `converted_targets` (peft layout): (model types, {target_modules name: what PEFT re-targets it to}) per group
    converted_targets: tuple[tuple[tuple[str, ...], Mapping[str, str]], ...] = ()
    converted_note: str = ""

    def experts_3d(self, classes) -> bool:
        return self.experts_3d_all or bool(set(classes) & set(self.experts_3d_classes))

    def converted_targets_of(self, model_type: str | None) -> Mapping[str, str]:
        """The target_modules names the loader re-targets for a base of `model_type`, and what it makes of each."""
        return next((targets for types, targets in self.converted_targets if model_type in types), {})

    def refusal(
        self, group: PlannedGroup, family: str, config: Mapping, classes=(), top: Mapping | None = None, arch=None
    ):
        """(Refusal, its reason rendered for this group, the values its `when` gave) of the first refusal that
        matches the group, or None. `top`: the base's top-level config (When's `vision_tower` reads it); `arch`:
        the bound base (When's `base_has_kind` reads it)."""
        for rule in self.refuse:
            values = rule.when.match(group, family, config, classes, top, arch)
            if values is not None:
                values.setdefault("count", len({id(src.module) for sl in group.slices for src in sl.sources()}))
                values.setdefault("layers", "-" if group.layer is None else str(group.layer))
                return rule, render(rule.reason, values), values
        return None

    def cut(self, group: PlannedGroup, family: str, config: Mapping, classes=()) -> Cut | None:
        return next((c for c in self.cuts if c.when.match(group, family, config, classes) is not None), None)

    def rename(self, group: PlannedGroup, family: str, config: Mapping, classes=()) -> Mapping[str, str]:
        names: dict[str, str] = {}
        for rule in self.renames:
            if rule.when.match(group, family, config, classes) is not None:
                names.update(rule.names)
        return names

    def container(self, group: PlannedGroup, family: str, config: Mapping, classes=()) -> str:
        """The group's container path (its key without the last component), with the layout's renames applied."""
        if "." not in group.key:
            return ""
        return self.rename_path(group.key.rsplit(".", 1)[0], group, family, config, classes)

    def rename_path(self, path: str, group: PlannedGroup, family: str, config: Mapping, classes=()) -> str:
        """`path` (a module path of `group`'s layer) with the layout's container renames applied."""
        path = "." + path + "."
        for rule in self.container_renames:  # whole dotted components: {"language_model.model": "model.language_model"}
            if rule.when.match(group, family, config, classes) is not None:
                for old, new in rule.names.items():
                    path = path.replace(f".{old}.", f".{new}.")
        return path.strip(".")

    def notes_for(self, groups: list[PlannedGroup], family: str, config: Mapping, classes=()) -> list[str]:
        return [n.text for n in self.notes if any(n.when.match(g, family, config, classes) is not None for g in groups)]


# ------------------------------------------------------------------------------------------------ loading
@cache
def load_layout_rules(layout: str) -> LayoutRules:
    """The rules of `layout` (`peft`, or an engine release: `sglang`, `vllm==0.33.0`). Raises SchemaError, or
    UsageError for an engine release that has no rule file. Both files are checked against LAYOUT_SPEC (peft_layout.json
    by it, an engine file as part of its own spec); PEFT applies every module, so the PEFT layout refuses nothing."""
    if layout == PEFT_LAYOUT:
        data = load_shipped(CONVERT_PACKAGE, PEFT_LAYOUT_FILE, LAYOUT_SPEC, f"convert/{PEFT_LAYOUT_FILE}")
        return _parse({**data, "refuse": []}, engine=PEFT_LAYOUT)
    return _parse(layout_document(layout), engine=resolve_engine(layout).engine)


def _parse(data: dict, engine: str) -> LayoutRules:
    """LayoutRules of a layout object that fits LAYOUT_SPEC."""
    auto = data.get("auto_detected_targets", {})
    experts_3d = data.get("experts_3d", {})
    return LayoutRules(
        layout=data["layout"],
        engine=data["engine"],
        served_by=data["served_by"],
        refuse=tuple(_rule_refusal(r, engine) for r in data["refuse"]),
        cuts=tuple(
            Cut(
                When(c["when"]),
                tuple((m["name"], tuple(m["slices"])) for m in c["modules"]),
                _unheld(c["unheld"], engine) if "unheld" in c else None,
            )
            for c in data.get("cut", [])
        ),
        renames=tuple(Rename(When(r["when"]), dict(r["names"]), r["source"]) for r in data.get("rename", [])),
        container_renames=tuple(
            Rename(When(r["when"]), dict(r["names"]), r["source"]) for r in data.get("rename_containers", [])
        ),
        notes=tuple(Note(When(n["when"]), n["text"], n["source"]) for n in data.get("notes", [])),
        embedding_leaf=data.get("embedding_leaf"),
        auto_detected_leaves=tuple(auto.get("leaves", ())),
        auto_detected_note=auto.get("note", ""),
        target_modules=data.get("target_modules", "module_leaves"),
        experts_3d_classes=tuple(experts_3d.get("architectures", ())),
        experts_3d_all=experts_3d.get("all", False),
        keeps_vision=data.get("vision_modules", {}).get("written", False),
        converted_targets=tuple(
            (tuple(g["model_types"]), dict(g["targets"])) for g in data.get("converted_targets", {}).get("groups", [])
        ),
        converted_note=data.get("converted_targets", {}).get("note", ""),
    )


def _rule_refusal(rule: dict, engine: str) -> Refusal:
    """A planned_group rule of the engine file (validated by lora_convert.engines.rules) as a refusal."""
    return Refusal(
        f"engine.{engine}.{rule['id']}",
        When(rule["params"]["when"]),
        rule["message"],
        rule["source"],
        rule["outcome"],
    )


def _unheld(entry: dict, engine: str) -> Refusal:
    """Rows a cut leaves out: `{"rule": id, "reason": ...}`, the id of the engine's validate rule that reports them."""
    return Refusal(f"engine.{engine}.{entry['rule']}", When({}), entry["reason"], entry["source"], "dropped")
