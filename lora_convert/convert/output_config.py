"""The files every output layout writes beside its tensors: adapter_config.json (one rank, every scale folded into B,
nothing but LoRA factors) and the file that lists what the output left out."""

from __future__ import annotations

from typing import Any

from lora_convert.convert.plan import Plan

STACKED_LAYOUT_FILE = "lora_layout.json"  # the stacked layout's groups, slices and drops (docs/stacked-layout.md)
ENGINE_REPORT_FILE = "lora_convert_report.json"  # an engine layout's groups, modules and drops (docs/engine-layouts.md)


def listing_file(layout: str) -> str:
    """The file of a `layout` output (`stacked`, or an engine layout: `peft`, `sglang`, `vllm==0.33.0`, ...) that lists
    every module left out and why; refusal hints name it. Engine layouts are plain PEFT folders: no lora_layout.json."""
    return STACKED_LAYOUT_FILE if layout == "stacked" else ENGINE_REPORT_FILE


def output_config(plan: Plan, target_modules: list[str] | str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """r = lora_alpha = R (scale 1, since each module's PEFT scale is folded into its B), no patterns, no rsLoRA."""
    src = plan.adapter.config.raw
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": src.get("base_model_name_or_path"),
        "task_type": src.get("task_type"),
        "r": plan.rank,
        "lora_alpha": plan.rank,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "target_parameters": None,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    config.update(extra or {})
    return config
