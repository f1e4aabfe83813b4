import dataclasses
import itertools
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_convert.io.tensor_files import read_safetensors_header
from lora_convert.peft import naming
from lora_convert.peft.naming import Factor, module_without_expert, parse_key, parse_keys


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


# ---- parse_keys: the per-template cache must give exactly what parse_key gives -----------------------------------
def _assert_same_as_parse_key(keys: list[str]) -> None:
    cached = parse_keys(keys)
    assert list(cached) == list(dict.fromkeys(keys))
    for key in keys:
        want, got = parse_key(key), cached[key]
        assert got == want, key
        # field by field with types (True == 1 and 1.0 == 1 would pass ==), and the instance dict in field order
        for f in dataclasses.fields(want):
            assert type(getattr(got, f.name)) is type(getattr(want, f.name)), (key, f.name)
        assert list(vars(got).items()) == list(vars(want).items()), key
        assert hash(got) == hash(want) and repr(got) == repr(want)


# Shapes of key, `{}` standing for a number; each is filled with several numbers so that the cache is both filled
# and used. They cover the fast path, the general parser, vision towers, adapter-name segments (numeric too),
# modules_to_save, embeddings, DoRA, lora_bias, 3-D expert wrappers, numbers outside layers/experts, leading
# zeros, several layer or expert segments, empty segments and names that are not PEFT's.
TEMPLATES = [
    "base_model.model.model.layers.{}.mlp.experts.{}.down_proj.lora_A.weight",
    "base_model.model.model.layers.{}.mlp.experts.{}.gate_proj.lora_B.weight",
    "base_model.model.model.layers.{}.self_attn.q_a_proj.lora_A.weight",
    "base_model.model.model.layers.{}.mlp.experts.base_layer.base_layer.lora_B.weight",
    "base_model.model.model.layers.{}.mlp.experts.lora_A.weight",
    "base_model.model.language_model.model.layers.{}.mlp.experts.{}.w{}.lora_A.weight",
    "base_model.model.model.layers.{}.block_sparse_moe.experts.{}.w1.lora_B.default.weight",
    "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.{}.weight",
    "base_model.model.model.layers.{}.self_attn.o_proj.lora_magnitude_vector",
    "base_model.model.model.layers.{}.self_attn.o_proj.lora_B.bias",
    "base_model.model.model.layers.{}.self_attn.o_proj.base_layer.lora_B.weight",
    "base_model.model.model.layers.{}.layers.{}.proj.lora_A.weight",
    "base_model.model.model.layers.{}.experts.{}.experts.{}.proj.lora_A.weight",
    "base_model.model.model.layers.{}.{}.proj.lora_A.weight",
    "base_model.model.model.layers.{}.mlp.experts.{}.lora_A.weight",
    "base_model.model.model.experts.{}.w1.lora_A.weight",
    "base_model.model.model.blocks.{}.attn.lora_A.weight",
    "base_model.model.model.vision_tower.encoder.layers.{}.attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.{}.mlp.merger.{}.lora_B.weight",
    "base_model.model.model.layers.{}.mlp.lora_embedding_A",
    "base_model.model.model.embed_tokens.{}.lora_embedding_B",
    "base_model.model.model.norm.{}.modules_to_save.default.weight",
    "base_model.model.model.layers.{}.norm.modules_to_save.{}.weight",
    "base_model.model.model.layers.{}.mlp.original_module.weight",
    "base_model.model.model.layers.{}.input_layernorm.bias",
    "base_model.model.lm_head.{}.weight",
    "model.layers.{}.self_attn.q_proj.lora_A.weight",
    "layers.{}.mlp.experts.{}.up_proj.lora_B.weight",
    "base_model.model.model.layers.{}.mlp.lora_A.{}.{}.weight",
    "base_model.model.model.layers.{}..q_proj.lora_A.weight",
    "base_model.model.model.layers.{}.base_layer.lora_A.weight",
    "base_model.model.model.layers.{}.mlp.lora_A.lora_B.weight",
    "base_model.model.model.layers.{}.mlp.lora_A.weight.{}.x",
    "base_model.model.model.layers.{}.mlp.lora_A",
    "base_model.model.model.layers.{}.mlp.x.weight",
    "base_model.model.model.layers.{}.mlp.{}",
    "{}.layers.{}.mlp.lora_A.weight",
    "base_model.model.{}.{}.{}.lora_B.weight",
    "base_model.model.model.layers.{}#.mlp.lora_A.weight",
    "base_model.model.model.layers.{}.w{}x.lora_A.weight",
]
NUMBERS = ["0", "7", "10", "255", "256", "007", "61", "123456789012345678901234567890"]


def test_parse_keys_equals_parse_key_on_varied_keys():
    rng = random.Random(16)
    keys = []
    for template in TEMPLATES:
        slots = template.count("{}")
        for _ in range(6):
            keys.append(template.format(*(rng.choice(NUMBERS) for _ in range(slots))))
    keys += ["", "weight", "lora_A.weight", "a..lora_A.weight", "1.2.3", ".1.", "a.1.", "a.1.b", "..", "."]
    keys.append("base_model.model.model.layers.1." + "x" * 1200 + ".q_proj.lora_A.weight")  # longer than a template
    keys.append(keys[0])  # a repeated key
    rng.shuffle(keys)
    _assert_same_as_parse_key(keys)


def test_parse_keys_equals_parse_key_on_every_fixture():
    data = Path(__file__).parent / "fixtures" / "data" / "cases"
    keys = []
    for case in sorted(data.iterdir()):
        for path in sorted((case / "adapter").glob("*.safetensors")):
            keys += list(read_safetensors_header(path)[0])
    assert len(keys) > 1000
    _assert_same_as_parse_key(keys)


_WORDS = [
    "base_model",
    "model",
    "layers",
    "experts",
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_magnitude_vector",
    "base_layer",
    "weight",
    "bias",
    "default",
    "modules_to_save",
    "original_module",
    "visual",
    "q_proj",
    "w1",
    "",
    "٣",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.lists(st.sampled_from(_WORDS) | st.integers(0, 300).map(str), min_size=1, max_size=9).map(".".join),
        min_size=1,
        max_size=40,
    )
)
@pytest.mark.slow
def test_parse_keys_equals_parse_key_on_generated_keys(keys):
    # each shape several times with other numbers, so that cached templates are reused
    more = [k.replace("1", "2").replace("3", "14") for k in keys]
    _assert_same_as_parse_key(list(itertools.chain(keys, more, keys)))


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.model.layers.3.mlp.experts.17.down_proj.lora_A.weight",
        "base_model.model.model.layers.3.self_attn.q_a_proj.lora_B.weight",
        "base_model.model.model.layers.3.mlp.experts.base_layer.lora_A.weight",
        "base_model.model.model.language_model.layers.3.mlp.experts.17.w1.lora_A.default.weight",
    ],
)
def test_common_shapes_are_cached(key):
    """The shapes of large adapters get a recipe (else parse_keys silently falls back to parse_key per key)."""
    assert naming._make_recipe(key, naming._NUMBER_SEGMENT.split(key)) is not None
