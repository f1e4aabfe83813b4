"""Issue 25's MLA families whose layer pattern or wrapper a fixture cannot show whole: GLM-5's indexer schedule as
released configs write it (no `indexer_types`), Mistral-Large-4's NoPE and KV-sharing layers, and Mistral-Small-4 as
released, a Mistral-3 wrapper around a Mistral-4 language model (claimed by mistral4.json's `wrapped_in`)."""

from __future__ import annotations

import json

import helpers
from lora_convert.arch.schema import bind


def _base(name: str) -> dict:
    return json.loads((helpers.FIXTURES / "bases" / name / "config.json").read_text())


def _indexer_layers(config: dict) -> list[int]:
    arch = bind(config)
    return [i for i in range(arch.num_layers) if any(g.name == "indexer.wk" for g in arch.groups(i))]


def test_glm5_indexer_layers_follow_the_released_schedule():
    # GLM-5.2's config.json: index_topk_freq 4, index_skip_topk_offset 3 and no indexer_types. transformers'
    # GlmMoeDsaConfig makes layer i 'full' when max(i - offset + 1, 0) % freq == 0: layers 0-2, then every 4th.
    config = dict(_base("v5_glm_moe_dsa"), num_hidden_layers=12, index_topk_freq=4, index_skip_topk_offset=3)
    del config["indexer_types"], config["mlp_layer_types"]
    assert _indexer_layers(config) == [0, 1, 2, 6, 10]
    # the letters form, and the defaults (freq 1: every layer runs its indexer)
    assert _indexer_layers(dict(config, num_hidden_layers=4, index_topk_pattern="FSSF")) == [0, 3]
    del config["index_topk_freq"], config["index_skip_topk_offset"]
    assert _indexer_layers(config) == list(range(12))
    # without mlp_layer_types the first first_k_dense_replace layers are dense (1 here)
    assert [g.name for g in bind(config).groups(0) if g.kind == "mlp"] == ["gate_up_proj", "down_proj"]


def test_mistral_large4_nope_and_kv_sharing_layers():
    arch = bind(_base("v5_mistral_large4"))
    stack = "model.language_model.layers"
    kv_a = [arch.resolve_path(f"{stack}.{i}.self_attn.kv_a_proj_with_mqa") for i in range(4)]
    assert [m.expected_out if m else None for m in kv_a] == [36, 36, None, 28]  # layer 2 reuses layer 1's latent KV
    kv_b = [arch.resolve_path(f"{stack}.{i}.self_attn.kv_b_proj").expected_out for i in range(4)]
    assert kv_b == [160, 160, 160, 192]  # NoPE layer 3: every key dim is non-rotary (4 heads x (16 + 8 + 24))
    # the checkpoint's own (Mistral-native) names place the same modules
    assert arch.resolve_path("layers.3.attention.wkv_b").expected_out == 192
    assert arch.resolve_path("layers.1.attention.indexer.wk") is None  # a 'shared' indexer layer has none


def test_mistral_small4_wrapper_binds_mistral4_not_mistral3():
    text = _base("v5_mistral4")
    wrapper = {
        "model_type": "mistral3",
        "architectures": ["Mistral3ForConditionalGeneration"],
        "text_config": text,
        "vision_config": {"model_type": "pixtral"},
    }
    arch = bind(wrapper)
    assert arch.family == "mistral4"
    for stack in ("model.language_model.layers", "language_model.model.layers"):
        assert arch.resolve_path(f"{stack}.1.self_attn.q_a_proj").expected_out == 32
        assert arch.resolve_path(f"{stack}.1.mlp.experts", "gate_up_proj") is not None
    # a Mistral-3 wrapper around a Mistral or Ministral-3 language model stays mistral3's
    assert bind(_base("v5_mistral3")).family == "mistral3"
