"""The `sharding` check takes each module's tensor-parallel split and the head counts from the schemas.

The families here have heads of several kinds (attention and KV heads beside linear-attention key/value heads,
Mamba heads and groups, or MLA heads beside replicated down-projections); each count must be reported exactly
when the adapter has LoRA on a module it splits, and only then. The fixture adapters and their tiny bases are
PEFT's own (tests/fixtures/README.md).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_convert.arch.base_config import resolve_base
from lora_convert.arch.schema import bind, list_schemas, load_schema
from lora_convert.arch.tensor_parallel import Split, module_split
from lora_convert.check.sharding import sharding_findings
from lora_convert.peft.adapter import load_adapter

DATA = Path(__file__).parent / "fixtures" / "data"


def fixture(case: str):
    """(adapter, arch, text_config) of a fixture case and its base."""
    base = json.loads((DATA / "cases" / case / "case.json").read_text())["base"]
    config = resolve_base(str(DATA / "bases" / base))
    return load_adapter(str(DATA / "cases" / case / "adapter")), bind(config), config.text_config


def only(adapter, *prefixes: str):
    """The adapter with LoRA on the modules whose local name starts with one of `prefixes` only."""
    return SimpleNamespace(modules=[m for m in adapter.modules if m.local_name.startswith(prefixes)])


def head_labels(findings) -> list[str]:
    """The head counts named by sharding.tp findings (dimension findings name no config field)."""
    return [f.keys[0] for f in findings if f.code == "sharding.tp" and "dimension" not in f.message]


def dimension_messages(findings) -> list[str]:
    return [f.message for f in findings if f.code == "sharding.tp" and "dimension" in f.message]


# ------------------------------------------------------------------------------------- heads of several kinds
# The tiny bases: nemotron_h 4 attention heads / 2 KV heads / 4 Mamba heads / n_groups 2; qwen3_5 and qwen3_next
# 4 attention heads / 2 KV heads / 4 linear value heads / 2 linear key heads; deepseek_v3 4 MLA heads.
@pytest.mark.parametrize(
    "case, prefixes, tp, expected",
    [
        ("v5_nemotron_h", (), 2, []),
        ("v5_nemotron_h", (), 4, ["n_groups"]),  # KV heads 2 divide tp 4: each rank holds a replica
        ("v5_nemotron_h", (), 8, ["num_attention_heads", "mamba_num_heads", "n_groups"]),
        ("v5_nemotron_h", (), 3, ["num_attention_heads", "mamba_num_heads", "n_groups", "num_key_value_heads"]),
        ("v5_nemotron_h", ("mixer.in_proj",), 8, ["mamba_num_heads", "n_groups"]),
        ("v5_nemotron_h", ("mixer.q_proj", "mixer.o_proj"), 8, ["num_attention_heads"]),
        ("v5_nemotron_h", ("mixer.q_proj",), 3, ["num_attention_heads"]),  # KV heads matter for k/v only
        ("v5_nemotron_h", ("mixer.v_proj",), 3, ["num_attention_heads", "num_key_value_heads"]),
        ("v5_nemotron_h", ("mixer.up_proj", "mixer.experts."), 8, []),
        ("v5_qwen3_5", (), 4, ["linear_num_key_heads"]),
        ("v5_qwen3_5", (), 8, ["num_attention_heads", "linear_num_value_heads", "linear_num_key_heads"]),
        ("v5_qwen3_5", ("self_attn.",), 4, []),
        ("v5_qwen3_5", ("linear_attn.in_proj_a",), 8, ["linear_num_value_heads", "linear_num_key_heads"]),
        ("v5_qwen3_5", ("mlp.",), 8, []),
        ("v5_qwen3_next", (), 4, ["linear_num_key_heads"]),
        ("v5_qwen3_next", ("linear_attn.out_proj",), 8, ["linear_num_value_heads", "linear_num_key_heads"]),
        ("v5_qwen3_next", ("self_attn.k_proj",), 3, ["num_attention_heads", "num_key_value_heads"]),
        ("v5_deepseek_v3", (), 8, ["num_attention_heads"]),
        ("v5_deepseek_v3", ("self_attn.kv_b_proj",), 8, ["num_attention_heads"]),
        # q_a_proj and kv_a_proj_with_mqa are replicated on every rank: the head count does not split them.
        ("v5_deepseek_v3", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), 8, []),
    ],
)
def test_head_counts_follow_the_adapted_modules(case, prefixes, tp, expected):
    adapter, arch, text_config = fixture(case)
    if prefixes:
        adapter = only(adapter, *prefixes)
        assert adapter.modules, f"{case} has no module under {prefixes}"
    assert head_labels(sharding_findings(adapter, arch, text_config, tp, 1)) == expected


def test_a_head_count_finding_names_the_field_and_the_numbers():
    adapter, arch, text_config = fixture("v5_nemotron_h")
    findings = sharding_findings(adapter, arch, text_config, 3, 1)
    by_label = {f.keys[0]: f for f in findings if "dimension" not in f.message}
    groups = by_label["n_groups"]
    assert groups.message.startswith("n_groups=2 is not divisible by --tp 3")
    assert (groups.expected, groups.actual) == ("a multiple of 3", 2)
    kv = by_label["num_key_value_heads"]
    assert kv.message.startswith("num_key_value_heads=2 neither divides nor is divisible by --tp 3")
    assert (kv.expected, kv.actual) == ("a multiple or divisor of 3", 2)


# ------------------------------------------------------------------------------------------ module splits
def test_heads_split_and_replicated_modules_have_no_dimension_findings():
    """tp 7 divides no width of the tiny bases: only modules split by columns or rows are reported."""
    adapter, arch, text_config = fixture("v5_deepseek_v3")
    named = {m.split(":")[0] for m in dimension_messages(sharding_findings(adapter, arch, text_config, 7, 1))}
    # q_b_proj / kv_b_proj split by heads, q_a_proj / kv_a_proj_with_mqa replicated
    assert named == {"self_attn.o_proj", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"}


def test_column_rows_row_columns_and_gated_halves():
    adapter, arch, text_config = fixture("v5_qwen3_next")
    messages = dimension_messages(sharding_findings(adapter, arch, text_config, 8, 1))
    # in_proj_ba: 8 output rows divide; out_proj: input 64 divides; the 3-D experts' gate|up rows (2 x 20) are
    # split per half, so 20 is what must divide; down_proj is split by its input (20); the shared-expert gate is
    # replicated (1 output row would divide nothing).
    assert messages == [
        "mlp.experts.down_proj: its input dimension 20 is not divisible by the tensor-parallel size 8.",
        "mlp.experts.gate_up_proj: its output dimension 20 is not divisible by the tensor-parallel size 8.",
    ]
    # with --ep 2 the experts use the MoE tensor-parallel size 8 / 2 = 4, which divides 20
    assert dimension_messages(sharding_findings(adapter, arch, text_config, 8, 2)) == []


@pytest.mark.parametrize(
    "case, local_name, split",
    [
        ("v5_nemotron_h", "mixer.in_proj", Split("column")),
        ("v5_nemotron_h", "mixer.experts.down_proj", Split("row")),
        ("v5_nemotron_h", "mixer.q_proj", Split("heads")),
        ("v5_deepseek_v3", "self_attn.q_a_proj", Split("replicated")),
        ("v5_deepseek_v3", "mlp.experts.gate_up_proj", Split("column", parts=2)),
        ("v5_qwen3_next", "mlp.shared_expert_gate", Split("replicated")),
        ("v5_qwen3_5", "linear_attn.in_proj_qkv", Split("column")),  # q|k|v of a group that is not gated
    ],
)
def test_module_split_comes_from_the_modules_group(case, local_name, split):
    adapter, arch, _ = fixture(case)
    module = next(m for m in adapter.modules if m.local_name == local_name)
    assert module_split(module, arch) == split


def test_without_a_base_the_shipped_schemas_agree_with_each_familys_own():
    """The fallback (the split most shipped schemas give a name) matches the bound schema on every fixture module."""
    checked = 0
    for case in sorted((DATA / "cases").iterdir()):
        if not json.loads((case / "case.json").read_text()).get("base"):
            continue
        adapter, arch, _ = fixture(case.name)
        for module in adapter.modules:
            if not module.is_vision:
                assert module_split(module, None) == module_split(module, arch), (case.name, module.module)
                checked += 1
    assert checked > 100


def test_a_name_no_schema_knows_falls_back_to_its_leaf_then_to_columns():
    adapter, _, _ = fixture("v5_llama")
    module = adapter.modules[0]
    assert module_split(replace(module, local_name="block.attention.o_proj", module="x.o_proj"), None) == Split("row")
    assert module_split(replace(module, local_name="block.fc_in", module="x.fc_in"), None) == Split("column")


def test_a_config_without_a_schema_still_gets_the_head_counts_of_the_shipped_families():
    """A base whose family has no schema (arch None): counts the config gives, for the modules any family splits."""
    adapter, arch, text_config = fixture("v5_nemotron_h")
    with_schema = sharding_findings(adapter, arch, text_config, 3, 1)
    without = sharding_findings(adapter, None, text_config, 3, 1)
    assert sorted(head_labels(without)) == sorted(head_labels(with_schema))
    assert dimension_messages(without) == dimension_messages(with_schema)
    assert head_labels(sharding_findings(adapter, None, {}, 3, 1)) == []  # no config: no counts


def test_every_shipped_head_split_group_is_counted_and_no_router_is_split():
    for family in list_schemas():
        schema = load_schema(family)
        counted = {p for h in schema.tp_head_counts for p in h.groups}
        for g in schema.groups + schema.top_level:
            if g.tp == "heads":
                assert g.path in counted, (family, g.path)
            if g.kind in ("router", "embedding", "lm_head"):
                assert g.tp == "replicated", (family, g.path)
