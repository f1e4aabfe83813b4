"""Reading a GGUF LoRA file (llama.cpp's adapter.gguf) as the Adapter a PEFT folder gives, against a --base config:
PEFT's module paths, factors, rank and scaling.

llama.cpp's adapter file (vendor/llama.cpp/src/llama-adapter.cpp:205-221, :274-297, :364-371 of llama-cpp-python
0.3.36) is `general.type` "adapter", `adapter.type` "lora", one `adapter.lora.alpha`, and `<base tensor>.lora_a`
(ne [in, r], i.e. PEFT's A [r, in]) / `.lora_b` (ne [r, out], PEFT's B [out, r]) pairs; a module's scale is
alpha / r with r = lora_b's ne[0], or 1 where alpha is 0 or absent (llama-adapter.h, get_scale). Routed experts are
stacked pairs `ffn_*_exps`: lora_a [E, r, in], lora_b [E, out, r], each expert a contiguous block of the file.

The names go back through gguf-py's own TensorNameMap for the base's llama.cpp architecture: of the transformers
paths it lists for a GGUF name, the one the base's architecture schema places (`GgufBase.place`, given by the
pipeline, which knows the schema); where the writer reorders a weight's output rows (Llama's q/k RoPE permutation),
B's rows are put back as the base has them when each tensor is read. Headers only until then, one tensor at a time.
Refused, named (UnsupportedAdapterError): a file that is not a LoRA adapter, activated LoRA, quantized factors,
embedding LoRA, and any tensor no base module answers to exactly. An adapter written for another base (architecture,
metadata sizes, blocks past the base's last layer) is the `gguf.base-mismatch` finding.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_convert.codes import finding
from lora_convert.errors import AdapterFormatError, UnsupportedAdapterError
from lora_convert.findings import Finding
from lora_convert.io.gguf_file import import_gguf, read_gguf_header
from lora_convert.io.source import AdapterSource
from lora_convert.io.tensor_files import TensorIndex, TensorInfo, read_tensor_data
from lora_convert.peft.adapter import Adapter, _check_inside, cyclic_gc_paused, group_modules
from lora_convert.peft.config import parse_config
from lora_convert.peft.naming import parse_keys

if TYPE_CHECKING:
    import numpy as np

FILE_FORMAT = "gguf"
PEFT_PREFIX = "base_model.model."
_SIDES = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}
_KNOWN_KEYS = ("general.", "adapter.type", "adapter.lora.alpha")
_BLOCK = re.compile(r"^blk\.(\d+)\.")
# metadata sizes an adapter may carry (`<arch>.<key>`) and the base config fields they must equal
_SIZE_KEYS = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size"}
_REFUSE_HINT = "Convert the PEFT adapter itself (lora-convert reads PEFT, mlx-lm and exactly mappable GGUF adapters)."


@dataclass(frozen=True)
class GgufBase:
    """What the pipeline knows of the --base for reading a GGUF adapter."""

    architecture: str  # llama.cpp's general.architecture for the base (convert/gguf_architectures.json)
    config: dict[str, Any]  # the base's (text) config
    heads: dict[str, int]  # GGUF tensor kind (`attn_q`) -> head count of the row reordering the writer applies
    # a transformers module path -> (the base weight it is, its out_features, in_features), or None
    place: Callable[[str], tuple[Hashable, int, int] | None]
    # GGUF tensor kind -> why llama.cpp never applies a LoRA pair on it (the writer's `refused_tensors`)
    refused: dict[str, str] = field(default_factory=dict)


def gguf_adapter_file(path: Path) -> Path | None:
    """The GGUF adapter `path` names: a .gguf file, or a folder whose only `general.type` adapter .gguf it is (a
    folder with a PEFT or mlx-lm adapter_config.json is not decided here). None otherwise."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "adapter_config.json").exists():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) == 1:
        return files[0]
    adapters = [f for f in files if _general_type(f) == "adapter"]
    return adapters[0] if len(adapters) == 1 else None


def _general_type(path: Path) -> str | None:
    try:
        return read_gguf_header(path)[0].get("general.type")
    except AdapterFormatError:
        return None


class GgufTensorIndex(TensorIndex):
    """A TensorIndex under PEFT's keys over a GGUF file: the lora_b keys whose rows the writer reordered sit in
    `_eager` (so every reader goes through `read`) with the head count that undoes it."""

    def read(self, key: str) -> np.ndarray:
        heads = self._eager.get(key)
        if heads is None:
            return super().read(key)
        return unpermute_rows(read_tensor_data(self.tensors[key]), heads)


def unpermute_rows(b: np.ndarray, heads: int) -> np.ndarray:
    """B's rows back in the base's order: the inverse of llama.cpp's RoPE reordering (each head's (2, head_dim/2)
    rows written as (head_dim/2, 2); vendor/llama.cpp conversion/llama.py:176-181)."""
    import numpy as np  # as tensor_files does: listing headers never imports numpy

    out, rank = b.shape
    return np.ascontiguousarray(b.reshape(heads, out // heads // 2, 2, rank).swapaxes(1, 2).reshape(out, rank))


def load_gguf_adapter(source: AdapterSource, path: Path, base: GgufBase) -> Adapter:
    """Open the GGUF LoRA file at `path` header-first as an Adapter in PEFT's terms, read against `base`. Raises
    AdapterFormatError for a file that is not a readable GGUF LoRA and UnsupportedAdapterError for what cannot be
    mapped exactly."""
    _check_inside(path, source.allowed_roots)
    fields, infos = read_gguf_header(path)
    _require_lora(path, fields, infos)
    mismatch = _base_mismatch(fields, infos, base)
    names = _reverse_names(base)
    with cyclic_gc_paused():
        index, ranks, unmapped = _peft_index(infos, names, base)
        if unmapped and not mismatch:
            listing = "; ".join(unmapped[:6]) + (f" and {len(unmapped) - 6} more" if len(unmapped) > 6 else "")
            raise UnsupportedAdapterError(
                f"{path}: {len(unmapped)} tensor(s) of this GGUF adapter cannot be mapped exactly to a module of the "
                f"base ({base.architecture}): {listing}.",
                hint=_REFUSE_HINT,
            )
        parsed = parse_keys(index.tensors)
        alpha = fields.get("adapter.lora.alpha") or 0.0
        config = parse_config(_peft_raw(ranks, alpha, fields), source=path.name)
        modules, findings = group_modules(parsed, index, config)
    for m in modules:  # llama.cpp's scale exactly: alpha / r of each module, 1 without alpha
        rank = m.rank or 0
        m.scaling = alpha / rank if alpha and rank else 1.0
        m.alpha = m.scaling * rank
    return Adapter(
        source=source,
        config=config,
        file_format=FILE_FORMAT,
        files=[path],
        index=index,
        parsed=parsed,
        modules=modules,
        findings=mismatch + list(config.findings) + findings,
    )


def _require_lora(path: Path, fields: dict[str, Any], infos: dict[str, TensorInfo]) -> None:
    kinds = (fields.get("general.type"), fields.get("adapter.type"))
    if kinds != ("adapter", "lora"):
        raise AdapterFormatError(
            f"{path} is not a GGUF LoRA adapter: general.type is {kinds[0]!r} and adapter.type {kinds[1]!r} "
            "(expected 'adapter' and 'lora').",
            hint="Point at the LoRA file (llama.cpp's convert_lora_to_gguf.py output), not a model or control vector.",
        )
    other = sorted(k for k in fields if k.startswith("adapter.") and not k.startswith(_KNOWN_KEYS))
    if other:
        raise UnsupportedAdapterError(
            f"{path} carries adapter metadata lora-convert cannot express in PEFT's terms: {', '.join(other)} "
            "(activated LoRA applies only after its invocation tokens).",
            hint=_REFUSE_HINT,
        )
    quantized = [k for k, info in infos.items() if not info.dtype]
    if quantized:
        raise UnsupportedAdapterError(
            f"{path} holds quantized LoRA factors ({', '.join(quantized[:4])}): lora-convert reads F32, F16 and "
            "BF16 factors only.",
            hint="Convert the adapter to GGUF again with --outtype f32, f16 or bf16.",
        )


def _base_mismatch(fields: dict[str, Any], infos: dict[str, TensorInfo], base: GgufBase) -> list[Finding]:
    """`gguf.base-mismatch`: the file's architecture, metadata sizes and blocks against the base's."""
    arch = fields.get("general.architecture")
    problems = []
    if arch != base.architecture:
        problems.append(("general.architecture", base.architecture, arch))
    for key, field_name in _SIZE_KEYS.items():
        have, want = fields.get(f"{arch}.{key}"), base.config.get(field_name)
        if have is not None and isinstance(want, int) and have != want:
            problems.append((f"{arch}.{key}", want, have))
    layers = base.config.get("num_hidden_layers")
    blocks = sorted({int(m.group(1)) for k in infos if (m := _BLOCK.match(k))})
    if isinstance(layers, int) and blocks and blocks[-1] >= layers:
        problems.append(("blocks", f"blk.0-{layers - 1}", f"blk.{blocks[0]}-{blocks[-1]}"))
    return [
        finding(
            "gguf.base-mismatch",
            f"{key} is {have!r}, but the --base config makes llama.cpp expect {want!r}.",
            keys=[key],
            expected=want,
            actual=have,
        )
        for key, want, have in problems
    ]


def _reverse_names(base: GgufBase) -> dict[str, list[str]]:
    """GGUF base tensor name (`blk.0.attn_q`) -> every transformers path gguf-py's TensorNameMap gives it."""
    gguf = import_gguf()
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == base.architecture), None)
    if arch is None:
        raise UnsupportedAdapterError(
            f"gguf-py knows no llama.cpp architecture {base.architecture!r}.", hint="Upgrade the `gguf` package."
        )
    layers = base.config.get("num_hidden_layers")
    names: dict[str, list[str]] = {}
    for hf, (_, name) in gguf.TensorNameMap(arch, layers if isinstance(layers, int) else 1).mapping.items():
        names.setdefault(name, []).append(hf)
    return names


def _peft_index(
    infos: dict[str, TensorInfo], names: dict[str, list[str]], base: GgufBase
) -> tuple[GgufTensorIndex, dict[str, int], list[str]]:
    """PEFT's keys over the file's tensors (headers only), each module's rank (lora_b's ne[0]), the tensors no base
    module answers to (kept under their own names: keys.unparseable)."""
    index, ranks, unmapped = GgufTensorIndex(), {}, []
    paths: dict[str, str | None] = {}
    for key, info in infos.items():
        stem, _, side = key.rpartition(".")
        weight = stem.removesuffix(".weight")
        experts = info.shape[0] if len(info.shape) == 3 else None
        if side in _SIDES and stem not in paths:
            a, b = infos.get(f"{stem}.lora_a"), infos.get(f"{stem}.lora_b")
            size = (b.shape[-2], a.shape[-1]) if a is not None and b is not None else None
            paths[stem] = _module_path(names.get(weight, []), base, experts, size)
        path = paths.get(stem) if side in _SIDES else None
        kind = weight.rsplit(".", 1)[-1]
        if path is None or weight == "token_embd" or kind in base.refused:
            why = "embedding LoRA (not proven)" if weight == "token_embd" else "no single base module"
            why = base.refused.get(kind, why)
            unmapped.append(f"{key} ({why})")
            index.add(TensorInfo(key, info.dtype, info.shape, info.path, info.start, info.nbytes))
            continue
        if experts is None:
            peft_key = f"{PEFT_PREFIX}{path}.{_SIDES[side]}"
            index.add(TensorInfo(peft_key, info.dtype, info.shape, info.path, info.start, info.nbytes))
            heads = base.heads.get(kind) if side == "lora_b" else None
            if heads is not None:
                index._eager[peft_key] = heads
            ranks[path] = info.shape[1] if side == "lora_b" else ranks.get(path, info.shape[0])
            continue
        for e, part in enumerate(_expert_blocks(info, path, _SIDES[side])):
            index.add(part)
            module = path.replace(".experts.", f".experts.{e}.", 1)
            ranks[module] = info.shape[2] if side == "lora_b" else ranks.get(module, info.shape[1])
    return index, ranks, unmapped


def _module_path(
    candidates: list[str], base: GgufBase, experts: int | None, size: tuple[int, int] | None
) -> str | None:
    """The one transformers path of `candidates` the base has with this (out, in) `size` (for stacked experts: with
    `.experts.` left for the expert index; a factor without its pair has none). Aliases of one base weight
    (transformers 4 and 5 expert names) are resolved to the path that shares most with the base's own; two different
    base weights are no exact mapping (None)."""
    placed: dict[Hashable, list[str]] = {}
    for path in candidates:
        if experts is not None and ".experts." not in path:
            continue
        probe = path.replace(".experts.", ".experts.0.", 1) if experts is not None else path
        found = base.place(probe)
        if found is not None and size is not None and tuple(found[1:]) == size:
            placed.setdefault(found[0], []).append(path)
    if len(placed) != 1:
        return None
    ((where, paths),) = placed.items()
    own = str(where[0]) if isinstance(where, tuple) and where else ""
    return max(sorted(paths), key=lambda p: _common_prefix(p, own))


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _expert_blocks(info: TensorInfo, path: str, peft_side: str) -> Iterator[TensorInfo]:
    """One TensorInfo per expert of a stacked [E, ...] factor: expert e's block is contiguous in the file."""
    experts = info.shape[0]
    step = info.nbytes // experts
    for e in range(experts):
        module = path.replace(".experts.", f".experts.{e}.", 1)
        key = f"{PEFT_PREFIX}{module}.{peft_side}"
        yield TensorInfo(key, info.dtype, info.shape[1:], info.path, info.start + e * step, step)


def _peft_raw(ranks: dict[str, int], alpha: float, fields: dict[str, Any]) -> dict[str, Any]:
    """The PEFT adapter_config.json of the file: r the most common rank, the others in rank_pattern (each module's
    scaling is set from llama.cpp's alpha / r afterwards)."""
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    return {
        "peft_type": "LORA",
        "r": common,
        "lora_alpha": float(alpha) if alpha else float(common),
        "rank_pattern": {path: r for path, r in ranks.items() if r != common},
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in ranks}),
        "base_model_name_or_path": None,
        "gguf": {k: v for k, v in fields.items() if k.startswith(("general.", "adapter."))},
    }
