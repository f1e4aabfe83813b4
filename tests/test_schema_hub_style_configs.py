"""The released (Hub-style) configs of Kimi-Linear, Bailing-hybrid (Ling 3.0) and HY-V3 name their layer patterns and
widths differently from what transformers 5 writes back (the fixtures' bases): the schemas bind both, and the layer
types and widths they derive from a Hub-style config agree with what transformers' own config class derives."""

from __future__ import annotations

import pytest

COMMON = dict(vocab_size=128, hidden_size=48, num_attention_heads=4, num_key_value_heads=4, intermediate_size=72)
KIMI_HUB = dict(
    COMMON,
    model_type="kimi_linear",
    num_hidden_layers=5,
    moe_intermediate_size=20,
    num_experts=4,
    num_shared_experts=1,
    first_k_dense_replace=2,
    q_lora_rank=None,
    kv_lora_rank=28,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=24,
    # 1-indexed, as released (configuration_kimi_linear.py:127-133)
    linear_attn_config={"head_dim": 12, "num_heads": 4, "kda_layers": [1, 2, 4, 5], "full_attn_layers": [3]},
)
BAILING_HUB = dict(
    COMMON,
    model_type="bailing_hybrid",
    num_hidden_layers=6,
    moe_intermediate_size=20,
    num_experts=4,
    num_shared_experts=1,
    first_k_dense_replace=2,
    kv_lora_rank=28,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=24,
    head_dim=12,  # the KDA head width as released
    layer_group_size=3,
    num_mtp_layers=0,
)
HY_V3_HUB = dict(
    COMMON,
    model_type="hy_v3",
    num_hidden_layers=3,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=20,
    num_experts=4,
    num_shared_experts=1,
    first_k_dense_replace=1,
)


def _transformers_config(config: dict):
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(config["model_type"], **fields)


def _types(arch, layer: int) -> set[str]:
    return set(arch.layer_types(layer))


@pytest.mark.slow  # imports transformers
@pytest.mark.parametrize("config", [KIMI_HUB, BAILING_HUB], ids=["kimi_linear", "bailing_hybrid"])
def test_hybrid_layer_types_and_linear_widths_agree_with_transformers(config):
    from lora_convert.arch.schema import bind

    reference = _transformers_config(config)
    arch = bind(dict(config))
    assert arch.family == config["model_type"]
    for i in range(reference.num_hidden_layers):
        want = {reference.layer_types[i], "moe" if reference.mlp_layer_types[i] == "sparse" else "dense"}
        assert _types(arch, i) == want, (i, _types(arch, i), want)
    width = reference.linear_head_dim * reference.linear_num_heads
    linear = next(i for i in range(reference.num_hidden_layers) if reference.layer_types[i] == "linear_attention")
    qkv = next(g for g in arch.groups(linear) if g.local_path == "self_attn.qkv_proj")
    assert [s.out_features for s in qkv.slices] == [width] * 3


@pytest.mark.slow
def test_hy_v3_dense_prefix_and_widths_agree_with_transformers():
    from lora_convert.arch.schema import bind

    reference = _transformers_config(HY_V3_HUB)
    arch = bind(dict(HY_V3_HUB))
    for i in range(reference.num_hidden_layers):
        assert ("moe" in _types(arch, i)) == (reference.mlp_layer_types[i] == "sparse"), i
    # a released config's own dense prefix wins where transformers' mlp_layer_types is absent
    assert "dense" in _types(bind(dict(HY_V3_HUB, first_k_dense_replace=2)), 1)
    assert arch.expert_count() == 4 and arch.shared_expert_count() == 1
    # a released config naming the expert width `expert_hidden_dim` (what vLLM reads) binds the same widths
    released = {k: v for k, v in HY_V3_HUB.items() if k != "moe_intermediate_size"} | {"expert_hidden_dim": 20}
    down = next(g for g in bind(released).groups(1) if g.local_path == "mlp.experts.down_proj")
    assert down.in_features == 20
