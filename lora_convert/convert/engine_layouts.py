"""Engine layouts: the stacked plan re-expressed as per-module PEFT files that today's engines load exactly.

`normalize --layout sglang|peft` (docs/engine-layouts.md). Both layouts are views of the same `Plan` as the
stacked layout: the same groups and slices, one rank R, every module's PEFT scaling folded into B, `r =
lora_alpha = R`. What differs is how each group is cut back into modules and what each module is called:

- `sglang`: names that SGLang 0.5.23's own loader (`lora.py` `_normalize_weights`, rules R1-R8 of
  ../shared/reference/sglang-loader.md) fuses into exactly the stacked groups: every fused family complete
  (q/k/v, q_a/kv_a, gate/up, Qwen3.5 GDN in_proj_q/k/v/z), Nemotron-H mamba `in_proj` as `gate_proj` + `x_proj`
  (only when its B/C/dt rows carry no delta), non-gated expert `up_proj` as `gate_proj`, Mixtral `w1/w3/w2` as
  `gate_proj/up_proj/down_proj`, both expert sides present, Nemotron `embeddings` as `embed_tokens`.
  Modules SGLang 0.5.23 has no LoRA path for are refused (or, with --drop-unsupported, dropped and reported).
- `peft` (what PEFT and vLLM load): one PEFT module per base-model module (`q_proj`, `in_proj_qkv`, mamba
  `in_proj` whole), module paths in the base checkpoint's naming, 3-D experts expanded to per-expert 2-D keys
  with gate, up and down all present (zero-filled where the adapter had none, as vLLM requires).
  Modules vLLM loads but never applies (MoE router LoRA, MLA kv_b_proj) are refused or dropped likewise.

Tensors are cut from `normalize.build_group_tensors` one group at a time and streamed through the same
temp-folder-and-swap writer as the stacked output (with its manifest); the same input gives the same bytes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from lora_convert.errors import UnsupportedAdapterError
from lora_convert.convert.plan import DroppedModule, Plan, PlannedGroup, _new_group

LAYOUTS = ("sglang", "peft")
REPORT_FILE = "lora_convert_report.json"
REPORT_FORMAT = "lora-convert/engine-layout"
REPORT_VERSION = 1
ENGINE_VERSIONS = {"sglang": "SGLang 0.5.23", "peft": "PEFT 0.21 / vLLM (per-module PEFT keys)"}

# Mixtral's checkpoint (and vLLM, PEFT's v4->v5 conversion) name the expert projections w1 (gate), w3 (up), w2 (down).
_W_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@dataclass(frozen=True)
class OutModule:
    """One per-module LoRA pair of the output: `slices` of `group` (for an expert group, of one expert)."""

    path: str  # module path, without `base_model.model.`
    slices: tuple[int, ...]  # contiguous slice indices of the group; more than one only where they share one A
    expert: int | None = None
    embedding: bool = False

    @property
    def a_key(self) -> str:
        return f"base_model.model.{self.path}." + ("lora_embedding_A" if self.embedding else "lora_A.weight")

    @property
    def b_key(self) -> str:
        return f"base_model.model.{self.path}." + ("lora_embedding_B" if self.embedding else "lora_B.weight")

    @property
    def leaf(self) -> str:
        return self.path.rsplit(".", 1)[-1]


@dataclass
class LayoutGroup:
    group: PlannedGroup
    modules: list[OutModule]
    added: bool = False  # a zero-filled expert side the adapter did not have (engines need both sides)
    dropped_slices: tuple[int, ...] = ()  # slices the engine cannot hold (only all-zero ones, or with --drop-unsupported)

    def out_rows(self, module: OutModule) -> tuple[int, int]:
        first, last = self.group.slices[module.slices[0]], self.group.slices[module.slices[-1]]
        return first.out_offset, last.out_offset + last.out_features


@dataclass
class LayoutPlan:
    plan: Plan
    layout: str
    groups: list[LayoutGroup]
    dropped: list[DroppedModule]
    target_modules: list[str] | str
    notes: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.plan.rank

    def modules(self) -> Iterator[tuple[LayoutGroup, OutModule]]:
        for lg in self.groups:
            for m in lg.modules:
                yield lg, m

    def tensor_specs(self, dtype: str):
        from lora_convert.io.safetensors_writer import TensorSpec

        R = self.rank
        specs = []
        for lg, m in self.modules():
            start, stop = lg.out_rows(m)
            specs.append(TensorSpec(m.a_key, dtype, (R, lg.group.in_features)))
            specs.append(TensorSpec(m.b_key, dtype, (stop - start, R)))
        return specs

    def adapter_config(self) -> dict[str, Any]:
        from lora_convert.convert.normalize import output_config

        return output_config(self.plan, self.target_modules)

    def report_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "layout": self.layout,
            "engine": ENGINE_VERSIONS[self.layout],
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
            "notes": self.notes,
        }


def _module_summary(lg: LayoutGroup) -> list[dict[str, Any]]:
    g = lg.group
    seen: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
    for m in lg.modules:
        generic = m.path if m.expert is None else m.path.replace(f".experts.{m.expert}.", ".experts.{e}.")
        entry = seen.setdefault((generic, m.slices), {"module": generic, "slices": [g.slices[i].name for i in m.slices]})
        if m.expert is not None:
            entry["experts"] = entry.get("experts", 0) + 1
    return list(seen.values())


# ------------------------------------------------------------------------------------------------ planning
def plan_layout(plan: Plan, layout: str, *, drop_unsupported: bool = False) -> LayoutPlan:
    """Cut the stacked plan into the modules of `layout`. Raises UnsupportedAdapterError for groups the target
    engine cannot serve exactly, unless `drop_unsupported` (then they are listed in `dropped`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown engine layout {layout!r}")
    groups = list(plan.groups) + _missing_expert_sides(plan)
    groups.sort(key=lambda g: (g.layer if g.layer is not None else 10**9, 1 if g.experts else 0, g.key))
    added = {id(g) for g in groups} - {id(g) for g in plan.groups}
    refused: list[tuple[PlannedGroup, str, str]] = []
    out: list[LayoutGroup] = []
    partial: list[DroppedModule] = []
    for g in groups:
        problem = (_sglang_problem if layout == "sglang" else _vllm_problem)(plan, g)
        if problem is not None:
            refused.append((g, *problem))
            continue
        lg = LayoutGroup(g, [], added=id(g) in added)
        if layout == "sglang" and plan.family == "nemotron_h" and g.name == "in_proj":
            lost = _mamba_bcdt_loss(plan, g)
            if lost is not None:
                share, rows = lost
                reason = (f"SGLang 0.5.23 applies mamba in_proj LoRA only to the z and x rows; the {rows} B/C/dt rows "
                          f"carry {share:.2%} of this module's delta (squared Frobenius norm of its B @ A)")
                if not drop_unsupported:
                    refused.append((g, reason, "sglang.mamba-in-proj-bcdt"))
                    continue
                keys = sorted({k for s in g.slices[2:] for k in (s.source_keys() or [])})
                partial.append(DroppedModule(f"{g.key} (B/C/dt rows)", keys, reason + "; dropped, the served delta differs",
                                             "sglang.mamba-in-proj-bcdt"))
            lg.dropped_slices = (2, 3, 4)
        lg.modules = _modules(plan, g, layout)
        out.append(lg)
    if refused and not drop_unsupported:
        listing = "; ".join(f"{g.key} ({reason})" for g, reason, _ in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        engine = "SGLang 0.5.23" if layout == "sglang" else "vLLM"
        raise UnsupportedAdapterError(
            f"--layout {layout}: {len(refused)} module group(s) cannot be served exactly by {engine}: {listing}{more}.",
            hint="Pass --drop-unsupported to leave them out (listed in lora_convert_report.json and on stderr; the "
            "served adapter then differs from the trained one), or use --layout stacked.",
        )
    dropped = list(plan.dropped)
    for g, reason, code in refused:
        keys = sorted({k for s in g.slices for k in (s.source_keys() or [])})
        dropped.append(DroppedModule(g.key, keys, reason, code))
    dropped += partial
    if not any(m for lg in out for m in lg.modules if not lg.added):
        raise UnsupportedAdapterError(f"--layout {layout}: nothing is left to write once the unsupported modules are dropped.",
                                      hint="Use --layout stacked, or run `lora-convert validate --engine ...` to see why.")
    plan.dropped[:] = dropped  # the command reports plan.dropped
    lp = LayoutPlan(plan=plan, layout=layout, groups=out, dropped=dropped, target_modules=[])
    lp.target_modules = _target_modules(lp)
    if isinstance(lp.target_modules, str):
        lp.notes.append("target_modules is 'all-linear': SGLang creates its literal up_proj target (Nemotron-H "
                        "non-gated MLP / shared expert) only by auto-detection; --lora-target-modules all also works.")
    if layout == "sglang" and any(g.group.name.startswith("shared_experts.") for g in out) and plan.family in ("deepseek_v3", "kimi_k25"):
        lp.notes.append("Launch SGLang with --disable-shared-experts-fusion, or the shared-expert LoRA is not applied.")
    return lp


def _missing_expert_sides(plan: Plan) -> list[PlannedGroup]:
    """Zero-filled routed-expert groups for layers that adapt one side only: SGLang wraps FusedMoE only when both
    gate_up and down are targets, and vLLM's pack_moe asserts all three projections for every expert."""
    arch = plan.arch
    have = {g.key for g in plan.groups}
    layers = sorted({g.layer for g in plan.groups if g.experts and g.layer is not None})
    extra = []
    for layer in layers:
        for spec in arch.groups(layer):
            if spec.experts and spec.kind == "routed_experts" and spec.path not in have:
                g = _new_group(spec)
                g.missing_experts = list(range(spec.experts))
                extra.append(g)
    return extra


def _container(group: PlannedGroup) -> str:
    return group.key.rsplit(".", 1)[0]


def _modules(plan: Plan, g: PlannedGroup, layout: str) -> list[OutModule]:
    container = _container(g)
    names = [s.name for s in g.slices]
    if g.kind == "embedding":
        path = g.key
        if layout == "sglang" and path.rsplit(".", 1)[-1] != "embed_tokens":
            path = f"{container}.embed_tokens" if "." in path else "embed_tokens"  # Nemotron-H `embeddings`
        return [OutModule(path, (0,), embedding=True)]
    if g.experts:
        gated = len(g.slices) == 2
        cuts: list[tuple[str, tuple[int, ...]]]
        if g.name.endswith("down_proj"):
            cuts = [("down_proj", (0,))]
        elif gated:
            cuts = [("gate_proj", (0,)), ("up_proj", (1,))]
        else:  # non-gated (Nemotron-H `experts.up_proj`): SGLang expects gate_proj, PEFT/vLLM keep up_proj
            cuts = [("gate_proj" if layout == "sglang" else "up_proj", (0,))]
        if layout == "peft" and plan.family == "mixtral":
            cuts = [(_W_NAMES[n], idx) for n, idx in cuts]
        return [OutModule(f"{container}.{e}.{name}", idx, expert=e) for e in range(g.experts) for name, idx in cuts]
    if len(g.slices) == 1:
        return [OutModule(g.key, (0,))]
    if g.name == "in_proj" and plan.family == "nemotron_h":
        if layout == "sglang":  # R5: gate_proj + x_proj -> in_proj (z | x); B/C/dt checked to be zero
            return [OutModule(f"{container}.gate_proj", (0,)), OutModule(f"{container}.x_proj", (1,))]
        return [OutModule(g.key, tuple(range(len(g.slices))))]  # one Linear in the base: A shared by all slices
    if g.name == "in_proj_qkvz" and names == ["q", "k", "v", "z"]:  # Qwen3.5 GDN
        if layout == "sglang":  # R6: the four-way split
            return [OutModule(f"{container}.in_proj_{n}", (i,)) for i, n in enumerate(names)]
        return [OutModule(f"{container}.in_proj_qkv", (0, 1, 2)), OutModule(f"{container}.in_proj_z", (3,))]
    if g.name == "in_proj_ba" and names == ["b", "a"]:
        return [OutModule(f"{container}.in_proj_{n}", (i,)) for i, n in enumerate(names)]
    # q/k/v, q_a/kv_a, gate/up: the slice names are the base model's module names
    return [OutModule(f"{container}.{s.name}", (i,)) for i, s in enumerate(g.slices)]


# ------------------------------------------------------------------------------------- engine support rules
def _cfg(plan: Plan) -> dict:
    return dict(getattr(plan.arch, "config", None) or {})


def _sglang_default_inter(cfg: dict, layer: int) -> int | None:
    """SGLang's default get_hidden_dim width for a dense gate_up/down (sglang-loader.md §5.1)."""
    fk = cfg.get("first_k_dense_replace")
    if fk is not None and layer >= fk and layer % (cfg.get("moe_layer_freq") or 1) == 0:
        return (cfg.get("moe_intermediate_size") or 0) * (cfg.get("n_shared_experts") or 0)
    return cfg.get("intermediate_size")


def _sglang_problem(plan: Plan, g: PlannedGroup) -> tuple[str, str] | None:
    """Why SGLang 0.5.23 cannot serve this group exactly (reason, code), or None."""
    family = plan.family
    cfg = _cfg(plan)
    leaf = g.name.rsplit(".", 1)[-1]
    if g.kind == "router":
        return "MoE router LoRA: SGLang has no LoRA for the router (get_hidden_dim('gate') raises NotImplementedError)", "sglang.router"
    if leaf == "shared_expert_gate":
        return "shared_expert_gate LoRA: no SGLang target (get_hidden_dim raises NotImplementedError)", "sglang.no-target"
    if g.name == "in_proj_ba":
        return "GDN in_proj_b/in_proj_a LoRA is unsupported in 0.5.23 (no get_hidden_dim entry; added by #30499/#31522)", "sglang.gdn-in-proj-ba"
    if family in ("deepseek_v3", "kimi_k25") and g.kind == "mla" and g.name in ("q_proj", "kv_a_proj_with_mqa"):
        return ("MLA without q_lora_rank (DeepSeek-V2-Lite style): SGLang has no LoRA path (q_proj goes through the q/k/v "
                "fusion and fails, kv_a_proj_with_mqa matches no target)"), "sglang.mla-no-q-lora"
    if family == "qwen3_next":
        if g.name == "qkv_proj":
            return ("Qwen3-Next gated-attention q/k/v: SGLang 0.5.23 sizes qkv_proj with the default get_hidden_dim "
                    "(heads x head_dim for q, not the gated 2 x heads x head_dim), so the pool copy fails"), "sglang.qwen3-next-qkv"
        if g.kind == "linear_attention":
            return "Qwen3-Next GDN LoRA: the default get_hidden_dim has no entry for it (NotImplementedError)", "sglang.qwen3-next-gdn"
    if family in ("qwen3_moe", "qwen3_next") and g.kind == "mlp":
        return ("dense-layer MLP of an MoE model: SGLang 0.5.23 builds every Qwen3-MoE/Qwen3-Next layer as MoE "
                "(mlp_only_layers/decoder_sparse_step ignored), so this MLP has no LoRA buffer"), "sglang.dense-mlp-on-moe"
    if (not g.experts and leaf in ("gate_up_proj", "down_proj") and g.layer is not None
            and family in ("deepseek_v3", "kimi_k25", "qwen3_next", "llama", "mixtral", "qwen3_moe")):
        want = _sglang_default_inter(cfg, g.layer)
        width = g.slices[0].out_features if leaf == "gate_up_proj" else g.in_features
        if want != width:
            return (f"SGLang sizes this MLP's LoRA buffer at {want} (default get_hidden_dim) but the module is {width} wide, "
                    "so the pool copy fails"), "sglang.mlp-width"
    return None


def _vllm_problem(plan: Plan, g: PlannedGroup) -> tuple[str, str] | None:
    if g.kind == "router":
        return "MoE router LoRA: vLLM skips it, so routing would be served with the base router", "vllm.router"
    if g.name == "kv_b_proj":
        return ("MLA kv_b_proj LoRA: vLLM loads it but never applies it (absorbed decode path; vllm #48974); "
                "SGLang applies it (use --layout sglang)"), "vllm.kv-b-proj"
    return None


def _mamba_bcdt_loss(plan: Plan, g: PlannedGroup) -> tuple[float, int] | None:
    """(share of the delta, rows) held by the B/C/dt rows of a Nemotron-H mamba in_proj, or None if exactly zero."""
    import torch

    from lora_convert.convert.normalize import build_group_tensors

    A, B = build_group_tensors(plan, g, "F32", plan.adapter.read)
    R = plan.rank
    lost = total = 0.0
    nonzero = False
    for i, s in enumerate(g.slices):
        d = B[s.out_offset:s.out_offset + s.out_features].double() @ A[i * R:(i + 1) * R].double()
        sq = float((d * d).sum())
        total += sq
        if i >= 2:
            lost += sq
            nonzero |= bool(torch.count_nonzero(d))
    if not nonzero:
        return None
    rows = sum(s.out_features for s in g.slices[2:])
    return (lost / total if total else 1.0), rows


def _target_modules(lp: LayoutPlan) -> list[str] | str:
    if lp.layout == "peft":
        # PEFT, vLLM and SGLang all match target_modules on the last name component: list exactly those in the file
        return sorted({m.leaf for _, m in lp.modules()})
    # SGLang: the names its normalization ends with (qkv_proj, gate_up_proj, fused_qkv_a_proj_with_mqa, in_proj_qkvz,
    # in_proj, ...), each its own normalized form and with a get_hidden_dim entry; in_proj_q/x_proj would not have one.
    names = set()
    literal_up = False
    for lg, m in lp.modules():
        g = lg.group
        leaf = g.name.rsplit(".", 1)[-1]
        if g.kind == "embedding":
            names.add("embed_tokens")
        elif g.experts:
            names.add("down_proj" if leaf == "down_proj" else "gate_up_proj")
        elif leaf == "up_proj":  # non-gated MLP: SGLang's `up_proj` target exists only through auto-detection
            literal_up = True
        else:
            names.add(leaf)
    return "all-linear" if literal_up else sorted(names)


# ------------------------------------------------------------------------------------------------- writing
def iter_layout_tensors(lp: LayoutPlan, dtype_tag: str, read: Callable[[str], Any] | None = None,
                        progress=None) -> Iterator[tuple[str, Any]]:
    """(key, tensor) in spec order: each group is built once (stacked, scaling folded) and cut into its modules.
    `progress.advance` gets, after each group, the bytes of the tensors yielded for it (normalize.WriteProgress)."""
    import torch

    from lora_convert.convert import normalize as normalize_module

    plan = lp.plan
    R = plan.rank
    read = read or plan.adapter.read
    for lg in lp.groups:
        A, B = normalize_module.build_group_tensors(plan, lg.group, dtype_tag, read)
        group_bytes = 0
        for m in lg.modules:
            a = A[m.expert] if m.expert is not None else A
            b = B[m.expert] if m.expert is not None else B
            first = m.slices[0]
            block = a[first * R:(first + 1) * R]
            for i in m.slices[1:]:  # one base Linear over several slices: they must share one A (same source)
                if not torch.equal(a[i * R:(i + 1) * R], block):
                    raise UnsupportedAdapterError(
                        f"{m.path}: slices {[lg.group.slices[j].name for j in m.slices]} have different A factors, so they "
                        "cannot be one module of rank R.", hint="Use --layout stacked.")
            start, stop = lg.out_rows(m)
            a_out, b_out = block.clone(), b[start:stop].clone()
            # The modules written, not the stacked group: dropped slices and per-expert cuts change the byte count.
            group_bytes += a_out.numel() * a_out.element_size() + b_out.numel() * b_out.element_size()
            yield m.a_key, a_out
            yield m.b_key, b_out
        if progress is not None:
            progress.advance(group_bytes)
        del A, B


def write_layout(lp: LayoutPlan, output: str | Path, *, dtype: str = "keep", force: bool = False, progress=None,
                 protected: list[tuple[str, Path]] | None = None):
    from lora_convert.convert.normalize import NormalizeResult, output_dtype, write_folder

    started = time.perf_counter()
    plan = lp.plan
    tag = output_dtype(plan, dtype)
    specs = lp.tensor_specs(tag)
    files = {
        "adapter_config.json": json.dumps(lp.adapter_config(), indent=2) + "\n",
        REPORT_FILE: json.dumps(lp.report_json(), indent=2) + "\n",
    }
    written = write_folder(output, plan.adapter, specs, iter_layout_tensors(lp, tag, progress=progress), files, force=force,
                           layout=lp.layout, protected=protected, progress=progress)
    return NormalizeResult(plan=plan, output=Path(output), dtype=tag, bytes_in=plan.adapter.total_bytes,
                           bytes_out=sum(s.nbytes for s in specs), seconds=time.perf_counter() - started,
                           tensors_written=written, notes=list(lp.notes), layout=lp.layout,
                           layout_summary=layout_summary(lp))


def layout_summary(lp: LayoutPlan) -> dict[str, Any]:
    return {
        "layout": lp.layout,
        "engine": ENGINE_VERSIONS[lp.layout],
        "modules_written": sum(len(lg.modules) for lg in lp.groups),
        "added_zero_filled_groups": [lg.group.key for lg in lp.groups if lg.added],
        "target_modules": lp.target_modules,
        "notes": lp.notes,
    }
