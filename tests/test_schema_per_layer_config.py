"""Per-layer head dims read from either config form: a Hub config (`global_head_dim`, `num_global_key_value_heads`)
and the `per_layer_config` overrides transformers 5.23 writes instead, for the Gemma-4 fixtures' bases.

The fixture bases hold the transformers-5.23 form (their config.json is what `save_pretrained` wrote), which the
PEFT-written adapters check (tests/test_shape_check.py). The Hub form is rebuilt from it here, as the released
checkpoints write it, and must place every module at the same widths on every layer.
"""

from __future__ import annotations

import copy
import json

import pytest

from helpers import FIXTURES
from lora_convert.arch.schema import bind

BASES = ["v5_gemma4_text", "v5_gemma4_moe", "v5_gemma4", "v5_gemma4_unified_text", "v5_gemma4_unified"]


def _text(config: dict) -> dict:
    return config.get("text_config") or config


def _hub_form(config: dict) -> dict:
    """The config as a Hub checkpoint writes it: the full layers' overrides as the two global fields."""
    hub = copy.deepcopy(config)
    text = _text(hub)
    overrides = text.pop("per_layer_config")
    last = overrides[str(text["num_hidden_layers"] - 1)]
    text["global_head_dim"] = last["head_dim"]
    if "num_key_value_heads" in last:
        assert text["attention_k_eq_v"], "transformers overrides the KV heads only with attention_k_eq_v"
        text["num_global_key_value_heads"] = last["num_key_value_heads"]
    return hub


def _widths(config: dict) -> list[list[tuple]]:
    arch = bind(config)
    return [
        sorted(
            (g.local_path, g.in_features, tuple((s.name, s.out_features) for s in g.slices)) for g in arch.groups(layer)
        )
        for layer in range(arch.num_layers)
    ]


@pytest.mark.parametrize("base", BASES)
def test_hub_form_and_per_layer_config_place_modules_alike(base):
    config = json.loads((FIXTURES / "bases" / base / "config.json").read_text())
    assert _text(config)["per_layer_config"], "the fixture base should hold transformers 5.23's per_layer_config"
    saved, hub = _widths(config), _widths(_hub_form(config))
    assert saved == hub
    # the full layers are wider than the sliding ones (global_head_dim 32 against head_dim 16)
    layer_types = _text(config)["layer_types"]
    o_in = {t: {w[1] for w in saved[i] if w[0] == "self_attn.o_proj"} for i, t in enumerate(layer_types)}
    assert o_in["sliding_attention"] == {64} and o_in["full_attention"] == {128}


def test_hub_form_without_global_fields_takes_the_config_class_defaults():
    """A Hub config that leaves global_head_dim out gets Gemma4TextConfig's 512 (transformers==5.23.0
    configuration_gemma4.py:171), and without attention_k_eq_v the full layers keep num_key_value_heads."""
    config = _hub_form(json.loads((FIXTURES / "bases" / "v5_gemma4_text" / "config.json").read_text()))
    del config["global_head_dim"]
    arch = bind(config)
    full = next(i for i, t in enumerate(config["layer_types"]) if t == "full_attention")
    qkv = next(g for g in arch.groups(full) if g.local_path == "self_attn.qkv_proj")
    assert [(s.name, s.out_features) for s in qkv.slices] == [
        ("q_proj", 4 * 512),
        ("k_proj", 2 * 512),
        ("v_proj", 2 * 512),
    ]
