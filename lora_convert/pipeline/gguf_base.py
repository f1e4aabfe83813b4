"""Reads a GGUF LoRA adapter (a .gguf file, or a folder holding one) against its --base: what of the base the GGUF
reader (lora_convert/peft/gguf_source.py) needs, from the base config, its architecture schema and the llama.cpp
facts the GGUF writer uses (lora_convert/convert/gguf_architectures.json)."""

from __future__ import annotations

from pathlib import Path

from lora_convert.errors import UnsupportedAdapterError, UsageError
from lora_convert.io.source import AdapterSource
from lora_convert.peft.adapter import Adapter
from lora_convert.peft.gguf_source import GgufBase, gguf_adapter_file, load_gguf_adapter


def read_gguf_adapter(
    spec, source: AdapterSource, base: str | None, *, cache_dir=None, token: str | None = None
) -> Adapter | None:
    """The GGUF adapter `spec` (or the folder `source`) names, read against `base`; None when it names none."""
    typed = Path(str(spec)).expanduser() if not isinstance(spec, AdapterSource) else None
    path = gguf_adapter_file(typed) if typed is not None and typed.is_file() else gguf_adapter_file(source.path)
    if path is None:
        return None
    if not base:
        raise UsageError(
            f"{path} is a GGUF LoRA adapter, and GGUF names llama.cpp's tensors, not the base model's modules.",
            hint="Pass --base with the base model's Hugging Face config (a folder or config.json, a Hub id, or a "
            "preset): its names are read back through it.",
        )
    return load_gguf_adapter(source, path, gguf_base(base, cache_dir=cache_dir, token=token))


def gguf_base(spec: str, *, cache_dir=None, token: str | None = None) -> GgufBase:
    """What the GGUF reader needs of the base `spec`: its llama.cpp architecture, config, the head counts of the
    rows llama.cpp's converter reorders, and where its architecture schema places a module path."""
    # imported here: prepare() asks read_gguf_adapter of every adapter, and only a GGUF one needs the base's schema
    from lora_convert.arch.base_config import resolve_base
    from lora_convert.arch.schema import bind
    from lora_convert.convert.gguf_layout import gguf_model_types, not_proven_reason

    arch = bind(resolve_base(spec, cache_dir=cache_dir, token=token))
    config = dict(arch.config)
    model_type = config.get("model_type")
    target = gguf_model_types().get(model_type) if isinstance(model_type, str) else None
    if target is None:
        why = not_proven_reason(model_type)
        raise UnsupportedAdapterError(
            f"Reading a GGUF adapter: lora-convert has not proven llama.cpp's names for the base's model_type "
            f"{model_type!r}" + (f": {why}." if why else f" (proven: {', '.join(sorted(gguf_model_types()))})."),
            hint="Convert the PEFT adapter itself, or pass the --base the GGUF adapter was made for.",
        )
    heads = {}
    for kind, fields in target.row_permutations.items():
        count = next((config[f] for f in fields if isinstance(config.get(f), int)), None)
        if count is not None:
            heads[kind] = count

    def place(path: str):
        match = arch.resolve_path(path)
        if match is None:
            return None
        return (match.group.path, match.slice_indices, match.expert), match.expected_out, match.expected_in

    # B rows the writer multiplied by the converter's folded constants (row_scales): not undone here, so refused
    scaled = "lora-convert does not read back B rows llama.cpp's converter scales by config constants (row_scales)"
    refused = {**{kind: scaled for kind in target.row_scales}, **target.refused_tensors}
    return GgufBase(target.architecture, config, heads, place, refused)
