import pytest

from lora_convert.peft.naming import Factor, module_without_expert, parse_key


@pytest.mark.parametrize(
    "key, factor, module, depth, adapter_name, layer, expert, local",
    [
        (
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight",
            Factor.LORA_A,
            "model.layers.3.self_attn.q_proj",
            0,
            None,
            3,
            None,
            "self_attn.q_proj",
        ),
        (
            "base_model.model.model.layers.3.self_attn.q_proj.lora_B.default.weight",
            Factor.LORA_B,
            "model.layers.3.self_attn.q_proj",
            0,
            "default",
            3,
            None,
            "self_attn.q_proj",
        ),
        (
            "base_model.model.model.layers.2.mlp.experts.base_layer.lora_A.weight",
            Factor.LORA_A,
            "model.layers.2.mlp.experts",
            1,
            None,
            2,
            None,
            "mlp.experts",
        ),
        (
            "base_model.model.model.layers.2.mlp.experts.lora_B.weight",
            Factor.LORA_B,
            "model.layers.2.mlp.experts",
            0,
            None,
            2,
            None,
            "mlp.experts",
        ),
        (
            "base_model.model.model.layers.1.block_sparse_moe.experts.3.w1.lora_A.weight",
            Factor.LORA_A,
            "model.layers.1.block_sparse_moe.experts.3.w1",
            0,
            None,
            1,
            3,
            "block_sparse_moe.experts.w1",
        ),
        (
            "base_model.model.language_model.model.layers.0.mlp.experts.17.gate_proj.lora_B.weight",
            Factor.LORA_B,
            "language_model.model.layers.0.mlp.experts.17.gate_proj",
            0,
            None,
            0,
            17,
            "mlp.experts.gate_proj",
        ),
        (
            "base_model.model.backbone.layers.4.mixer.in_proj.lora_A.weight",
            Factor.LORA_A,
            "backbone.layers.4.mixer.in_proj",
            0,
            None,
            4,
            None,
            "mixer.in_proj",
        ),
        (
            "base_model.model.model.embed_tokens.lora_embedding_A",
            Factor.EMBEDDING_A,
            "model.embed_tokens",
            0,
            None,
            None,
            None,
            "model.embed_tokens",
        ),
        (
            "base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector",
            Factor.MAGNITUDE,
            "model.layers.0.self_attn.o_proj",
            0,
            None,
            0,
            None,
            "self_attn.o_proj",
        ),
        (
            "base_model.model.model.layers.0.self_attn.o_proj.lora_B.bias",
            Factor.LORA_BIAS,
            "model.layers.0.self_attn.o_proj",
            0,
            None,
            0,
            None,
            "self_attn.o_proj",
        ),
        ("base_model.model.lm_head.weight", Factor.FULL_WEIGHT, "lm_head", 0, None, None, None, "lm_head"),
        (
            "base_model.model.model.norm.modules_to_save.default.weight",
            Factor.FULL_WEIGHT,
            "model.norm",
            0,
            "default",
            None,
            None,
            "model.norm",
        ),
    ],
)
def test_grammar(key, factor, module, depth, adapter_name, layer, expert, local):
    p = parse_key(key)
    assert (p.factor, p.module, p.base_layer_depth, p.adapter_name, p.layer, p.expert, p.local_name) == (
        factor,
        module,
        depth,
        adapter_name,
        layer,
        expert,
        local,
    )


def test_prefix_and_stack():
    p = parse_key("base_model.model.model.language_model.layers.5.linear_attn.in_proj_qkv.lora_A.weight")
    assert p.has_peft_prefix and p.stack_prefix == "model.language_model" and p.layer == 5
    bare = parse_key("model.layers.5.self_attn.q_proj.lora_A.weight")
    assert not bare.has_peft_prefix and bare.module == "model.layers.5.self_attn.q_proj"


def test_vision_modules_are_not_text_layers():
    p = parse_key("base_model.model.model.vision_tower.encoder.layers.0.attn.q_proj.lora_A.weight")
    assert p.is_vision and p.layer is None
    assert parse_key("base_model.model.model.mm_projector.in_proj.lora_B.weight").is_vision


def test_fused_expert_marker_and_expert_removal():
    assert parse_key("base_model.model.model.layers.2.mlp.experts.lora_A.weight").is_fused_experts
    per = parse_key("base_model.model.model.layers.2.mlp.experts.11.down_proj.lora_A.weight")
    assert not per.is_fused_experts and module_without_expert(per) == "model.layers.2.mlp.experts.down_proj"


@pytest.mark.parametrize(
    "key",
    ["", "weight", "lora_A.weight", "a.lora_A.x.y.weight", "a.lora_A", "a.lora_embedding_A.bias", "a..lora_A.weight"],
)
def test_unparseable_never_raises(key):
    assert parse_key(key).factor is Factor.UNKNOWN
