"""Features of the tensors PEFT saves beside the LoRA factors for token rows: trainable tokens."""

from __future__ import annotations

from lora_convert.engines.features.context import MAX_KEYS, Context, examples
from lora_convert.peft.naming import Factor


def f_trainable_tokens(ctx: Context, params: dict):
    """PEFT's trainable-token rows (`trainable_tokens_delta` keys, from `trainable_token_indices`), or None."""
    keys = [k for k, p in ctx.adapter.parsed.items() if p.factor is Factor.TRAINABLE_TOKENS]
    if not keys:
        return None
    return {
        "count": len(keys),
        "modules": ", ".join(sorted({ctx.adapter.parsed[k].module for k in keys})),
        "keys": keys[:MAX_KEYS],
        "examples": examples(keys),
    }
