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
import math
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from operator import attrgetter
from pathlib import Path
from typing import Any

from lora_convert.codes import finding
from lora_convert.errors import AdapterConfigError, AdapterFormatError, UsageError
from lora_convert.findings import Finding
from lora_convert.io.small_files import json_type_name, read_small_json
from lora_convert.io.source import AdapterSource, resolve_adapter_source
from lora_convert.io.tensor_files import TensorIndex, TensorInfo, load_bin_index, read_safetensors_header
from lora_convert.peft.config import PeftConfig, load_config_file
from lora_convert.peft.naming import Factor, ParsedKey, parse_keys

SAFETENSORS_NAME = "adapter_model.safetensors"
SAFETENSORS_INDEX_NAME = "adapter_model.safetensors.index.json"
BIN_NAME = "adapter_model.bin"
LAYOUT_NAME = "lora_layout.json"

# Registration order of the 3-D expert parameters in transformers 5 MoE blocks (gate_up_proj or up_proj first,
# down_proj last). The first-registered targeted parameter gets the most `.base_layer` wrappers.
EXPERT_PARAM_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")


class ModuleKind(str, Enum):
    LINEAR = "linear"
    EMBEDDING = "embedding"
    FUSED_EXPERTS = "fused_experts"  # PEFT ParamWrapper over a 3-D expert parameter


class ExpertLayout(str, Enum):
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
        return sum(map(attrgetter("nbytes"), self.index.tensors.values()))

    @property
    def total_params(self) -> int:
        # TensorInfo.numel of every tensor, mapped in C: this runs over every tensor of the adapter
        return sum(map(math.prod, map(attrgetter("shape"), self.index.tensors.values())))

    @property
    def expert_layout(self) -> str:
        """One of ExpertLayout's values (the string, as reports write it)."""
        per_expert = any(m.expert is not None for m in self.modules)
        fused_experts = ModuleKind.FUSED_EXPERTS
        fused = any(m.kind == fused_experts for m in self.modules)
        if per_expert and fused:
            layout = ExpertLayout.MIXED
        elif fused:
            layout = ExpertLayout.FUSED_3D
        elif per_expert:
            layout = ExpertLayout.PER_EXPERT
        else:
            layout = ExpertLayout.NONE
        return layout.value

    def read(self, key: str):
        return self.index.read(key)

    def read_many(self, keys: list[str], arena=None) -> dict:
        """Several tensors with as few reads as possible; with an `arena` (lora_convert.io.tensor_files.ReadArena)
        they are views of its reused memory, valid until its next use."""
        return self.index.read_many(keys, arena)


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
        # A FIFO, device or oversized index, an LFS pointer, bad JSON, not an object: its own AdapterFormatError.
        index = read_small_json(index_file, AdapterFormatError, hint=_INDEX_HINT)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise AdapterFormatError(
                f"{index_file} is not a valid shard index: expected a JSON object with a `weight_map` object of "
                f"key -> file, but its `weight_map` is {json_type_name(weight_map)}.",
                hint=_INDEX_HINT,
            )
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
def cyclic_gc_paused():
    """Pause Python's cyclic garbage collector while the index, parsed keys and modules are built.

    These are a few acyclic objects per tensor, freed by reference counting alone, but every allocation counts
    towards the collector's thresholds, so building them for a large adapter would run repeated full collections
    over a growing heap that holds no cycle (docs/benchmarks.md, "peft/ and the header reader" measures it). The previous
    state is restored.

    On the way out the objects built here are handed to the oldest generation (gc.freeze then gc.unfreeze: two
    list splices, no traversal) instead of staying young: otherwise the first allocation after gc.enable() runs a
    young-generation collection over all of them, and a middle-generation one follows. They are collected as usual
    by full collections. Skipped when the caller has frozen objects of its own (unfreeze would release those too).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()
        if was_enabled:
            gc.enable()


def config_error(config: PeftConfig, config_path: Path) -> AdapterConfigError | None:
    """The AdapterConfigError a strict read raises for adapter_config.json's errors, or None when it has none."""
    fatal = config.errors
    if not fatal:
        return None
    return AdapterConfigError(
        f"{config_path} has {len(fatal)} problem(s): " + " ".join(f.message for f in fatal),
        hint=(fatal[0].fix + " " if len(fatal) == 1 and fatal[0].fix else "")
        + "Fix adapter_config.json (`lora-convert validate` lists every problem).",
    )


def load_adapter(
    spec: str | Path | AdapterSource,
    *,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    strict_config: bool = True,
) -> Adapter:
    """Open an adapter (local folder or Hub id) header-first.

    With `strict_config`, errors in adapter_config.json raise AdapterConfigError (`config_error`); otherwise they
    are kept in `adapter.findings` (validate reports them all).
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
    error = config_error(config, config_path) if strict_config else None
    if error is not None:
        raise error
    file_format, files = _adapter_files(source)
    with cyclic_gc_paused():
        index = _read_index(source, file_format, files)
        parsed = parse_keys(index.tensors)
        modules, findings = group_modules(parsed, index, config)
    findings = list(config.findings) + findings + _duplicate_key_findings(index)
    layout = _read_layout(source)
    added, added_findings = _read_added_tokens(source)
    return Adapter(
        source=source,
        config=config,
        file_format=file_format,
        files=files,
        index=index,
        parsed=parsed,
        modules=modules,
        findings=findings + added_findings,
        stacked_layout=layout,
        added_tokens=added,
    )


def _read_index(source: AdapterSource, file_format: str, files: list[Path]) -> TensorIndex:
    """Every tensor's header entry, over all shards (a `.bin` through safe unpickling)."""
    index = TensorIndex()
    for path in files:
        _check_inside(path, source.allowed_roots)
        if file_format == "bin":
            index = load_bin_index(path)
        else:
            tensors, _ = read_safetensors_header(path)
            index.add_all(tensors)
    return index


def _duplicate_key_findings(index: TensorIndex) -> list[Finding]:
    return [
        finding(
            "keys.duplicate",
            f"{key} is stored in more than one shard ({', '.join(holders)}); only the first is used.",
            keys=[key],
            fix="Re-save the adapter so each tensor is stored once.",
        )
        for key, holders in index.duplicates.items()
    ]


def _read_layout(source: AdapterSource) -> dict[str, Any] | None:
    """lora_layout.json, when the adapter is a stacked output of `lora-convert normalize`."""
    layout_path = source.path / LAYOUT_NAME
    if not layout_path.exists():
        return None
    _check_inside(layout_path, source.allowed_roots)
    return read_small_json(
        layout_path,
        AdapterFormatError,
        hint=f"{LAYOUT_NAME} is written by `lora-convert normalize`: normalize the original adapter again.",
    )


def _read_added_tokens(source: AdapterSource) -> tuple[dict[str, int] | None, list[Finding]]:
    """added_tokens.json as token -> id; one that cannot be read is a finding, not an error."""
    added_path = source.path / "added_tokens.json"
    if not added_path.exists():
        return None, []
    _check_inside(added_path, source.allowed_roots)
    try:
        loaded = read_small_json(added_path, AdapterFormatError)
        return {str(k): int(v) for k, v in loaded.items()}, []
    except AdapterFormatError as exc:  # not a regular file, too large, an LFS pointer, not a JSON object
        message = exc.message
    except (TypeError, ValueError):
        message = f"{added_path} is not a JSON object of token -> id."
    return None, [finding("config.added-tokens-unreadable", message, keys=["added_tokens.json"])]


# ------------------------------------------------------------------------------------------------ grouping
Slot = tuple[str, int]  # (module path, base_layer depth): one LoRA wrapper
# Keys that are no LoRA factor (each a finding), and the factor an embedding's key fills in its wrapper's slot.
_NOT_LORA_FACTORS = frozenset(
    {Factor.UNKNOWN, Factor.FULL_WEIGHT, Factor.FULL_BIAS, Factor.BASE_LAYER_COPY, Factor.TRAINABLE_TOKENS}
)
_EMBEDDING_FACTORS = {Factor.EMBEDDING_A: Factor.LORA_A, Factor.EMBEDDING_B: Factor.LORA_B}
# The tensors of a LoraModule, in the order of its fields lora_A, lora_B, magnitude, lora_bias.
_MODULE_FACTORS = (Factor.LORA_A, Factor.LORA_B, Factor.MAGNITUDE, Factor.LORA_BIAS)


def group_modules(
    parsed: dict[str, ParsedKey], index: TensorIndex, config: PeftConfig, *, shortcut: bool = True
) -> tuple[list[LoraModule], list[Finding]]:
    """The LoRA modules of the parsed keys, in (layer, module, expert, param) order, and what is wrong with them.

    Findings come in this order: each key that is no LoRA factor or a second copy of one (key order), leftover
    adapter-name segments, 3-D expert parameters, then each module's pairing, shape and rank problems.
    `shortcut=False` sends every module through the general shape checks (`_fill_shapes`): the test oracle of
    `_fill_common_pair`, which gives the same modules and findings faster.
    """
    findings: list[Finding] = []
    slots, embedding_slots = _collect_slots(parsed, findings)
    fused_params = _resolve_fused_params(slots, index, config, findings)
    modules = _build_modules(slots, embedding_slots, fused_params, index, config, findings, shortcut)
    modules.sort(key=_module_order)
    return modules, findings


def _collect_slots(
    parsed: dict[str, ParsedKey], findings: list[Finding]
) -> tuple[dict[Slot, dict[Factor, ParsedKey]], set[Slot]]:
    """The LoRA factors of each wrapper (embedding factors as LORA_A/B), and the wrappers that are embeddings.

    Keys that are not LoRA factors, and second copies of a factor, become findings instead."""
    slots: dict[Slot, dict[Factor, ParsedKey]] = {}
    embedding_slots: set[Slot] = set()  # slots that hold a lora_embedding_A/B
    leftover_names: list[str] = []
    for key, p in parsed.items():
        factor = p.factor
        if factor in _NOT_LORA_FACTORS:
            findings.append(_not_a_factor(key, factor))
            continue
        if p.adapter_name is not None:
            leftover_names.append(key)
        slot = (p.module, p.base_layer_depth)
        factors = slots.setdefault(slot, {})
        is_embedding = factor in _EMBEDDING_FACTORS
        if is_embedding:
            factor = _EMBEDDING_FACTORS[factor]
        if factor in factors:
            first = factors[factor].key
            findings.append(
                finding("keys.duplicate", f"{key} and {first} are the same factor of {p.module}.", keys=[key, first])
            )
            continue
        factors[factor] = p
        if is_embedding:
            embedding_slots.add(slot)
    if leftover_names:
        findings.append(_adapter_name_finding(parsed, leftover_names))
    return slots, embedding_slots


def _not_a_factor(key: str, factor: Factor) -> Finding:
    if factor is Factor.UNKNOWN:
        return finding(
            "keys.unparseable",
            f"{key!r} is not a PEFT LoRA tensor name (expected "
            "`<module>.lora_A.weight`, `<module>.lora_B.weight`, `lora_embedding_A/B` or "
            "`lora_magnitude_vector`).",
            keys=[key],
        )
    if factor is Factor.BASE_LAYER_COPY:
        return finding(
            "keys.base-layer-copy",
            f"{key} is PEFT's copy of the base weight of a layer it wraps (saved for embedding layers), not a LoRA "
            "factor; it equals the base model's weight unless the vocabulary was resized.",
            keys=[key],
        )
    if factor is Factor.TRAINABLE_TOKENS:
        return finding(
            "keys.trainable-tokens",
            f"{key} holds PEFT's trainable-token rows (trainable_token_indices): new values of some embedding rows, "
            "not a LoRA factor.",
            keys=[key],
            fix="Merge them into the base model, or normalize with --drop-unsupported to leave them out.",
        )
    return finding(
        "keys.full-weight",
        f"{key} is a whole module {'weight' if factor is Factor.FULL_WEIGHT else 'bias'} "
        "(modules_to_save or bias), not a LoRA factor; serving engines reject or ignore it.",
        keys=[key],
        fix="Merge it into the base model, or normalize with --drop-unsupported to leave it out.",
    )


def _adapter_name_finding(parsed: dict[str, ParsedKey], leftover_names: list[str]) -> Finding:
    names = sorted({parsed[k].adapter_name for k in leftover_names})
    return finding(
        "keys.adapter-name-segment",
        f"{len(leftover_names)} key(s) keep the adapter-name segment {', '.join(repr(n) for n in names)} "
        f"(e.g. {leftover_names[0]}); PEFT strips it on save, and vLLM rejects such keys.",
        keys=leftover_names[:20],
        fix="lora-convert normalize writes the keys without it.",
    )


def _build_modules(
    slots: dict[Slot, dict[Factor, ParsedKey]],
    embedding_slots: set[Slot],
    fused_params: dict[Slot, tuple[str, str]],
    index: TensorIndex,
    config: PeftConfig,
    findings: list[Finding],
    shortcut: bool,
) -> list[LoraModule]:
    """One LoraModule per wrapper: its kind, target name, the config's numbers for it, its rank and features."""
    tensors = index.tensors
    ranks = _RankLookup(config)
    modules = []
    for slot, factors in slots.items():
        module_path, depth = slot
        sample = next(iter(factors.values()))
        param, param_source = fused_params.get(slot, (None, None))
        if _is_fused_experts(module_path):
            kind = ModuleKind.FUSED_EXPERTS
        else:
            kind = ModuleKind.EMBEDDING if slot in embedding_slots else ModuleKind.LINEAR
        target_name = _target_name(config, module_path, kind, param)
        config_rank, alpha, scaling, config_rank_known, scaling_known = ranks.numbers(target_name)
        local_name = sample.local_name
        if param and local_name.endswith("experts"):
            local_name = f"{local_name}.{param}"
        a, b, magnitude, bias = [None if p is None else tensors[p.key] for p in map(factors.get, _MODULE_FACTORS)]
        # Built as `LoraModule(...)` builds it: __init__ called on a bare instance takes the keywords as they are,
        # where calling the class first packs them into a dict (docs/benchmarks.md, "peft/ and the header reader").
        mod = object.__new__(LoraModule)
        mod.__init__(
            module=module_path,
            kind=kind,
            target_name=target_name,
            param=param,
            param_source=param_source,
            layer=sample.layer,
            expert=sample.expert,
            local_name=local_name,
            stack_prefix=sample.stack_prefix,
            is_vision=sample.is_vision,
            base_layer_depth=depth,
            adapter_name=sample.adapter_name,
            lora_A=a,
            lora_B=b,
            magnitude=magnitude,
            lora_bias=bias,
            config_rank=config_rank,
            alpha=alpha,
            scaling=scaling,
            config_rank_known=config_rank_known,
            scaling_known=scaling_known,
        )
        if not (shortcut and _fill_common_pair(mod)):
            _fill_shapes(mod, config, findings)
        modules.append(mod)
    return modules


def _target_name(config: PeftConfig, module_path: str, kind: ModuleKind, param: str | None) -> str:
    """What PEFT matches rank/alpha patterns against: the 3-D parameter, or a targeted 2-D `weight`."""
    if param:
        return f"{module_path}.{param}"
    if config.target_parameters and kind == ModuleKind.LINEAR and config.targets_parameter(module_path, "weight"):
        return f"{module_path}.weight"
    return module_path


def _module_order(m: LoraModule) -> tuple:
    return (m.layer if m.layer is not None else -1, m.module, m.expert or 0, m.param or "")


def _is_fused_experts(module_path: str) -> bool:
    """ParsedKey.is_fused_experts from the module path alone: its last segment is `experts`."""
    return module_path == "experts" or module_path.endswith(".experts")


class _RankLookup:
    """The config's rank, alpha, scaling and whether they are known, per target name.

    With no rank_pattern and no alpha_pattern entries, `PeftConfig`'s answers cannot depend on the name (every
    pattern lookup finds nothing), so they are computed once instead of five lookups per module."""

    def __init__(self, config: PeftConfig) -> None:
        self.config = config
        self.shared: tuple | None = None
        self.name_free = not config.rank_pattern and not config.alpha_pattern

    def numbers(self, target_name: str) -> tuple[int, float, float, bool, bool]:
        if self.shared is not None:
            return self.shared
        c = self.config
        values = (
            c.rank_for(target_name),
            c.alpha_for(target_name),
            c.scaling_for(target_name),
            c.rank_known(target_name),
            c.scaling_known(target_name),
        )
        if self.name_free:
            self.shared = values
        return values


def _resolve_fused_params(
    slots, index: TensorIndex, config: PeftConfig, findings: list[Finding]
) -> dict[tuple[str, int], tuple[str, str]]:
    """Decide which 3-D parameter each `experts[.base_layer]*` wrapper holds."""
    by_module: dict[str, list[int]] = defaultdict(list)
    for module_path, depth in slots:
        if _is_fused_experts(module_path):
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


# -------------------------------------------------------------------------------------------------- shapes
def _fill_common_pair(mod: LoraModule) -> bool:
    """Fill the common module, a 2-D pair whose ranks agree with each other and with the config; False for any
    other, which `_fill_shapes` fills and reports on.

    A shortcut past `_fill_shapes` for the tens of thousands of modules of a large MoE adapter (docs/benchmarks.md,
    "peft/ and the header reader"); on these modules both set the same fields and report nothing
    (tests/test_peft_reading_parts.py holds them equal)."""
    a, b = mod.lora_A, mod.lora_B
    if a is None or b is None or mod.kind == ModuleKind.FUSED_EXPERTS:
        return False
    sa, sb = a.shape, b.shape
    if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1] or (mod.config_rank_known and sa[0] != mod.config_rank):
        return False
    mod.rank, mod.in_features, mod.out_features = sa[0], sa[1], sb[0]
    return True


def _fill_shapes(mod: LoraModule, config: PeftConfig, findings: list[Finding]) -> None:
    """The module's rank, features and expert count from its tensors (config_rank and the rest already set), and a
    finding for each thing that does not fit PEFT's layout."""
    a, b = mod.lora_A, mod.lora_B
    if a is None or b is None:
        if a is not None or b is not None:
            findings.append(_missing_factor(mod))
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
    mod.in_features, mod.out_features = a.shape[1], b.shape[0]
    if mod.kind == ModuleKind.FUSED_EXPERTS:
        _fill_expert_rank(mod, findings)
    else:
        _fill_pair_rank(mod, config, findings)


def _missing_factor(mod: LoraModule) -> Finding:
    present, missing = ("lora_A", "lora_B") if mod.lora_B is None else ("lora_B", "lora_A")
    param = f".{mod.param}" if mod.param and mod.kind == ModuleKind.FUSED_EXPERTS else ""
    return finding(
        "pairs.missing-B" if mod.lora_B is None else "pairs.missing-A",
        f"{mod.module}{param} has {present} but no {missing}.",
        keys=mod.keys,
        fix="The adapter is incomplete; save it again, or drop the module.",
    )


def _fill_expert_rank(mod: LoraModule, findings: list[Finding]) -> None:
    """A 3-D expert wrapper's rank and expert count: A is [E*r, in], B [out, r*E], r from the config."""
    if not mod.config_rank_known:
        return  # E and r cannot be told apart without the config's rank; the config finding says why
    a, b = mod.lora_A, mod.lora_B
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


def _fill_pair_rank(mod: LoraModule, config: PeftConfig, findings: list[Finding]) -> None:
    """A 2-D pair's rank: A's rows, which B's columns and the config's rank (or rank_pattern) must equal."""
    a, b = mod.lora_A, mod.lora_B
    rank_a, rank_b = a.shape[0], b.shape[1]
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
