"""The architecture schema's data model: what a schema file says (`Schema`, `GroupDef`, `SliceDef`, `MergedDef`,
expressions unevaluated) and what a schema bound to a config answers (`GroupSpec`, `SliceSpec`, `ModuleMatch`,
`Location`, numbers evaluated). Loading is `schema_loader.py`, binding `architecture.py`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


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
    tp: str = "column"  # how tensor parallelism splits it: column | row | replicated | heads (see schema_loader)
    expert_storage: str = "out_in"  # a 3-D expert parameter's storage: [E, out, in] or [E, in, out] (schema_loader)
    peft_lora_a: str = "in"  # the side of a 3-D expert parameter PEFT puts lora_A on: in | out (schema_loader)
    interleaved: frozenset[str] = frozenset()  # canonical names of merged sources whose rows alternate by slice
    param_3d: str = ""  # routed experts: the 3-D parameter transformers 5 holds, relative to the layer (GroupDef)
    base_fused: str = ""  # the base's one module for all slices, when the slices have none of their own (GroupDef)
    peft_cannot_apply: str = ""  # why PEFT cannot apply LoRA to this module ("" when it can; schema_loader)

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
            "name": self.name,
            "path": self.path,
            "layer": self.layer,
            "kind": self.kind,
            "in": self.in_features,
            "out": self.out_features,
            "slices": [{"name": s.name, "out": s.out_features} for s in self.slices],
            "gated": self.gated,
            "experts": self.experts,
        }


@dataclass(frozen=True)
class ModuleMatch:
    group: GroupSpec
    slice_indices: tuple[int, ...]  # the slices this source module covers
    canonical: str  # canonical source name: q_proj, experts.gate_proj, experts.gate_up_proj, in_proj_qkv, ...
    expert: int | None  # for per-expert 2-D modules
    expected_in: int  # what lora_A's in-dim must be (the output width when `a_on_output`)
    expected_out: int  # what lora_B's out-dim must be (sum over the covered slices; the input width when `a_on_output`)
    interleaved: bool = False  # the source's rows alternate among its slices (row j feeds slice j mod n)
    a_on_output: bool = False  # a PEFT 3-D module whose lora_A is the OUTPUT side (schema `peft_lora_a: out`)

    @property
    def widths(self) -> tuple[int, int]:
        """(in, out) of the module itself, whichever side PEFT puts lora_A on (a base weight's logical widths)."""
        return (self.expected_out, self.expected_in) if self.a_on_output else (self.expected_in, self.expected_out)


@dataclass(frozen=True)
class Location:
    """Where `Architecture.locate` put a module: `status` is `ok` (with `match`) or why it has no place."""

    status: str  # ok | vision | unknown-prefix | past-end | mtp | unknown | not-on-layer-type | experts-on-dense
    match: ModuleMatch | None = None
    detail: str = ""
    layer_types: frozenset[str] = frozenset()
    group_kind: str | None = None  # for not-on-layer-type / experts-on-dense: the kind of the family's group
    # for unknown / unknown-prefix: what the schema has in that place (the module names of the layer, the top-level
    # modules, or the layer stacks), and what the module is, in the same terms: a finding's expected and actual
    expected: tuple[str, ...] = ()
    actual: str | None = None


@dataclass(frozen=True)
class HeadCount:
    """A head count of one bound config that tensor parallelism must split evenly, and the source names whose LoRA
    makes it matter (`tp_head_counts` in the schema)."""

    label: str  # the count's expression, as findings name it: `num_attention_heads`
    value: int
    sources: frozenset[str]
    may_replicate: bool  # a count that divides tp is fine too: each rank holds a replica (KV heads)

    def fits(self, tp: int) -> bool:
        return self.value % tp == 0 or (self.may_replicate and tp % self.value == 0)


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
    interleaved: bool = False  # rows alternate among the slices (schema `"rows": "interleaved"`)
    base: bool = False  # the base model's own module for these slices (schema `"base": true`: Phi-3 qkv_proj)


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
    tp: str = "column"
    wrapped_path: str | None = None  # top-level groups only
    expert_storage: str = "out_in"
    peft_lora_a: str = "in"
    peft_cannot_apply: str = ""  # why PEFT cannot apply LoRA to this module ("" when it can)

    def param_3d(self) -> str:
        """A routed-expert group's 3-D parameter as transformers 5 holds it (relative to the layer): the first alias
        of the group's whole output (its merged source, or its one slice) that is `<...>.experts.<param>`, else
        the group's own path. Granite's `block_sparse_moe.input_linear` -> `block_sparse_moe.experts.gate_up_proj`."""
        whole = [a for m in self.merged if len(m.slices) == len(self.slices) for a in m.aliases]
        if len(self.slices) == 1:
            whole += list(self.slices[0].aliases)
        params = [a for a in whole if a.split(".")[-2:-1] == ["experts"]]
        leaf = self.path.rsplit(".", 1)[-1]
        # the group's own leaf first (Mixtral's down group lists the checkpoint's `experts.w2` before `down_proj`)
        return next((a for a in params if a.endswith("." + leaf)), params[0] if params else self.path)

    def base_fused(self) -> str:
        """The name of the merged source that is the base model's ONE module for this group (schema `"base": true`:
        Phi-3 `qkv_proj`, GLM-4 `gate_up_proj`, Granite `shared_mlp.input_linear`), else ""."""
        return next((m.name for m in self.merged if m.base and len(m.slices) == len(self.slices)), "")

    def interleaved_sources(self) -> frozenset[str]:
        """Canonical names of this group's merged sources whose rows alternate among their slices."""
        parent = self.name.rpartition(".")[0]
        return frozenset(f"{parent}.{m.name}" if parent else m.name for m in self.merged if m.interleaved)

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
class HeadCountDef:
    """One entry of `tp_head_counts`: a count that must divide the tensor-parallel size when any source of the
    named groups (narrowed to `slices` when given) carries LoRA."""

    count: str  # expression
    groups: tuple[str, ...]  # group paths
    slices: tuple[str, ...] = ()  # empty: every slice of those groups
    may_replicate: bool = False

    def sources(self, groups: Iterable[GroupDef]) -> frozenset[str]:
        """The source names of `groups` (the schema's) that this count covers."""
        out = set()
        for g in groups:
            if g.path not in self.groups:
                continue
            wanted = {i for i, s in enumerate(g.slices) if not self.slices or s.name in self.slices}
            out.update(alias for alias, covered, _ in g.sources() if wanted.intersection(covered))
        return frozenset(out)

    def describe(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "groups": list(self.groups),
            "slices": list(self.slices),
            "may_replicate": self.may_replicate,
        }


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
    shared_expert_count: str | None = None  # expression: shared experts fused into one MLP (engine rules ask)
    tp_head_counts: tuple[HeadCountDef, ...] = ()
    # wrapper model types this family claims when the wrapper's text config is one of its own model types
    # (Mistral-Small-4: a mistral3 wrapper around a mistral4 language model), ahead of the wrapper's own family
    wrapped_in: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """The schema with its expressions unevaluated (for `schemas show FAMILY` without a config)."""
        return {
            "family": self.family,
            "file": self.file,
            "match": {
                "model_type": list(self.model_types),
                "architectures": list(self.architectures),
                **({"wrapped_in": list(self.wrapped_in)} if self.wrapped_in else {}),
            },
            "text_config": self.text_config,
            "num_layers": self.num_layers,
            "expert_count": self.expert_count,
            "shared_expert_count": self.shared_expert_count,
            "checkpoint_prefix": self.checkpoint_prefix,
            "wrapped_checkpoint_prefix": self.wrapped_checkpoint_prefix,
            "stack_prefixes": list(self.stack_prefixes),
            "let": dict(self.let),
            "layer_types": dict(self.layer_types),
            "groups": [_describe_group(g) for g in self.groups],
            "top_level": [_describe_group(g) for g in self.top_level],
            "tp_head_counts": [h.describe() for h in self.tp_head_counts],
        }


def _describe_group(g: GroupDef) -> dict[str, Any]:
    return {
        "name": g.name,
        "path": g.path,
        "kind": g.kind,
        "on": list(g.on),
        "when": g.when,
        "in": g.in_,
        "slices": [{"name": s.name, "out": s.out, "aliases": list(s.aliases)} for s in g.slices],
        "merged": [
            {
                "name": m.name,
                "slices": list(m.slices),
                "aliases": list(m.aliases),
                "rows": "interleaved" if m.interleaved else "consecutive",
                "base": m.base,
            }
            for m in g.merged
        ],
        "experts": g.experts,
        "gated": g.gated,
        "tp": g.tp,
        **({"expert_storage": g.expert_storage, "peft_lora_a": g.peft_lora_a} if g.experts else {}),
        **({"peft_cannot_apply": g.peft_cannot_apply} if g.peft_cannot_apply else {}),
    }
