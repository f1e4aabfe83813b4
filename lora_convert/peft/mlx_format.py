"""Reading an mlx-lm adapter folder (adapters.safetensors + mlx-lm's adapter_config.json) as the Adapter a PEFT
folder gives: the same module paths, PEFT's factor orientation, PEFT's rank and scaling.

A folder is an mlx-lm adapter when its adapter_config.json has mlx-lm's own fields (`detect_fields` of
lora_convert/peft/mlx_lm.json: `lora_parameters` and `num_layers`), which PEFT never writes. mlx-lm stores a dense
LoRA as `lora_a` [in, r] and `lora_b` [r, out], transposed from PEFT's A [r, in] and B [out, r]: `MlxTensorIndex`
presents them under PEFT's keys in PEFT's orientation, transposing each tensor as it is read (headers only until
then, one tensor at a time), so every check and writer sees a PEFT adapter. Stacked experts (`switch_mlp`:
`lora_a` [E, r, in], `lora_b` [E, out, r], already PEFT's orientation per expert) become PEFT's per-expert modules
`experts.J.<proj>`, each expert a contiguous slice of the stored tensor, so no data is touched. `scale` is the final
multiplier (PEFT's alpha/r): every module's scaling is `scale` exactly, and alpha = scale * rank. Where a family's
mlx-lm module names differ from transformers' (`renames` of mlx_lm.json, picked by the base's schema family), the
paths are read back in transformers' names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_convert.codes import finding
from lora_convert.errors import AdapterConfigError, AdapterFormatError, LoraConvertError
from lora_convert.findings import Finding
from lora_convert.io.shipped_data import STRING, ListOf, MapOf, Object, load_shipped
from lora_convert.io.small_files import read_small_json
from lora_convert.io.source import AdapterSource
from lora_convert.io.tensor_files import TensorIndex, TensorInfo, read_safetensors_header, read_tensor_data
from lora_convert.peft.adapter import Adapter, _check_inside, cyclic_gc_paused, group_modules
from lora_convert.peft.config import parse_config
from lora_convert.peft.naming import parse_keys

if TYPE_CHECKING:
    import numpy as np

FILE_FORMAT = "mlx"
PEFT_PREFIX = "base_model.model."
_FACTORS = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "m": "lora_magnitude_vector"}

_SPEC = Object(
    required={
        "release": STRING,
        "weights_file": STRING,
        "detect_fields": ListOf(STRING, non_empty=True),
        "expert_containers": MapOf(STRING),
        "families": ListOf(STRING, non_empty=True),
        "renames": MapOf(MapOf(STRING)),
        "no_lora": MapOf(MapOf(STRING)),
        "unproven": MapOf(STRING),
        "unproven_model_types": MapOf(MapOf(STRING)),
    }
)


@dataclass(frozen=True)
class MlxFacts:
    """lora_convert/peft/mlx_lm.json: what lora-convert knows about mlx-lm's adapter format."""

    release: str
    weights_file: str
    detect_fields: tuple[str, ...]
    expert_containers: dict[str, str]  # mlx-lm's stacked-expert container -> transformers' module
    families: tuple[str, ...]
    renames: dict[str, dict[str, str]]  # family -> transformers' dotted path fragment -> mlx-lm's
    no_lora: dict[str, dict[str, str]]  # family -> module path inside a layer -> why mlx-lm has no LoRA for it
    unproven: dict[str, str]  # family -> why lora-convert does not write it for mlx-lm
    unproven_model_types: dict[str, dict[str, str]]  # proven family -> model_type -> why lora-convert does not write it

    def mlx_path(self, family: str | None, path: str) -> str:
        """mlx-lm's module path for transformers' `path` (whose expert container is already mlx-lm's)."""
        return _renamed(path, self.renames.get(family or "", {}).items())

    def transformers_path(self, family: str | None, path: str) -> str:
        """transformers' module path for mlx-lm's `path` (the expert container left as mlx-lm's)."""
        return _renamed(path, [(v, k) for k, v in self.renames.get(family or "", {}).items()])


def _renamed(path: str, pairs) -> str:
    """`path` with each whole dotted fragment `old` replaced by `new` (fragments match at dots only)."""
    dotted = f".{path}."
    for old, new in pairs:
        dotted = dotted.replace(f".{old}.", f".{new}.")
    return dotted[1:-1]


@cache
def mlx_facts() -> MlxFacts:
    data = load_shipped("lora_convert.peft", "mlx_lm.json", _SPEC, "peft/mlx_lm.json")
    return MlxFacts(
        data["release"],
        data["weights_file"],
        tuple(data["detect_fields"]),
        dict(data["expert_containers"]),
        tuple(data["families"]),
        {family: dict(pairs) for family, pairs in data["renames"].items()},
        {family: dict(paths) for family, paths in data["no_lora"].items()},
        dict(data["unproven"]),
        {family: dict(types) for family, types in data["unproven_model_types"].items()},
    )


def is_mlx_adapter(folder: Path) -> bool:
    """Whether `folder` holds an mlx-lm adapter: its adapter_config.json has every one of mlx-lm's own fields. A
    config that cannot be read is not decided here (the PEFT reader reports it)."""
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        return False
    try:
        raw = read_small_json(config_path)
    except LoraConvertError:
        return False
    return isinstance(raw, dict) and all(f in raw for f in mlx_facts().detect_fields)


class MlxTensorIndex(TensorIndex):
    """A TensorIndex under PEFT's keys over an mlx-lm file: the transposed keys sit in `_eager` (so every reader
    goes through `read`), mapped to the stored tensor they are the transpose of."""

    def read(self, key: str) -> np.ndarray:
        import numpy as np  # as tensor_files does: listing headers never imports numpy

        stored = self._eager.get(key)
        if stored is None:
            return super().read(key)
        return np.ascontiguousarray(read_tensor_data(stored).T)


# ------------------------------------------------------------------------------------------------ tensors
def _peft_module(module: str, expert: int | None, facts: MlxFacts) -> str:
    """transformers' module path for mlx-lm's `module` (expert `expert` of a stacked-expert container)."""
    if expert is None:
        return module
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part in facts.expert_containers:
            parts[i] = f"{facts.expert_containers[part]}.{expert}"
            return ".".join(parts)
    return module


def _expert_slices(info: TensorInfo, key: str, module: str, facts: MlxFacts) -> list[TensorInfo]:
    """One TensorInfo per expert of a stacked [E, ...] tensor: expert e's rows are contiguous in the file."""
    experts = info.shape[0]
    step = info.nbytes // experts if experts else 0
    return [
        TensorInfo(
            f"{PEFT_PREFIX}{_peft_module(module, e, facts)}.{key}",
            info.dtype,
            info.shape[1:],
            info.path,
            info.start + e * step,
            step,
        )
        for e in range(experts)
    ]


def mlx_index(infos: dict[str, TensorInfo], facts: MlxFacts, family: str | None = None) -> MlxTensorIndex:
    """PEFT's keys and orientation over mlx-lm's tensors (headers only), module paths in transformers' names for
    the base's schema `family` (None: mlx-lm's paths as they are, apart from the expert container)."""
    index = MlxTensorIndex()
    for mlx_key, info in infos.items():
        module, _, factor = mlx_key.rpartition(".")
        module = facts.transformers_path(family, module) if module else module
        peft_factor = _FACTORS.get(factor)
        if peft_factor is None or not module:  # not a LoRA factor: kept under its own name, for keys.unparseable
            index.add(TensorInfo(PEFT_PREFIX + mlx_key, info.dtype, info.shape, info.path, info.start, info.nbytes))
            continue
        switch = len(info.shape) == 3 and any(p in facts.expert_containers for p in module.split("."))
        if switch:
            for part in _expert_slices(info, peft_factor, module, facts):
                index.add(part)
            continue
        key = f"{PEFT_PREFIX}{module}.{peft_factor}"
        if len(info.shape) == 2 and factor != "m":
            index.add(TensorInfo(key, info.dtype, info.shape[::-1], info.path, info.start, info.nbytes))
            index._eager[key] = info
        else:
            index.add(TensorInfo(key, info.dtype, info.shape, info.path, info.start, info.nbytes))
    return index


# ------------------------------------------------------------------------------------------------- config
def _lora_parameters(raw: dict[str, Any], path: Path) -> tuple[int, float, dict[str, Any]]:
    """(rank, scale, lora_parameters) of mlx-lm's config; raises AdapterConfigError when they are unusable."""
    fine_tune_type = raw.get("fine_tune_type", "lora")
    if fine_tune_type == "full":
        raise AdapterConfigError(
            f"{path} is mlx-lm's config of a full fine-tune (fine_tune_type 'full'): its weights replace the base's, "
            "it is not a LoRA adapter.",
            hint="Only `fine_tune_type` 'lora' (or 'dora') adapters can be read.",
        )
    params = raw.get("lora_parameters")
    rank = params.get("rank") if isinstance(params, dict) else None
    scale = params.get("scale") if isinstance(params, dict) else None
    ok = isinstance(rank, int) and not isinstance(rank, bool) and rank > 0
    ok = ok and isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if not ok:
        raise AdapterConfigError(
            f"{path}: mlx-lm's `lora_parameters` must hold a positive integer `rank` and a number `scale`, but it is "
            f"{json.dumps(params)[:200]}.",
            hint="mlx-lm writes lora_parameters {rank, scale, dropout, keys} (scale is the final multiplier, not "
            "alpha); fix adapter_config.json.",
        )
    return rank, float(scale), params


def _peft_raw(raw: dict[str, Any], rank: int, scale: float, modules: set[str]) -> dict[str, Any]:
    """The PEFT adapter_config.json that computes what mlx-lm computes: r = rank, lora_alpha = scale * rank."""
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": scale * rank,
        "use_dora": raw.get("fine_tune_type") == "dora",
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "lora_dropout": (raw.get("lora_parameters") or {}).get("dropout", 0.0),
        "base_model_name_or_path": None,
        "mlx_lm": {k: raw[k] for k in ("fine_tune_type", "num_layers", "lora_parameters") if k in raw},
    }


def load_mlx_adapter(source: AdapterSource, family: str | None = None) -> Adapter:
    """Open an mlx-lm adapter folder header-first as an Adapter in PEFT's terms, its module paths in transformers'
    names for the base's schema `family` (mlx_lm.json `renames`). Raises AdapterConfigError for an unusable
    mlx-lm config and AdapterFormatError when adapters.safetensors is missing or unreadable."""
    facts = mlx_facts()
    config_path = source.path / "adapter_config.json"
    _check_inside(config_path, source.allowed_roots)
    raw = read_small_json(config_path, AdapterConfigError)
    rank, scale, _ = _lora_parameters(raw, config_path)
    weights = source.path / facts.weights_file
    if not weights.is_file():
        raise AdapterFormatError(
            f"{source.path} has mlx-lm's adapter_config.json but no {facts.weights_file}.",
            hint="Point at the folder mlx-lm's training wrote (adapter_config.json and adapters.safetensors).",
        )
    _check_inside(weights, source.allowed_roots)
    with cyclic_gc_paused():
        index = mlx_index(read_safetensors_header(weights)[0], facts, family)
        parsed = parse_keys(index.tensors)
        modules_seen = {p.module for p in parsed.values() if p.module}
        config = parse_config(_peft_raw(raw, rank, scale, modules_seen), source=config_path.name)
        modules, findings = group_modules(parsed, index, config)
    findings += mlx_findings(read_safetensors_header(weights)[0], raw)
    for m in modules:  # exactly mlx-lm's multiplier (alpha / r could differ from it in the last bit)
        m.scaling, m.alpha = scale, scale * rank
    return Adapter(
        source=source,
        config=config,
        file_format=FILE_FORMAT,
        files=[weights],
        index=index,
        parsed=parsed,
        modules=modules,
        findings=list(config.findings) + findings,
    )


# ----------------------------------------------------------------------------------------------- hazards
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def mlx_findings(infos: dict[str, TensorInfo], raw: dict[str, Any]) -> list[Finding]:
    """mlx-lm's own hazards, from the headers and the config: factors in PEFT's orientation, a `scale` that is the
    trained alpha, layers no last-`num_layers` block holds."""
    return _orientation_findings(infos) + _scale_findings(raw) + _layer_findings(infos, raw)


def _orientation_findings(infos: dict[str, TensorInfo]) -> list[Finding]:
    out = []
    for key, a in infos.items():
        module, _, factor = key.rpartition(".")
        b = infos.get(f"{module}.lora_b")
        if factor != "lora_a" or b is None or len(a.shape) != 2 or len(b.shape) != 2:
            continue
        mlx_fits, peft_fits = a.shape[1] == b.shape[0], a.shape[0] == b.shape[1]
        if peft_fits and not mlx_fits:
            out.append(_orientation(module, a, b, transposed=True))
        elif len({*a.shape, *b.shape}) == 1:
            out.append(_orientation(module, a, b, transposed=False))
    return out


def _orientation(module: str, a: TensorInfo, b: TensorInfo, *, transposed: bool) -> Finding:
    """`transposed`: the shapes fit PEFT's orientation only; otherwise they fit both (square in every dimension)."""
    text = f"{module}: lora_a {list(a.shape)}, lora_b {list(b.shape)}; mlx-lm's orientation is lora_a [in, r], lora_b [r, out]."
    details = {
        "keys": [a.key, b.key],
        "expected": "lora_a [in, r], lora_b [r, out]",
        "actual": [list(a.shape), list(b.shape)],
    }
    if transposed:
        return finding("mlx.factors-peft-orientation", text, **details)
    return finding("mlx.orientation-unknown", text, **details)


def _scale_findings(raw: dict[str, Any]) -> list[Finding]:
    params = raw.get("lora_parameters") or {}
    alpha, scale = params.get("alpha"), params.get("scale")
    if alpha is None or alpha != scale:
        return []
    return [
        finding(
            "mlx.scale-looks-like-alpha",
            f"lora_parameters has scale {scale} and alpha {alpha}: mlx-lm multiplies by scale, so the delta is applied "
            f"{params.get('rank')}x what alpha/rank would give.",
            keys=["lora_parameters.scale", "lora_parameters.alpha"],
            expected=f"scale = alpha / rank = {alpha}/{params.get('rank')}",
            actual=scale,
        )
    ]


def _layer_findings(infos: dict[str, TensorInfo], raw: dict[str, Any]) -> list[Finding]:
    """Layers that no block of the last `num_layers` layers can hold: the adapted layers span more than it (the
    base's layer count, which would place the block exactly, is not known here). mlx-lm takes
    `model.layers[-max(num_layers, 0):]` (mlx_lm/tuner/utils.py:113), so 0 or less means every layer."""
    num_layers = raw.get("num_layers")
    layers = sorted({int(m.group(1)) for k in infos for m in [_LAYER.search(k)] if m})
    if not isinstance(num_layers, int) or num_layers <= 0 or not layers or layers[-1] - layers[0] < num_layers:
        return []
    outside = [k for k in infos if (m := _LAYER.search(k)) and int(m.group(1)) <= layers[-1] - num_layers]
    return [
        finding(
            "mlx.layers-outside-num-layers",
            f"num_layers is {num_layers}, but the adapter holds layers {layers[0]}-{layers[-1]}: layers up to "
            f"{layers[-1] - num_layers} lie outside the last {num_layers} layers.",
            keys=outside[:20],
            expected=f"at most {num_layers} consecutive layers ending at the last",
            actual=f"layers {layers[0]}-{layers[-1]}",
        )
    ]
