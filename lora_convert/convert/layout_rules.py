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
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from lora_convert.arch.expr import evaluate
from lora_convert.convert.plan import PlannedGroup
from lora_convert.engines.profiles import render
from lora_convert.engines.rules import layout_document, resolve_engine
from lora_convert.errors import SchemaError

CONVERT_PACKAGE = "lora_convert.convert"
_WHEN_KEYS = {"kind", "name", "leaf", "slices", "experts", "layered", "family", "architectures", "width_differs"}
PEFT_LAYOUT_FILE = "peft_layout.json"


@dataclass(frozen=True)
class When:
    """A condition on a planned group (see the module docstring)."""

    fields: Mapping[str, Any]

    def match(self, group: PlannedGroup, family: str, config: Mapping, classes=()) -> dict[str, Any] | None:
        """None when the group does not match; otherwise the values the rule's text may cite. `classes`: the base
        config's `architectures`."""
        f = self.fields
        if "architectures" in f and not set(classes) & set(f["architectures"]):
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
        return values


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
    target_modules: str = "module_leaves"  # or "engine_names": the names the engine normalizes modules to (SGLang)
    keeps_vision: bool = False  # vision-tower and projector modules are written, not refused (`vision_modules`)

    def experts_3d(self, classes) -> bool:
        return self.experts_3d_all or bool(set(classes) & set(self.experts_3d_classes))

    def refusal(self, group: PlannedGroup, family: str, config: Mapping, classes=()):
        """(Refusal, its reason rendered for this group, the values its `when` gave) of the first refusal that
        matches the group, or None."""
        for rule in self.refuse:
            values = rule.when.match(group, family, config, classes)
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
    UsageError for an engine release that has no rule file."""
    if layout == "peft":
        text = resources.files(CONVERT_PACKAGE).joinpath(PEFT_LAYOUT_FILE).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SchemaError(f"convert/{PEFT_LAYOUT_FILE} is not valid JSON ({exc}).") from None
        if data.get("refuse"):
            raise SchemaError(f"convert/{PEFT_LAYOUT_FILE}: PEFT applies every module; the layout refuses nothing.")
        return _parse({**data, "refuse": []}, f"convert/{PEFT_LAYOUT_FILE}", engine="peft")
    data = layout_document(layout)
    return _parse(data, f"{data['_file']} layout", engine=resolve_engine(layout).engine)


def _parse(data: dict, where: str, engine: str) -> LayoutRules:
    try:
        return LayoutRules(
            layout=data["layout"],
            engine=data["engine"],
            served_by=data["served_by"],
            refuse=tuple(_rule_refusal(r, engine) for r in data.get("refuse", [])),
            cuts=tuple(
                Cut(
                    _when(c["when"], f"{where}.cut[{i}]"),
                    tuple((m["name"], tuple(m["slices"])) for m in c["modules"]),
                    _unheld(c["unheld"], data.get("refuse", []), engine, f"{where}.cut[{i}].unheld")
                    if c.get("unheld")
                    else None,
                )
                for i, c in enumerate(data.get("cut", []))
            ),
            renames=tuple(
                Rename(_when(r["when"], f"{where}.rename[{i}]"), dict(r["names"]), _source(r, f"{where}.rename[{i}]"))
                for i, r in enumerate(data.get("rename", []))
            ),
            container_renames=tuple(
                Rename(
                    _when(r["when"], f"{where}.rename_containers[{i}]"),
                    dict(r["names"]),
                    _source(r, f"{where}.rename_containers[{i}]"),
                )
                for i, r in enumerate(data.get("rename_containers", []))
            ),
            notes=tuple(
                Note(_when(n["when"], f"{where}.notes[{i}]"), n["text"], _source(n, f"{where}.notes[{i}]"))
                for i, n in enumerate(data.get("notes", []))
            ),
            embedding_leaf=data.get("embedding_leaf"),
            auto_detected_leaves=tuple(data.get("auto_detected_targets", {}).get("leaves", ())),
            auto_detected_note=data.get("auto_detected_targets", {}).get("note", ""),
            target_modules=data.get("target_modules", "module_leaves"),
            experts_3d_classes=tuple((data.get("experts_3d") or {}).get("architectures", ())),
            experts_3d_all=bool((data.get("experts_3d") or {}).get("all", False)),
            keeps_vision=_vision_modules(data.get("vision_modules"), f"{where}.vision_modules"),
        )
    except (KeyError, TypeError) as exc:
        raise SchemaError(f"{where}: malformed entry ({type(exc).__name__}: {exc}).") from None


def _vision_modules(entry: dict | None, where: str) -> bool:
    """`{"written": true, "source": ...}`: the loader applies vision-tower and projector LoRA where the adapter has it."""
    if entry is None:
        return False
    _source(entry, where)
    if not isinstance(entry.get("written"), bool):
        raise SchemaError(f"{where}: `written` must be true or false.")
    return entry["written"]


def _rule_refusal(rule: dict, engine: str) -> Refusal:
    """A planned_group rule of the engine file (validated by lora_convert.engines.rules) as a refusal."""
    where = f"engines/{engine} rule {rule['id']}"
    return Refusal(
        f"engine.{engine}.{rule['id']}",
        _when(rule["params"]["when"], where),
        rule["message"],
        rule["source"],
        rule["outcome"],
    )


def _unheld(entry: dict, rules: list[dict], engine: str, where: str) -> Refusal:
    """Rows a cut leaves out: `{"rule": id, "reason": ...}`, the id of the engine's validate rule that reports them."""
    if entry.get("rule") is None:
        raise SchemaError(f"{where}: name the engine rule (`rule`) that reports these rows.")
    return Refusal(f"engine.{engine}.{entry['rule']}", When({}), entry["reason"], _source(entry, where), "dropped")


def _source(r: dict, where: str) -> str:
    if not r.get("source"):
        raise SchemaError(f"{where}: every layout rule cites its `source`.")
    return r["source"]


def _when(fields: dict, where: str) -> When:
    unknown = set(fields) - _WHEN_KEYS
    if unknown:
        raise SchemaError(f"{where}.when: unknown condition(s) {sorted(unknown)}; known: {sorted(_WHEN_KEYS)}.")
    return When(dict(fields))
