"""Schema loading (strict), matching, binding and module resolution across naming variants."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time

import pytest

import lora_convert.arch.schema_loader as schema_module  # where the schema files are listed
from lora_convert.arch.base_config import resolve_base
from lora_convert.arch.schema import (
    Architecture,
    bind,
    list_schemas,
    load_schema,
    parse_schema,
    schema_for_config,
)
from lora_convert.errors import BaseConfigError, SchemaError
from lora_convert.peft.adapter import LoraModule
from lora_convert.peft.naming import parse_key

FAMILIES = sorted(
    [
        "deepseek_v3",
        "kimi_k25",
        "llama",
        "mixtral",
        "nemotron_h",
        "qwen3_5",
        "qwen3_5_moe",
        "qwen3_moe",
        "qwen3_next",
        # issue 14
        "qwen3",
        "gemma3",
        "phi3",
        "glm4",
        "gpt_oss",
        "glm4_moe",
        "llama4",
        "qwen2_moe",
        "olmoe",
        "granitemoe",
        "granitemoehybrid",
        "minimax",
        "minimax_m2",
        "deepseek_v32",
        "qwen3_vl",
        "qwen3_vl_moe",
        # issue 25
        "mistral3",
        "olmo3",
        "seed_oss",
        "dots1",
        "exaone_moe",
        "ernie4_5_moe",
        "phimoe",
        "glm4_moe_lite",
        "glm_moe_dsa",
        "mistral4",
        "mistral_large4",
        "deepseek_v4",
        "qwen3_omni_moe",
        "kimi_linear",
        "hy_v3",
        "bailing_hybrid",
        "gemma4",
        "lfm2_moe",
        "falcon_h1",
        "jamba",
        "olmo_hybrid",
        "longcat_flash",
    ]
)


def module(path: str, *, param: str | None = None) -> LoraModule:
    """A LoraModule as adapter.py builds it from `base_model.model.<path>.lora_A.weight`."""
    p = parse_key(f"base_model.model.{path}.lora_A.weight")
    kind = "fused_experts" if p.is_fused_experts else "linear"
    local = f"{p.local_name}.{param}" if param else p.local_name
    return LoraModule(
        module=p.module,
        kind=kind,
        target_name=p.module,
        param=param,
        layer=p.layer,
        expert=p.expert,
        local_name=local,
        stack_prefix=p.stack_prefix,
        is_vision=p.is_vision,
    )


# ----------------------------------------------------------------------------------------------- loading
def test_every_family_ships_and_loads():
    assert list_schemas() == FAMILIES
    for family in FAMILIES:
        s = load_schema(family)
        assert s.family == family and s.file == f"schemas/{family}.json"


MINIMAL = {
    "family": "toy",
    "match": {"model_type": ["toy"]},
    "num_layers": "num_hidden_layers",
    "checkpoint_prefix": "model.layers",
    "stack_prefixes": ["model.layers"],
    "layer_types": {"attention": "True"},
    "tp_head_counts": [{"count": "num_attention_heads", "groups": ["self_attn.qkv_proj"]}],
    "groups": [
        {
            "path": "self_attn.qkv_proj",
            "kind": "attention",
            "tp": "heads",
            "on": ["attention"],
            "in": "hidden_size",
            "slices": [
                {"name": "q_proj", "out": "hidden_size", "aliases": ["self_attn.q_proj"]},
                {"name": "v_proj", "out": "hidden_size // 2", "aliases": ["self_attn.v_proj"]},
            ],
            "merged": [{"name": "qkv_proj", "slices": ["q_proj", "v_proj"], "aliases": ["self_attn.qkv_proj"]}],
        },
    ],
}


_LM_HEAD = {
    "path": "lm_head",
    "kind": "lm_head",
    "tp": "replicated",
    "in": "hidden_size",
    "slices": [{"name": "lm_head", "out": "vocab_size", "aliases": ["lm_head"]}],
}


def _mutated(edit):
    data = copy.deepcopy(MINIMAL)
    edit(data)
    return data


@pytest.mark.parametrize(
    "edit, where",
    [
        (lambda d: d.update(colour="red"), "top level: unknown key 'colour'"),
        (lambda d: d["groups"][0].update(outt="x"), "groups[0] (self_attn.qkv_proj): unknown key 'outt'"),
        (lambda d: d["groups"][0]["slices"][1].update(alias=["x"]), "slices[1]: unknown key 'alias'"),
        (lambda d: d["groups"][0]["merged"][0].update(extra=1), "merged[0]: unknown key 'extra'"),
        (lambda d: d["match"].update(model_types=["toy"]), "match: unknown key 'model_types'"),
        (lambda d: d.pop("num_layers"), "missing required key 'num_layers'"),
        (lambda d: d["groups"][0]["slices"][0].update(out="hidden_size +"), "slices[0].out: Expression"),
        (lambda d: d["groups"][0].update({"in": "__import__('os')"}), ".in: Expression"),
        (lambda d: d["layer_types"].update(attention="config.x"), "layer_types.attention: Expression"),
        (
            lambda d: d["groups"][0].update(kind="ffn"),
            (
                "groups[0] (self_attn.qkv_proj).kind: expected one of attention, embedding, latent, linear_attention,"
                " lm_head, mamba, mla, mlp, routed_experts, router, shared_expert, got string 'ffn'"
            ),
        ),
        (lambda d: d["groups"][0].update(on=["moe"]), "layer type 'moe' is not declared"),
        (lambda d: d["groups"][0]["merged"][0].update(slices=["q_proj", "k_proj"]), "names slice 'k_proj'"),
        (lambda d: d["groups"][0].update(experts=True), "only groups of kind routed_experts"),
        (lambda d: d["groups"][0]["slices"][1].update(aliases=["self_attn.q_proj"]), "listed twice"),
        (lambda d: d.update(family="other"), "the file is named toy.json"),
        (lambda d: d.update(match={}), "needs at least one model_type"),
        (lambda d: d.update(groups=[]), "groups: expected a non-empty list"),
        (lambda d: d["groups"][0].update(gated="yes"), "gated: expected true or false, got string 'yes'"),
        (lambda d: d.update(_note=3), "schemas/toy.json: _note: expected a string, got number 3"),
        # the tensor-parallel vocabulary: every group says how TP splits it, head counts name real groups
        (lambda d: d["groups"][0].pop("tp"), "groups[0] (self_attn.qkv_proj): missing required key 'tp'"),
        (
            lambda d: d["groups"][0].update(tp="diagonal"),
            ".tp: expected one of column, row, replicated, heads, got string 'diagonal'",
        ),
        (lambda d: d["groups"][0].update(tp=None), ".tp: expected one of column, row, replicated, heads, got null"),
        (lambda d: d.pop("tp_head_counts"), "missing required key 'tp_head_counts' (groups split by heads"),
        (lambda d: d.update(tp_head_counts={}), "tp_head_counts: expected a list"),
        (lambda d: d["tp_head_counts"][0].update(heads=1), "tp_head_counts[0]: unknown key 'heads'"),
        (lambda d: d["tp_head_counts"][0].pop("groups"), "tp_head_counts[0]: missing required key 'groups'"),
        (lambda d: d["tp_head_counts"][0].update(groups=[]), "tp_head_counts[0].groups: expected a non-empty list"),
        (lambda d: d["tp_head_counts"][0].update(groups=["self_attn.o_proj"]), "names group 'self_attn.o_proj'"),
        (lambda d: d["tp_head_counts"][0].update(slices=["k_proj"]), "names slice 'k_proj', which none of its"),
        (lambda d: d["tp_head_counts"][0].update(count="heads +"), "tp_head_counts[0].count: Expression"),
        (lambda d: d["tp_head_counts"][0].update(may_replicate="yes"), "may_replicate: expected true or false"),
        (lambda d: d.update(tp_head_counts=[]), "no count covers group 'self_attn.qkv_proj'"),
        (lambda d: d.update(top_level=[{**_LM_HEAD, "tp": "heads"}]), "only per-layer groups that are not routed"),
        (
            lambda d: d["groups"][0].update(kind="routed_experts", experts=True),
            "only per-layer groups that are not routed experts can be split by heads",
        ),
    ],
)
def test_strict_loading_names_file_and_key(edit, where):
    with pytest.raises(SchemaError) as exc:
        parse_schema(_mutated(edit), "toy", "schemas/toy.json")
    assert "schemas/toy.json" in exc.value.message
    assert where in exc.value.message


def test_note_keys_are_allowed_everywhere():
    data = _mutated(
        lambda d: (d.update(_note="n"), d["groups"][0].update(_note="n"), d["groups"][0]["slices"][0].update(_note="n"))
    )
    assert parse_schema(data, "toy").note == "n"


@pytest.fixture
def extra_schema_dir(tmp_path, monkeypatch):
    """Make load_schema see the shipped files plus whatever the test writes into tmp_path."""
    shipped = schema_module._schema_files()

    def files():
        found = dict(shipped)
        found.update({p.stem: p for p in tmp_path.glob("*.json")})
        return found

    monkeypatch.setattr(schema_module, "_schema_files", files)
    load_schema.cache_clear()
    yield tmp_path
    load_schema.cache_clear()


def test_load_schema_reports_unknown_key_and_bad_json(extra_schema_dir):
    (extra_schema_dir / "toy.json").write_text(json.dumps({**MINIMAL, "layer_typez": {}}))
    with pytest.raises(SchemaError, match=r"schemas/toy.json: top level: unknown key 'layer_typez'"):
        load_schema("toy")
    (extra_schema_dir / "broken.json").write_text("{not json")
    with pytest.raises(SchemaError, match="schemas/broken.json is not valid JSON"):
        load_schema("broken")
    with pytest.raises(SchemaError, match="No schema named 'nope'"):
        load_schema("nope")


def test_a_new_family_needs_only_a_json_file(extra_schema_dir):
    (extra_schema_dir / "toy.json").write_text(json.dumps(MINIMAL))
    arch = bind({"model_type": "toy", "num_hidden_layers": 2, "hidden_size": 64})
    assert arch.family == "toy" and arch.num_layers == 2
    match = arch.resolve(module("model.layers.1.self_attn.v_proj"))
    assert (match.group.path, match.slice_indices, match.expected_in, match.expected_out) == (
        "model.layers.1.self_attn.qkv_proj",
        (1,),
        64,
        32,
    )
    merged = arch.resolve(module("model.layers.0.self_attn.qkv_proj"))
    assert merged.slice_indices == (0, 1) and merged.expected_out == 96 and merged.canonical == "qkv_proj"


# ---------------------------------------------------------------------------------------------- matching
@pytest.mark.parametrize(
    "config, family",
    [
        ({"model_type": "deepseek_v2"}, "deepseek_v3"),
        ({"model_type": "kimi_k2"}, "deepseek_v3"),
        ({"model_type": "custom", "architectures": ["MixtralForCausalLM"]}, "mixtral"),
        ({"model_type": "qwen2"}, "llama"),
        ({"model_type": "mistral"}, "llama"),
        ({"model_type": "qwen3_5_moe_text"}, "qwen3_5_moe"),
        ({"model_type": "kimi_k25", "text_config": {"model_type": "deepseek_v3"}}, "kimi_k25"),
        ({"model_type": "wrapper", "text_config": {"model_type": "qwen3_next"}}, "qwen3_next"),
    ],
)
def test_schema_for_config(config, family):
    assert schema_for_config(config).family == family


def test_no_schema_is_a_base_config_error():
    with pytest.raises(BaseConfigError, match="No schema matches model_type 'gpt2'"):
        schema_for_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_config_missing_a_needed_field_is_a_base_config_error():
    with pytest.raises(BaseConfigError, match="schema llama .*missing \\(None\\) field\\(s\\): intermediate_size"):
        bind({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4})
    with pytest.raises(BaseConfigError, match="positive integer"):
        bind(
            {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "intermediate_size": -3,
                "vocab_size": 10,
            }
        )


# ------------------------------------------------------------------------------------ resolving names
@pytest.fixture(scope="module")
def presets() -> dict[str, Architecture]:
    names = [
        "deepseek-v3",
        "kimi-k2.5",
        "mixtral-8x7b",
        "nemotron-3-super-120b-a12b",
        "qwen3.5-27b",
        "qwen3-next-80b-a3b",
        "qwen3-30b-a3b",
        "llama-3.1-8b",
    ]
    return {n: bind(resolve_base(n)) for n in names}


@pytest.mark.parametrize(
    "preset, path, param, group_path, slices, canonical, expert, shape",
    [
        # Mixtral: transformers 4 (block_sparse_moe, w1/w3/w2), transformers 5 (mlp., 3-D), Hub names.
        (
            "mixtral-8x7b",
            "model.layers.3.block_sparse_moe.experts.5.w1",
            None,
            "model.layers.3.block_sparse_moe.experts.gate_up_proj",
            (0,),
            "experts.gate_proj",
            5,
            (4096, 14336),
        ),
        (
            "mixtral-8x7b",
            "model.layers.3.block_sparse_moe.experts.5.w3",
            None,
            "model.layers.3.block_sparse_moe.experts.gate_up_proj",
            (1,),
            "experts.up_proj",
            5,
            (4096, 14336),
        ),
        (
            "mixtral-8x7b",
            "model.layers.3.block_sparse_moe.experts.5.w2",
            None,
            "model.layers.3.block_sparse_moe.experts.down_proj",
            (0,),
            "experts.down_proj",
            5,
            (14336, 4096),
        ),
        (
            "mixtral-8x7b",
            "model.layers.3.mlp.experts",
            "gate_up_proj",
            "model.layers.3.block_sparse_moe.experts.gate_up_proj",
            (0, 1),
            "experts.gate_up_proj",
            None,
            (4096, 28672),
        ),
        (
            "mixtral-8x7b",
            "model.layers.3.mlp.gate",
            None,
            "model.layers.3.block_sparse_moe.gate",
            (0,),
            "gate",
            None,
            (4096, 8),
        ),
        (
            "mixtral-8x7b",
            "model.layers.3.block_sparse_moe.gate",
            None,
            "model.layers.3.block_sparse_moe.gate",
            (0,),
            "gate",
            None,
            (4096, 8),
        ),
        # DeepSeek-V3: q_a_proj and kv_a_proj_with_mqa are slices of the fused MLA down-projection.
        (
            "deepseek-v3",
            "model.layers.0.self_attn.q_a_proj",
            None,
            "model.layers.0.self_attn.fused_qkv_a_proj_with_mqa",
            (0,),
            "q_a_proj",
            None,
            (7168, 1536),
        ),
        (
            "deepseek-v3",
            "model.layers.0.self_attn.kv_a_proj_with_mqa",
            None,
            "model.layers.0.self_attn.fused_qkv_a_proj_with_mqa",
            (1,),
            "kv_a_proj_with_mqa",
            None,
            (7168, 576),
        ),
        (
            "deepseek-v3",
            "model.layers.5.mlp.shared_experts.up_proj",
            None,
            "model.layers.5.mlp.shared_experts.gate_up_proj",
            (1,),
            "shared_experts.up_proj",
            None,
            (7168, 2048),
        ),
        (
            "deepseek-v3",
            "model.layers.5.mlp.experts.255.down_proj",
            None,
            "model.layers.5.mlp.experts.down_proj",
            (0,),
            "experts.down_proj",
            255,
            (2048, 7168),
        ),
        # Kimi-K2.5: remote-code/Hub `language_model.model.` and transformers 5 `model.language_model.`.
        (
            "kimi-k2.5",
            "language_model.model.layers.2.self_attn.q_a_proj",
            None,
            "language_model.model.layers.2.self_attn.fused_qkv_a_proj_with_mqa",
            (0,),
            "q_a_proj",
            None,
            (7168, 1536),
        ),
        (
            "kimi-k2.5",
            "model.language_model.layers.2.mlp.experts",
            "gate_up_proj",
            "language_model.model.layers.2.mlp.experts.gate_up_proj",
            (0, 1),
            "experts.gate_up_proj",
            None,
            (7168, 4096),
        ),
        (
            "kimi-k2.5",
            "model.language_model.embed_tokens",
            None,
            "language_model.model.embed_tokens",
            (0,),
            "embed_tokens",
            None,
            (163840, 7168),
        ),
        ("kimi-k2.5", "lm_head", None, "language_model.lm_head", (0,), "lm_head", None, (7168, 163840)),
        # Nemotron-H: Hub/remote `backbone.` and transformers 5 `model.`; non-gated experts.
        (
            "nemotron-3-super-120b-a12b",
            "backbone.layers.1.mixer.experts.7.up_proj",
            None,
            "backbone.layers.1.mixer.experts.up_proj",
            (0,),
            "experts.up_proj",
            7,
            (1024, 2688),
        ),
        (
            "nemotron-3-super-120b-a12b",
            "model.layers.1.mixer.experts",
            "up_proj",
            "backbone.layers.1.mixer.experts.up_proj",
            (0,),
            "experts.up_proj",
            None,
            (1024, 2688),
        ),
        (
            "nemotron-3-super-120b-a12b",
            "model.layers.0.mixer.in_proj",
            None,
            "backbone.layers.0.mixer.in_proj",
            (0, 1, 2, 3, 4),
            "in_proj",
            None,
            (4096, 18560),
        ),
        (
            "nemotron-3-super-120b-a12b",
            "backbone.layers.1.mixer.fc1_latent_proj",
            None,
            "backbone.layers.1.mixer.fc1_latent_proj",
            (0,),
            "fc1_latent_proj",
            None,
            (4096, 1024),
        ),
        (
            "nemotron-3-super-120b-a12b",
            "model.embeddings",
            None,
            "backbone.embeddings",
            (0,),
            "embeddings",
            None,
            (131072, 4096),
        ),
        # Qwen3.5 VL: split GDN projections map onto the fused in_proj_qkvz / in_proj_ba slices.
        (
            "qwen3.5-27b",
            "model.language_model.layers.0.linear_attn.in_proj_qkv",
            None,
            "model.language_model.layers.0.linear_attn.in_proj_qkvz",
            (0, 1, 2),
            "in_proj_qkv",
            None,
            (5120, 10240),
        ),
        (
            "qwen3.5-27b",
            "model.layers.0.linear_attn.in_proj_z",
            None,
            "model.language_model.layers.0.linear_attn.in_proj_qkvz",
            (3,),
            "z",
            None,
            (5120, 6144),
        ),
        (
            "qwen3.5-27b",
            "model.layers.0.linear_attn.in_proj_a",
            None,
            "model.language_model.layers.0.linear_attn.in_proj_ba",
            (1,),
            "a",
            None,
            (5120, 48),
        ),
        (
            "qwen3.5-27b",
            "model.language_model.layers.3.self_attn.q_proj",
            None,
            "model.language_model.layers.3.self_attn.qkv_proj",
            (0,),
            "q_proj",
            None,
            (5120, 12288),
        ),
        # Qwen3-Next: the pre-merged, head-interleaved in_proj_qkvz is one whole slice.
        (
            "qwen3-next-80b-a3b",
            "model.layers.0.linear_attn.in_proj_qkvz",
            None,
            "model.layers.0.linear_attn.in_proj_qkvz",
            (0,),
            "in_proj_qkvz",
            None,
            (2048, 12288),
        ),
        (
            "qwen3-next-80b-a3b",
            "model.layers.0.mlp.shared_expert_gate",
            None,
            "model.layers.0.mlp.shared_expert_gate",
            (0,),
            "shared_expert_gate",
            None,
            (2048, 1),
        ),
        (
            "llama-3.1-8b",
            "model.layers.31.self_attn.qkv_proj",
            None,
            "model.layers.31.self_attn.qkv_proj",
            (0, 1, 2),
            "qkv_proj",
            None,
            (4096, 6144),
        ),
    ],
)
def test_resolve(presets, preset, path, param, group_path, slices, canonical, expert, shape):
    match = presets[preset].resolve(module(path, param=param))
    assert match is not None, path
    assert match.group.path == group_path
    assert match.slice_indices == slices
    assert match.canonical == canonical
    assert match.expert == expert
    assert (match.expected_in, match.expected_out) == shape


@pytest.mark.parametrize(
    "preset, path, status, detail",
    [
        ("deepseek-v3", "model.layers.61.self_attn.q_a_proj", "past-end", ""),
        ("deepseek-v3", "model.layers.0.mlp.experts.1.gate_proj", "experts-on-dense", "moe"),
        ("deepseek-v3", "model.layers.3.mlp.gate_proj", "not-on-layer-type", "dense"),
        ("deepseek-v3", "model.layers.3.self_attn.q_proj", "unknown", "only when `not q_lora_rank`"),
        ("deepseek-v3", "model.layers.3.self_attn.qkv_proj", "unknown", "not a module name"),
        ("deepseek-v3", "transformer.h.3.attn.c_attn", "unknown", "not a module"),
        ("deepseek-v3", "decoder.layers.3.self_attn.q_a_proj", "unknown-prefix", "decoder.layers"),
        ("qwen3-next-80b-a3b", "model.layers.0.self_attn.q_proj", "not-on-layer-type", "attention"),
        ("qwen3-next-80b-a3b", "mtp.layers.0.self_attn.q_proj", "mtp", "MTP"),
        ("kimi-k2.5", "model.vision_tower.encoder.blocks.0.wqkv", "vision", ""),
        ("kimi-k2.5", "mm_projector.proj.0", "vision", ""),
        ("nemotron-3-super-120b-a12b", "backbone.layers.0.mixer.q_proj", "not-on-layer-type", "attention"),
        ("nemotron-3-super-120b-a12b", "backbone.layers.0.mixer.experts.0.up_proj", "experts-on-dense", "moe"),
    ],
)
def test_locate_explains_misses(presets, preset, path, status, detail):
    loc = presets[preset].locate(module(path))
    assert loc.status == status
    assert detail in loc.detail
    assert presets[preset].resolve(module(path)) is None


def test_expert_index_on_a_non_expert_module_is_unknown(presets):
    m = module("model.layers.5.mlp.shared_experts.up_proj")
    m.expert = 3
    assert presets["deepseek-v3"].locate(m).status == "unknown"


def test_groups_paths_offsets_and_layer_types(presets):
    ds = presets["deepseek-v3"]
    assert ds.layer_types(0) == {"attention", "dense"} and ds.layer_types(3) == {"attention", "moe"}
    assert ds.layer_types(61) == {"attention", "moe"}  # the MTP layer evaluates like a MoE layer
    fused = ds.groups(3)[0]
    assert fused.path == "model.layers.3.self_attn.fused_qkv_a_proj_with_mqa" and fused.slice_offsets() == [0, 1536]
    assert fused.out_features == 2112 and fused.local_path == "self_attn.fused_qkv_a_proj_with_mqa"
    assert ds.groups(3) is ds.groups(3)  # cached
    with pytest.raises(ValueError):
        ds.groups(61)
    nem = presets["nemotron-3-super-120b-a12b"]
    assert nem.layer_types(0) == {"mamba"} and nem.layer_types(1) == {"moe"} and nem.layer_types(7) == {"attention"}
    assert nem.checkpoint_prefix == "backbone.layers" and nem.mtp_layers == 1
    in_proj = nem.groups(0)[0]
    assert [s.name for s in in_proj.slices] == ["z", "x", "B", "C", "dt"]
    assert in_proj.slice_offsets() == [0, 8192, 16384, 17408, 18432]
    assert presets["kimi-k2.5"].checkpoint_prefix == "language_model.model.layers"
    assert presets["qwen3.5-27b"].checkpoint_prefix == "model.language_model.layers"


def test_deepseek_without_q_lora_rank(presets):
    # DeepSeek-V2-Lite geometry: q_lora_rank null -> q_proj and a lone kv_a_proj_with_mqa.
    cfg = dict(
        resolve_base("deepseek-v3").config,
        q_lora_rank=None,
        model_type="deepseek_v2",
        architectures=["DeepseekV2ForCausalLM"],
    )
    arch = bind(cfg)
    names = [g.name for g in arch.groups(0)]
    assert names[:4] == ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    kv = arch.resolve(module("model.layers.0.self_attn.kv_a_proj_with_mqa"))
    assert kv.group.name == "kv_a_proj_with_mqa" and len(kv.group.slices) == 1 and kv.expected_out == 512 + 64
    q = arch.resolve(module("model.layers.0.self_attn.q_proj"))
    assert q.expected_out == 128 * (128 + 64) and q.expected_in == 7168
    assert arch.locate(module("model.layers.0.self_attn.q_a_proj")).status == "unknown"


def test_nemotron_without_latent_and_with_legacy_pattern():
    cfg = dict(resolve_base("nemotron-3-super-120b-a12b").config, moe_latent_size=None, hybrid_override_pattern="M*-E")
    cfg.pop("num_hidden_layers")
    arch = bind(cfg)
    assert arch.num_layers == 4
    assert [sorted(arch.layer_types(i)) for i in range(4)] == [["mamba"], ["attention"], ["dense"], ["moe"]]
    names = [g.name for g in arch.groups(3)]
    assert "fc1_latent_proj" not in names and "fc2_latent_proj" not in names
    up = next(g for g in arch.groups(3) if g.name == "experts.up_proj")
    assert up.in_features == 4096 and up.gated is False  # no latent: experts work at hidden size
    dense = [g.name for g in arch.groups(2)]
    assert dense == ["up_proj", "down_proj"]


def test_bind_takes_a_dict_or_an_explicit_schema():
    cfg = resolve_base("llama-3.1-8b").config
    assert bind(cfg).family == "llama"
    assert bind(cfg, schema="llama").family == "llama"
    with pytest.raises(TypeError):
        bind(["not", "a", "config"])  # type: ignore[arg-type]


@pytest.mark.slow
def test_resolve_is_constant_time_for_100k_modules(presets):
    arch = presets["deepseek-v3"]
    mods = []
    for layer in range(3, 61):
        for e in range(256):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                mods.append(
                    LoraModule(
                        module=f"model.layers.{layer}.mlp.experts.{e}.{proj}",
                        kind="linear",
                        target_name="",
                        layer=layer,
                        expert=e,
                        local_name=f"mlp.experts.{proj}",
                        stack_prefix="model",
                    )
                )
    assert len(mods) > 44_000
    start = time.perf_counter()
    for _ in range(2):
        for m in mods:
            assert arch.resolve(m) is not None
    assert time.perf_counter() - start < 3.0


def test_schema_modules_do_not_import_torch():
    code = (
        "import sys; import lora_convert.arch.schema, lora_convert.arch.expr, lora_convert.arch.base_config as b;"
        "from lora_convert.arch.schema import bind; bind(b.resolve_base('deepseek-v3'));"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_wrapper_around_a_known_text_model_is_unwrapped():
    text = resolve_base("qwen3-next-80b-a3b").config
    arch = bind({"model_type": "some_vl_wrapper", "text_config": text})
    assert arch.family == "qwen3_next" and arch.num_layers == 48 and arch.wrapped


def test_shared_expert_count_is_an_optional_expression_validated_like_the_others():
    assert (
        parse_schema(_mutated(lambda d: d.update(shared_expert_count="n_shared or 0")), "toy").shared_expert_count
        == "n_shared or 0"
    )
    assert parse_schema(MINIMAL, "toy").shared_expert_count is None
    with pytest.raises(SchemaError, match=r"shared_expert_count: .*"):
        parse_schema(_mutated(lambda d: d.update(shared_expert_count="n.shared")), "toy")
    with pytest.raises(SchemaError, match="shared_expert_count"):
        parse_schema(_mutated(lambda d: d.update(shared_expert_count=True)), "toy")


def test_experts_gated_comes_from_the_schema():
    assert bind(resolve_base("deepseek-v3")).experts_gated() is True
    nemotron = bind(resolve_base("nemotron-3-super-120b-a12b"))
    dense_layer = next(i for i in range(nemotron.num_layers) if "moe" not in nemotron.layer_types(i))
    # non-gated experts (up/down only): at a MoE layer, and family-wide where a layer has no experts
    assert nemotron.experts_gated() is False and nemotron.experts_gated(dense_layer) is False
    assert (
        bind(
            {
                "model_type": "llama",
                "num_hidden_layers": 1,
                "hidden_size": 8,
                "num_attention_heads": 2,
                "intermediate_size": 16,
                "vocab_size": 32,
            }
        ).experts_gated()
        is None
    )


def test_tp_head_counts_bind_to_the_config_and_the_source_names_they_cover():
    data = _mutated(
        lambda d: d["tp_head_counts"].append(
            {
                "count": "num_key_value_heads",
                "groups": ["self_attn.qkv_proj"],
                "slices": ["v_proj"],
                "may_replicate": True,
            }
        )
    )
    schema = parse_schema(data, "toy")
    assert [g.tp for g in schema.groups] == ["heads"]
    assert schema.describe()["tp_head_counts"][1] == {
        "count": "num_key_value_heads",
        "groups": ["self_attn.qkv_proj"],
        "slices": ["v_proj"],
        "may_replicate": True,
    }
    config = {"model_type": "toy", "num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 4}
    heads, kv = bind({**config, "num_key_value_heads": 2}, schema=schema).tp_head_counts()
    assert (heads.label, heads.value, heads.may_replicate) == ("num_attention_heads", 4, False)
    assert heads.sources == {"self_attn.q_proj", "self_attn.v_proj", "self_attn.qkv_proj"}
    assert (kv.label, kv.value, kv.sources) == ("num_key_value_heads", 2, {"self_attn.v_proj", "self_attn.qkv_proj"})
    assert kv.fits(4) and kv.fits(1) and not kv.fits(3) and not heads.fits(8)
    # a count the config does not give is left out: nothing to divide
    assert [h.label for h in bind(config, schema=schema).tp_head_counts()] == ["num_attention_heads"]


def test_a_schema_without_head_split_groups_needs_no_tp_head_counts():
    def edit(d):
        d["groups"][0]["tp"] = "column"
        del d["tp_head_counts"]

    assert parse_schema(_mutated(edit), "toy").tp_head_counts == ()
