"""The `keys` check: tensor names (from reading the adapter), the PEFT prefix, and, where the schema check cannot
run, vision modules and layers past the end (lora_convert/check/shape_check.py reports those itself when it runs)."""

from __future__ import annotations

from lora_convert.check.context import MAX_KEYS, Check, CheckContext, Outcome, adapter_findings
from lora_convert.codes import finding
from lora_convert.findings import Finding
from lora_convert.text import spans


def run(ctx: CheckContext) -> Outcome:
    found = adapter_findings(ctx, "keys") + key_findings(ctx.adapter)
    if not ctx.stacked and ctx.arch is None:
        found += fallback_layer_findings(ctx.adapter, ctx.text_config)
    return Outcome(found)


CHECK = Check("keys", run)


def key_findings(adapter) -> list[Finding]:
    out: list[Finding] = []
    if not adapter.index.tensors:
        out.append(
            finding(
                "keys.empty",
                f"{', '.join(p.name for p in adapter.files)} holds no tensors.",
                expected="lora_A/lora_B tensors",
                actual=0,
                fix="Save the adapter again.",
            )
        )
        return out
    no_prefix = [k for k, p in adapter.parsed.items() if not p.has_peft_prefix and p.factor.value != "unknown"]
    if no_prefix:
        out.append(
            finding(
                "keys.no-peft-prefix",
                f"{len(no_prefix)} key(s) lack PEFT's `base_model.model.` prefix (e.g. {no_prefix[0]}); PEFT cannot load "
                "them as an adapter and engines that strip the prefix see different module paths.",
                keys=no_prefix[:MAX_KEYS],
                expected="base_model.model.<module>...",
                actual=no_prefix[0],
            )
        )
    return out


def fallback_layer_findings(adapter, text_config: dict) -> list[Finding]:
    """Vision modules and layers past the end, for when the schema check cannot run."""
    out: list[Finding] = []
    vision = [m for m in adapter.modules if m.is_vision]
    if vision:
        out.append(
            finding(
                "modules.vision",
                f"{len(vision)} LoRA module(s) sit in a vision tower or multimodal projector (e.g. {vision[0].module}); "
                "text-only serving drops them and SGLang may file `...layers.N` ones under text layer N.",
                keys=[k for m in vision[:MAX_KEYS] for k in m.keys][:MAX_KEYS],
                fix="lora-convert normalize ADAPTER -o OUT --drop-unsupported (text-only serving), or --layout peft "
                "to keep them",
            )
        )
    n_layers = text_config.get("num_hidden_layers")
    if isinstance(n_layers, int):
        past = [m for m in adapter.modules if m.layer is not None and m.layer >= n_layers]
        if past:
            layers = sorted({m.layer for m in past})
            out.append(
                finding(
                    "layers.past-end",
                    f"{len(past)} module(s) are on layer(s) {spans(layers)} but the base has "
                    f"num_hidden_layers={n_layers} (layers 0..{n_layers - 1}); MTP/NextN layers are not served with "
                    "LoRA, and SGLang fails to load the adapter.",
                    keys=[k for m in past[:MAX_KEYS] for k in m.keys][:MAX_KEYS],
                    expected=f"< {n_layers}",
                    actual=layers,
                    fix="lora-convert normalize ADAPTER -o OUT --drop-unsupported",
                )
            )
    return out
