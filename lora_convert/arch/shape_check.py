"""Header-only shape validation of an adapter against a bound architecture schema.

`check_shapes(adapter, arch)` looks at every LoRA module's tensor shapes (read from the safetensors header by
`adapter.py`; no tensor data is touched) and reports every problem at once:

| code | severity | when |
|---|---|---|
| shapes.in-features | error | lora_A's in-dim is not the schema's `in` for that module at that layer |
| shapes.out-features | error | lora_B's out-dim (or a DoRA magnitude's length) is not the covered slices' `out` |
| shapes.experts | error | a 3-D expert LoRA holds a different number of experts than the config |
| layers.past-end | error | layer index >= num_hidden_layers (MTP/NextN layers say so), or an `mtp.` module |
| experts.index-past-end | error | per-expert module with expert index >= the expert count |
| experts.on-dense-layer | error | routed-expert LoRA on a layer without routed experts |
| modules.not-on-layer-type | error | a module of the family on a layer of the wrong type (self_attn on a linear-attention layer) |
| modules.unknown | error | not a module of this architecture (or an unknown layer-stack prefix) |
| modules.vision | warning | vision tower / multimodal projector LoRA (recognized, not sized) |
| modules.router | info | LoRA on an MoE router (PEFT's all-linear does this) |

Rank problems (A vs B, tensors vs adapter_config.json) are reported by `adapter.py` and not repeated here.
Modules with the same problem in many places (an unknown name on every layer, every vision module) are folded
into one finding that lists all their keys; shape mismatches are one finding per module.
"""  # noqa: E501 (a Markdown table row cannot wrap; the noqa of a multi-line string goes on its last line)

from __future__ import annotations

from collections import defaultdict

from lora_convert.arch.schema import Architecture, Location, ModuleMatch
from lora_convert.codes import finding
from lora_convert.findings import Finding
from lora_convert.peft.adapter import Adapter, LoraModule, ModuleKind


def _layers_text(layers: list[int]) -> str:
    layers = sorted(set(layers))
    if len(layers) <= 8:
        return ", ".join(map(str, layers))
    return f"{', '.join(map(str, layers[:8]))}, ... ({len(layers)} layers)"


class _Folded:
    """Findings of one kind folded by a key, so a problem repeated on every layer is reported once."""

    def __init__(self) -> None:
        self.keys: dict[tuple, list[str]] = defaultdict(list)
        self.layers: dict[tuple, list[int]] = defaultdict(list)
        self.extra: dict[tuple, list] = defaultdict(list)

    def add(self, fold: tuple, module: LoraModule, extra=None) -> None:
        self.keys[fold].extend(module.keys)
        if module.layer is not None:
            self.layers[fold].append(module.layer)
        if extra is not None:
            self.extra[fold].append(extra)


def check_shapes(adapter: Adapter, arch: Architecture) -> list[Finding]:
    """Check every LoRA module of `adapter` against `arch`; returns all findings (empty when clean)."""
    findings: list[Finding] = []
    vision: list[str] = []
    vision_modules = 0
    routers = _Folded()
    unknown = _Folded()
    wrong_type = _Folded()
    on_dense = _Folded()
    past_end = _Folded()
    mtp = _Folded()  # modules under a top-level MTP stack (`mtp.`)
    expert_past_end = _Folded()
    expert_count = arch.expert_count()
    for module in adapter.modules:
        if not module.is_complete:
            continue  # adapter.py already reported the missing factor
        if module.kind == ModuleKind.FUSED_EXPERTS and module.param is None:
            continue  # adapter.py already reported that the wrapped parameter is unknown
        loc: Location = arch.locate(module)
        if loc.status == "vision":
            vision.extend(module.keys)
            vision_modules += 1
            continue
        if loc.status in ("unknown", "unknown-prefix"):
            name = module.local_name if module.layer is not None else module.module
            unknown.add((name, module.stack_prefix, loc.detail), module, loc)
            continue
        if loc.status == "mtp":
            mtp.add((module.stack_prefix, loc.detail), module, module.module)
            continue
        if loc.status == "past-end":
            past_end.add((module.layer,), module)
            continue
        if loc.status == "experts-on-dense":
            on_dense.add((module.local_name, loc.detail), module, "+".join(sorted(loc.layer_types)))
            continue
        if loc.status == "not-on-layer-type":
            wrong_type.add((module.local_name, loc.detail), module, "+".join(sorted(loc.layer_types)))
            continue
        match = loc.match
        assert match is not None
        if match.group.kind == "router":
            routers.add((match.group.name,), module)
        if match.expert is not None and match.group.experts is not None and match.expert >= match.group.experts:
            expert_past_end.add((module.local_name,), module, match.expert)
            continue
        findings.extend(_shape_findings(module, match, expert_count))

    if vision:
        findings.append(
            finding(
                "modules.vision",
                f"{vision_modules} LoRA module(s) sit in the vision tower or multimodal projector; they are recognized "
                "but not checked against a text schema, and text-only serving engines do not load them.",
                keys=vision,
                fix="Drop them (normalize --drop-unsupported) for text-only serving; `normalize --layout peft` writes "
                "them for PEFT or an engine that serves the vision tower with LoRA.",
            )
        )
    for (name,), keys in routers.keys.items():
        findings.append(
            finding(
                "modules.router",
                f"LoRA on the MoE router `{name}` on layer(s) {_layers_text(routers.layers[(name,)])} (PEFT's all-linear and "
                "its v4->v5 conversion target routers); some engines do not apply router LoRA.",
                keys=keys,
            )
        )
    for (name, prefix, detail), keys in unknown.keys.items():
        layers = unknown.layers[(name, prefix, detail)]
        where = f" on layer(s) {_layers_text(layers)}" if layers else ""
        locations = unknown.extra[(name, prefix, detail)]
        # What the schema has in those places (layers of different types have different modules): all of it, once.
        expected = list(dict.fromkeys(e for loc in locations for e in loc.expected))
        findings.append(
            finding(
                "modules.unknown",
                f"`{name}`{where} is not a LoRA-able module of {arch.family} ({detail}).",
                keys=keys,
                expected=expected or None,
                actual=locations[0].actual or name,
                fix="Check that --base is the adapter's base model; `lora-convert schemas show` lists the modules.",
            )
        )
    for (prefix, detail), keys in mtp.keys.items():
        findings.append(
            finding(
                "layers.past-end",
                f"{len(set(mtp.extra[(prefix, detail)]))} LoRA module(s) belong to the {detail}; "
                f"serving engines index LoRA by the {arch.num_layers} main layers only.",
                keys=keys,
                expected=f"layers 0..{arch.num_layers - 1}",
                actual=prefix,
                fix="Drop the MTP modules (normalize --drop-unsupported).",
            )
        )
    for (layer,), keys in sorted(past_end.keys.items()):
        if layer < arch.num_layers + arch.mtp_layers:
            what = (
                f"is an MTP/NextN layer (the checkpoint stores {arch.mtp_layers} MTP layer(s) after the "
                f"{arch.num_layers} main layers)"
            )
        else:
            what = f"is past the end of the {arch.num_layers} layers (num_hidden_layers)"
            if arch.mtp_layers:
                what += f" and of the {arch.mtp_layers} MTP layer(s)"
        findings.append(
            finding(
                "layers.past-end",
                f"Layer {layer} {what}; engines index LoRA by layer and fail on it (SGLang: IndexError).",
                keys=keys,
                expected=f"layer < {arch.num_layers}",
                actual=layer,
                fix="Drop these modules, or check that --base is the adapter's base model.",
            )
        )
    for (name,), keys in expert_past_end.keys.items():
        experts = sorted(set(expert_past_end.extra[(name,)]))
        findings.append(
            finding(
                "experts.index-past-end",
                f"`{name}` has expert index(es) {', '.join(map(str, experts))} on layer(s) "
                f"{_layers_text(expert_past_end.layers[(name,)])}, but the base has {expert_count} routed experts.",
                keys=keys,
                expected=f"expert < {expert_count}",
                actual=max(experts),
                fix="Check that --base is the adapter's base model.",
            )
        )
    for (name, detail), keys in on_dense.keys.items():
        types = sorted(set(on_dense.extra[(name, detail)]))
        findings.append(
            finding(
                "experts.on-dense-layer",
                f"Routed-expert LoRA `{name}` on layer(s) {_layers_text(on_dense.layers[(name, detail)])}, which "
                f"have no routed experts (layer type {', '.join(types)}; {detail}).",
                keys=keys,
                expected="a MoE layer",
                actual=types,
                fix=(
                    "Check that --base is the adapter's base model and the config fields its schema's layer_types "
                    f"read: `lora-convert schemas show {arch.family}`."
                ),
            )
        )
    for (name, detail), keys in wrong_type.keys.items():
        types = sorted(set(wrong_type.extra[(name, detail)]))
        findings.append(
            finding(
                "modules.not-on-layer-type",
                f"`{name}` on layer(s) {_layers_text(wrong_type.layers[(name, detail)])} of type {', '.join(types)}; "
                f"{detail}.",
                keys=keys,
                expected=detail,
                actual=types,
                fix="Check that --base is the adapter's base model (layer_types, hybrid pattern, dense/MoE layers).",
            )
        )
    return findings


def _shape_findings(module: LoraModule, match: ModuleMatch, expert_count: int | None) -> list[Finding]:
    a, b = module.lora_A, module.lora_B
    out: list[Finding] = []
    where = f"{module.module}{'.' + module.param if module.kind == ModuleKind.FUSED_EXPERTS and module.param else ''}"
    what = f"{match.canonical} of {match.group.path}"
    if a is not None and len(a.shape) == 2 and a.shape[1] != match.expected_in:
        out.append(
            finding(
                "shapes.in-features",
                f"{where}: lora_A has in-dim {a.shape[1]} but {what} takes {match.expected_in} inputs.",
                keys=[a.key],
                expected=[a.shape[0], match.expected_in],
                actual=list(a.shape),
                fix="Check that --base is the adapter's base model.",
            )
        )
    if b is not None and len(b.shape) == 2 and b.shape[0] != match.expected_out:
        out.append(
            finding(
                "shapes.out-features",
                f"{where}: lora_B has out-dim {b.shape[0]} but {what} has {match.expected_out} output rows.",
                keys=[b.key],
                expected=[match.expected_out, b.shape[1]],
                actual=list(b.shape),
                fix="Check that --base is the adapter's base model.",
            )
        )
    mag = module.magnitude
    if mag is not None and list(mag.shape) != [match.expected_out]:
        out.append(
            finding(
                "shapes.out-features",
                f"{where}: the DoRA magnitude has shape {list(mag.shape)} but {what} has {match.expected_out} output rows.",
                keys=[mag.key],
                expected=[match.expected_out],
                actual=list(mag.shape),
            )
        )
    if (
        module.kind == ModuleKind.FUSED_EXPERTS
        and module.experts is not None
        and expert_count is not None
        and module.experts != expert_count
        and a is not None
        and b is not None
        and module.rank
    ):
        r = module.rank
        out.append(
            finding(
                "shapes.experts",
                f"{where}: the 3-D expert LoRA holds {module.experts} experts (A {list(a.shape)} = E*r rows with r={r}) "
                f"but the base has {expert_count}.",
                keys=[a.key, b.key],
                expected=[[expert_count * r, match.expected_in], [match.expected_out, r * expert_count]],
                actual=[list(a.shape), list(b.shape)],
                fix="Check that --base is the adapter's base model.",
            )
        )
    return out
