"""Modules an engine layout writes twice on purpose, recognised in lora-convert's own output and verified.

`normalize --layout vllm` writes some modules a second time under another name, where the engine's packing reads
that name: the rule files' layout `cut` lists a module whose slices are another module's (Gemma-4's k_proj LoRA
written again as v_proj on attention_k_eq_v layers, vllm-0.33.0.json). Read back, such a module is one the base
does not have on that layer, and the shape check would call it a module on the wrong layer type. An adapter folder
whose manifest (lora_convert_manifest.json) says it is lora-convert's output of an engine layout has its copies
found here, from that layout's own rules; a copy counts only when its factors are byte for byte the copied
module's, so a hand-edited file is still an error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lora_convert.codes import finding
from lora_convert.convert.engine_layouts import model_classes
from lora_convert.convert.layout_rules import load_layout_rules, rule_layouts
from lora_convert.errors import LoraConvertError
from lora_convert.findings import Finding
from lora_convert.io.output_folder import written_layout
from lora_convert.text import spans

if TYPE_CHECKING:
    from lora_convert.convert.plan import Plan
    from lora_convert.peft.adapter import LoraModule

# the shape check's finding for a module the base does not have on that layer: what a layout copy looks like; the
# plan, which does not tell the two apart, drops it as unknown
_MISPLACED = "modules.not-on-layer-type"
_UNPLANNED = ("modules.unknown", _MISPLACED)


@dataclass(frozen=True)
class LayoutCopy:
    """`module` holds the same factors as `copy_of`, written so by `layout`."""

    module: LoraModule
    copy_of: LoraModule
    layout: str


def find_layout_copies(prepared) -> list[LayoutCopy]:
    """The verified copies in an engine layout's output (empty for any other adapter or when nothing can be planned:
    the checks then report the adapter as it is). `prepared`: lora_convert.pipeline.prepared.PreparedAdapter."""
    layout = written_layout(prepared.source.path)
    if layout is None or layout.partition("==")[0] not in rule_layouts():
        return []
    try:
        plan = prepared.plan(drop_unsupported=True, shapes=False)
        rules = load_layout_rules(layout)
    except LoraConvertError:
        return []
    copies = []
    for module in _misplaced_modules(plan):
        source = _copied_module(plan, rules, module)
        if source is not None and _same_factors(prepared, module, source):
            copies.append(LayoutCopy(module, source, layout))
    return copies


def _misplaced_modules(plan: Plan) -> list[LoraModule]:
    dropped = {key for d in plan.dropped if d.code in _UNPLANNED for key in d.keys}
    return [m for m in plan.adapter.modules if m.layer is not None and m.lora_A is not None and m.lora_A.key in dropped]


def _copied_module(plan: Plan, rules, module: LoraModule) -> LoraModule | None:
    """The module whose factors the layout writes again as `module`: a cut of a group of `module`'s layer and
    container writes one slice of that group under its own name and again under `module`'s leaf, which is no slice
    of the group (a module renamed, not repeated, is no copy)."""
    container, _, leaf = module.module.rpartition(".")
    config = dict(getattr(plan.arch, "config", None) or {})
    classes = model_classes(plan)
    for group in plan.groups:
        if group.layer != module.layer or group.key.rpartition(".")[0] != container:
            continue
        cut = rules.cut(group, plan.family, config, classes)
        written = dict(cut.modules) if cut else {}  # module name -> the slices it holds
        names = [s.name for s in group.slices]
        copied = written.get(leaf, ())
        if len(copied) != 1 or leaf in names or copied[0] not in names or written.get(copied[0]) != copied:
            continue
        sources = group.slices[names.index(copied[0])].sources()
        if len(sources) == 1:
            return sources[0].module
    return None


def _same_factors(prepared, module: LoraModule, source: LoraModule) -> bool:
    pairs = ((module.lora_A, source.lora_A), (module.lora_B, source.lora_B))
    if any(a is None or b is None or a.shape != b.shape or a.dtype != b.dtype for a, b in pairs):
        return False
    if module.scaling != source.scaling:
        return False
    read = prepared.adapter.read
    return all(np.array_equal(read(a.key), read(b.key)) for a, b in pairs)


def with_layout_copies(shape_findings: list[Finding], copies: list[LayoutCopy]) -> list[Finding]:
    """The shape findings with each verified copy taken out of the misplaced-module findings (a finding left with
    no key goes) and reported once per copied name as `modules.layout-copy`."""
    if not copies:
        return shape_findings
    copied_keys = {k for c in copies for k in c.module.keys}
    out = []
    for f in shape_findings:
        if f.code == _MISPLACED and copied_keys & set(f.keys):
            rest = [k for k in f.keys if k not in copied_keys]
            if not rest:
                continue
            f = dataclasses.replace(f, keys=rest)
        out.append(f)
    return out + _copy_findings(copies)


def _copy_findings(copies: list[LayoutCopy]) -> list[Finding]:
    by_name: dict[tuple[str, str, str], list[LayoutCopy]] = {}
    for c in copies:
        by_name.setdefault((c.module.local_name, c.copy_of.local_name, c.layout), []).append(c)
    return [
        finding(
            "modules.layout-copy",
            f"`{name}` on layer(s) {spans(c.module.layer for c in group)} repeats `{source}`'s factors exactly: "
            f"written so by `normalize --layout {layout}` (this folder's lora_convert_manifest.json), whose "
            "engine reads the second name; the base has no such module there.",
            keys=[k for c in group for k in c.module.keys],
        )
        for (name, source, layout), group in by_name.items()
    ]
