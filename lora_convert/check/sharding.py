"""The `sharding` check (with --tp/--ep): dimensions and head counts that would not divide over the ranks."""

from __future__ import annotations

import contextlib

from lora_convert.check.context import MAX_KEYS, Check, CheckContext, Outcome
from lora_convert.codes import finding
from lora_convert.findings import Finding


def run(ctx: CheckContext) -> Outcome:
    tp, ep = ctx.options.tp, ctx.options.ep
    if not (tp or ep):
        return Outcome(skipped="no --tp/--ep")
    return Outcome(sharding_findings(ctx.adapter, ctx.arch, ctx.text_config, tp or 1, ep or 1))


CHECK = Check("sharding", run)


# How tensor parallelism splits each projection (by leaf name); routed experts use the MoE TP size (tp / ep).
ROW_PARALLEL = {"o_proj", "down_proj", "out_proj", "w2", "wo", "dense", "fc2", "c_proj"}
REPLICATED = {
    "q_a_proj",
    "kv_a_proj_with_mqa",
    "fc1_latent_proj",
    "fc2_latent_proj",
    "gate",
    "wq_b",
    "wk",
    "weights_proj",
    "shared_expert_gate",
    "embed_tokens",
    "embeddings",
    "word_embeddings",
    "lm_head",
    "output",
}
HEAD_BASED = {"q_proj", "k_proj", "v_proj", "qkv_proj", "q_b_proj", "kv_b_proj"}
# (config field, which TP it must divide, the module families whose LoRA makes it matter)
HEAD_FIELDS = (
    (
        "num_attention_heads",
        "tp",
        ("self_attn.", "attn.", "mixer.q_proj", "mixer.k_proj", "mixer.v_proj", "mixer.o_proj"),
    ),
    ("linear_num_value_heads", "tp", ("linear_attn.",)),
    ("linear_num_key_heads", "tp", ("linear_attn.",)),
    ("mamba_num_heads", "tp", ("mixer.in_proj", "mixer.out_proj")),
    ("n_groups", "tp", ("mixer.in_proj",)),
)


def sharding_findings(adapter, arch, text_config: dict, tp: int, ep: int) -> list[Finding]:
    out: list[Finding] = []
    if tp % ep:
        out.append(
            finding(
                "sharding.ep",
                f"--ep {ep} does not divide --tp {tp}; the MoE tensor-parallel size would be {tp}/{ep}.",
                expected=f"a divisor of {tp}",
                actual=ep,
            )
        )
        return out
    moe_tp = tp // ep
    problems: dict[tuple, dict] = {}

    def note(what, dim, value, divisor, key):
        entry = problems.setdefault((what, value, divisor), {"keys": [], "dim": dim})
        if len(entry["keys"]) < MAX_KEYS:
            entry["keys"].append(key)

    expert_counts = set()
    for mod in adapter.modules:
        if mod.in_features is None or mod.out_features is None or mod.is_vision:
            continue
        leaf = mod.leaf
        is_expert = mod.expert is not None or mod.kind == "fused_experts"
        if mod.kind == "fused_experts" and mod.experts:
            expert_counts.add(mod.experts)
        size = moe_tp if is_expert else tp
        if size == 1 or leaf in REPLICATED or (leaf in HEAD_BASED and not is_expert) or "indexer." in mod.local_name:
            continue
        name = mod.local_name or mod.module
        row = leaf in ROW_PARALLEL
        out_features = mod.out_features
        if mod.kind == "fused_experts" and leaf in ("gate_up_proj",):
            out_features //= 2  # sharded per half: gate rows and up rows
        dim = mod.in_features if row else out_features
        if dim % size:
            note(name, "input" if row else "output", dim, size, mod.keys[0] if mod.keys else mod.module)
    if arch is not None and ep > 1:
        with contextlib.suppress(Exception):
            expert_counts.add(int(arch.expert_count()))
    per_expert = {m.expert for m in adapter.modules if m.expert is not None}
    if per_expert and not expert_counts:
        expert_counts.add(max(per_expert) + 1)
    for count in expert_counts:
        if ep > 1 and count % ep:
            out.append(
                finding(
                    "sharding.ep",
                    f"{count} routed experts do not divide evenly over --ep {ep}.",
                    expected=f"a multiple of {ep}",
                    actual=count,
                )
            )
    locals_ = [m.local_name for m in adapter.modules]
    for field_name, _which, families in HEAD_FIELDS:
        value = text_config.get(field_name)
        if not isinstance(value, int) or value <= 0 or tp == 1:
            continue
        if not any(name.startswith(families) for name in locals_):
            continue
        if value % tp:
            out.append(
                finding(
                    "sharding.tp",
                    f"{field_name}={value} is not divisible by --tp {tp}; the adapted modules "
                    "cannot be split across ranks.",
                    keys=[field_name],
                    expected=f"a multiple of {tp}",
                    actual=value,
                )
            )
    kv = text_config.get("num_key_value_heads")
    if (
        isinstance(kv, int)
        and kv > 0
        and tp > 1
        and any(m.leaf in ("k_proj", "v_proj", "qkv_proj") for m in adapter.modules)
        and kv % tp
        and tp % kv
    ):
        out.append(
            finding(
                "sharding.tp",
                f"num_key_value_heads={kv} neither divides nor is divisible by --tp {tp}; "
                "KV heads can be neither split nor replicated evenly.",
                keys=["num_key_value_heads"],
                expected=f"a multiple or divisor of {tp}",
                actual=kv,
            )
        )
    for (what, value, divisor), entry in sorted(problems.items(), key=lambda kv_: str(kv_[0])):
        out.append(
            finding(
                "sharding.tp",
                f"{what}: its {entry['dim']} dimension {value} is not divisible by the tensor-parallel size {divisor}.",
                keys=entry["keys"],
                expected=f"a multiple of {divisor}",
                actual=value,
            )
        )
    return out
