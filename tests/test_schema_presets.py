"""`schemas show` for every shipped preset against a table derived by hand from the model's config.

Each row is `group: (in, out, slices, gated, experts)` where slices is a tuple of (name, out) for fused groups
(None for a group of one). The arithmetic is written next to each number; the config values come from the
preset files in lora_convert/arch/presets/ (which cite their sources), the formulas from the models' modeling code.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lora_convert.arch.base_config import list_presets
from lora_convert.cli import app


def _show(preset: str) -> dict:
    result = CliRunner().invoke(app, ["schemas", "show", preset, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _actual(table: dict) -> dict:
    out = {}
    for entry in table["layer_types"]:
        groups = {}
        for g in entry["groups"]:
            slices = tuple((s["name"], s["out"]) for s in g["slices"]) if len(g["slices"]) > 1 else None
            groups[g["name"]] = (g["in"], g["out"], slices, g["gated"], g["experts"])
        out[tuple(entry["types"])] = (entry["layers"], groups)
    return out


def _top(table: dict) -> dict:
    return {g["path"]: (g["in"], g["out"]) for g in table["top_level"]}


# ---------------------------------------------------------------------------------------------- DeepSeek-V3
# hidden 7168, heads 128, q_lora_rank 1536, kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head 128,
# intermediate 18432, moe_intermediate 2048, 256 routed + 1 shared expert, first_k_dense_replace 3, 61 layers.
DS_ATTN = {
    "fused_qkv_a_proj_with_mqa": (
        7168,
        1536 + 512 + 64,
        (("q_a_proj", 1536), ("kv_a_proj_with_mqa", 512 + 64)),
        None,
        None,
    ),  # 2112
    "q_b_proj": (1536, 128 * (128 + 64), None, None, None),  # 24576
    "kv_b_proj": (512, 128 * (128 + 128), None, None, None),  # 32768
    "o_proj": (128 * 128, 7168, None, None, None),  # 16384 -> 7168
}
DEEPSEEK_V3 = {
    ("attention", "dense"): (
        [0, 1, 2],
        {
            **DS_ATTN,
            "gate_up_proj": (7168, 2 * 18432, (("gate_proj", 18432), ("up_proj", 18432)), True, None),  # 36864
            "down_proj": (18432, 7168, None, None, None),
        },
    ),
    ("attention", "moe"): (
        list(range(3, 61)),
        {
            **DS_ATTN,
            "experts.gate_up_proj": (7168, 2 * 2048, (("gate_proj", 2048), ("up_proj", 2048)), True, 256),  # 4096
            "experts.down_proj": (2048, 7168, None, None, 256),
            "shared_experts.gate_up_proj": (7168, 2 * 2048 * 1, (("gate_proj", 2048), ("up_proj", 2048)), True, None),
            "shared_experts.down_proj": (2048 * 1, 7168, None, None, None),
            "gate": (7168, 256, None, None, None),  # router: out = n_routed_experts
        },
    ),
}

# ---------------------------------------------------------------------------------------------- Kimi-K2.5
# text_config: hidden 7168, heads 64, q_lora 1536, kv_lora 512, nope 128, rope 64, v 128, intermediate 18432,
# moe_intermediate 2048, 384 routed + 1 shared, first_k_dense_replace 1, 61 layers, vocab 163840.
KIMI_ATTN = {
    "fused_qkv_a_proj_with_mqa": (7168, 1536 + 512 + 64, (("q_a_proj", 1536), ("kv_a_proj_with_mqa", 576)), None, None),
    "q_b_proj": (1536, 64 * (128 + 64), None, None, None),  # 12288 (the Hub tensor is [12288, 1536])
    "kv_b_proj": (512, 64 * (128 + 128), None, None, None),  # 16384 (Hub [16384, 512])
    "o_proj": (64 * 128, 7168, None, None, None),  # 8192 -> 7168 (Hub [7168, 8192])
}
KIMI_K25 = {
    ("attention", "dense"): (
        [0],
        {
            **KIMI_ATTN,
            "gate_up_proj": (7168, 2 * 18432, (("gate_proj", 18432), ("up_proj", 18432)), True, None),
            "down_proj": (18432, 7168, None, None, None),
        },
    ),
    ("attention", "moe"): (
        list(range(1, 61)),
        {
            **KIMI_ATTN,
            "experts.gate_up_proj": (7168, 2 * 2048, (("gate_proj", 2048), ("up_proj", 2048)), True, 384),
            "experts.down_proj": (2048, 7168, None, None, 384),
            "shared_experts.gate_up_proj": (7168, 2 * 2048, (("gate_proj", 2048), ("up_proj", 2048)), True, None),
            "shared_experts.down_proj": (2048, 7168, None, None, None),
            "gate": (7168, 384, None, None, None),
        },
    ),
}

# ---------------------------------------------------------------------------------------------- Llama-3.1-8B
# hidden 4096, 32 heads, 8 KV heads, head_dim 4096/32 = 128, intermediate 14336, 32 layers.
LLAMA = {
    ("attention", "dense"): (
        list(range(32)),
        {
            "qkv_proj": (
                4096,
                32 * 128 + 2 * 8 * 128,
                (("q_proj", 4096), ("k_proj", 1024), ("v_proj", 1024)),
                None,
                None,
            ),  # 6144
            "o_proj": (32 * 128, 4096, None, None, None),
            "gate_up_proj": (4096, 2 * 14336, (("gate_proj", 14336), ("up_proj", 14336)), True, None),  # 28672
            "down_proj": (14336, 4096, None, None, None),
        },
    ),
}

# ---------------------------------------------------------------------------------------------- Mixtral-8x7B
# hidden 4096, 32 heads, 8 KV heads, head_dim 128, intermediate 14336 per expert, 8 local experts.
MIXTRAL = {
    ("attention", "moe"): (
        list(range(32)),
        {
            "qkv_proj": (4096, 4096 + 1024 + 1024, (("q_proj", 4096), ("k_proj", 1024), ("v_proj", 1024)), None, None),
            "o_proj": (4096, 4096, None, None, None),
            "experts.gate_up_proj": (4096, 2 * 14336, (("gate_proj", 14336), ("up_proj", 14336)), True, 8),
            "experts.down_proj": (14336, 4096, None, None, 8),
            "gate": (4096, 8, None, None, None),
        },
    ),
}

# ---------------------------------------------------------------------------------------------- Nemotron-3-Super
# hidden 4096; mamba: 128 heads x 64 = d_inner 8192, n_groups 8, ssm_state 128; attention 32 heads, 2 KV heads,
# head_dim 128; LatentMoE: 512 experts, moe_intermediate 2688, latent 1024, shared 5376; pattern of 88 chars with
# '*' at 7, 16, 25, 36, 47, 58, 69, 78 (40 'M', 40 'E', no '-').
ATTN_LAYERS = [7, 16, 25, 36, 47, 58, 69, 78]
PATTERN = "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME"
NEMOTRON = {
    ("mamba",): (
        [i for i, c in enumerate(PATTERN) if c == "M"],
        {
            # in_proj rows z | x | B | C | dt = 8192 + 8192 + 8*128 + 8*128 + 128 = 18560
            "in_proj": (
                4096,
                8192 + 8192 + 1024 + 1024 + 128,
                (("z", 8192), ("x", 8192), ("B", 1024), ("C", 1024), ("dt", 128)),
                None,
                None,
            ),
            "out_proj": (8192, 4096, None, None, None),
        },
    ),
    ("moe",): (
        [i for i, c in enumerate(PATTERN) if c == "E"],
        {
            "experts.up_proj": (1024, 2688, None, False, 512),  # non-gated, in the 1024-wide latent space
            "experts.down_proj": (2688, 1024, None, None, 512),
            "shared_experts.up_proj": (4096, 5376, None, False, None),
            "shared_experts.down_proj": (5376, 4096, None, None, None),
            "fc1_latent_proj": (4096, 1024, None, None, None),
            "fc2_latent_proj": (1024, 4096, None, None, None),
            "gate": (4096, 512, None, None, None),
        },
    ),
    ("attention",): (
        ATTN_LAYERS,
        {
            "qkv_proj": (
                4096,
                32 * 128 + 2 * 2 * 128,
                (("q_proj", 4096), ("k_proj", 256), ("v_proj", 256)),
                None,
                None,
            ),  # 4608
            "o_proj": (32 * 128, 4096, None, None, None),
        },
    ),
}

# ---------------------------------------------------------------------------------------------- Qwen3-30B-A3B
# hidden 2048, 32 heads, 4 KV heads, head_dim 128, moe_intermediate 768, 128 experts, mlp_only_layers [] (all MoE).
QWEN3_MOE = {
    ("attention", "moe"): (
        list(range(48)),
        {
            "qkv_proj": (
                2048,
                32 * 128 + 2 * 4 * 128,
                (("q_proj", 4096), ("k_proj", 512), ("v_proj", 512)),
                None,
                None,
            ),  # 5120
            "o_proj": (32 * 128, 2048, None, None, None),
            "experts.gate_up_proj": (2048, 2 * 768, (("gate_proj", 768), ("up_proj", 768)), True, 128),
            "experts.down_proj": (768, 2048, None, None, 128),
            "gate": (2048, 128, None, None, None),
        },
    ),
}

# ---------------------------------------------------------------------------------------------- Qwen3-Next-80B-A3B
# hidden 2048, 16 heads, 2 KV heads, head_dim 256 (q gated: 2x); GDN: 16 key heads x 128 = key_dim 2048,
# 32 value heads x 128 = value_dim 4096; moe_intermediate 512, shared 512, 512 experts;
# full_attention_interval 4 -> attention on layers 3, 7, ..., 47.
QN_MOE = {
    "experts.gate_up_proj": (2048, 2 * 512, (("gate_proj", 512), ("up_proj", 512)), True, 512),
    "experts.down_proj": (512, 2048, None, None, 512),
    "shared_expert.gate_up_proj": (2048, 2 * 512, (("gate_proj", 512), ("up_proj", 512)), True, None),
    "shared_expert.down_proj": (512, 2048, None, None, None),
    "shared_expert_gate": (2048, 1, None, None, None),
    "gate": (2048, 512, None, None, None),
}
QWEN3_NEXT = {
    ("linear_attention", "moe"): (
        [i for i in range(48) if (i + 1) % 4],
        {
            "in_proj_qkvz": (2048, 2 * 2048 + 2 * 4096, None, None, None),  # 12288, one head-interleaved slice
            "in_proj_ba": (2048, 2 * 32, None, None, None),  # 64
            "out_proj": (4096, 2048, None, None, None),
            **QN_MOE,
        },
    ),
    ("attention", "moe"): (
        [i for i in range(48) if (i + 1) % 4 == 0],
        {
            "qkv_proj": (
                2048,
                2 * 16 * 256 + 2 * 2 * 256,
                (("q_proj", 8192), ("k_proj", 512), ("v_proj", 512)),
                None,
                None,
            ),  # 9216
            "o_proj": (16 * 256, 2048, None, None, None),
            **QN_MOE,
        },
    ),
}

# ---------------------------------------------------------------------------------------------- Qwen3.5-27B
# text_config: hidden 5120, 24 heads, 4 KV heads, head_dim 256, attn_output_gate (q 2x); GDN: 16 key heads x 128 =
# 2048, 48 value heads x 128 = 6144; intermediate 17408; layer_types: full_attention every 4th (3, 7, ..., 63).
QWEN3_5 = {
    ("dense", "linear_attention"): (
        [i for i in range(64) if (i + 1) % 4],
        {
            "in_proj_qkvz": (
                5120,
                2048 + 2048 + 6144 + 6144,
                (("q", 2048), ("k", 2048), ("v", 6144), ("z", 6144)),
                None,
                None,
            ),  # 16384
            "in_proj_ba": (5120, 48 + 48, (("b", 48), ("a", 48)), None, None),
            "out_proj": (6144, 5120, None, None, None),
            "gate_up_proj": (5120, 2 * 17408, (("gate_proj", 17408), ("up_proj", 17408)), True, None),  # 34816
            "down_proj": (17408, 5120, None, None, None),
        },
    ),
    ("attention", "dense"): (
        [i for i in range(64) if (i + 1) % 4 == 0],
        {
            "qkv_proj": (
                5120,
                2 * 24 * 256 + 2 * 4 * 256,
                (("q_proj", 12288), ("k_proj", 1024), ("v_proj", 1024)),
                None,
                None,
            ),  # 14336
            "o_proj": (24 * 256, 5120, None, None, None),  # 6144 -> 5120
            "gate_up_proj": (5120, 2 * 17408, (("gate_proj", 17408), ("up_proj", 17408)), True, None),
            "down_proj": (17408, 5120, None, None, None),
        },
    ),
}

# ---------------------------------------------------------------------------------------------- Qwen3.5-35B-A3B
# text_config: hidden 2048, 16 heads, 2 KV heads, head_dim 256 (q 2x); GDN 16 x 128 = 2048 key, 32 x 128 = 4096
# value; 256 experts, moe_intermediate 512, shared 512; every layer MoE; attention on 3, 7, ..., 39.
Q35_MOE = {
    "experts.gate_up_proj": (2048, 2 * 512, (("gate_proj", 512), ("up_proj", 512)), True, 256),
    "experts.down_proj": (512, 2048, None, None, 256),
    "shared_expert.gate_up_proj": (2048, 2 * 512, (("gate_proj", 512), ("up_proj", 512)), True, None),
    "shared_expert.down_proj": (512, 2048, None, None, None),
    "shared_expert_gate": (2048, 1, None, None, None),
    "gate": (2048, 256, None, None, None),
}
QWEN3_5_MOE = {
    ("linear_attention", "moe"): (
        [i for i in range(40) if (i + 1) % 4],
        {
            "in_proj_qkvz": (
                2048,
                2048 + 2048 + 4096 + 4096,
                (("q", 2048), ("k", 2048), ("v", 4096), ("z", 4096)),
                None,
                None,
            ),  # 12288
            "in_proj_ba": (2048, 32 + 32, (("b", 32), ("a", 32)), None, None),
            "out_proj": (4096, 2048, None, None, None),
            **Q35_MOE,
        },
    ),
    ("attention", "moe"): (
        [i for i in range(40) if (i + 1) % 4 == 0],
        {
            "qkv_proj": (2048, 8192 + 512 + 512, (("q_proj", 8192), ("k_proj", 512), ("v_proj", 512)), None, None),
            "o_proj": (16 * 256, 2048, None, None, None),
            **Q35_MOE,
        },
    ),
}

EXPECTED = {
    "deepseek-v3": (
        "deepseek_v3",
        "model.layers",
        DEEPSEEK_V3,
        {"model.embed_tokens": (129280, 7168), "lm_head": (7168, 129280)},
    ),
    "kimi-k2.5": (
        "kimi_k25",
        "language_model.model.layers",
        KIMI_K25,
        {"language_model.model.embed_tokens": (163840, 7168), "language_model.lm_head": (7168, 163840)},
    ),
    "llama-3.1-8b": ("llama", "model.layers", LLAMA, {"model.embed_tokens": (128256, 4096), "lm_head": (4096, 128256)}),
    "mixtral-8x7b": (
        "mixtral",
        "model.layers",
        MIXTRAL,
        {"model.embed_tokens": (32000, 4096), "lm_head": (4096, 32000)},
    ),
    "nemotron-3-super-120b-a12b": (
        "nemotron_h",
        "backbone.layers",
        NEMOTRON,
        {"backbone.embeddings": (131072, 4096), "lm_head": (4096, 131072)},
    ),
    "qwen3-30b-a3b": (
        "qwen3_moe",
        "model.layers",
        QWEN3_MOE,
        {"model.embed_tokens": (151936, 2048), "lm_head": (2048, 151936)},
    ),
    "qwen3-next-80b-a3b": (
        "qwen3_next",
        "model.layers",
        QWEN3_NEXT,
        {"model.embed_tokens": (151936, 2048), "lm_head": (2048, 151936)},
    ),
    "qwen3.5-27b": (
        "qwen3_5",
        "model.language_model.layers",
        QWEN3_5,
        {"model.language_model.embed_tokens": (248320, 5120), "lm_head": (5120, 248320)},
    ),
    "qwen3.5-35b-a3b": (
        "qwen3_5_moe",
        "model.language_model.layers",
        QWEN3_5_MOE,
        {"model.language_model.embed_tokens": (248320, 2048), "lm_head": (2048, 248320)},
    ),
}


def test_every_preset_has_a_hand_derived_table():
    assert sorted(p["name"] for p in list_presets()) == sorted(EXPECTED)


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_schemas_show_matches_the_hand_derived_table(preset):
    family, prefix, expected, top = EXPECTED[preset]
    table = _show(preset)
    assert table["family"] == family
    assert table["checkpoint_prefix"] == prefix
    actual = _actual(table)
    assert set(actual) == set(expected)
    for types, (layers, groups) in expected.items():
        got_layers, got_groups = actual[types]
        assert got_layers == layers, types
        assert list(got_groups) == list(groups), types  # same groups, same order
        for name, row in groups.items():
            assert got_groups[name] == row, (types, name)
    assert _top(table) == top
    for entry in table["layer_types"]:
        for g in entry["groups"]:
            assert g["path"] == f"{prefix}.{{layer}}.{g['path'].split('{layer}.', 1)[1]}"


def test_mtp_and_expert_counts():
    assert _show("deepseek-v3")["mtp_layers"] == 1  # num_nextn_predict_layers: model.layers.61
    assert _show("nemotron-3-super-120b-a12b")["expert_count"] == 512
    assert _show("llama-3.1-8b")["expert_count"] is None
