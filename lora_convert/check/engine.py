"""The `engine` check (with --engine): what that serving engine would do with each feature of the adapter
(rules in lora_convert/engines/<engine>.json, evaluated by lora_convert/engines/profiles.py)."""

from __future__ import annotations

from lora_convert.check.context import Check, CheckContext, Outcome
from lora_convert.engines.profiles import evaluate_engine


def run(ctx: CheckContext) -> Outcome:
    engine = ctx.options.engine
    if engine == "none":
        return Outcome(skipped="--engine none")
    if not ctx.adapter.config.is_valid:
        # The rules reason about ranks and scalings; on placeholder values they would invent findings.
        return Outcome(skipped="adapter_config.json is invalid")
    return Outcome(evaluate_engine(engine, ctx.adapter, ctx.arch, ctx.text_config, scan=ctx.scan))


CHECK = Check("engine", run)
