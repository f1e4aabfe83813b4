"""Reading a PEFT adapter: files -> header index -> parsed keys -> LoRA modules with PEFT's rank and scaling.

Nothing here reads tensor data: `Adapter.read(key)` does, one tensor at a time, when a caller asks.

PEFT's 3-D expert wrappers need care (docs/stacked-layout.md; the fixtures under tests/fixtures/data): the key
`...mlp.experts.lora_A.weight` does not say which parameter it wraps. When several parameters of one module are
targeted, the wrappers nest in registration order, so the first-registered targeted parameter sits deepest
(most `.base_layer`). We decide from `target_parameters`, that order, and the shapes, never from the key alone.
A is `[E*r, in]` expert-major; B is `[out, r*E]` rank-major.
"""

from __future__ import annotations

import gc
import json
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_convert.codes import finding
from lora_convert.errors import AdapterConfigError, AdapterFormatError, UsageError
from lora_convert.findings import Finding
from lora_convert.io.small_files import read_small_text
from lora_convert.io.source import AdapterSource, resolve_adapter_source
from lora_convert.io.tensor_files import TensorIndex, TensorInfo, load_bin_index, read_safetensors_header
from lora_convert.peft.config import PeftConfig, load_config_file
from lora_convert.peft.naming import Factor, ParsedKey, parse_key

SAFETENSORS_NAME = "adapter_model.safetensors"
SAFETENSORS_INDEX_NAME = "adapter_model.safetensors.index.json"
BIN_NAME = "adapter_model.bin"
LAYOUT_NAME = "lora_layout.json"
# Findings that describe PEFT's per-module layout; a stacked output (lora_layout.json) has 3-D, rank-padded
# tensors on purpose, so for it these say nothing about the adapter (its own layout file is checked instead).
STACKED_LAYOUT_CODES = frozenset({"shapes.not-2d", "rank.config-mismatch", "rank.fused-experts", "rank.a-b-mismatch"})

# Registration order of the 3-D expert parameters in transformers 5 MoE blocks (gate_up_proj or up_proj first,
# down_proj last). The first-registered targeted parameter gets the most `.base_layer` wrappers.
EXPERT_PARAM_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")


class ModuleKind:
    LINEAR = "linear"
    EMBEDDING = "embedding"
    FUSED_EXPERTS = "fused_experts"  # PEFT ParamWrapper over a 3-D expert parameter


class ExpertLayout:
    NONE = "none"
    PER_EXPERT = "per-expert-2d"
    FUSED_3D = "fused-3d"
    MIXED = "mixed"


@dataclass
class LoraModule:
    """One LoRA-adapted module (or 3-D parameter) with what PEFT would compute for it."""

    module: str  # module path as written in the keys (no `base_model.model.`, no `.base_layer`)
    kind: str
    target_name: str  # what PEFT matches rank/alpha patterns against
    param: str | None = None  # the 3-D parameter a ParamWrapper wraps (gate_up_proj, up_proj, down_proj)
    param_source: str | None = None  # how `param` was decided: target_parameters | shapes
    layer: int | None = None
    expert: int | None = None
    local_name: str = ""
    stack_prefix: str | None = None
    is_vision: bool = False
    base_layer_depth: int = 0
    adapter_name: str | None = None
    lora_A: TensorInfo | None = None
    lora_B: TensorInfo | None = None
    magnitude: TensorInfo | None = None
    lora_bias: TensorInfo | None = None
    experts: int | None = None  # E, for FUSED_EXPERTS
    rank: int | None = None  # effective rank from the tensors (per expert for FUSED_EXPERTS)
    config_rank: int = 0
    alpha: float = 0.0
    scaling: float = 0.0
    # False when adapter_config.json's rank (or alpha) fields are invalid: the numbers above are then
    # placeholders, and to_json() shows them as null instead of presenting them as the config's.
    config_rank_known: bool = True
    scaling_known: bool = True
    in_features: int | None = None
    out_features: int | None = None

    @property
    def keys(self) -> list[str]:
        return [t.key for t in (self.lora_A, self.lora_B, self.magnitude, self.lora_bias) if t is not None]

    @property
    def leaf(self) -> str:
        return self.param or self.module.rsplit(".", 1)[-1]

    @property
    def is_complete(self) -> bool:
        return self.lora_A is not None and self.lora_B is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "param": self.param,
            "target_name": self.target_name,
            "kind": self.kind,
            "layer": self.layer,
            "expert": self.expert,
            "experts": self.experts,
            "rank": self.rank,
            "config_rank": self.config_rank if self.config_rank_known else None,
            "alpha": self.alpha if self.scaling_known else None,
            "scaling": self.scaling if self.scaling_known else None,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "dora": self.magnitude is not None,
            "base_layer_depth": self.base_layer_depth,
            "keys": self.keys,
        }


@dataclass
class Adapter:
    source: AdapterSource
    config: PeftConfig
    file_format: str  # safetensors | safetensors-sharded | bin
    files: list[Path]
    index: TensorIndex
    parsed: dict[str, ParsedKey]
    modules: list[LoraModule]
    findings: list[Finding] = field(default_factory=list)  # config + key + pairing problems
    stacked_layout: dict[str, Any] | None = None  # lora_layout.json when this is a normalized output
    added_tokens: dict[str, int] | None = None

    @property
    def path(self) -> Path:
        return self.source.path

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.index.tensors.values())

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.index.tensors.values())

    @property
    def expert_layout(self) -> str:
        per_expert = any(m.expert is not None for m in self.modules)
        fused = any(m.kind == ModuleKind.FUSED_EXPERTS for m in self.modules)
        if per_expert and fused:
            return ExpertLayout.MIXED
        if fused:
            return ExpertLayout.FUSED_3D
        if per_expert:
            return ExpertLayout.PER_EXPERT
        return ExpertLayout.NONE

    def read(self, key: str):
        return self.index.read(key)

    def read_many(self, keys: list[str], arena=None) -> dict:
        """Several tensors with as few reads as possible; with an `arena` (lora_convert.io.tensor_files.ReadArena)
        they are views of its reused memory, valid until its next use."""
        return self.index.read_many(keys, arena)

    def keys_of(self, factor: Factor) -> list[str]:
        return [k for k, p in self.parsed.items() if p.factor is factor]


# --------------------------------------------------------------------------------------------------- files
def _check_inside(path: Path, roots: tuple[Path, ...]) -> None:
    real = path.resolve()
    if not any(real == root or root in real.parents for root in roots):
        raise AdapterFormatError(
            f"{path} is a link to {real}, which lies outside the adapter folder.",
            hint="Copy the real file into the adapter folder; links out of it are refused so that a crafted adapter "
            "cannot make lora-convert read arbitrary files.",
        )


_INDEX_HINT = "Re-save the adapter, or remove the index and keep a single adapter_model.safetensors."


def _adapter_files(source: AdapterSource) -> tuple[str, list[Path]]:
    folder = source.path
    single = folder / SAFETENSORS_NAME
    index_file = folder / SAFETENSORS_INDEX_NAME
    if single.exists():
        return "safetensors", [single]
    if index_file.exists():
        _check_inside(index_file, source.allowed_roots)
        try:  # a FIFO, device or oversized index raises its own AdapterFormatError, naming the problem
            index = json.loads(read_small_text(index_file, AdapterFormatError, hint=_INDEX_HINT))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise AdapterFormatError(
                f"{index_file} is not a valid shard index (a JSON object with a `weight_map` of key -> file).",
                hint=_INDEX_HINT,
            ) from None
        names = sorted({str(v) for v in weight_map.values()})
        shards = []
        for name in names:
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise AdapterFormatError(
                    f"{index_file} names shard {name!r}, which is not a file name in the adapter folder."
                )
            shard = folder / name
            if not shard.exists():
                raise AdapterFormatError(
                    f"{index_file} lists shard {name!r}, which is missing from {folder}.",
                    hint="Download the whole adapter again.",
                )
            shards.append(shard)
        return "safetensors-sharded", shards
    shards = sorted(folder.glob("adapter_model-*-of-*.safetensors"))
    if shards:
        return "safetensors-sharded", shards
    if (folder / BIN_NAME).exists():
        return "bin", [folder / BIN_NAME]
    present = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise AdapterFormatError(
        f"{folder} has no adapter weights: expected {SAFETENSORS_NAME}, sharded adapter_model-0000N-of-0000M.safetensors "
        f"with {SAFETENSORS_INDEX_NAME}, or {BIN_NAME}; found {present}.",
        hint="Point at the folder PEFT's save_pretrained wrote.",
    )


@contextmanager
def _cyclic_gc_paused():
    """Pause Python's cyclic garbage collector while the index, parsed keys and modules are built.

    perf: these are ~5 acyclic objects per tensor (freed by reference counting alone), but every allocation counts
    towards the collector's thresholds, so building them for a 94,000-tensor adapter ran repeated full collections
    over a growing heap: half of load_adapter's time (docs/benchmarks.md). The previous state is restored.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_adapter(
    spec: str | Path | AdapterSource,
    *,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    strict_config: bool = True,
) -> Adapter:
    """Open an adapter (local folder or Hub id) header-first.

    With `strict_config`, errors in adapter_config.json raise AdapterConfigError; otherwise they are kept in
    `adapter.findings` (validate reports them all).
    """
    source = (
        spec if isinstance(spec, AdapterSource) else resolve_adapter_source(str(spec), cache_dir=cache_dir, token=token)
    )
    if not source.path.is_dir():
        raise UsageError(f"{source.path} is not a folder.", hint="Pass the adapter's folder, not a file in it.")
    config_path = source.path / "adapter_config.json"
    if config_path.exists():
        _check_inside(config_path, source.allowed_roots)
    config = load_config_file(config_path)
    if strict_config and config.errors:
        fatal = config.errors
        raise AdapterConfigError(
            f"{config_path} has {len(fatal)} problem(s): " + " ".join(f.message for f in fatal),
            hint=(fatal[0].fix + " " if len(fatal) == 1 and fatal[0].fix else "")
            + "Fix adapter_config.json (`lora-convert validate` lists every problem).",
        )
    file_format, files = _adapter_files(source)
    with _cyclic_gc_paused():
        index = TensorIndex()
        for path in files:
            _check_inside(path, source.allowed_roots)
            if file_format == "bin":
                index = load_bin_index(path)
            else:
                tensors, _ = read_safetensors_header(path)
                for info_ in tensors.values():
                    index.add(info_)
        parsed = {key: parse_key(key) for key in index.tensors}
        modules, findings = group_modules(parsed, index, config)
    findings = list(config.findings) + findings
    for key, holders in index.duplicates.items():
        findings.append(
            finding(
                "keys.duplicate",
                f"{key} is stored in more than one shard ({', '.join(holders)}); only the first is used.",
                keys=[key],
                fix="Re-save the adapter so each tensor is stored once.",
            )
        )
    layout = None
    layout_path = source.path / LAYOUT_NAME
    if layout_path.exists():
        _check_inside(layout_path, source.allowed_roots)
        try:
            layout = json.loads(read_small_text(layout_path, AdapterFormatError))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterFormatError(f"{layout_path} is not valid JSON ({exc}).") from None
    added = None
    added_path = source.path / "added_tokens.json"
    if added_path.exists():
        _check_inside(added_path, source.allowed_roots)
        try:
            loaded = json.loads(read_small_text(added_path, AdapterFormatError))
            added = {str(k): int(v) for k, v in loaded.items()} if isinstance(loaded, dict) else None
        except AdapterFormatError as exc:  # not a regular file, too large, cannot be opened
            findings.append(finding("config.added-tokens-unreadable", exc.message, keys=["added_tokens.json"]))
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError):
            findings.append(
                finding(
                    "config.added-tokens-unreadable",
                    f"{added_path} is not a JSON object of token -> id.",
                    keys=["added_tokens.json"],
                )
            )
    return Adapter(
        source=source,
        config=config,
        file_format=file_format,
        files=files,
        index=index,
        parsed=parsed,
        modules=modules,
        findings=findings,
        stacked_layout=layout,
        added_tokens=added,
    )


# ------------------------------------------------------------------------------------------------ grouping
def group_modules(
    parsed: dict[str, ParsedKey], index: TensorIndex, config: PeftConfig
) -> tuple[list[LoraModule], list[Finding]]:
    findings: list[Finding] = []
    slots: dict[tuple[str, int], dict[Factor, ParsedKey]] = defaultdict(dict)
    leftover_names: list[str] = []
    for key, p in parsed.items():
        if p.factor is Factor.UNKNOWN:
            findings.append(
                finding(
                    "keys.unparseable",
                    f"{key!r} is not a PEFT LoRA tensor name (expected "
                    "`<module>.lora_A.weight`, `<module>.lora_B.weight`, `lora_embedding_A/B` or "
                    "`lora_magnitude_vector`).",
                    keys=[key],
                )
            )
            continue
        if p.factor in (Factor.FULL_WEIGHT, Factor.FULL_BIAS):
            findings.append(
                finding(
                    "keys.full-weight",
                    f"{key} is a whole module {'weight' if p.factor is Factor.FULL_WEIGHT else 'bias'} "
                    "(modules_to_save or bias), not a LoRA factor; serving engines reject or ignore it.",
                    keys=[key],
                    fix="Merge it into the base model, or normalize with --drop-unsupported to leave it out.",
                )
            )
            continue
        if p.adapter_name is not None:
            leftover_names.append(key)
        slot = slots[(p.module, p.base_layer_depth)]
        factor = (
            Factor.LORA_A
            if p.factor is Factor.EMBEDDING_A
            else Factor.LORA_B
            if p.factor is Factor.EMBEDDING_B
            else p.factor
        )
        if factor in slot:
            findings.append(
                finding(
                    "keys.duplicate",
                    f"{key} and {slot[factor].key} are the same factor of {p.module}.",
                    keys=[key, slot[factor].key],
                )
            )
            continue
        slot[factor] = p
    if leftover_names:
        names = sorted({parsed[k].adapter_name for k in leftover_names})
        findings.append(
            finding(
                "keys.adapter-name-segment",
                f"{len(leftover_names)} key(s) keep the adapter-name segment {', '.join(repr(n) for n in names)} "
                f"(e.g. {leftover_names[0]}); PEFT strips it on save, and vLLM rejects such keys.",
                keys=leftover_names[:20],
                fix="lora-convert normalize writes the keys without it.",
            )
        )
    fused_params = _resolve_fused_params(slots, index, config, findings)
    modules: list[LoraModule] = []
    for (module_path, depth), factors in slots.items():
        sample = next(iter(factors.values()))
        is_embedding = any(p.factor in (Factor.EMBEDDING_A, Factor.EMBEDDING_B) for p in factors.values())
        kind = (
            ModuleKind.FUSED_EXPERTS
            if sample.is_fused_experts
            else ModuleKind.EMBEDDING
            if is_embedding
            else ModuleKind.LINEAR
        )
        param, param_source = fused_params.get((module_path, depth), (None, None))
        target_name = f"{module_path}.{param}" if param else module_path
        if kind == ModuleKind.LINEAR and config.target_parameters and config.targets_parameter(module_path, "weight"):
            target_name = f"{module_path}.weight"
        mod = LoraModule(
            module=module_path,
            kind=kind,
            target_name=target_name,
            param=param,
            param_source=param_source,
            layer=sample.layer,
            expert=sample.expert,
            local_name=sample.local_name,
            stack_prefix=sample.stack_prefix,
            is_vision=sample.is_vision,
            base_layer_depth=depth,
            adapter_name=sample.adapter_name,
            lora_A=index.tensors[factors[Factor.LORA_A].key] if Factor.LORA_A in factors else None,
            lora_B=index.tensors[factors[Factor.LORA_B].key] if Factor.LORA_B in factors else None,
            magnitude=index.tensors[factors[Factor.MAGNITUDE].key] if Factor.MAGNITUDE in factors else None,
            lora_bias=index.tensors[factors[Factor.LORA_BIAS].key] if Factor.LORA_BIAS in factors else None,
        )
        if mod.param and mod.local_name.endswith("experts"):
            mod.local_name = f"{mod.local_name}.{mod.param}"
        _fill_ranks(mod, config, findings)
        modules.append(mod)
    modules.sort(key=lambda m: (m.layer if m.layer is not None else -1, m.module, m.expert or 0, m.param or ""))
    return modules, findings


def _resolve_fused_params(
    slots, index: TensorIndex, config: PeftConfig, findings: list[Finding]
) -> dict[tuple[str, int], tuple[str, str]]:
    """Decide which 3-D parameter each `experts[.base_layer]*` wrapper holds."""
    by_module: dict[str, list[int]] = defaultdict(list)
    for (module_path, depth), factors in slots.items():
        if next(iter(factors.values())).is_fused_experts:
            by_module[module_path].append(depth)
    resolved: dict[tuple[str, int], tuple[str, str]] = {}
    for module_path, depths in by_module.items():
        depths.sort()
        targeted = [p for p in EXPERT_PARAM_ORDER if config.targets_parameter(module_path, p)]
        if targeted:
            # First-registered targeted parameter is innermost: depth len-1 .. 0
            by_depth = {len(targeted) - 1 - i: p for i, p in enumerate(targeted)}
            for depth in depths:
                if depth in by_depth:
                    resolved[(module_path, depth)] = (by_depth[depth], "target_parameters")
                else:
                    keys = [p.key for p in slots[(module_path, depth)].values()]
                    findings.append(
                        finding(
                            "experts.unknown-parameter",
                            f"{module_path} has a 3-D LoRA wrapper {depth} level(s) deep, but target_parameters "
                            f"({', '.join(config.target_parameters)}) names only {len(targeted)} parameter(s) of it.",
                            keys=keys,
                            expected=sorted(by_depth),
                            actual=depth,
                        )
                    )
            continue
        # No usable target_parameters: fall back on registration order and shapes, and say so.
        if len(depths) >= 2:
            guess = {depths[-1]: "gate_up_proj", depths[0]: "down_proj"}
        else:
            guess = {depths[0]: _guess_param_from_shapes(slots[(module_path, depths[0])], index)}
        for depth, param in guess.items():
            resolved[(module_path, depth)] = (param, "shapes")
        keys = [p.key for d in depths for p in slots[(module_path, d)].values()]
        findings.append(
            finding(
                "experts.parameter-guessed",
                f"{module_path} holds 3-D expert LoRA but target_parameters "
                f"{'is invalid' if 'target_parameters' in config.invalid else 'does not name its parameters'}; "
                f"assumed {', '.join(f'depth {d} = {p}' for d, p in sorted(guess.items()))} from registration order and shapes.",
                keys=keys[:4],
                fix="Add the parameter names to target_parameters in adapter_config.json.",
            )
        )
    return resolved


def _guess_param_from_shapes(factors: dict[Factor, ParsedKey], index: TensorIndex) -> str:
    a = index.tensors.get(factors[Factor.LORA_A].key) if Factor.LORA_A in factors else None
    b = index.tensors.get(factors[Factor.LORA_B].key) if Factor.LORA_B in factors else None
    if a is not None and b is not None and len(a.shape) == 2 and len(b.shape) == 2:
        # gate_up maps hidden -> 2I (or I); down maps I -> hidden, so down's output is wider than its input
        # in every MoE here (hidden > moe_intermediate_size).
        return "down_proj" if b.shape[0] > a.shape[1] else "gate_up_proj"
    return "down_proj"


def _fill_ranks(mod: LoraModule, config: PeftConfig, findings: list[Finding]) -> None:
    mod.config_rank = config.rank_for(mod.target_name)
    mod.alpha = config.alpha_for(mod.target_name)
    mod.scaling = config.scaling_for(mod.target_name)
    mod.config_rank_known = config.rank_known(mod.target_name)
    mod.scaling_known = config.scaling_known(mod.target_name)
    a, b = mod.lora_A, mod.lora_B
    if a is None or b is None:
        present, missing = ("lora_A", "lora_B") if b is None else ("lora_B", "lora_A")
        if a is None and b is None:
            return
        findings.append(
            finding(
                "pairs.missing-B" if b is None else "pairs.missing-A",
                f"{mod.module}{'.' + mod.param if mod.param and mod.kind == ModuleKind.FUSED_EXPERTS else ''} "
                f"has {present} but no {missing}.",
                keys=mod.keys,
                fix="The adapter is incomplete; save it again, or drop the module.",
            )
        )
        return
    for t in (a, b):
        if len(t.shape) != 2:
            findings.append(
                finding(
                    "shapes.not-2d",
                    f"{t.key} has shape {list(t.shape)}; LoRA factors are 2-D.",
                    keys=[t.key],
                    expected="2-D",
                    actual=list(t.shape),
                )
            )
            return
    if mod.kind == ModuleKind.FUSED_EXPERTS:
        mod.in_features, mod.out_features = a.shape[1], b.shape[0]
        if not mod.config_rank_known:
            return  # E and r cannot be told apart without the config's rank; the config finding says why
        r = mod.config_rank
        rows, cols = a.shape[0], b.shape[1]
        if r <= 0 or rows % r or cols % r or rows != cols:
            findings.append(
                finding(
                    "rank.fused-experts",
                    f"{mod.module}.{mod.param}: 3-D LoRA A has {rows} rows and B has {cols} columns, which is not E*r "
                    f"for the configured rank {r}.",
                    keys=mod.keys,
                    expected=f"A [E*{r}, in], B [out, {r}*E]",
                    actual=[list(a.shape), list(b.shape)],
                )
            )
            mod.rank = None
        else:
            mod.rank = r
            mod.experts = rows // r
        return
    rank_a, rank_b = a.shape[0], b.shape[1]
    mod.in_features, mod.out_features = a.shape[1], b.shape[0]
    if rank_a != rank_b:
        findings.append(
            finding(
                "rank.a-b-mismatch",
                f"{mod.module}: lora_A has rank {rank_a} (shape {list(a.shape)}) "
                f"but lora_B has rank {rank_b} (shape {list(b.shape)}).",
                keys=mod.keys,
                expected=rank_a,
                actual=rank_b,
            )
        )
        mod.rank = None
        return
    mod.rank = rank_a
    if mod.config_rank_known and rank_a != mod.config_rank:
        where = config.pattern_sources(mod.target_name)["rank_pattern"]
        said = f"rank_pattern[{where!r}] = {mod.config_rank}" if where else f"r = {mod.config_rank}"
        findings.append(
            finding(
                "rank.config-mismatch",
                f"{mod.module}: the tensors have rank {rank_a} but adapter_config.json says {said}; PEFT would refuse "
                "to load this, and the scaling alpha/r is ambiguous.",
                keys=mod.keys,
                expected=mod.config_rank,
                actual=rank_a,
                fix="Fix r / rank_pattern in adapter_config.json to match the tensors.",
            )
        )
