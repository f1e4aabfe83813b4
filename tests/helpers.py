"""Helpers shared by the tests: the PEFT-written fixtures (tests/fixtures/data) and a writer for small adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def fixture_index() -> dict:
    path = FIXTURES / "INDEX.json"
    return json.loads(path.read_text()) if path.exists() else {"cases": {}}


def fixture_cases() -> list[str]:
    cases = FIXTURES / "cases"
    return sorted(p.name for p in cases.iterdir() if (p / "adapter").is_dir())


def case_dir(name: str) -> Path:
    return FIXTURES / "cases" / name


def case_meta(name: str) -> dict:
    return json.loads((case_dir(name) / "case.json").read_text())


def case_base_dir(name: str) -> Path:
    return FIXTURES / "bases" / case_meta(name)["base"]


# The families that had schemas before issue 14 added fifteen more: the torch path's golden bytes
# (test_torch_free_bytes) and the SGLang simulator (test_engine_layouts) cover these only.
FAMILIES_BEFORE_ISSUE_14 = frozenset(
    {"deepseek_v3", "kimi_k25", "llama", "mixtral", "nemotron_h", "qwen3_5", "qwen3_5_moe", "qwen3_moe", "qwen3_next"}
)


def case_family(case: str) -> str:
    """The schema family a fixture's base binds to."""
    from lora_convert.arch.base_config import config_from_mapping
    from lora_convert.arch.schema import bind

    return bind(config_from_mapping(json.loads((case_base_dir(case) / "config.json").read_text()))).family


def orient_reference(case: str, reference: dict) -> dict:
    """A fixture's reference.safetensors with every 3-D delta as [E, out, in]: PEFT records a parameter's delta in
    the parameter's own layout, which is [E, in, out] where the model's forward contracts the parameter's axis 1
    (case.json `forward_contracts`, observed by make_fixtures.py: gpt-oss, Llama-4), and every embedding's delta as
    [dim, num_embeddings], the LoRA product B @ A (PEFT records it as the Embedding weight, [num_embeddings, dim]:
    peft/tuners/lora/layer.py Embedding.get_delta_weight transposes). numpy arrays or torch tensors."""
    modules = case_meta(case).get("modules", {})
    out = dict(reference)
    for name, info in modules.items():
        key = f"{name}::delta_weight"
        if (info.get("forward_contracts") == 1 or info.get("kind") == "embedding") and key in out:
            d = out[key]
            out[key] = d.swapaxes(-1, -2) if hasattr(d, "swapaxes") else d.transpose(-1, -2)
    return out


# Every output layout of `normalize`, with the file only that layout writes (what the installed-wheel tests check).
OUTPUT_LAYOUTS = [
    ("stacked", "lora_layout.json"),
    ("sglang", "lora_convert_report.json"),
    ("vllm", "lora_convert_report.json"),
    ("peft", "lora_convert_report.json"),
]


def write_adapter(
    folder: Path, tensors: dict, config: dict | None = None, *, filename: str = "adapter_model.safetensors"
) -> Path:
    """Write a small adapter with the safetensors library (for tests that need a hand-made mutation)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / filename))
    return folder


# Not part of a source distribution: local environments, caches and outputs (what the wheel and hook tests leave
# out when they copy the checkout).
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    "build",
    "dist",
    ".pytest_cache",
    ".hypothesis",
    "demo-out",
    "out",
    ".whl",
    ".gl",
)


def engine_rules_fired(adapter: Path, base: Path, engine: str) -> dict[str, str]:
    """{rule id: message} of the engine findings `validate --engine ENGINE` reports (no smoke, no data scan)."""
    from lora_convert.pipeline.commands import validate

    report = validate(str(adapter), base=str(base), engine=engine, smoke=False, data_scan=False)
    prefix = f"engine.{engine.partition('==')[0]}."
    return {f.code.removeprefix(prefix): f.message for f in report.findings if f.code.startswith(prefix)}


def base_with_config(base: Path, folder: Path, change) -> Path:
    """A copy of `base` in `folder` (weights linked, not copied) whose config.json is `change(config)`."""
    folder.mkdir()
    for file in base.iterdir():
        if file.name != "config.json":
            (folder / file.name).symlink_to(file)
    config = json.loads((base / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))
    return folder
