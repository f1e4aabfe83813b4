"""The `pairs` check: A without B, B without A, and ranks of A vs B vs `r`/`rank_pattern`.

Those are found while the adapter is read (lora_convert/peft/adapter.py builds the modules from the pairs);
this check reports them."""

from __future__ import annotations

from lora_convert.check.context import Check, CheckContext, Outcome, adapter_findings


def run(ctx: CheckContext) -> Outcome:
    return Outcome(adapter_findings(ctx, "pairs"))


CHECK = Check("pairs", run)
