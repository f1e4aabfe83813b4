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

# ---------------------------------------------------------------------------------------------- DeepSeek-V3.2-Exp
# The DeepSeek-V3 geometry (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, nope 128, rope 64, v 128,
# intermediate 18432, moe_intermediate 2048, 256 routed + 1 shared, first_k_dense_replace 3, 61 layers) plus the
# DSA indexer in every attention: index_n_heads 64, index_head_dim 128 (transformers==5.23.0:
# transformers/models/deepseek_v32/modeling_deepseek_v32.py:172-175: wq_b q_lora_rank -> n_heads * head_dim,
# wk hidden -> head_dim, weights_proj hidden -> n_heads); dense = the first first_k_dense_replace layers
# (configuration_deepseek_v32.py:134-136).
DS32_ATTN = {
    **DS_ATTN,
    "indexer.wq_b": (1536, 64 * 128, None, None, None),  # 8192
    "indexer.wk": (7168, 128, None, None, None),  # one shared key head of index_head_dim
    "indexer.weights_proj": (7168, 64, None, None, None),  # one weight per indexer head
}
DEEPSEEK_V32 = {
    ("attention", "dense"): (
        [0, 1, 2],
        {
            **DS32_ATTN,
            "gate_up_proj": (7168, 2 * 18432, (("gate_proj", 18432), ("up_proj", 18432)), True, None),
            "down_proj": (18432, 7168, None, None, None),
        },
    ),
    ("attention", "moe"): (
        list(range(3, 61)),
        {
            **DS32_ATTN,
            "experts.gate_up_proj": (7168, 2 * 2048, (("gate_proj", 2048), ("up_proj", 2048)), True, 256),
            "experts.down_proj": (2048, 7168, None, None, 256),
            "shared_experts.gate_up_proj": (7168, 2 * 2048 * 1, (("gate_proj", 2048), ("up_proj", 2048)), True, None),
            "shared_experts.down_proj": (2048 * 1, 7168, None, None, None),
            "gate": (7168, 256, None, None, None),
        },
    ),
}


# ---------------------------------------------------------------------------------------------- Gemma-3
# Gemma3Attention: head_dim = config.head_dim (modeling_gemma3.py:305); q/k/v/o and gate/up/down are plain Linears
# (:311-320, :125-127). Sliding vs full attention layers have the same projections, so every layer is one type.
# Keys a terse Hub text_config leaves out take Gemma3TextConfig's defaults (configuration_gemma3.py:74-80): vocab
# 262208, 8 heads, 4 KV heads, head_dim 256. The VL wrapper's Hub checkpoint names the text model
# language_model.model.* and its head language_model.lm_head (transformers maps gemma3 to the llava renames:
# conversion_mapping.py:96, :748-752); lm_head is a Linear(hidden, vocab) even though it is tied to the embedding.
def _gemma3(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int) -> dict:
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        ("attention", "dense"): (
            list(range(layers)),
            {
                "qkv_proj": (hidden, q + 2 * kv, (("q_proj", q), ("k_proj", kv), ("v_proj", kv)), None, None),
                "o_proj": (q, hidden, None, None, None),
                "gate_up_proj": (hidden, 2 * inter, (("gate_proj", inter), ("up_proj", inter)), True, None),
                "down_proj": (inter, hidden, None, None, None),
            },
        ),
    }


# 1B (text only, Gemma3ForCausalLM): 26 layers, hidden 1152, 4 heads, 1 KV head, head_dim 256, intermediate 6912.
GEMMA3_1B = _gemma3(26, 1152, 4, 1, 256, 6912)  # qkv 1024 + 256 + 256 = 1536; o 1024 -> 1152
# 4B: 34 layers, hidden 2560, intermediate 10240; heads 8 / KV 4 / head_dim 256 are the config defaults.
GEMMA3_4B = _gemma3(34, 2560, 8, 4, 256, 10240)  # qkv 2048 + 1024 + 1024 = 4096; o 2048 -> 2560
# 27B: 62 layers, hidden 5376, 32 heads, 16 KV heads, head_dim 128, intermediate 21504.
GEMMA3_27B = _gemma3(62, 5376, 32, 16, 128, 21504)  # qkv 4096 + 2048 + 2048 = 8192; o 4096 -> 5376

# ---------------------------------------------------------------------------------------------- GLM-4-9B-0414
# hidden 4096, 32 heads, 2 KV heads, head_dim 128 (Glm4Config default 128 = 4096 / 32), intermediate 13696,
# 40 layers; the base already fuses gate_up_proj = Linear(hidden, 2 * intermediate) (modeling_glm4.py:53).
GLM4 = {
    ("attention", "dense"): (
        list(range(40)),
        {
            "qkv_proj": (
                4096,
                32 * 128 + 2 * 2 * 128,
                (("q_proj", 4096), ("k_proj", 256), ("v_proj", 256)),
                None,
                None,
            ),  # 4608
            "o_proj": (32 * 128, 4096, None, None, None),
            "gate_up_proj": (4096, 2 * 13696, (("gate_proj", 13696), ("up_proj", 13696)), True, None),  # 27392
            "down_proj": (13696, 4096, None, None, None),
        },
    ),
}


# ---------------------------------------------------------------------------------------------- GLM-4.5 / -Air
# Glm4MoeDecoderLayer: dense MLP (intermediate_size) while layer_idx < first_k_dense_replace, else MoE
# (modeling_glm4_moe.py:401-404) with routed experts of moe_intermediate_size (:338-340), a shared MLP of
# moe_intermediate_size * n_shared_experts (:380) and a router gate [n_routed_experts, hidden]. Both sizes:
# 96 heads, 8 KV heads, head_dim 128 -> q 12288, k = v = 1024.
def _glm4_moe(layers: int, dense: int, hidden: int, inter: int, moe: int, experts: int) -> dict:
    attn = {
        "qkv_proj": (
            hidden,
            96 * 128 + 2 * 8 * 128,
            (("q_proj", 12288), ("k_proj", 1024), ("v_proj", 1024)),
            None,
            None,
        ),  # 14336
        "o_proj": (96 * 128, hidden, None, None, None),  # 12288 -> hidden
    }
    return {
        ("attention", "dense"): (
            list(range(dense)),
            {
                **attn,
                "gate_up_proj": (hidden, 2 * inter, (("gate_proj", inter), ("up_proj", inter)), True, None),
                "down_proj": (inter, hidden, None, None, None),
            },
        ),
        ("attention", "moe"): (
            list(range(dense, layers)),
            {
                **attn,
                "experts.gate_up_proj": (hidden, 2 * moe, (("gate_proj", moe), ("up_proj", moe)), True, experts),
                "experts.down_proj": (moe, hidden, None, None, experts),
                "shared_experts.gate_up_proj": (
                    hidden,
                    2 * moe * 1,
                    (("gate_proj", moe), ("up_proj", moe)),
                    True,
                    None,
                ),
                "shared_experts.down_proj": (moe * 1, hidden, None, None, None),
                "gate": (hidden, experts, None, None, None),
            },
        ),
    }


# Air: 46 layers, first_k_dense_replace 1, hidden 4096, intermediate 10944, moe 1408, 128 routed + 1 shared.
GLM45_AIR = _glm4_moe(46, 1, 4096, 10944, 1408, 128)  # gate_up 21888 dense, 2816 per expert
# 355B: 92 layers, first_k_dense_replace 3, hidden 5120, intermediate 12288, moe 1536, 160 routed + 1 shared.
GLM45 = _glm4_moe(92, 3, 5120, 12288, 1536, 160)  # gate_up 24576 dense, 3072 per expert


# ---------------------------------------------------------------------------------------------- gpt-oss
# hidden 2880, 64 heads, 8 KV heads, head_dim 64 -> q 4096, k = v = 512; every layer is attention (sliding or full,
# same projections) + MoE. Experts: gate_up_proj [E, hidden, 2 * intermediate], down_proj [E, intermediate, hidden]
# (modeling_gpt_oss.py:74-76), intermediate 2880, gate/up interleaved along 2I (rows 0::2 / 1::2: the slices are
# still 2880 each); router weight [E, hidden] (:122).
def _gpt_oss(layers: int, experts: int) -> dict:
    return {
        ("attention", "moe"): (
            list(range(layers)),
            {
                "qkv_proj": (
                    2880,
                    64 * 64 + 2 * 8 * 64,
                    (("q_proj", 4096), ("k_proj", 512), ("v_proj", 512)),
                    None,
                    None,
                ),
                "o_proj": (64 * 64, 2880, None, None, None),  # 4096 -> 2880
                "experts.gate_up_proj": (2880, 2 * 2880, (("gate_proj", 2880), ("up_proj", 2880)), True, experts),
                "experts.down_proj": (2880, 2880, None, None, experts),
                "router": (2880, experts, None, None, None),
            },
        ),
    }


GPT_OSS_20B = _gpt_oss(24, 32)  # 24 layers, 32 local experts
GPT_OSS_120B = _gpt_oss(36, 128)  # 36 layers, 128 local experts


# ---------------------------------------------------------------------------------------------- Llama-4
# text_config: hidden 5120, 40 heads, 8 KV heads, head_dim 128 -> q 5120, k = v = 1024; 48 layers.
# MoE layers = range(step - 1, 48, step) (configuration_llama4.py:176-184): Scout step 1 -> all 48; Maverick step 2
# -> 1, 3, ..., 47. Llama4TextMoe: experts gate_up [E, hidden, 2 * intermediate_size] (modeling_llama4.py:61-62),
# shared_expert Llama4TextMLP(config) of intermediate_size (:163, :91-92), router Linear(hidden, E) (:140-141);
# dense layers: Llama4TextMLP of intermediate_size_mlp (:403). intermediate_size 8192, intermediate_size_mlp 16384.
LLAMA4_ATTN = {
    "qkv_proj": (5120, 40 * 128 + 2 * 8 * 128, (("q_proj", 5120), ("k_proj", 1024), ("v_proj", 1024)), None, None),
    "o_proj": (40 * 128, 5120, None, None, None),
}


def _llama4_moe(experts: int) -> dict:
    return {
        **LLAMA4_ATTN,
        "experts.gate_up_proj": (5120, 2 * 8192, (("gate_proj", 8192), ("up_proj", 8192)), True, experts),  # 16384
        "experts.down_proj": (8192, 5120, None, None, experts),
        "shared_expert.gate_up_proj": (5120, 2 * 8192, (("gate_proj", 8192), ("up_proj", 8192)), True, None),
        "shared_expert.down_proj": (8192, 5120, None, None, None),
        "router": (5120, experts, None, None, None),
    }


LLAMA4_SCOUT = {("attention", "moe"): (list(range(48)), _llama4_moe(16))}
LLAMA4_MAVERICK = {
    ("attention", "dense"): (
        list(range(0, 48, 2)),
        {
            **LLAMA4_ATTN,
            "gate_up_proj": (5120, 2 * 16384, (("gate_proj", 16384), ("up_proj", 16384)), True, None),  # 32768
            "down_proj": (16384, 5120, None, None, None),
        },
    ),
    ("attention", "moe"): (list(range(1, 48, 2)), _llama4_moe(128)),
}

# ---------------------------------------------------------------------------------------------- MiniMax-M2
# hidden 3072, 48 heads, 8 KV heads, head_dim 128 (modeling_minimax_m2.py:288-291) -> q 6144, k = v = 1024;
# 62 layers, every one MoE: 256 experts of intermediate_size 1536 (:74-76), router [256, hidden]. The checkpoint
# (and the schema path) calls the block block_sparse_moe; transformers names it mlp (:347).
MINIMAX_M2 = {
    ("attention", "moe"): (
        list(range(62)),
        {
            "qkv_proj": (
                3072,
                48 * 128 + 2 * 8 * 128,
                (("q_proj", 6144), ("k_proj", 1024), ("v_proj", 1024)),
                None,
                None,
            ),
            "o_proj": (48 * 128, 3072, None, None, None),  # 6144 -> 3072
            "experts.gate_up_proj": (3072, 2 * 1536, (("gate_proj", 1536), ("up_proj", 1536)), True, 256),  # 3072
            "experts.down_proj": (1536, 3072, None, None, 256),
            "gate": (3072, 256, None, None, None),
        },
    ),
}

# ---------------------------------------------------------------------------------------------- OLMoE-1B-7B-0924
# hidden 2048, 16 heads, 16 KV heads, head_dim 2048 / 16 = 128; 16 layers, all MoE: 64 experts of
# intermediate_size 1024 (modeling_olmoe.py:285-287), router gate [64, hidden] (:324).
OLMOE = {
    ("attention", "moe"): (
        list(range(16)),
        {
            "qkv_proj": (
                2048,
                3 * 16 * 128,
                (("q_proj", 2048), ("k_proj", 2048), ("v_proj", 2048)),
                None,
                None,
            ),  # 6144
            "o_proj": (2048, 2048, None, None, None),
            "experts.gate_up_proj": (2048, 2 * 1024, (("gate_proj", 1024), ("up_proj", 1024)), True, 64),
            "experts.down_proj": (1024, 2048, None, None, 64),
            "gate": (2048, 64, None, None, None),
        },
    ),
}


# ---------------------------------------------------------------------------------------------- Phi-3 / Phi-4
# Phi3Attention: head_dim = hidden // heads (Phi3Config has no head_dim), and the BASE fuses qkv_proj of
# heads * hd + 2 * kv_heads * hd rows (modeling_phi3.py:196-205) and gate_up_proj of 2 * intermediate (:53).
def _phi3(layers: int, hidden: int, heads: int, kv_heads: int, inter: int) -> dict:
    hd = hidden // heads
    q, kv = heads * hd, kv_heads * hd
    return {
        ("attention", "dense"): (
            list(range(layers)),
            {
                "qkv_proj": (hidden, q + 2 * kv, (("q_proj", q), ("k_proj", kv), ("v_proj", kv)), None, None),
                "o_proj": (q, hidden, None, None, None),
                "gate_up_proj": (hidden, 2 * inter, (("gate_proj", inter), ("up_proj", inter)), True, None),
                "down_proj": (inter, hidden, None, None, None),
            },
        ),
    }


# Phi-3-mini-4k: 32 layers, hidden 3072, 32 heads / 32 KV heads -> hd 96, qkv 3 * 3072 = 9216; intermediate 8192.
PHI3_MINI = _phi3(32, 3072, 32, 32, 8192)
# Phi-4: 40 layers, hidden 5120, 40 heads / 10 KV heads -> hd 128, qkv 5120 + 2 * 1280 = 7680; intermediate 17920.
PHI4 = _phi3(40, 5120, 40, 10, 17920)

# ---------------------------------------------------------------------------------------------- Qwen2-57B-A14B
# hidden 3584, 28 heads, 4 KV heads, head_dim 3584 / 28 = 128 -> q 3584, k = v = 512; 28 layers, decoder_sparse_step
# 1 and no mlp_only_layers -> all MoE (modeling_qwen2_moe.py:357-362): 64 experts of moe_intermediate_size 2560,
# shared_expert MLP of shared_expert_intermediate_size 20480, shared_expert_gate Linear(hidden, 1) (:334-337).
QWEN2_MOE = {
    ("attention", "moe"): (
        list(range(28)),
        {
            "qkv_proj": (
                3584,
                28 * 128 + 2 * 4 * 128,
                (("q_proj", 3584), ("k_proj", 512), ("v_proj", 512)),
                None,
                None,
            ),
            "o_proj": (28 * 128, 3584, None, None, None),
            "experts.gate_up_proj": (3584, 2 * 2560, (("gate_proj", 2560), ("up_proj", 2560)), True, 64),  # 5120
            "experts.down_proj": (2560, 3584, None, None, 64),
            "shared_expert.gate_up_proj": (3584, 2 * 20480, (("gate_proj", 20480), ("up_proj", 20480)), True, None),
            "shared_expert.down_proj": (20480, 3584, None, None, None),
            "shared_expert_gate": (3584, 1, None, None, None),
            "gate": (3584, 64, None, None, None),
        },
    ),
}

# ---------------------------------------------------------------------------------------------- Qwen3-8B, Qwen3-VL-8B
# Both (Qwen3-VL-8B in text_config): hidden 4096, 32 heads, 8 KV heads, head_dim 128, intermediate 12288, 36 layers.
QWEN3_DENSE = {
    ("attention", "dense"): (
        list(range(36)),
        {
            "qkv_proj": (
                4096,
                32 * 128 + 2 * 8 * 128,
                (("q_proj", 4096), ("k_proj", 1024), ("v_proj", 1024)),
                None,
                None,
            ),  # 6144
            "o_proj": (32 * 128, 4096, None, None, None),
            "gate_up_proj": (4096, 2 * 12288, (("gate_proj", 12288), ("up_proj", 12288)), True, None),  # 24576
            "down_proj": (12288, 4096, None, None, None),
        },
    ),
}

# ---------------------------------------------------------------------------------------------- Qwen3-VL-30B-A3B
# text_config: hidden 2048, 32 heads, 4 KV heads, head_dim 128 -> q 4096, k = v = 512; 48 layers, mlp_only_layers []
# and decoder_sparse_step 1 -> all MoE (modeling_qwen3_vl_moe.py:322-327): 128 experts of moe_intermediate_size 768.
QWEN3_VL_MOE = {
    ("attention", "moe"): (
        list(range(48)),
        {
            "qkv_proj": (
                2048,
                32 * 128 + 2 * 4 * 128,
                (("q_proj", 4096), ("k_proj", 512), ("v_proj", 512)),
                None,
                None,
            ),
            "o_proj": (32 * 128, 2048, None, None, None),  # 4096 -> 2048
            "experts.gate_up_proj": (2048, 2 * 768, (("gate_proj", 768), ("up_proj", 768)), True, 128),
            "experts.down_proj": (768, 2048, None, None, 128),
            "gate": (2048, 128, None, None, None),
        },
    ),
}

# ---------------------------------------------------------------------------------------------- issue 25's presets
# Seed-OSS-36B: hidden 5120, 80 heads, 8 KV heads, head_dim 128 -> q 80 * 128 = 10240 (twice hidden), k = v = 1024;
# 64 dense layers of intermediate_size 27648 (modeling_seed_oss.py: SeedOssAttention/SeedOssMLP).
SEED_OSS = {
    ("attention", "dense"): (
        list(range(64)),
        {
            "qkv_proj": (
                5120,
                80 * 128 + 2 * 8 * 128,
                (("q_proj", 10240), ("k_proj", 1024), ("v_proj", 1024)),
                None,
                None,
            ),  # 12288
            "o_proj": (80 * 128, 5120, None, None, None),  # 10240 -> 5120
            "gate_up_proj": (5120, 2 * 27648, (("gate_proj", 27648), ("up_proj", 27648)), True, None),  # 55296
            "down_proj": (27648, 5120, None, None, None),
        },
    ),
}

# Phi-3.5-MoE: hidden 4096, 32 heads, 8 KV heads, head_dim 4096 / 32 = 128 -> q 4096, k = v = 1024; 32 layers, every
# one MoE: 16 experts of intermediate_size 6400 (modeling_phimoe.py: PhimoeExperts), router [16, hidden].
PHIMOE = {
    ("attention", "moe"): (
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
            "experts.gate_up_proj": (4096, 2 * 6400, (("gate_proj", 6400), ("up_proj", 6400)), True, 16),  # 12800
            "experts.down_proj": (6400, 4096, None, None, 16),
            "gate": (4096, 16, None, None, None),
        },
    ),
}

# Mistral-Small-3.1-24B (text_config): hidden 5120, 32 heads, 8 KV heads, head_dim 128 given (not 5120 / 32 = 160)
# -> q 32 * 128 = 4096, k = v = 1024, o 4096 -> 5120; 40 dense layers of intermediate_size 32768.
MISTRAL_SMALL_31 = {
    ("attention", "dense"): (
        list(range(40)),
        {
            "qkv_proj": (
                5120,
                32 * 128 + 2 * 8 * 128,
                (("q_proj", 4096), ("k_proj", 1024), ("v_proj", 1024)),
                None,
                None,
            ),  # 6144
            "o_proj": (32 * 128, 5120, None, None, None),
            "gate_up_proj": (5120, 2 * 32768, (("gate_proj", 32768), ("up_proj", 32768)), True, None),  # 65536
            "down_proj": (32768, 5120, None, None, None),
        },
    ),
}

# ERNIE-4.5-21B-A3B: hidden 2560, 20 heads, 4 KV heads, head_dim 2560 / 20 = 128 -> q 2560, k = v = 512; 28 layers,
# moe_layer_start_index 1 .. moe_layer_end_index 27 every 1 -> layer 0 dense (intermediate_size 12288), layers 1-27
# MoE: 64 experts of moe_intermediate_size 1536, shared_experts one MLP of 2 * 1536 = 3072
# (modeling_ernie4_5_moe.py: moe_intermediate_size * moe_num_shared_experts), router gate [64, hidden].
ERNIE_ATTN = {
    "qkv_proj": (2560, 20 * 128 + 2 * 4 * 128, (("q_proj", 2560), ("k_proj", 512), ("v_proj", 512)), None, None),
    "o_proj": (20 * 128, 2560, None, None, None),
}
ERNIE45_21B = {
    ("attention", "dense"): (
        [0],
        {
            **ERNIE_ATTN,
            "gate_up_proj": (2560, 2 * 12288, (("gate_proj", 12288), ("up_proj", 12288)), True, None),  # 24576
            "down_proj": (12288, 2560, None, None, None),
        },
    ),
    ("attention", "moe"): (
        list(range(1, 28)),
        {
            **ERNIE_ATTN,
            "experts.gate_up_proj": (2560, 2 * 1536, (("gate_proj", 1536), ("up_proj", 1536)), True, 64),  # 3072
            "experts.down_proj": (1536, 2560, None, None, 64),
            "shared_experts.gate_up_proj": (2560, 2 * 3072, (("gate_proj", 3072), ("up_proj", 3072)), True, None),
            "shared_experts.down_proj": (3072, 2560, None, None, None),
            "gate": (2560, 64, None, None, None),
        },
    ),
}

# GLM-4.7-Flash: hidden 2048, 20 heads, MLA with q_lora_rank 768, kv_lora_rank 512, qk_nope 192, qk_rope 64,
# v_head 256 -> q_a 768 + kv_a 512 + 64 = 1344, q_b 20 * (192 + 64) = 5120, kv_b 20 * (192 + 256) = 8960,
# o 20 * 256 = 5120 -> 2048; layer 0 dense (intermediate_size 10240), layers 1-46 MoE: 64 experts of
# moe_intermediate_size 1536 plus 1 shared expert of 1 * 1536, router gate [64, hidden]; one MTP layer.
GLM47_ATTN = {
    "fused_qkv_a_proj_with_mqa": (2048, 768 + 512 + 64, (("q_a_proj", 768), ("kv_a_proj_with_mqa", 576)), None, None),
    "q_b_proj": (768, 20 * (192 + 64), None, None, None),  # 5120
    "kv_b_proj": (512, 20 * (192 + 256), None, None, None),  # 8960
    "o_proj": (20 * 256, 2048, None, None, None),  # 5120 -> 2048
}
GLM47_FLASH = {
    ("attention", "dense"): (
        [0],
        {
            **GLM47_ATTN,
            "gate_up_proj": (2048, 2 * 10240, (("gate_proj", 10240), ("up_proj", 10240)), True, None),  # 20480
            "down_proj": (10240, 2048, None, None, None),
        },
    ),
    ("attention", "moe"): (
        list(range(1, 47)),
        {
            **GLM47_ATTN,
            "experts.gate_up_proj": (2048, 2 * 1536, (("gate_proj", 1536), ("up_proj", 1536)), True, 64),  # 3072
            "experts.down_proj": (1536, 2048, None, None, 64),
            "shared_experts.gate_up_proj": (2048, 2 * 1536, (("gate_proj", 1536), ("up_proj", 1536)), True, None),
            "shared_experts.down_proj": (1536, 2048, None, None, None),
            "gate": (2048, 64, None, None, None),
        },
    ),
}

# ---------------------------------------------------------------------------------------------- issue 25: hybrids
# AI21-Jamba-1.5-Mini: hidden 4096, 32 heads, 8 KV heads, head_dim 4096 / 32 = 128 -> q 4096, k = v = 1024; Mamba-1
# d_inner = mamba_expand 2 * 4096 = 8192, in_proj rows x | z (2 * 8192), x_proj 8192 -> dt_rank 256 + 2 * d_state 16
# = 288, dt_proj 256 -> 8192, out_proj 8192 -> 4096 (modeling_jamba.py: JambaMambaMixer); attention where
# i % 8 == 4 (4, 12, 20, 28, all even), MoE where i % 2 == 1: 16 experts of intermediate 14336, router [16, hidden];
# the other layers a dense MLP of 14336.
JAMBA_MAMBA = {
    "in_proj": (4096, 2 * 8192, (("x", 8192), ("z", 8192)), None, None),  # 16384
    "x_proj": (8192, 256 + 2 * 16, None, None, None),  # 288
    "dt_proj": (256, 8192, None, None, None),
    "out_proj": (8192, 4096, None, None, None),
}
JAMBA_DENSE = {
    "gate_up_proj": (4096, 2 * 14336, (("gate_proj", 14336), ("up_proj", 14336)), True, None),  # 28672
    "down_proj": (14336, 4096, None, None, None),
}
JAMBA_15_MINI = {
    ("dense", "mamba"): ([0, 2, 6, 8, 10, 14, 16, 18, 22, 24, 26, 30], {**JAMBA_MAMBA, **JAMBA_DENSE}),
    ("mamba", "moe"): (
        list(range(1, 32, 2)),
        {
            **JAMBA_MAMBA,
            "experts.gate_up_proj": (4096, 2 * 14336, (("gate_proj", 14336), ("up_proj", 14336)), True, 16),
            "experts.down_proj": (14336, 4096, None, None, 16),
            "router": (4096, 16, None, None, None),
        },
    ),
    ("attention", "dense"): (
        [4, 12, 20, 28],
        {
            "qkv_proj": (
                4096,
                32 * 128 + 2 * 8 * 128,
                (("q_proj", 4096), ("k_proj", 1024), ("v_proj", 1024)),
                None,
                None,
            ),
            "o_proj": (32 * 128, 4096, None, None, None),
            **JAMBA_DENSE,
        },
    ),
}

# LFM2-8B-A1B: hidden 2048, 32 heads, 8 KV heads, head_dim 2048 / 32 = 64 -> q 2048, k = v = 512, out_proj 2048 ->
# 2048; short-conv blocks: in_proj 2048 -> 3 * 2048 (rows B | C | x), out_proj 2048 -> 2048 (modeling_lfm2_moe.py:
# Lfm2MoeShortConv); attention at layer_types 2, 6, 10, 14, 18, 21; layers 0-1 dense (num_dense_layers 2) with w1/w3 of
# intermediate 7168, the rest 32 experts of moe_intermediate 1792 and a router [32, hidden].
LFM2_CONV = {
    "in_proj": (2048, 3 * 2048, (("B", 2048), ("C", 2048), ("x", 2048)), None, None),  # 6144
    "out_proj": (2048, 2048, None, None, None),
}
LFM2_MOE_MLP = {
    "experts.gate_up_proj": (2048, 2 * 1792, (("gate_proj", 1792), ("up_proj", 1792)), True, 32),  # 3584
    "experts.down_proj": (1792, 2048, None, None, 32),
    "gate": (2048, 32, None, None, None),
}
LFM2_8B_A1B = {
    ("conv", "dense"): (
        [0, 1],
        {
            **LFM2_CONV,
            "gate_up_proj": (2048, 2 * 7168, (("w1", 7168), ("w3", 7168)), True, None),  # 14336
            "down_proj": (7168, 2048, None, None, None),
        },
    ),
    ("attention", "moe"): (
        [2, 6, 10, 14, 18, 21],
        {
            "qkv_proj": (2048, 32 * 64 + 2 * 8 * 64, (("q_proj", 2048), ("k_proj", 512), ("v_proj", 512)), None, None),
            "out_proj": (32 * 64, 2048, None, None, None),
            **LFM2_MOE_MLP,
        },
    ),
    ("conv", "moe"): (
        [i for i in range(3, 24) if i not in (6, 10, 14, 18, 21)],
        {**LFM2_CONV, **LFM2_MOE_MLP},
    ),
}

# Falcon-H1-7B-Base: every one of 44 layers holds attention, Mamba-2 and an MLP; hidden 3072, 12 heads of head_dim 128
# -> q 1536, 2 KV heads -> k = v = 256, o 1536 -> 3072; Mamba in_proj 3072 -> z d_ssm 3072 | x 3072 | B 1 * 256 | C 256
# | dt 24 heads = 6680, out_proj 3072 -> 3072 (modeling_falcon_h1.py: FalconH1Mixer); MLP of intermediate 12288.
FALCON_H1_7B = {
    ("attention", "dense", "mamba"): (
        list(range(44)),
        {
            "in_proj": (
                3072,
                3072 + 3072 + 2 * 1 * 256 + 24,
                (("z", 3072), ("x", 3072), ("B", 256), ("C", 256), ("dt", 24)),
                None,
                None,
            ),  # 6680
            "out_proj": (3072, 3072, None, None, None),
            "qkv_proj": (
                3072,
                12 * 128 + 2 * 2 * 128,
                (("q_proj", 1536), ("k_proj", 256), ("v_proj", 256)),
                None,
                None,
            ),
            "o_proj": (12 * 128, 3072, None, None, None),
            "gate_up_proj": (3072, 2 * 12288, (("gate_proj", 12288), ("up_proj", 12288)), True, None),  # 24576
            "down_proj": (12288, 3072, None, None, None),
        },
    ),
}

# Kimi-Linear-48B-A3B: hidden 2304; KDA layers (1-based kda_layers, i.e. all but 3, 7, 11, 15, 19, 23, 26 0-based):
# q/k/v 2304 -> 32 heads * 128 = 4096, b_proj -> 32, forget gate f_a 2304 -> 128, f_b 128 -> 4096, g_a / g_b the same,
# o 4096 -> 2304 (modeling_kimi_linear.py: KimiLinearDeltaAttention); MLA layers with q_lora_rank null: q_proj 2304 ->
# 32 * (128 + 64) = 6144, kv_a 2304 -> 512 + 64 = 576, kv_b 512 -> 32 * (128 + 128) = 8192, o 32 * 128 = 4096 -> 2304;
# layer 0 dense (intermediate 9216), layers 1-26 MoE: 256 experts of 1024, one shared expert of 1 * 1024, router [256].
KIMI_KDA = {
    "qkv_proj": (2304, 3 * 32 * 128, (("q_proj", 4096), ("k_proj", 4096), ("v_proj", 4096)), None, None),  # 12288
    "b_proj": (2304, 32, None, None, None),
    "forget_gate.f_a_proj": (2304, 128, None, None, None),
    "forget_gate.f_b_proj": (128, 32 * 128, None, None, None),
    "g_a_proj": (2304, 128, None, None, None),
    "g_b_proj": (128, 32 * 128, None, None, None),
    "o_proj": (32 * 128, 2304, None, None, None),
}
KIMI_MOE = {
    "experts.gate_up_proj": (2304, 2 * 1024, (("gate_proj", 1024), ("up_proj", 1024)), True, 256),  # 2048
    "experts.down_proj": (1024, 2304, None, None, 256),
    "shared_experts.gate_up_proj": (2304, 2 * 1024 * 1, (("gate_proj", 1024), ("up_proj", 1024)), True, None),
    "shared_experts.down_proj": (1024 * 1, 2304, None, None, None),
    "gate": (2304, 256, None, None, None),
}
KIMI_MLA_LAYERS = [3, 7, 11, 15, 19, 23, 26]  # full_attn_layers 4, 8, ..., 24, 27 minus one
KIMI_LINEAR_48B = {
    ("dense", "linear_attention"): (
        [0],
        {
            **KIMI_KDA,
            "gate_up_proj": (2304, 2 * 9216, (("gate_proj", 9216), ("up_proj", 9216)), True, None),  # 18432
            "down_proj": (9216, 2304, None, None, None),
        },
    ),
    ("linear_attention", "moe"): ([i for i in range(1, 27) if i not in KIMI_MLA_LAYERS], {**KIMI_KDA, **KIMI_MOE}),
    ("full_attention", "moe"): (
        KIMI_MLA_LAYERS,
        {
            "q_proj": (2304, 32 * (128 + 64), None, None, None),  # 6144
            "kv_a_proj_with_mqa": (2304, 512 + 64, None, None, None),  # 576
            "kv_b_proj": (512, 32 * (128 + 128), None, None, None),  # 8192
            "o_proj": (32 * 128, 2304, None, None, None),
            **KIMI_MOE,
        },
    ),
}

# Qwen3-Omni-30B-A3B thinker text model: hidden 2048, 32 heads, 4 KV heads, head_dim 128 -> q 4096, k = v = 512, o
# 4096 -> 2048; 48 layers, all MoE (decoder_sparse_step 1, mlp_only_layers []): 128 experts of 768, router [128, hidden]
# (modeling_qwen3_omni_moe.py: Qwen3OmniMoeThinkerTextSparseMoeBlock); the stack lives under thinker.model.
QWEN3_OMNI_THINKER = {
    ("attention", "moe"): (
        list(range(48)),
        {
            "qkv_proj": (
                2048,
                32 * 128 + 2 * 4 * 128,
                (("q_proj", 4096), ("k_proj", 512), ("v_proj", 512)),
                None,
                None,
            ),
            "o_proj": (32 * 128, 2048, None, None, None),
            "experts.gate_up_proj": (2048, 2 * 768, (("gate_proj", 768), ("up_proj", 768)), True, 128),  # 1536
            "experts.down_proj": (768, 2048, None, None, 128),
            "gate": (2048, 128, None, None, None),
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
    "deepseek-v3.2-exp": (
        "deepseek_v32",
        "model.layers",
        DEEPSEEK_V32,
        {"model.embed_tokens": (129280, 7168), "lm_head": (7168, 129280)},
    ),
    "gemma-3-1b-it": (
        "gemma3",
        "model.layers",
        GEMMA3_1B,
        {"model.embed_tokens": (262144, 1152), "lm_head": (1152, 262144)},  # this file spells out vocab 262144
    ),
    "gemma-3-4b-it": (
        "gemma3",
        "language_model.model.layers",
        GEMMA3_4B,
        {"language_model.model.embed_tokens": (262208, 2560), "language_model.lm_head": (2560, 262208)},
    ),
    "gemma-3-27b-it": (
        "gemma3",
        "language_model.model.layers",
        GEMMA3_27B,
        {"language_model.model.embed_tokens": (262208, 5376), "language_model.lm_head": (5376, 262208)},
    ),
    "glm-4-9b-0414": ("glm4", "model.layers", GLM4, {"model.embed_tokens": (151552, 4096), "lm_head": (4096, 151552)}),
    "glm-4.5-air": (
        "glm4_moe",
        "model.layers",
        GLM45_AIR,
        {"model.embed_tokens": (151552, 4096), "lm_head": (4096, 151552)},
    ),
    "glm-4.5": ("glm4_moe", "model.layers", GLM45, {"model.embed_tokens": (151552, 5120), "lm_head": (5120, 151552)}),
    "gpt-oss-20b": (
        "gpt_oss",
        "model.layers",
        GPT_OSS_20B,
        {"model.embed_tokens": (201088, 2880), "lm_head": (2880, 201088)},
    ),
    "gpt-oss-120b": (
        "gpt_oss",
        "model.layers",
        GPT_OSS_120B,
        {"model.embed_tokens": (201088, 2880), "lm_head": (2880, 201088)},
    ),
    "llama-4-maverick-17b-128e": (
        "llama4",
        "language_model.model.layers",
        LLAMA4_MAVERICK,
        {"language_model.model.embed_tokens": (202048, 5120), "language_model.lm_head": (5120, 202048)},
    ),
    "llama-4-scout-17b-16e": (
        "llama4",
        "language_model.model.layers",
        LLAMA4_SCOUT,
        {"language_model.model.embed_tokens": (202048, 5120), "language_model.lm_head": (5120, 202048)},
    ),
    "minimax-m2": (
        "minimax_m2",
        "model.layers",
        MINIMAX_M2,
        {"model.embed_tokens": (200064, 3072), "lm_head": (3072, 200064)},
    ),
    "olmoe-1b-7b-0924": (
        "olmoe",
        "model.layers",
        OLMOE,
        {"model.embed_tokens": (50304, 2048), "lm_head": (2048, 50304)},
    ),
    "phi-3-mini-4k-instruct": (
        "phi3",
        "model.layers",
        PHI3_MINI,
        {"model.embed_tokens": (32064, 3072), "lm_head": (3072, 32064)},
    ),
    "phi-4": ("phi3", "model.layers", PHI4, {"model.embed_tokens": (100352, 5120), "lm_head": (5120, 100352)}),
    "qwen2-57b-a14b": (
        "qwen2_moe",
        "model.layers",
        QWEN2_MOE,
        {"model.embed_tokens": (151936, 3584), "lm_head": (3584, 151936)},
    ),
    "qwen3-8b": (
        "qwen3",
        "model.layers",
        QWEN3_DENSE,
        {"model.embed_tokens": (151936, 4096), "lm_head": (4096, 151936)},
    ),
    "qwen3-vl-8b-instruct": (
        "qwen3_vl",
        "model.language_model.layers",
        QWEN3_DENSE,
        {"model.language_model.embed_tokens": (151936, 4096), "lm_head": (4096, 151936)},
    ),
    "qwen3-vl-30b-a3b-instruct": (
        "qwen3_vl_moe",
        "model.language_model.layers",
        QWEN3_VL_MOE,
        {"model.language_model.embed_tokens": (151936, 2048), "lm_head": (2048, 151936)},
    ),
    "seed-oss-36b-instruct": (
        "seed_oss",
        "model.layers",
        SEED_OSS,
        {"model.embed_tokens": (155136, 5120), "lm_head": (5120, 155136)},
    ),
    "phi-3.5-moe-instruct": (
        "phimoe",
        "model.layers",
        PHIMOE,
        {"model.embed_tokens": (32064, 4096), "lm_head": (4096, 32064)},
    ),
    "mistral-small-3.1-24b-instruct-2503": (
        "mistral3",
        "language_model.model.layers",
        MISTRAL_SMALL_31,
        {"language_model.model.embed_tokens": (131072, 5120), "language_model.lm_head": (5120, 131072)},
    ),
    "ernie-4.5-21b-a3b-pt": (
        "ernie4_5_moe",
        "model.layers",
        ERNIE45_21B,
        {
            "model.embed_tokens": (103424, 2560),
            "lm_head": (2560, 103424),
        },  # tie_word_embeddings true: the module is still there
    ),
    "glm-4.7-flash": (
        "glm4_moe_lite",
        "model.layers",
        GLM47_FLASH,
        {"model.embed_tokens": (154880, 2048), "lm_head": (2048, 154880)},
    ),
    "ai21-jamba-1.5-mini": (
        "jamba",
        "model.layers",
        JAMBA_15_MINI,
        {"model.embed_tokens": (65536, 4096), "lm_head": (4096, 65536)},
    ),
    "lfm2-8b-a1b": (
        "lfm2_moe",
        "model.layers",
        LFM2_8B_A1B,
        {"model.embed_tokens": (65536, 2048), "lm_head": (2048, 65536)},  # tied, the module is still listed
    ),
    "falcon-h1-7b-base": (
        "falcon_h1",
        "model.layers",
        FALCON_H1_7B,
        {"model.embed_tokens": (130048, 3072), "lm_head": (3072, 130048)},
    ),
    "kimi-linear-48b-a3b-instruct": (
        "kimi_linear",
        "model.layers",
        KIMI_LINEAR_48B,
        {"model.embed_tokens": (163840, 2304), "lm_head": (2304, 163840)},
    ),
    "qwen3-omni-30b-a3b-instruct": (
        "qwen3_omni_moe",
        "thinker.model.layers",
        QWEN3_OMNI_THINKER,
        {"thinker.model.embed_tokens": (152064, 2048), "thinker.lm_head": (2048, 152064)},
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
    assert _show("glm-4.7-flash")["mtp_layers"] == 1  # num_nextn_predict_layers: model.layers.47
    assert _show("ernie-4.5-21b-a3b-pt")["expert_count"] == 64
    assert _show("nemotron-3-super-120b-a12b")["expert_count"] == 512
    assert _show("llama-3.1-8b")["expert_count"] is None
