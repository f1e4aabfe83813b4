"""The feature detectors engine rules fire on, by name. Each takes the Context and the rule's `params` and
returns None (absent) or a dict: placeholders for the rule's message, plus "keys" for the finding.

Detectors are generic and parameterised: which module names, slices or families they look at comes from the rule
(engines/*.json) and from the architecture schema (schemas/*.json), never from this package.
"""

from __future__ import annotations

from collections.abc import Callable

from lora_convert.engines.features import (
    config_features,
    expert_features,
    module_features,
    quantization_features,
    row_split,
    token_features,
)
from lora_convert.engines.features.context import Context

Detector = Callable[[Context, dict], "dict | None"]

FEATURES: dict[str, Detector] = {
    # adapter_config.json and the adapter as a whole
    "config_flag": config_features.f_config_flag,
    "rslora": config_features.f_rslora,
    "rank_mismatch": config_features.f_rank_mismatch,
    "pattern_scale": config_features.f_pattern_scale,
    "dora": config_features.f_dora,
    "added_tokens": config_features.f_added_tokens,
    "full_weights": config_features.f_full_weights,
    "bias": config_features.f_bias,
    "target_names": config_features.f_target_names,
    "regex_targets": config_features.f_regex_targets,
    "adapter_name_segment": config_features.f_adapter_name,
    "max_rank": config_features.f_max_rank,
    "trainable_tokens": token_features.f_trainable_tokens,
    # which modules are adapted
    "leaf_present": module_features.f_leaf_present,
    "companion_missing": module_features.f_companion_missing,
    "layers_past_end": module_features.f_layers_past_end,
    "router_lora": module_features.f_router,
    "prefix_mismatch": module_features.f_prefix_mismatch,
    "fused_experts": module_features.f_fused_experts,
    "vision_modules": module_features.f_vision,
    # experts
    "partial_expert_projections": expert_features.f_partial_expert_projections,
    "shared_experts_fusion": expert_features.f_shared_experts_fusion,
    "expert_rank_mismatch": expert_features.f_expert_rank_mismatch,
    # row splits of one module
    "partial_row_split": row_split.f_partial_row_split,
    # the base's quantization (quantization_config through lora_convert/arch/quantization.json)
    "quantized_base": quantization_features.f_quantized_base,
    "unknown_quantization": quantization_features.f_unknown_quantization,
    "quantization_method": quantization_features.f_quantization_method,
}

__all__ = ["Context", "Detector", "FEATURES"]
