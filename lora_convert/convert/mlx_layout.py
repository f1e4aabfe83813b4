"""`normalize --layout mlx`: the stacked plan written as the adapter folder mlx-lm's `load_adapters` loads and
applies exactly (adapters.safetensors + mlx-lm's adapter_config.json; docs/formats.md).

mlx-lm holds one rank and one scale for a whole adapter, and creates LoRA layers for every `keys` entry of each of
the LAST `num_layers` decoder layers (mlx-lm 0.32.2 mlx_lm/tuner/utils.py:40-120). So the output has rank R, scale
1.0 (each module's PEFT scaling is folded into its B, as in every layout), `num_layers` = the base's layers from the
adapter's first adapted layer on, and `keys` = every module path the adapter adapts, relative to its layer. A LoRA
layer mlx-lm creates that the file does not hold keeps its zero `lora_b` (`load_weights(strict=False)`, :173; the
zero init at mlx_lm/tuner/lora.py:93 and :178), so it adds nothing: a module the adapter has on some layers only is
still exact. Dense factors are written transposed (`lora_a` [in, R], `lora_b` [R, out]); routed experts as mlx-lm's
stacked `switch_mlp` factors (`lora_a` [E, R, in], `lora_b` [E, out, R]), then each path in the family's own mlx-lm
names (mlx_lm.json `renames`).

Refused, named: modules outside the decoder layers (embeddings, lm_head), vision modules, module runs that need
different A factors in one mlx-lm module, modules mlx-lm builds as something `linear_to_lora_layers` cannot wrap
(`no_lora`), and a whole family whose mlx-lm names lora-convert has not proven (lora_convert/peft/mlx_lm.json
`families`; `unproven` says why).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_convert.convert import factors
from lora_convert.convert.engine_layouts import _modules, model_classes
from lora_convert.convert.group_tensors import iter_group_tensors
from lora_convert.convert.layout_rules import MLX_LAYOUT, PEFT_LAYOUT, load_layout_rules
from lora_convert.convert.output_config import ENGINE_REPORT_FILE, listing_file
from lora_convert.convert.plan import VISION_KIND, DroppedModule, Plan, PlannedGroup
from lora_convert.errors import UnsupportedAdapterError
from lora_convert.io.safetensors_writer import TensorSpec
from lora_convert.peft.mlx_format import mlx_facts
from lora_convert.text import refused_listing

REFUSED_CODE = "layout.mlx-unsupported"


@dataclass(frozen=True)
class MlxModule:
    """One mlx-lm LoRA layer of the output: slice `slice_index` of `group` (all experts at once for a switch)."""

    path: str  # mlx-lm's module path: model.layers.N.self_attn.q_proj, model.layers.N.mlp.switch_mlp.gate_proj
    group: PlannedGroup
    slices: tuple[int, ...]
    relative: str  # the path inside its layer: what lora_parameters.keys lists

    def specs(self, dtype: str, rank: int) -> list[TensorSpec]:
        g = self.group
        out = factors.span_rows([g.slices[i] for i in self.slices])
        rows = out.stop - out.start
        if g.experts:
            shapes = ((g.experts, rank, g.in_features), (g.experts, rows, rank))
        else:
            shapes = ((g.in_features, rank), (rank, rows))
        return [
            TensorSpec(f"{self.path}.lora_a", dtype, shapes[0]),
            TensorSpec(f"{self.path}.lora_b", dtype, shapes[1]),
        ]


@dataclass(frozen=True)
class MlxPlan:
    plan: Plan
    modules: tuple[MlxModule, ...]
    refused: tuple[tuple[PlannedGroup, str], ...]
    dropped: tuple[DroppedModule, ...] = ()
    num_layers: int = 0

    @property
    def rank(self) -> int:
        return self.plan.rank

    @property
    def groups(self) -> list[PlannedGroup]:
        return list({id(m.group): m.group for m in self.modules}.values())

    def tensor_specs(self, dtype: str) -> list[TensorSpec]:
        return [s for m in self.modules for s in m.specs(dtype, self.rank)]

    def adapter_config(self) -> dict[str, Any]:
        keys = sorted({m.relative for m in self.modules})
        params = {"rank": self.rank, "scale": 1.0, "dropout": 0.0, "keys": keys}
        return {"fine_tune_type": "lora", "num_layers": self.num_layers, "lora_parameters": params}

    def report_json(self) -> dict[str, Any]:
        return {
            "format": "lora-convert/mlx-layout",
            "version": 1,
            "layout": MLX_LAYOUT,
            "loader": mlx_facts().release,
            "rank": self.rank,
            "base": self.plan.base_name,
            "family": self.plan.family,
            "num_layers": self.num_layers,
            "modules": [m.path for m in self.modules],
            "dropped": [d.to_json() for d in self.dropped],
        }

    def summary(self) -> dict[str, Any]:
        return {"layout": MLX_LAYOUT, "engine": mlx_facts().release, "modules_written": len(self.modules), "notes": []}


# ------------------------------------------------------------------------------------------------- plan
def _refusal(g: PlannedGroup) -> str | None:
    """Why mlx-lm cannot hold group `g` (of a proven family), or None."""
    if g.kind == VISION_KIND:
        return "a vision-tower or projector module: mlx-lm's text models have no LoRA layer for it"
    if g.layer is None:
        return "outside the decoder layers: the mlx layout writes only `keys` of the last num_layers decoder layers"
    return None


def _check_family(plan: Plan) -> None:
    """UnsupportedAdapterError for a family whose mlx-lm names lora-convert has not proven (every module of it), or
    a base whose model type (the wrapper's or its text model's) the proof does not cover in a proven family."""
    facts = mlx_facts()
    family = plan.family
    if family in facts.families:
        config = dict(getattr(plan.arch, "config", None) or {})
        top = dict(getattr(plan.arch, "top_config", None) or config)
        unproven = facts.unproven_model_types.get(family, {})
        name = next((c["model_type"] for c in (top, config) if c.get("model_type") in unproven), None)
        if name is None:
            return
        raise UnsupportedAdapterError(
            f"--layout mlx: lora-convert has not proven mlx-lm's loading of model_type {name} (family {family}): "
            f"{unproven[name]} ({facts.release}).",
            hint="Use --layout peft or --layout stacked; docs/formats.md lists what the MLX proof covers.",
        )
    why = facts.unproven.get(family)
    raise UnsupportedAdapterError(
        f"--layout mlx: lora-convert has not proven mlx-lm's module names for the {family} family"
        f"{': ' + why if why else ''} ({facts.release}; proven: {', '.join(facts.families)}).",
        hint="Use --layout peft or --layout stacked; docs/formats.md lists what the MLX proof covers.",
    )


def _mlx_path(family: str, path: str, experts: bool) -> str:
    """mlx-lm's name for a module path in transformers' naming: a per-expert `experts.J.x` (or `<moe>.J.x`) is the
    switch `x`, then the family's `renames` (mlx_lm.json)."""
    facts = mlx_facts()
    parts = path.split(".")
    layer = next((i for i in range(len(parts) - 1) if parts[i] == "layers" and parts[i + 1].isdigit()), -1)
    expert = next((i for i in range(layer + 2, len(parts)) if parts[i].isdigit()), None) if experts else None
    if expert is not None:
        container, hf_name = next(iter(facts.expert_containers.items()))
        start = expert - 1 if parts[expert - 1] == hf_name else expert
        parts = [*parts[:start], container, *parts[expert + 1 :]]
    return facts.mlx_path(family, ".".join(parts))


def _layer_relative(path: str, layer: int) -> str | None:
    """The part of mlx-lm's `path` inside decoder layer `layer` (what lora_parameters.keys lists), or None."""
    marker = f"layers.{layer}."
    at = path.find(marker)
    if at < 0 or (at > 0 and path[at - 1] != "."):
        return None
    return path[at + len(marker) :]


def _group_modules(plan: Plan, g: PlannedGroup, rules, config, classes) -> list[MlxModule] | str:
    """The mlx-lm modules of one group, or why it cannot be written."""
    out = []
    # routed experts: one switch module per projection in every mlx-lm MoE block (SwitchGLU's gate_proj / up_proj /
    # down_proj, mlx_lm/models/switch_layers.py), whatever merged module PEFT's layout cuts for transformers
    cut = None if g.experts else rules.cut(g, plan.family, config, classes)
    for m in _modules(plan, g, rules, cut, config, classes):
        if m.expert not in (None, 0) or all(g.slices[i].is_zero_filled for i in m.slices):
            continue  # one switch module holds every expert; a zero-filled slice is mlx-lm's own zero lora_b
        if not factors.shares_one_a([g.slices[i] for i in m.slices]):
            return f"{m.path}: slices from different source modules (different A factors) in one mlx-lm module"
        path = _mlx_path(plan.family, m.path, bool(g.experts))
        relative = _layer_relative(path, g.layer)
        if relative is None:
            return f"{path} does not sit under decoder layer {g.layer}, where mlx-lm creates its LoRA layers"
        why = mlx_facts().no_lora.get(plan.family, {}).get(relative)
        if why is not None:
            return why
        out.append(MlxModule(path, g, m.slices, relative))
    return out


def plan_mlx_layout(plan: Plan, *, drop_unsupported: bool = False) -> MlxPlan:
    """Every mlx-lm module of the plan, or UnsupportedAdapterError naming what mlx-lm cannot express (with
    `drop_unsupported`: those groups left out, listed)."""
    _check_family(plan)
    rules = load_layout_rules(PEFT_LAYOUT)  # transformers' module names, which the proven families share
    config = dict(getattr(plan.arch, "config", None) or {})
    classes = model_classes(plan)
    modules: list[MlxModule] = []
    refused: list[tuple[PlannedGroup, str]] = []
    for g in sorted(plan.groups, key=lambda g: (g.layer if g.layer is not None else -1, g.key)):
        why = _refusal(g)
        cut = _group_modules(plan, g, rules, config, classes) if why is None else why
        if isinstance(cut, str):
            refused.append((g, cut))
        else:
            modules.extend(cut)
    return _settle(plan, modules, refused, drop_unsupported)


def _settle(plan: Plan, modules: list[MlxModule], refused: list, drop_unsupported: bool) -> MlxPlan:
    if refused and not drop_unsupported:
        listing = refused_listing((g.key, why) for g, why in refused)
        raise UnsupportedAdapterError(
            f"--layout mlx: {len(refused)} module group(s) cannot be expressed in mlx-lm's adapter format "
            f"({mlx_facts().release}): {listing}.",
            hint=f"Pass --drop-unsupported to leave them out (listed in {listing_file(MLX_LAYOUT)}; the adapter then "
            "differs from the trained one), or use --layout peft.",
        )
    if not modules:
        raise UnsupportedAdapterError(
            "--layout mlx: nothing is left to write once the unsupported modules are dropped.",
            hint="Use --layout peft or --layout stacked.",
        )
    dropped = list(plan.dropped)
    for g, why in refused:
        keys = sorted({k for s in g.slices for k in (s.source_keys() or [])})
        dropped.append(DroppedModule(g.key, keys, why, REFUSED_CODE))
    first = min(m.group.layer for m in modules)
    return MlxPlan(plan, tuple(modules), tuple(refused), tuple(dropped), plan.arch.num_layers - first)


# ------------------------------------------------------------------------------------------------ write
def iter_mlx_tensors(mp: MlxPlan, dtype_tag: str, progress=None, *, allow_non_finite: bool = False) -> Iterator:
    """(key, tensor) in `tensor_specs` order: each group built once (scaling folded), cut into mlx-lm's modules."""
    R = mp.rank
    groups = mp.groups
    built = iter_group_tensors(mp.plan, groups, dtype_tag, allow_non_finite=allow_non_finite)
    by_group: dict[int, list[MlxModule]] = {}
    for m in mp.modules:
        by_group.setdefault(id(m.group), []).append(m)
    for g, (_, A, B) in zip(groups, built, strict=True):
        nbytes = 0
        for m in by_group[id(g)]:
            a, b = _mlx_factors(A, B, g, m.slices, R)
            nbytes += a.nbytes + b.nbytes
            yield f"{m.path}.lora_a", a
            yield f"{m.path}.lora_b", b
        if progress is not None:
            progress.advance(nbytes)


def _mlx_factors(A, B, g: PlannedGroup, slices: tuple[int, ...], R: int):
    """mlx-lm's (lora_a, lora_b) of a run of slices: transposed for a dense module, per expert for a switch."""
    rows = factors.span_rows([g.slices[i] for i in slices])
    a_rows = factors.a_rows(slices[0], R)
    if g.experts:
        return np.ascontiguousarray(A[:, a_rows, :]), np.ascontiguousarray(B[:, rows, :])
    return np.ascontiguousarray(A[a_rows].T), np.ascontiguousarray(B[rows].T)


def mlx_files(mp: MlxPlan) -> dict[str, str]:
    return {
        "adapter_config.json": json.dumps(mp.adapter_config(), indent=2) + "\n",
        ENGINE_REPORT_FILE: json.dumps(mp.report_json(), indent=2) + "\n",
    }
