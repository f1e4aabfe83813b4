"""The feature detectors engine rules fire on, by name. Each takes the Context and the rule's `params` and
returns None (absent) or a dict: placeholders for the rule's message, plus "keys" for the finding.

Detectors are generic and parameterised: which module names, slices or families they look at comes from the rule
(engines/*.json) and from the architecture schema (schemas/*.json), never from this package.
"""

from __future__ import annotations

from collections.abc import Callable

from lora_convert.engines.features import config_features as cf
from lora_convert.engines.features import expert_features as ef
from lora_convert.engines.features import module_features as mf
from lora_convert.engines.features import quantization_features as qf
from lora_convert.engines.features import row_split as rs
from lora_convert.engines.features.context import Context

Detector = Callable[[Context, dict], "dict | None"]

FEATURES: dict[str, Detector] = {
    # adapter_config.json and the adapter as a whole
    "config_flag": cf.f_config_flag,
    "rslora": cf.f_rslora,
    "rank_mismatch": cf.f_rank_mismatch,
    "pattern_scale": cf.f_pattern_scale,
    "dora": cf.f_dora,
    "added_tokens": cf.f_added_tokens,
    "full_weights": cf.f_full_weights,
    "bias": cf.f_bias,
    "target_names": cf.f_target_names,
    "regex_targets": cf.f_regex_targets,
    "adapter_name_segment": cf.f_adapter_name,
    "max_rank": cf.f_max_rank,
    # which modules are adapted
    "leaf_present": mf.f_leaf_present,
    "companion_missing": mf.f_companion_missing,
    "layers_past_end": mf.f_layers_past_end,
    "router_lora": mf.f_router,
    "prefix_mismatch": mf.f_prefix_mismatch,
    "fused_experts": mf.f_fused_experts,
    "vision_modules": mf.f_vision,
    # experts
    "partial_expert_projections": ef.f_partial_expert_projections,
    "shared_experts_fusion": ef.f_shared_experts_fusion,
    "expert_rank_mismatch": ef.f_expert_rank_mismatch,
    # row splits of one module
    "partial_row_split": rs.f_partial_row_split,
    # the base's quantization (quantization_config through lora_convert/arch/quantization.json)
    "quantized_base": qf.f_quantized_base,
    "unknown_quantization": qf.f_unknown_quantization,
}

__all__ = ["Context", "Detector", "FEATURES"]
