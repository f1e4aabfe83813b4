"""What the engine layouts need to know about an engine, read from the `layout` key of its rule file.

`lora_convert/engines/<engine>.json` holds, besides the validate rules, a `layout` object for the output layout
that engine loads (`sglang.json`: --layout sglang; `vllm.json`: --layout peft): which planned groups it refuses,
how a group is cut into the engine's modules, renames, and notes for the user, each citing its source. A rule
matches a planned group through `when`, by what the schema says about the group:

  kind      the schema's group kind (router, mla, mlp, shared_expert, ...)
  name      the group name (qkv_proj, experts.down_proj, in_proj_ba, ...); `leaf` its last component
  slices    the slice names, in order
  experts   whether it is a routed-expert group; `layered` whether it sits on a layer
  family    the schema family, only where the engine behaves per model class rather than per architecture
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
from lora_convert.errors import SchemaError

ENGINE_PACKAGE = "lora_convert.engines"
_WHEN_KEYS = {"kind", "name", "leaf", "slices", "experts", "layered", "family", "width_differs"}


@dataclass(frozen=True)
class When:
    """A condition on a planned group (see the module docstring)."""

    fields: Mapping[str, Any]

    def match(self, group: PlannedGroup, family: str, config: Mapping) -> dict[str, Any] | None:
        """None when the group does not match; otherwise the values the rule's text may cite."""
        f = self.fields
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
    code: str
    when: When
    reason: str
    source: str


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
    notes: tuple[Note, ...]
    embedding_leaf: str | None  # the leaf an embedding module must have (None: keep the base's own name)
    auto_detected_leaves: tuple[str, ...]  # targets the engine creates only by auto-detection (-> all-linear)
    auto_detected_note: str

    def refusal(self, group: PlannedGroup, family: str, config: Mapping) -> tuple[str, str] | None:
        """(reason, code) of the first refusal that matches the group, or None."""
        for rule in self.refuse:
            values = rule.when.match(group, family, config)
            if values is not None:
                return rule.reason.format(**values), rule.code
        return None

    def cut(self, group: PlannedGroup, family: str, config: Mapping) -> Cut | None:
        return next((c for c in self.cuts if c.when.match(group, family, config) is not None), None)

    def rename(self, group: PlannedGroup, family: str, config: Mapping) -> Mapping[str, str]:
        names: dict[str, str] = {}
        for rule in self.renames:
            if rule.when.match(group, family, config) is not None:
                names.update(rule.names)
        return names

    def notes_for(self, groups: list[PlannedGroup], family: str, config: Mapping) -> list[str]:
        return [n.text for n in self.notes if any(n.when.match(g, family, config) is not None for g in groups)]


# ------------------------------------------------------------------------------------------------ loading
@cache
def load_layout_rules(layout: str) -> LayoutRules:
    """The rules of `layout`, from the engine file whose `layout.layout` names it. Raises SchemaError."""
    for entry in sorted(resources.files(ENGINE_PACKAGE).iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            doc = json.loads(entry.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise SchemaError(f"engines/{entry.name} is not valid JSON ({exc}).") from None
        data = doc.get("layout") if isinstance(doc, dict) else None
        if isinstance(data, dict) and data.get("layout") == layout:
            return _parse(data, f"engines/{entry.name} layout")
    raise SchemaError(f"No engine file describes the output layout {layout!r}.")


def _parse(data: dict, where: str) -> LayoutRules:
    try:
        return LayoutRules(
            layout=data["layout"],
            engine=data["engine"],
            served_by=data["served_by"],
            refuse=tuple(_refusal(r, f"{where}.refuse[{i}]") for i, r in enumerate(data.get("refuse", []))),
            cuts=tuple(
                Cut(
                    _when(c["when"], f"{where}.cut[{i}]"),
                    tuple((m["name"], tuple(m["slices"])) for m in c["modules"]),
                    _refusal(c["unheld"], f"{where}.cut[{i}].unheld") if c.get("unheld") else None,
                )
                for i, c in enumerate(data.get("cut", []))
            ),
            renames=tuple(
                Rename(_when(r["when"], f"{where}.rename[{i}]"), dict(r["names"]), _source(r, f"{where}.rename[{i}]"))
                for i, r in enumerate(data.get("rename", []))
            ),
            notes=tuple(
                Note(_when(n["when"], f"{where}.notes[{i}]"), n["text"], _source(n, f"{where}.notes[{i}]"))
                for i, n in enumerate(data.get("notes", []))
            ),
            embedding_leaf=data.get("embedding_leaf"),
            auto_detected_leaves=tuple(data.get("auto_detected_targets", {}).get("leaves", ())),
            auto_detected_note=data.get("auto_detected_targets", {}).get("note", ""),
        )
    except (KeyError, TypeError) as exc:
        raise SchemaError(f"{where}: malformed entry ({type(exc).__name__}: {exc}).") from None


def _refusal(r: dict, where: str) -> Refusal:
    return Refusal(r["code"], _when(r.get("when", {}), where), r["reason"], _source(r, where))


def _source(r: dict, where: str) -> str:
    if not r.get("source"):
        raise SchemaError(f"{where}: every layout rule cites its `source`.")
    return r["source"]


def _when(fields: dict, where: str) -> When:
    unknown = set(fields) - _WHEN_KEYS
    if unknown:
        raise SchemaError(f"{where}.when: unknown condition(s) {sorted(unknown)}; known: {sorted(_WHEN_KEYS)}.")
    return When(dict(fields))
