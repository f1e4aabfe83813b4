"""Normalization plans: what the stacked output will hold, decided from headers, config and schema alone.

A plan lists every output group with its slices (which source module feeds each slice, which B rows of it,
its rank and PEFT scaling, or a zero fill with the schema's shape), the one rank R, and every module that is
dropped or refused with the reason. No tensor data is read to build it; the writers (lora_convert.convert.group_tensors)
then read each source tensor once and write each output tensor once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_convert.convert.blockers import normalize_blockers
from lora_convert.errors import UnsupportedAdapterError, UsageError
from lora_convert.findings import Finding
from lora_convert.peft.adapter import Adapter, LoraModule, ModuleKind
from lora_convert.text import refused_listing

LAYOUT_FORMAT = "lora-convert/stacked"
LAYOUT_VERSION = 1


@dataclass
class SourceRef:
    """One source module feeding one slice: B rows [row_start, row_stop) of the module's output, every
    `row_step`-th (a merged source whose rows alternate among its slices: gpt-oss gate_up)."""

    module: LoraModule
    row_start: int
    row_stop: int
    row_step: int = 1
    a_on_output: bool = False  # a PEFT 3-D module whose lora_A is the output side (ModuleMatch.a_on_output)

    @property
    def rank(self) -> int:
        return int(self.module.rank or 0)

    @property
    def scaling(self) -> float:
        return float(self.module.scaling)


@dataclass
class PlannedSlice:
    name: str
    out_offset: int
    out_features: int
    in_features: int
    dense_source: SourceRef | None = None  # dense groups
    expert_sources: dict[int, SourceRef] = field(default_factory=dict)  # per-expert 2-D modules
    fused_source: SourceRef | None = None  # one PEFT 3-D module covering every expert

    @property
    def is_zero_filled(self) -> bool:
        return self.dense_source is None and not self.expert_sources and self.fused_source is None

    def sources(self) -> list[SourceRef]:
        if self.dense_source is not None:
            return [self.dense_source]
        if self.fused_source is not None:
            return [self.fused_source]
        return [self.expert_sources[e] for e in sorted(self.expert_sources)]

    @property
    def rank(self) -> int:
        return max((s.rank for s in self.sources()), default=0)

    def scaling_json(self) -> Any:
        values = sorted({s.scaling for s in self.sources()})
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def source_layout_json(self) -> dict[str, Any]:
        """What a reader of lora_layout.json needs beyond `source` when the source is not read the ordinary way:
        `source_rows` [start, stop, step] for interleaved rows, `source_lora_a: "output"` for a PEFT 3-D module
        whose lora_A is the output side (docs/stacked-layout.md)."""
        sources = self.sources()
        if not sources:
            return {}
        ref = sources[0]
        out: dict[str, Any] = {}
        if ref.row_step != 1:
            out["source_rows"] = [ref.row_start, ref.row_stop, ref.row_step]
        if ref.a_on_output:
            out["source_lora_a"] = "output"
        return out

    def source_keys(self) -> list[str] | None:
        if self.is_zero_filled:
            return None
        # each key once, in first-seen order (a slice's per-expert sources may share one 3-D tensor)
        keys = dict.fromkeys(k for src in self.sources() for k in (src.module.lora_A.key, src.module.lora_B.key))
        return list(keys)


@dataclass
class PlannedGroup:
    key: str  # module path of the group in the base checkpoint's naming
    name: str  # group name, the last component(s) of `key`
    kind: str
    layer: int | None
    in_features: int
    experts: int | None
    slices: list[PlannedSlice]
    missing_experts: list[int] = field(default_factory=list)
    spec: Any = field(default=None, repr=False, compare=False)  # the schema's GroupSpec it was planned from

    @property
    def out_features(self) -> int:
        return sum(s.out_features for s in self.slices)

    def a_shape(self, rank: int) -> tuple[int, ...]:
        rows = len(self.slices) * rank
        return (self.experts, rows, self.in_features) if self.experts else (rows, self.in_features)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (self.experts, self.out_features, rank) if self.experts else (self.out_features, rank)


@dataclass
class DroppedModule:
    module: str
    keys: list[str]
    reason: str
    code: str

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "keys": self.keys, "reason": self.reason, "code": self.code}


@dataclass
class Plan:
    adapter: Adapter
    base_name: str
    family: str
    rank: int
    groups: list[PlannedGroup]
    dropped: list[DroppedModule]
    findings: list[Finding] = field(default_factory=list)
    # What the reader must know about what the plan stands on (a shipped preset standing in for the base).
    notes: list[str] = field(default_factory=list)
    arch: Any = None  # the schema bound to the base config (lora_convert.arch.schema.Architecture)

    @property
    def zero_filled(self) -> list[tuple[PlannedGroup, PlannedSlice]]:
        return [(g, s) for g in self.groups for s in g.slices if s.is_zero_filled]

    @property
    def source_modules(self) -> int:
        return len({id(src.module) for g in self.groups for s in g.slices for src in s.sources()})

    def layout_json(self) -> dict[str, Any]:
        return {
            "format": LAYOUT_FORMAT,
            "version": LAYOUT_VERSION,
            "rank": self.rank,
            "base": self.base_name,
            "family": self.family,
            "groups": [
                {
                    "key": g.key,
                    "layer": g.layer,
                    "group": g.name,
                    "kind": g.kind,
                    "experts": g.experts,
                    "in_features": g.in_features,
                    "missing_experts": g.missing_experts or None,
                    "slices": [
                        {
                            "name": s.name,
                            "out_offset": s.out_offset,
                            "out_features": s.out_features,
                            "rank": s.rank,
                            "scaling": s.scaling_json(),
                            "source": s.source_keys(),
                            **s.source_layout_json(),
                        }
                        for s in g.slices
                    ],
                }
                for g in self.groups
            ],
            "dropped": [d.to_json() for d in self.dropped],
        }


# ------------------------------------------------------------------------------------------------ building
VISION_KIND = "vision"  # the group of one vision-tower or projector module, kept as it is (build_plan's keep_vision)


# Module-level problems that make a module unconvertible. Value: (finding code, reason shown to the user).
def _unsupported_reason(mod: LoraModule, keep_vision: bool = False) -> tuple[str, str] | None:
    # a kept vision module is a Linear or Embedding pair (the reader refuses factors that are not 2-D: conv LoRA)
    if mod.is_vision and not (keep_vision and mod.kind in (ModuleKind.LINEAR, ModuleKind.EMBEDDING)):
        return "modules.vision", "vision-tower or projector module: the text serving path has no place for it"
    if mod.magnitude is not None:
        return (
            "config.dora",
            "DoRA magnitude vector: its delta depends on the base weights, which plain LoRA kernels cannot compute",
        )
    if mod.lora_bias is not None:
        return "config.lora-bias", "lora_bias: a bias on lora_B has no place in the stacked layout"
    return None


def _vision_group(mod: LoraModule) -> PlannedGroup:
    """A vision-tower or projector module as a group of one slice at the adapter's own module path: the path PEFT
    applied it at (no schema describes vision towers, so nothing is renamed or fused)."""
    out_features, in_features = mod.lora_B.shape[0], mod.lora_A.shape[1]
    sl = PlannedSlice(mod.leaf, 0, out_features, in_features, dense_source=SourceRef(mod, 0, out_features))
    return PlannedGroup(mod.module, mod.leaf, VISION_KIND, None, in_features, None, [sl])


def build_plan(
    adapter: Adapter,
    arch,
    *,
    base_name: str,
    rank: int | None = None,
    drop_unsupported: bool = False,
    keep_vision: bool = False,
    listed_in: str | None = None,
    peft_applies: bool = False,
) -> Plan:
    """Plan the stacked output. Raises UnsupportedAdapterError (exit 1) listing every refused module unless
    `drop_unsupported`, in which case they are listed in `plan.dropped`. `keep_vision`: vision-tower and projector
    modules become groups of kind VISION_KIND (for a layout that writes them: `--layout peft`) instead of refusals.
    `listed_in`: the output file that lists dropped modules, which the refusal's hint names. `peft_applies`: PEFT
    loads the output (`--layout peft`), so the modules of a schema group PEFT cannot apply (`peft_cannot_apply`) are
    refused; every other layout keeps them (its loader, or its engine rules, decide). What makes the whole adapter
    unconvertible is refused before, by `refuse_unusable_adapter`."""
    groups, refused = _group_modules(adapter, arch, keep_vision, peft_applies)
    dropped = _full_weight_drops(adapter) + refused
    # PEFT's copies of a base weight are left out without asking: no engine reads them (the base model has the weight)
    if any(d.code != COPY_CODE for d in dropped) and not drop_unsupported:
        raise _refused_modules_error([d for d in dropped if d.code != COPY_CODE], listed_in)
    groups = _in_output_order(groups)
    for group in groups:
        if group.experts:
            group.missing_experts = _missing_experts(group)
    max_rank = _largest_rank(groups, dropped)
    return Plan(
        adapter=adapter,
        base_name=base_name,
        family=arch.family,
        rank=_output_rank(rank, max_rank),
        groups=groups,
        dropped=dropped,
        arch=arch,
    )


def refuse_unusable_adapter(adapter: Adapter, shape_findings: list[Finding]) -> None:
    """Refuse, in one error, what makes the whole adapter unconvertible whatever its modules are."""
    problems = _adapter_level_problems(adapter, shape_findings)
    if problems:
        raise UnsupportedAdapterError(
            "This adapter cannot be normalized: " + " Also: ".join(problems),
            hint="Run `lora-convert validate` for the full list of problems.",
        )


def _adapter_level_problems(adapter: Adapter, shape_findings: list[Finding]) -> list[str]:
    cfg = adapter.config
    problems: list[str] = []
    if cfg.variants:
        problems.append(
            "the adapter uses " + "; ".join(f"{k} ({v})" for k, v in cfg.variants.items()) + ", which is not plain LoRA"
        )
    if cfg.fan_in_fan_out:
        problems.append("fan_in_fan_out is set: the factors belong to a transposed (Conv1D) base weight")
    broken = normalize_blockers([*adapter.findings, *shape_findings])
    if broken:
        problems.append(f"{len(broken)} error(s) in the adapter itself, e.g. {broken[0].message}")
    return problems


COPY_CODE = "keys.base-layer-copy"
# Tensors PEFT saves beside the factors that are no part of a LoRA layout: factor -> (reason, code).
_NOT_LORA_TENSORS = {
    "full_weight": ("a whole module weight (modules_to_save or bias), not a LoRA factor", "keys.full-weight"),
    "full_bias": ("a whole module weight (modules_to_save or bias), not a LoRA factor", "keys.full-weight"),
    "base_layer_copy": ("PEFT's copy of the layer's base weight, not a LoRA factor", COPY_CODE),
    "trainable_tokens_delta": ("PEFT's trainable-token rows, not a LoRA factor", "keys.trainable-tokens"),
}


def _full_weight_drops(adapter: Adapter) -> list[DroppedModule]:
    """Whole module weights (modules_to_save, bias), PEFT's base-layer copies and trainable-token rows saved beside
    the factors: never part of a LoRA layout."""
    return [
        # a copy is named by its own path (`lm_head.base_layer`): the module's LoRA is not what is left out
        DroppedModule(
            parsed.module + ".base_layer" * parsed.base_layer_depth, [key], *_NOT_LORA_TENSORS[parsed.factor.value]
        )
        for key, parsed in adapter.parsed.items()
        if parsed.factor.value in _NOT_LORA_TENSORS
    ]


def _group_modules(
    adapter: Adapter, arch, keep_vision: bool, peft_applies: bool
) -> tuple[list[PlannedGroup], list[DroppedModule]]:
    """Every complete module placed into its output group, or refused with its reason; groups in first-seen order."""
    builds: dict[str, PlannedGroup] = {}
    order: list[str] = []  # a schema group's path once; a vision module's path each time one is kept
    refused: list[DroppedModule] = []
    for mod in adapter.modules:
        if not mod.is_complete:
            continue
        match, problem = _match_or_problem(mod, arch, keep_vision, peft_applies)
        if problem is not None:
            refused.append(_refused_module(mod, problem))
        elif match is None:
            builds[mod.module] = _vision_group(mod)
            order.append(mod.module)
        else:
            if match.group.path not in builds:
                builds[match.group.path] = _new_group(match.group)
                order.append(match.group.path)
            _attach(builds[match.group.path], match, mod)
    return [builds[path] for path in order], refused


def _match_or_problem(
    mod: LoraModule, arch, keep_vision: bool, peft_applies: bool
) -> tuple[Any, tuple[str, str] | None]:
    """The schema match of one complete module, or the (finding code, reason) it is refused with. (None, None) for
    a kept vision module, which no schema describes."""
    problem = _unsupported_reason(mod, keep_vision)
    if problem is not None:
        return None, problem
    if mod.is_vision:
        return None, None
    if mod.layer is not None and mod.layer >= arch.num_layers:
        return None, (
            "layers.past-end",
            f"layer {mod.layer} is past the base model's {arch.num_layers} layers (an MTP/NextN layer)",
        )
    match = arch.resolve(mod)
    if match is None:
        return None, ("modules.unknown", f"the {arch.family} schema has no module {mod.local_name!r} at this layer")
    if match.group.peft_cannot_apply and peft_applies:
        return None, (
            "modules.peft-cannot-apply",
            f"PEFT itself cannot apply LoRA here: {match.group.peft_cannot_apply}",
        )
    return match, None


def _refused_module(mod: LoraModule, problem: tuple[str, str]) -> DroppedModule:
    code, reason = problem
    return DroppedModule(mod.module + (f".{mod.param}" if mod.param else ""), mod.keys, reason, code)


def _refused_modules_error(dropped: list[DroppedModule], listed_in: str | None) -> UnsupportedAdapterError:
    listing = refused_listing((d.module, d.reason) for d in dropped)
    return UnsupportedAdapterError(
        f"{len(dropped)} module(s) cannot be converted: {listing}.",
        hint="Pass --drop-unsupported to leave them out"
        + (f" (they are listed in {listed_in})" if listed_in else "")
        + ", or fix the adapter.",
    )


def _in_output_order(groups: list[PlannedGroup]) -> list[PlannedGroup]:
    """By layer (layerless groups last), dense before expert groups, then by path."""
    return sorted(groups, key=lambda g: (g.layer if g.layer is not None else 10**9, _kind_order(g), g.key))


def _missing_experts(group: PlannedGroup) -> list[int]:
    """The experts of an expert group that no source module feeds (a fused 3-D source feeds them all)."""
    present: set[int] = set()
    for s in group.slices:
        if s.fused_source is not None:
            return []
        present |= set(s.expert_sources)
    return sorted(set(range(group.experts)) - present)


def _largest_rank(groups: list[PlannedGroup], dropped: list[DroppedModule]) -> int:
    """The largest effective rank of any planned slice; refuses a plan that converts nothing."""
    max_rank = max((s.rank for g in groups for s in g.slices), default=0)
    if max_rank == 0:
        reasons = sorted({d.reason for d in dropped})
        why = f" All {len(dropped)} were dropped: {'; '.join(reasons)}." if dropped else ""
        raise UnsupportedAdapterError(
            f"The adapter has no LoRA module that can be converted.{why}",
            hint="Run `lora-convert validate` to see what it holds and why.",
        )
    return max_rank


def _output_rank(requested: int | None, max_rank: int) -> int:
    """The one rank R of the output: the requested --rank, which may pad but never truncate, else the largest."""
    if requested is not None and requested < max_rank:
        raise UsageError(
            f"--rank {requested} is below the adapter's largest effective rank {max_rank}.",
            hint=f"Use --rank {max_rank} or more, or leave --rank out.",
        )
    return requested or max_rank


def _kind_order(group: PlannedGroup) -> int:
    return 1 if group.experts else 0


def _new_group(spec) -> PlannedGroup:
    slices = []
    offset = 0
    for s in spec.slices:
        slices.append(
            PlannedSlice(name=s.name, out_offset=offset, out_features=s.out_features, in_features=spec.in_features)
        )
        offset += s.out_features
    return PlannedGroup(
        key=spec.path,
        name=spec.name,
        kind=spec.kind,
        layer=spec.layer,
        in_features=spec.in_features,
        experts=spec.experts,
        slices=slices,
        spec=spec,
    )


def _attach(group: PlannedGroup, match, mod: LoraModule) -> None:
    row = 0
    covered = len(match.slice_indices)
    total = sum(group.slices[i].out_features for i in match.slice_indices)
    for position, index in enumerate(match.slice_indices):
        target = group.slices[index]
        if match.interleaved:  # row j of the source feeds its (j mod n)-th slice
            ref = SourceRef(mod, position, total, covered, match.a_on_output)
        else:
            ref = SourceRef(mod, row, row + target.out_features, 1, match.a_on_output)
        row += target.out_features
        if mod.kind == ModuleKind.FUSED_EXPERTS:
            clash = target.fused_source is not None or bool(target.expert_sources)
            target.fused_source = ref
        elif group.experts:
            expert = match.expert if match.expert is not None else mod.expert
            clash = target.fused_source is not None or expert in target.expert_sources
            target.expert_sources[expert] = ref
        else:
            clash = target.dense_source is not None
            target.dense_source = ref
        if clash:
            raise UnsupportedAdapterError(
                f"Two source modules feed slice {target.name!r} of {group.key}; the second is {mod.module}.",
                hint="The adapter holds both a fused and a split form of the same projection; keep one.",
            )
