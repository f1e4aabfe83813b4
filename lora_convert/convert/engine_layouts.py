"""Engine layouts: the stacked plan re-expressed as per-module PEFT files that today's engines load exactly.

`normalize --layout sglang|peft` (docs/engine-layouts.md). Both layouts are views of the same `Plan` as the
stacked layout: the same groups and slices, one rank R, every module's PEFT scaling folded into B, `r =
lora_alpha = R`. What differs is how each group is cut back into modules, what each module is called and which
groups the engine cannot serve; that is the engine's `layout` rules (lora_convert.convert.layout_rules, data in
lora_convert/engines/<engine>-<version>.json):

- `sglang`: names that SGLang 0.5.23's own loader (rules R1-R8 of its reference notes) fuses into exactly the
  stacked groups: every fused family complete, split groups cut as its rules say, both expert sides present.
- `peft` (what PEFT loads): one PEFT module per module PEFT applies, in transformers 5's in-memory naming, routed
  experts as PEFT's 3-D `target_parameters`, and vision-tower and projector modules at the adapter's own paths.
- `vllm`: the `peft` naming, with what vLLM cannot serve refused and the experts in the format its model class takes.

Planning, then execution, in three steps that write nothing:
1. `plan_layout` decides every module, refusal and drop from the plan (headers, config, schema) alone.
2. `verify_layout` runs the few checks that need data, before any output exists: a cut that leaves slices out
   (a state-space in_proj's B/C/dt rows under SGLang) is exact only when those rows carry no delta, and only the data
   can say. It reads just those groups' factors.
3. `settle_layout` refuses (UnsupportedAdapterError) or, with --drop-unsupported, drops what cannot be served.
The result says exactly what will be written (`tensor_specs`); `iter_layout_tensors` then only produces it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lora_convert.convert import factors
from lora_convert.convert.group_tensors import build_group_tensors, iter_group_tensors
from lora_convert.convert.layout_rules import LayoutRules, load_layout_rules, rule_layouts
from lora_convert.convert.output_config import ENGINE_REPORT_FILE, listing_file, output_config
from lora_convert.convert.plan import VISION_KIND, DroppedModule, Plan, PlannedGroup, _new_group
from lora_convert.engines.features import FEATURES, Context
from lora_convert.engines.profiles import render, rule_finding
from lora_convert.engines.rules import WHOLE_BASE_FEATURES, installed_engines, load_rules
from lora_convert.errors import UnsupportedAdapterError
from lora_convert.io.safetensors_writer import TensorSpec
from lora_convert.peft.adapter import ModuleKind
from lora_convert.text import refused_listing

REPORT_FILE = ENGINE_REPORT_FILE
REPORT_FORMAT = "lora-convert/engine-layout"
REPORT_VERSION = 1
DIFFERENT_A_CODE = "layout.slices-differ-in-a"
UNHELD_CODE = "layout.unheld-rows"


@dataclass(frozen=True)
class OutModule:
    """One per-module LoRA pair of the output: `slices` of `group` (for an expert group, of one expert)."""

    path: str  # module path, without `base_model.model.`
    slices: tuple[int, ...]  # contiguous slice indices of the group; more than one only where they share one A
    expert: int | None = None
    embedding: bool = False
    # Every expert at once, in PEFT's 3-D layout for a `target_parameters` expert parameter (A [E*r, in] expert-
    # major, B [out, r*E] rank-major): `param` names that parameter (mlp.experts.gate_up_proj).
    param: str | None = None

    @property
    def a_key(self) -> str:
        return f"base_model.model.{self.path}." + ("lora_embedding_A" if self.embedding else "lora_A.weight")

    @property
    def b_key(self) -> str:
        return f"base_model.model.{self.path}." + ("lora_embedding_B" if self.embedding else "lora_B.weight")

    @property
    def leaf(self) -> str:
        return self.path.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class LayoutGroup:
    group: PlannedGroup
    modules: tuple[OutModule, ...]
    added: bool = False  # a zero-filled expert side the adapter did not have (engines need both sides)
    dropped_slices: tuple[int, ...] = ()  # slices no module of the engine holds (checked to carry no delta)

    def out_rows(self, module: OutModule) -> tuple[int, int]:
        rows = factors.span_rows([self.group.slices[i] for i in module.slices])
        return rows.start, rows.stop


@dataclass(frozen=True)
class Refused:
    """A group the engine cannot serve exactly. `partial`: only its `dropped_slices` are lost (the group is kept
    when dropping); otherwise the whole group goes."""

    group: PlannedGroup
    reason: str
    code: str
    partial: bool = False
    values: Mapping[str, Any] = field(default_factory=dict, compare=False)  # what the refusal's `when` gave its text


@dataclass(frozen=True)
class RowCheck:
    """A data check `verify_layout` runs: slices of `group` no module holds must carry no delta."""

    group: PlannedGroup
    slices: tuple[int, ...]
    code: str
    reason: str  # template: {rows}, {share}


@dataclass(frozen=True)
class LayoutPlan:
    plan: Plan
    layout: str
    rules: LayoutRules
    groups: tuple[LayoutGroup, ...]
    refused: tuple[Refused, ...] = ()
    checks: tuple[RowCheck, ...] = ()  # pending data checks; empty once verified
    dropped: tuple[DroppedModule, ...] = ()  # everything left out, once settled (the plan's drops first)
    target_modules: list[str] | str = field(default_factory=list)
    # 2-D modules written as full-path target_parameters (`<module>.weight`): the loader would re-target their
    # target_modules name elsewhere (`converted_targets` of the layout's rules: PEFT on transformers-5 MoE bases)
    target_weights: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    settled: bool = False
    out_rank: int = 0  # the rank every written module has: R, or 2R where a 3-D gate_up needs gate's and up's A

    @property
    def rank(self) -> int:
        return self.out_rank or self.plan.rank

    @property
    def engine(self) -> str:
        return self.rules.engine

    def modules(self) -> Iterator[tuple[LayoutGroup, OutModule]]:
        for lg in self.groups:
            for m in lg.modules:
                yield lg, m

    def tensor_specs(self, dtype: str) -> list[TensorSpec]:
        R = self.rank
        specs = []
        for lg, m in self.modules():
            start, stop = lg.out_rows(m)
            E = lg.group.experts if m.param else 1
            if m.param and _lora_a_on_output(lg.group):  # PEFT's sides of this 3-D parameter are swapped
                specs.append(TensorSpec(m.a_key, dtype, (E * R, stop - start)))
                specs.append(TensorSpec(m.b_key, dtype, (lg.group.in_features, R * E)))
                continue
            specs.append(TensorSpec(m.a_key, dtype, (E * R, lg.group.in_features)))
            specs.append(TensorSpec(m.b_key, dtype, (stop - start, R * E)))
        return specs

    def adapter_config(self) -> dict[str, Any]:
        # PEFT wraps the parameters in this order and saves the first one as `.base_layer` (see _module_3d): gate_up
        # (or a non-gated up_proj) first, then down
        params = sorted({m.param for _, m in self.modules() if m.param}, key=lambda p: (p.endswith("down_proj"), p))
        params += [f"{path}.weight" for path in self.target_weights]
        extra = {"r": self.rank, "lora_alpha": self.rank, "target_parameters": params or None}
        return output_config(self.plan, self.target_modules, extra)

    def report_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "layout": self.layout,
            "engine": self.engine,
            "rank": self.rank,
            "base": plan.base_name,
            "family": plan.family,
            "source_peft_version": plan.adapter.config.raw.get("peft_version"),
            "target_modules": self.target_modules,
            "groups": [
                {
                    "group": lg.group.key,
                    "experts": lg.group.experts,
                    "added_zero_filled": lg.added,
                    "zero_filled_slices": [s.name for s in lg.group.slices if s.is_zero_filled],
                    "dropped_slices": [lg.group.slices[i].name for i in lg.dropped_slices],
                    "modules": _module_summary(lg),
                }
                for lg in self.groups
            ],
            "dropped": [d.to_json() for d in self.dropped],
            "notes": list(self.notes),
        }

    def summary(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "engine": self.engine,
            "modules_written": sum(len(lg.modules) for lg in self.groups),
            "added_zero_filled_groups": [lg.group.key for lg in self.groups if lg.added],
            "target_modules": self.target_modules,
            "notes": list(self.notes),
        }


def _module_summary(lg: LayoutGroup) -> list[dict[str, Any]]:
    g = lg.group
    seen: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
    for m in lg.modules:
        generic = m.path if m.expert is None else m.path.replace(f".experts.{m.expert}.", ".experts.{e}.")
        entry = seen.setdefault(
            (generic, m.slices), {"module": generic, "slices": [g.slices[i].name for i in m.slices]}
        )
        if m.expert is not None:
            entry["experts"] = entry.get("experts", 0) + 1
    return list(seen.values())


# ------------------------------------------------------------------------------------- 1. plan (no data)
def keeps_vision(layout: str) -> bool:
    """Whether `layout` writes vision-tower and projector modules (its rules' `vision_modules`), so the plan keeps
    them (lora_convert.convert.plan.build_plan's keep_vision) instead of refusing them."""
    return layout.partition("==")[0] in rule_layouts() and load_layout_rules(layout).keeps_vision


def plan_layout(plan: Plan, layout: str) -> LayoutPlan:
    """Cut the stacked plan into the modules of `layout`, from the plan alone (no tensor data). Groups the engine
    cannot serve are listed in `refused`; cuts whose exactness depends on data are listed in `checks`."""
    if layout.partition("==")[0] not in rule_layouts():
        raise ValueError(f"unknown engine layout {layout!r}")
    rules = load_layout_rules(layout)
    config = dict(getattr(plan.arch, "config", None) or {})
    classes = model_classes(plan)
    added = _missing_expert_sides(plan)
    groups = sorted(list(plan.groups) + added, key=_group_order)
    added_ids = {id(g) for g in added}
    out: list[LayoutGroup] = []
    refused: list[Refused] = []
    checks: list[RowCheck] = []
    experts_3d = rules.experts_3d(classes)
    out_rank = plan.rank
    top = dict(getattr(plan.arch, "top_config", None) or config)
    for g in groups:
        problem = rules.refusal(g, plan.family, config, classes, top, plan.arch)
        if problem is not None:
            if id(g) in added_ids:  # a zero-filled side the adapter does not have: nothing of its to refuse
                continue
            rule, reason, values = problem
            refused.append(Refused(g, reason, rule.code, values=values))
            continue
        if g.kind == VISION_KIND:  # one module, written where the adapter has it (PEFT applied it there)
            embedding = g.slices[0].dense_source.module.kind == ModuleKind.EMBEDDING
            out.append(LayoutGroup(g, (OutModule(g.key, (0,), embedding=embedding),)))
            continue
        if experts_3d and g.experts and g.kind == "routed_experts":
            module = _module_3d(g, rules.rename_path(_param_3d_path(g), g, plan.family, config, classes))
            if not factors.shares_one_a(g.slices):
                out_rank = max(out_rank, len(g.slices) * plan.rank)  # one A per slice, side by side
            out.append(LayoutGroup(g, (module,), added=id(g) in added_ids))
            continue
        cut = rules.cut(g, plan.family, config, classes)
        modules = _modules(plan, g, rules, cut, config, classes)
        split = next((m for m in modules if not factors.shares_one_a([g.slices[i] for i in m.slices])), None)
        if split is not None:
            names = [g.slices[j].name for j in split.slices]
            refused.append(
                Refused(
                    g,
                    f"{split.path}: slices {names} come from different source modules (different A "
                    "factors), so they cannot be one module of rank R",
                    DIFFERENT_A_CODE,
                )
            )
            continue
        held = {i for m in modules for i in m.slices}
        unheld = tuple(i for i in range(len(g.slices)) if i not in held)
        if unheld and any(not g.slices[i].is_zero_filled for i in unheld):
            why = cut.unheld if cut is not None and cut.unheld is not None else None
            reason = (
                why.reason
                if why
                else "no module of the engine holds these {rows} rows, which carry {share} of the delta"
            )
            checks.append(RowCheck(g, unheld, why.code if why else UNHELD_CODE, reason))
        out.append(LayoutGroup(g, tuple(modules), added=id(g) in added_ids, dropped_slices=unheld))
    return LayoutPlan(
        plan=plan,
        layout=layout,
        rules=rules,
        groups=tuple(out),
        refused=tuple(refused),
        checks=tuple(checks),
        out_rank=out_rank,
    )


def _param_3d_path(g: PlannedGroup) -> str:
    """The full path of a routed-expert group's 3-D parameter in transformers 5's naming, before the layout's
    container renames: the group's layer prefix and the schema's `param_3d` (Granite: the checkpoint's
    `block_sparse_moe.input_linear` is the in-memory `block_sparse_moe.experts.gate_up_proj`)."""
    spec = g.spec
    if spec is None or not spec.param_3d or not g.key.endswith(spec.local_path):
        return g.key
    prefix = g.key[: len(g.key) - len(spec.local_path)]
    return prefix + spec.param_3d


def _module_3d(g: PlannedGroup, param_path: str) -> OutModule:
    """All experts of a routed-expert group as one PEFT 3-D parameter module. PEFT nests the second parameter
    wrapper of one module around the first, so gate_up (targeted first; Nemotron-H: up_proj) is saved as
    `experts.base_layer` and down as `experts` (the layout transformers 5 + PEFT write; vLLM reads gate_up from
    `.base_layer`)."""
    container, _, leaf = param_path.rpartition(".")
    layer_part = f"layers.{g.layer}."
    rel = param_path.split(layer_part, 1)[1] if layer_part in param_path else param_path
    path = container + (".base_layer" if leaf != "down_proj" else "")  # gate_up_proj, or a non-gated up_proj
    return OutModule(path, tuple(range(len(g.slices))), param=rel)


def _lora_a_on_output(g: PlannedGroup) -> bool:
    return g.spec is not None and bool(g.experts) and g.spec.peft_lora_a == "out"


def _in_base_row_order(g: PlannedGroup, slices: tuple[int, ...], b):
    """B of a module covering `slices` of `g`, in the base's row order: re-interleaved when the module is the base's
    interleaved merged projection (every slice of gpt-oss's gate_up), else unchanged (the stacked order)."""
    if g.spec is not None and g.spec.interleaved and len(slices) == len(g.slices) > 1:
        return factors.interleave_rows(b, len(slices))
    return b


def model_classes(plan: Plan) -> tuple[str, ...]:
    """The base config's `architectures` (the model class an engine builds), top level first."""
    arch = plan.arch
    top = dict(getattr(arch, "top_config", None) or getattr(arch, "config", None) or {})
    return tuple(a for a in top.get("architectures") or () if isinstance(a, str))


def _group_order(g: PlannedGroup) -> tuple:
    return (g.layer if g.layer is not None else 10**9, 1 if g.experts else 0, g.key)


def _missing_expert_sides(plan: Plan) -> list[PlannedGroup]:
    """Zero-filled routed-expert groups for layers that adapt one side only: SGLang wraps FusedMoE only when both
    gate_up and down are targets, and vLLM's pack_moe asserts all three projections for every expert."""
    have = {g.key for g in plan.groups}
    layers = sorted({g.layer for g in plan.groups if g.experts and g.layer is not None})
    extra = []
    for layer in layers:
        for spec in plan.arch.groups(layer):
            if spec.experts and spec.kind == "routed_experts" and spec.path not in have:
                g = _new_group(spec)
                g.missing_experts = list(range(spec.experts))
                extra.append(g)
    return extra


def _modules(plan: Plan, g: PlannedGroup, rules: LayoutRules, cut, config, classes) -> list[OutModule]:
    container = rules.container(g, plan.family, config, classes)
    if g.kind == "embedding":
        path = g.key
        if rules.embedding_leaf and path.rsplit(".", 1)[-1] != rules.embedding_leaf:
            path = f"{container}.{rules.embedding_leaf}" if "." in path else rules.embedding_leaf
        return [OutModule(path, (0,), embedding=True)]
    index = {s.name: i for i, s in enumerate(g.slices)}
    if cut is not None:
        cuts = [(name, tuple(index[s] for s in slices)) for name, slices in cut.modules]
    elif len(g.slices) == 1 and not g.experts:
        leaf = g.key.rsplit(".", 1)[-1]
        return [OutModule(f"{container}.{leaf}" if container else leaf, (0,))]
    elif g.spec is not None and g.spec.base_fused:  # the base has one module for every slice (Phi-3 qkv_proj)
        cuts = [(g.spec.base_fused, tuple(range(len(g.slices))))]
    else:  # q/k/v, q_a/kv_a, gate/up, expert projections: the slice names are the base model's module names
        cuts = [(s.name, (i,)) for i, s in enumerate(g.slices)]
    renames = rules.rename(g, plan.family, config, classes)
    cuts = [(renames.get(name, name), idx) for name, idx in cuts]
    if g.experts:
        return [OutModule(f"{container}.{e}.{name}", idx, expert=e) for e in range(g.experts) for name, idx in cuts]
    return [OutModule(f"{container}.{name}", idx) for name, idx in cuts]


# ---------------------------------------------------------------------------------- 2. verify (reads data)
def verify_layout(lp: LayoutPlan, read: Callable[[str], Any] | None = None) -> LayoutPlan:
    """Run the plan's data checks (before any output exists) and return the plan with their outcome: a slice run
    that carries a delta no module holds becomes a partial refusal, with the share of the delta it holds."""
    read = read or lp.plan.adapter.read
    refused = list(lp.refused)
    for check in lp.checks:
        share = _unheld_share(lp.plan, check.group, check.slices, read)
        if share is None:
            continue
        rows = sum(check.group.slices[i].out_features for i in check.slices)
        refused.append(
            Refused(check.group, check.reason.format(rows=rows, share=f"{share:.2%}"), check.code, partial=True)
        )
    return dataclasses.replace(lp, refused=tuple(refused), checks=())


def _unheld_share(plan: Plan, g: PlannedGroup, unheld: tuple[int, ...], read) -> float | None:
    """Share of the group's delta (squared Frobenius norm of B @ A) in the `unheld` slices, or None if exactly zero."""
    A, B = build_group_tensors(plan, g, "F32", read)
    R = plan.rank
    lost = total = 0.0
    nonzero = False
    for i, s in enumerate(g.slices):
        d = B[factors.b_rows(s)].astype(np.float64) @ A[factors.a_rows(i, R)].astype(np.float64)
        sq = float((d * d).sum())
        total += sq
        if i in unheld:
            lost += sq
            nonzero |= bool(np.count_nonzero(d))
    if not nonzero:
        return None
    return lost / total if total else 1.0


# ------------------------------------------------------------------------------------------- 3. settle
def settle_layout(lp: LayoutPlan, *, drop_unsupported: bool = False) -> LayoutPlan:
    """Refuse what the engine cannot serve, or (with `drop_unsupported`) leave it out and list it in `dropped`.
    Raises UnsupportedAdapterError; the plan must be verified first."""
    if lp.checks:
        raise ValueError("settle_layout needs a verified layout plan (verify_layout)")
    refused = sorted(lp.refused, key=lambda r: _group_order(r.group))
    if refused and not drop_unsupported:
        listing = refused_listing((r.group.key, r.reason) for r in refused)
        raise UnsupportedAdapterError(
            f"--layout {lp.layout}: {len(refused)} module group(s) cannot be served exactly by {lp.rules.served_by}: "
            f"{listing}.",
            hint=f"Pass --drop-unsupported to leave them out (listed in {listing_file(lp.layout)} and on stderr; the "
            "served adapter then differs from the trained one), or use --layout stacked.",
        )
    whole = [r for r in lp.refused if not r.partial]
    partial = [r for r in lp.refused if r.partial]
    dropped = list(lp.plan.dropped)
    for r in whole:
        keys = sorted({k for s in r.group.slices for k in (s.source_keys() or [])})
        dropped.append(DroppedModule(r.group.key, keys, r.reason, r.code))
    for r in partial:
        lg = next(lg for lg in lp.groups if lg.group is r.group)
        rows = "/".join(r.group.slices[i].name for i in lg.dropped_slices)
        keys = sorted({k for i in lg.dropped_slices for k in (r.group.slices[i].source_keys() or [])})
        reason = r.reason + "; dropped, the served delta differs"
        dropped.append(DroppedModule(f"{r.group.key} ({rows} rows)", keys, reason, r.code))
    groups = lp.groups  # wholly refused groups were never cut into modules; partially refused ones keep theirs
    if not any(lg.modules for lg in groups if not lg.added):
        raise UnsupportedAdapterError(
            f"--layout {lp.layout}: nothing is left to write once the unsupported modules are dropped.",
            hint="Use --layout stacked, or run `lora-convert validate --engine ...` to see why.",
        )
    settled = dataclasses.replace(lp, groups=groups, dropped=tuple(dropped), settled=True)
    weights, weights_note = _retargeted_modules(settled)
    settled = dataclasses.replace(settled, target_weights=weights)
    targets = _target_modules(settled)
    notes = []
    if isinstance(targets, str):
        notes.append(lp.rules.auto_detected_note)
    if weights_note:
        notes.append(weights_note)
    config = dict(getattr(lp.plan.arch, "config", None) or {})
    notes += lp.rules.notes_for([lg.group for lg in groups], lp.plan.family, config, model_classes(lp.plan))
    return dataclasses.replace(settled, target_modules=targets, notes=tuple(notes))


def plan_engine_layout(
    plan: Plan, layout: str, *, drop_unsupported: bool = False, read: Callable[[str], Any] | None = None
) -> LayoutPlan:
    """The three steps: plan, verify, settle. Everything `iter_layout_tensors` will write is decided here. A base
    the release refuses whatever the adapter is refused first (refuse_unservable_base)."""
    refuse_unservable_base(plan, layout)
    return settle_layout(verify_layout(plan_layout(plan, layout), read), drop_unsupported=drop_unsupported)


def refuse_unservable_base(plan: Plan, layout: str) -> None:
    """Raise UnsupportedAdapterError when the engine release of `layout` refuses the BASE itself, whatever the adapter
    holds (a rule on lora_convert/engines/rules.py WHOLE_BASE_FEATURES whose outcome is a load failure: vLLM without
    a bitsandbytes method). No layout of the adapter changes that, so normalize writes nothing, with
    --drop-unsupported too; the message is the finding `validate --engine` reports for it (code, release, source,
    fix)."""
    if layout.partition("==")[0] not in installed_engines():
        return
    ctx = Context(plan.adapter, plan.arch, dict(getattr(plan.arch, "config", None) or {}), None, layout)
    for rule in load_rules(layout):
        if rule["feature"] not in WHOLE_BASE_FEATURES or rule["outcome"] != "load-failure":
            continue
        values = FEATURES[rule["feature"]](ctx, rule.get("params") or {})
        if values:
            finding = rule_finding(layout, rule, values, plan.adapter)
            raise UnsupportedAdapterError(
                f"--layout {layout}: {finding.code}: {finding.message}. The release refuses the base model, not "
                "modules of the adapter, so no output of this adapter can be served by it; nothing was written.",
                hint=finding.fix or "Serve the adapter with another engine or release (`lora-convert engines list`).",
            )


def _retargeted_modules(lp: LayoutPlan) -> tuple[tuple[str, ...], str]:
    """The 2-D modules whose target_modules name the loader would re-target away from them (the layout rules'
    `converted_targets` for the base's model type: PEFT on a transformers-5 MoE base turns `down_proj` into the
    experts' 3-D `down_proj` parameter, which a dense or shared-expert `mlp.down_proj` is not), and the note that
    says so. Each is written as the full-path target parameter `<module>.weight` instead, which PEFT applies as
    ordinary LoRA; a name whose re-target still matches the module's own weight (the router `gate` -> `gate.weight`)
    stays in target_modules, as every name does for other bases."""
    top = dict(getattr(lp.plan.arch, "top_config", None) or getattr(lp.plan.arch, "config", None) or {})
    model_type = top.get("model_type")
    converted = lp.rules.converted_targets_of(model_type) if lp.rules.target_modules != "engine_names" else {}
    moved = sorted(
        m.path
        for _, m in lp.modules()
        if m.param is None
        and m.leaf in converted
        and not m.embedding  # never: no embedding has an expert projection's name
        and not f"{m.path}.weight".endswith(f".{converted[m.leaf]}")
    )
    if not moved:
        return (), ""
    names = sorted({p.rsplit(".", 1)[-1] for p in moved})
    shown = ", ".join(moved[:4]) + (f" and {len(moved) - 4} more" if len(moved) > 4 else "")
    values = {"names": ", ".join(names), "model_type": model_type, "count": len(moved), "modules": shown}
    return tuple(moved), render(lp.rules.converted_note, values)


def _beside_a_vision_tower(plan: Plan) -> bool:
    """Whether the base is a multimodal wrapper whose schema names a vision tower beside the language model."""
    arch = plan.arch
    return bool(arch is not None and arch.wrapped and arch.schema.vision_prefixes)


def _target_modules(lp: LayoutPlan) -> list[str] | str:
    if lp.rules.target_modules in ("module_leaves", "module_paths_beside_vision"):
        # PEFT, vLLM and SGLang all match target_modules on the last name component: list exactly those in the file
        # (less the modules written as full-path target_parameters, which the name would make PEFT re-target)
        moved = set(lp.target_weights)
        written = [m for _, m in lp.modules() if m.param is None and m.path not in moved]
        if lp.rules.target_modules == "module_paths_beside_vision" and _beside_a_vision_tower(lp.plan):
            # the tower's projections share the language model's leaf names (q_proj, ...), and PEFT would wrap those
            # too (and refuses a tower whose projections are not nn.Linear): name each module written in full
            return sorted({m.path for m in written})
        return sorted({m.leaf for m in written})
    # SGLang: the names its normalization ends with (qkv_proj, gate_up_proj, fused_qkv_a_proj_with_mqa, in_proj_qkvz,
    # in_proj, ...), each its own normalized form and with a get_hidden_dim entry; in_proj_q/x_proj would not have one.
    names = set()
    auto_detected = False
    for lg, _ in lp.modules():
        g = lg.group
        leaf = g.name.rsplit(".", 1)[-1]
        if g.kind == "embedding":
            names.add(lp.rules.embedding_leaf or leaf)
        elif g.experts:  # by the slices, not the group's name (Granite's checkpoint calls down `output_linear`)
            names.add("down_proj" if [sl.name for sl in g.slices] == ["down_proj"] else "gate_up_proj")
        elif leaf in lp.rules.auto_detected_leaves:
            auto_detected = True
        else:
            names.add(leaf)
    return "all-linear" if auto_detected else sorted(names)


# --------------------------------------------------------------------------------------------- execution
def _unwritten_keys(lp: LayoutPlan) -> frozenset[str]:
    """The source tensors that feed only slices the layout leaves out (a partly served group's dropped rows)."""
    dropped, kept = set(), set()
    for lg in lp.groups:
        for i, sl in enumerate(lg.group.slices):
            (dropped if i in lg.dropped_slices else kept).update(sl.source_keys() or ())
    return frozenset(dropped - kept)


def iter_layout_tensors(
    lp: LayoutPlan,
    dtype_tag: str,
    read: Callable[[str], Any] | None = None,
    progress=None,
    *,
    allow_non_finite: bool = False,
) -> Iterator[tuple[str, Any]]:
    """(key, tensor) in `tensor_specs` order: each group is built once (stacked, scaling folded) and cut into its
    modules. The tensors are views of reused buffers: consume each before asking for the next. `progress.advance`
    gets, after each group, the bytes of the tensors yielded for it. Decides nothing: the settled plan already says
    what is written; only NaN or Inf in what is written raises NonFiniteValuesError, unless `allow_non_finite`."""
    if not lp.settled:
        raise ValueError("iter_layout_tensors needs a settled layout plan (plan_engine_layout)")
    R = lp.plan.rank
    groups = [lg.group for lg in lp.groups]
    built = iter_group_tensors(
        lp.plan, groups, dtype_tag, read, allow_non_finite=allow_non_finite, unwritten_keys=_unwritten_keys(lp)
    )
    for lg, (_, A, B) in zip(lp.groups, built, strict=True):
        group_bytes = 0
        if lg.modules and lg.modules[0].param is not None:
            (m,) = lg.modules
            a, b = factors.peft_3d_module(A, B, lg.group, R, lp.rank)
            b = _in_base_row_order(lg.group, m.slices, b)
            if _lora_a_on_output(lg.group):  # PEFT's own sides of an [E, in, out] parameter (Llama-4)
                a, b = factors.swapped_expert_factors(a, b, lg.group.experts, lp.rank)
            group_bytes += a.nbytes + b.nbytes
            yield m.a_key, a
            yield m.b_key, b
            del a, b
            if progress is not None:
                progress.advance(group_bytes)
            del A, B
            continue
        for m in lg.modules:
            # Views of the group's buffers, no copies (a copy of every module would be one more pass over the
            # output): the buffers are reused only once the next group is asked for, and the writer is done with
            # each tensor before it asks for the next (iter_layout_tensors' own contract, as iter_group_tensors').
            a, b = factors.cut_module(A, B, lg.group, m.slices, R, m.expert)
            if lp.rank > R:  # padded with zero rank rows/columns: the same delta
                a, b = factors.pad_rank(a, b, lp.rank)
            b = _in_base_row_order(lg.group, m.slices, b)
            # The modules written, not the stacked group: dropped slices and per-expert cuts change the byte count.
            group_bytes += a.nbytes + b.nbytes
            yield m.a_key, a
            yield m.b_key, b
            del a, b
        if progress is not None:
            progress.advance(group_bytes)
        del A, B
