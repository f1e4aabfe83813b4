"""Header-only shape validation of an adapter against a bound architecture schema: the core of the `shapes`
check (check/shapes.py runs it). It is a check, so it lives in check/ (it was arch/shape_check.py); the
architecture only answers where a module sits (`Architecture.locate`).

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
| modules.peft-cannot-apply | warning | LoRA on a module PEFT cannot apply (schema `peft_cannot_apply`): `--layout peft` refuses it |

Rank problems (A vs B, tensors vs adapter_config.json) are reported by `adapter.py` and not repeated here.
Modules with the same problem in many places (an unknown name on every layer, every vision module) are folded
into one finding that lists all their keys; shape mismatches are one finding per module.
"""  # noqa: E501 (a Markdown table row cannot wrap; the noqa of a multi-line string goes on its last line)

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from lora_convert.arch.schema import Architecture, Location, ModuleMatch
from lora_convert.codes import finding
from lora_convert.findings import Finding
from lora_convert.peft.adapter import Adapter, LoraModule, ModuleKind
from lora_convert.text import spans

_CHECK_BASE = "Check that --base is the adapter's base model."


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


@dataclass
class _Problems:
    """The modules without a (valid) place, sorted by what is wrong with them, each kind folded."""

    vision: list[str] = field(default_factory=list)  # keys
    vision_modules: int = 0
    routers: _Folded = field(default_factory=_Folded)  # not a problem: a note
    peft_cannot_apply: _Folded = field(default_factory=_Folded)  # shapes still checked; --layout peft refuses them
    unknown: _Folded = field(default_factory=_Folded)
    mtp: _Folded = field(default_factory=_Folded)  # modules under a top-level MTP stack (`mtp.`)
    past_end: _Folded = field(default_factory=_Folded)
    expert_past_end: _Folded = field(default_factory=_Folded)
    on_dense: _Folded = field(default_factory=_Folded)
    wrong_type: _Folded = field(default_factory=_Folded)


def check_shapes(adapter: Adapter, arch: Architecture) -> list[Finding]:
    """Check every LoRA module of `adapter` against `arch`; returns all findings (empty when clean): the shape
    mismatches of the modules that have a place, in adapter order, then the folded placement problems."""
    problems = _Problems()
    mismatches: list[Finding] = []
    expert_count = arch.expert_count()
    for module in adapter.modules:
        if not module.is_complete:
            continue  # adapter.py already reported the missing factor
        if module.kind == ModuleKind.FUSED_EXPERTS and module.param is None:
            continue  # adapter.py already reported that the wrapped parameter is unknown
        match = _place(module, arch.locate(module), problems)
        if match is not None:
            mismatches.extend(_shape_findings(module, match, expert_count))
    return mismatches + _problem_findings(problems, arch, expert_count)


def _place(module: LoraModule, loc: Location, problems: _Problems) -> ModuleMatch | None:
    """The match to check `module`'s shapes against, or None after filing it under its placement problem."""
    if loc.status == "vision":
        problems.vision.extend(module.keys)
        problems.vision_modules += 1
        return None
    if loc.status in ("unknown", "unknown-prefix"):
        name = module.local_name if module.layer is not None else module.module
        problems.unknown.add((name, module.stack_prefix, loc.detail), module, loc)
        return None
    if loc.status == "mtp":
        problems.mtp.add((module.stack_prefix, loc.detail), module, module.module)
        return None
    if loc.status == "past-end":
        problems.past_end.add((module.layer,), module)
        return None
    if loc.status in ("experts-on-dense", "not-on-layer-type"):
        fold = problems.on_dense if loc.status == "experts-on-dense" else problems.wrong_type
        fold.add((module.local_name, loc.detail), module, "+".join(sorted(loc.layer_types)))
        return None
    match = loc.match
    assert match is not None
    if match.group.kind == "router":
        problems.routers.add((match.group.name,), module)  # a note; its shapes are still checked
    if match.group.peft_cannot_apply:
        problems.peft_cannot_apply.add((match.group.name, match.group.peft_cannot_apply), module)
    if match.expert is not None and match.group.experts is not None and match.expert >= match.group.experts:
        problems.expert_past_end.add((module.local_name,), module, match.expert)
        return None
    return match


def _problem_findings(problems: _Problems, arch: Architecture, expert_count: int | None) -> list[Finding]:
    """One finding per folded problem, kind by kind."""
    return [
        *_vision_findings(problems),
        *_router_findings(problems.routers),
        *_peft_cannot_apply_findings(problems.peft_cannot_apply),
        *_unknown_findings(problems.unknown, arch),
        *_mtp_findings(problems.mtp, arch),
        *_past_end_findings(problems.past_end, arch),
        *_expert_past_end_findings(problems.expert_past_end, expert_count),
        *_on_dense_findings(problems.on_dense, arch),
        *_wrong_type_findings(problems.wrong_type),
    ]


def _vision_findings(problems: _Problems) -> list[Finding]:
    if not problems.vision:
        return []
    message = (
        f"{problems.vision_modules} LoRA module(s) sit in the vision tower or multimodal projector; they are "
        "recognized but not checked against a text schema, and text-only serving engines do not load them."
    )
    fix = (
        "Drop them (normalize --drop-unsupported) for text-only serving; `normalize --layout peft` writes them for "
        "PEFT or an engine that serves the vision tower with LoRA."
    )
    return [finding("modules.vision", message, keys=problems.vision, fix=fix)]


def _router_findings(routers: _Folded) -> list[Finding]:
    return [
        finding(
            "modules.router",
            f"LoRA on the MoE router `{name}` on layer(s) {spans(routers.layers[(name,)])} (PEFT's all-linear "
            "and its v4->v5 conversion target routers); some engines do not apply router LoRA.",
            keys=keys,
        )
        for (name,), keys in routers.keys.items()
    ]


def _peft_cannot_apply_findings(modules: _Folded) -> list[Finding]:
    return [
        finding(
            "modules.peft-cannot-apply",
            f"LoRA on `{name}` on layer(s) {spans(modules.layers[(name, why)])}, which PEFT itself cannot apply: {why}. "
            "normalize --layout peft refuses these modules (--drop-unsupported leaves them out); the other layouts "
            "keep them, for loaders that apply them.",
            keys=keys,
        )
        for (name, why), keys in modules.keys.items()
    ]


def _unknown_findings(unknown: _Folded, arch: Architecture) -> list[Finding]:
    out = []
    for fold, keys in unknown.keys.items():
        name, _, detail = fold
        layers = unknown.layers[fold]
        where = f" on layer(s) {spans(layers)}" if layers else ""
        locations = unknown.extra[fold]
        # What the schema has in those places (layers of different types have different modules): all of it, once.
        expected = list(dict.fromkeys(e for loc in locations for e in loc.expected))
        out.append(
            finding(
                "modules.unknown",
                f"`{name}`{where} is not a LoRA-able module of {arch.family} ({detail}).",
                keys=keys,
                expected=expected or None,
                actual=locations[0].actual or name,
                fix="Check that --base is the adapter's base model; `lora-convert schemas show` lists the modules.",
            )
        )
    return out


def _mtp_findings(mtp: _Folded, arch: Architecture) -> list[Finding]:
    return [
        finding(
            "layers.past-end",
            f"{len(set(mtp.extra[(prefix, detail)]))} LoRA module(s) belong to the {detail}; "
            f"serving engines index LoRA by the {arch.num_layers} main layers only.",
            keys=keys,
            expected=f"layers 0..{arch.num_layers - 1}",
            actual=prefix,
            fix="Drop the MTP modules (normalize --drop-unsupported).",
        )
        for (prefix, detail), keys in mtp.keys.items()
    ]


def _past_end_findings(past_end: _Folded, arch: Architecture) -> list[Finding]:
    return [
        finding(
            "layers.past-end",
            f"Layer {layer} {_past_end_what(layer, arch)}; engines index LoRA by layer and fail on it "
            "(SGLang: IndexError).",
            keys=keys,
            expected=f"layer < {arch.num_layers}",
            actual=layer,
            fix="Drop these modules, or check that --base is the adapter's base model.",
        )
        for (layer,), keys in sorted(past_end.keys.items())
    ]


def _past_end_what(layer: int, arch: Architecture) -> str:
    """What layer `layer` (>= num_hidden_layers) is: one of the checkpoint's MTP layers, or past every layer."""
    if layer < arch.num_layers + arch.mtp_layers:
        return (
            f"is an MTP/NextN layer (the checkpoint stores {arch.mtp_layers} MTP layer(s) after the "
            f"{arch.num_layers} main layers)"
        )
    what = f"is past the end of the {arch.num_layers} layers (num_hidden_layers)"
    if arch.mtp_layers:
        what += f" and of the {arch.mtp_layers} MTP layer(s)"
    return what


def _expert_past_end_findings(past_end: _Folded, expert_count: int | None) -> list[Finding]:
    out = []
    for (name,), keys in past_end.keys.items():
        experts = sorted(set(past_end.extra[(name,)]))
        out.append(
            finding(
                "experts.index-past-end",
                f"`{name}` has expert index(es) {', '.join(map(str, experts))} on layer(s) "
                f"{spans(past_end.layers[(name,)])}, but the base has {expert_count} routed experts.",
                keys=keys,
                expected=f"expert < {expert_count}",
                actual=max(experts),
                fix=_CHECK_BASE,
            )
        )
    return out


def _on_dense_findings(on_dense: _Folded, arch: Architecture) -> list[Finding]:
    out = []
    for (name, detail), keys in on_dense.keys.items():
        types = sorted(set(on_dense.extra[(name, detail)]))
        out.append(
            finding(
                "experts.on-dense-layer",
                f"Routed-expert LoRA `{name}` on layer(s) {spans(on_dense.layers[(name, detail)])}, which "
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
    return out


def _wrong_type_findings(wrong_type: _Folded) -> list[Finding]:
    out = []
    for (name, detail), keys in wrong_type.keys.items():
        types = sorted(set(wrong_type.extra[(name, detail)]))
        out.append(
            finding(
                "modules.not-on-layer-type",
                f"`{name}` on layer(s) {spans(wrong_type.layers[(name, detail)])} of type {', '.join(types)}; "
                f"{detail}.",
                keys=keys,
                expected=detail,
                actual=types,
                fix="Check that --base is the adapter's base model (layer_types, hybrid pattern, dense/MoE layers).",
            )
        )
    return out


# --------------------------------------------------------------------------------------------- shapes of a module
def _shape_findings(module: LoraModule, match: ModuleMatch, expert_count: int | None) -> list[Finding]:
    """lora_A's in-dim, lora_B's out-dim, a DoRA magnitude's length and a 3-D LoRA's expert count against `match`."""
    fused = module.kind == ModuleKind.FUSED_EXPERTS
    where = f"{module.module}{'.' + module.param if fused and module.param else ''}"
    what = f"{match.canonical} of {match.group.path}"
    return [
        *_in_dim_findings(module, match, where, what),
        *_out_dim_findings(module, match, where, what),
        *_expert_count_findings(module, match, where, expert_count),
    ]


def _in_dim_findings(module: LoraModule, match: ModuleMatch, where: str, what: str) -> list[Finding]:
    a = module.lora_A
    if a is None or len(a.shape) != 2 or a.shape[1] == match.expected_in:
        return []
    return [
        finding(
            "shapes.in-features",
            f"{where}: lora_A has in-dim {a.shape[1]} but {what} takes {match.expected_in} inputs.",
            keys=[a.key],
            expected=[a.shape[0], match.expected_in],
            actual=list(a.shape),
            fix=_CHECK_BASE,
        )
    ]


def _out_dim_findings(module: LoraModule, match: ModuleMatch, where: str, what: str) -> list[Finding]:
    """lora_B's out-dim, then the DoRA magnitude's length (one per output row)."""
    out = []
    b, mag = module.lora_B, module.magnitude
    if b is not None and len(b.shape) == 2 and b.shape[0] != match.expected_out:
        out.append(
            finding(
                "shapes.out-features",
                f"{where}: lora_B has out-dim {b.shape[0]} but {what} has {match.expected_out} output rows.",
                keys=[b.key],
                expected=[match.expected_out, b.shape[1]],
                actual=list(b.shape),
                fix=_CHECK_BASE,
            )
        )
    if mag is not None and list(mag.shape) != [match.expected_out]:
        out.append(
            finding(
                "shapes.out-features",
                f"{where}: the DoRA magnitude has shape {list(mag.shape)} but {what} has {match.expected_out} output "
                "rows.",
                keys=[mag.key],
                expected=[match.expected_out],
                actual=list(mag.shape),
            )
        )
    return out


def _expert_count_findings(
    module: LoraModule, match: ModuleMatch, where: str, expert_count: int | None
) -> list[Finding]:
    """A 3-D expert LoRA (E*r rows of A) sized for another number of experts than the base has."""
    a, b, r = module.lora_A, module.lora_B, module.rank
    if (
        module.kind != ModuleKind.FUSED_EXPERTS
        or module.experts is None
        or expert_count is None
        or module.experts == expert_count
        or a is None
        or b is None
        or not r
    ):
        return []
    return [
        finding(
            "shapes.experts",
            f"{where}: the 3-D expert LoRA holds {module.experts} experts (A {list(a.shape)} = E*r rows with r={r}) "
            f"but the base has {expert_count}.",
            keys=[a.key, b.key],
            expected=[[expert_count * r, match.expected_in], [match.expected_out, r * expert_count]],
            actual=[list(a.shape), list(b.shape)],
            fix=_CHECK_BASE,
        )
    ]
