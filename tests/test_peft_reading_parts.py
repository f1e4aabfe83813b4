"""The parts of reading an adapter that other stages reuse, and the fast paths of peft/ against their plain oracles.

- `config_error` is the error `load_adapter(strict_config=True)` raises for an invalid adapter_config.json.
- Which codes describe PEFT's per-module layout (and so say nothing about a stacked output) is a property of the
  codes registry.
- `parse_keys` (templates parsed once) equals `parse_key` key by key (tests/test_naming.py holds the key sets;
  here hypothesis builds keys from the grammar's own pieces).
- `group_modules` fills the common module (a 2-D pair whose ranks agree) without the general shape checks; on
  generated modules it gives what the general path gives.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_convert import codes
from lora_convert.errors import AdapterConfigError
from lora_convert.io.tensor_files import TensorIndex, TensorInfo
from lora_convert.peft import adapter as adapter_module
from lora_convert.peft.adapter import config_error, group_modules, load_adapter
from lora_convert.peft.config import load_config_file, parse_config
from lora_convert.peft.naming import parse_key, parse_keys

GOOD = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}


# ---- config_error ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, message, hint",
    [
        (
            {"r": "8"},
            'has 1 problem(s): adapter_config.json: `r` should be a positive integer, got "8" (a string).',
            "Fix `r` in adapter_config.json. Fix adapter_config.json (`lora-convert validate` lists every problem).",
        ),
        (
            {"r": 0, "lora_alpha": "x"},
            "has 2 problem(s): ",
            "Fix adapter_config.json (`lora-convert validate` lists every problem).",
        ),
    ],
)
def test_config_error_is_what_strict_loading_raises(tmp_path, changes, message, hint):
    folder = tmp_path / "ad"
    folder.mkdir()
    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps({**GOOD, **changes}))
    with pytest.raises(AdapterConfigError) as raised:
        load_adapter(folder)
    error = config_error(load_config_file(config_path), config_path)
    assert isinstance(error, AdapterConfigError)
    assert (error.message, error.hint) == (raised.value.message, raised.value.hint)
    assert error.message.startswith(f"{config_path} {message}")
    assert error.hint == hint


def test_config_error_is_none_for_a_valid_config(tmp_path):
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps(GOOD))
    assert config_error(load_config_file(config_path), config_path) is None


# ---- the codes that describe PEFT's per-module layout ---------------------------------------------------------
def test_peft_layout_codes_are_a_property_of_the_registry():
    expected = {"shapes.not-2d", "rank.config-mismatch", "rank.fused-experts", "rank.a-b-mismatch"}
    assert {c.code for c in codes.REGISTRY.values() if c.peft_layout} == expected
    assert frozenset(expected) == codes.PEFT_LAYOUT_CODES
    assert not hasattr(adapter_module, "STACKED_LAYOUT_CODES")  # one home: the registry


# ---- parse_keys against parse_key, on keys made of the grammar's pieces ----------------------------------------
_SEGMENTS = st.sampled_from(
    ["model", "language_model", "layers", "experts", "mlp", "self_attn", "q_proj", "w1", "gate_proj", "visual",
     "merger", "base_layer", "embed_tokens", "lm_head", "default", "modules_to_save", "original_module"]
)  # fmt: skip
_NUMBER = st.sampled_from(["0", "3", "12", "255", "007"])
_FACTORS = st.sampled_from(
    ["lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_A.default.weight", "lora_embedding_A",
     "lora_magnitude_vector", "base_layer.lora_A.weight", "base_layer.base_layer.lora_B.weight", "weight", "bias"]
)  # fmt: skip


@st.composite
def _peft_keys(draw):
    path = draw(st.lists(_SEGMENTS | _NUMBER, min_size=1, max_size=8))
    prefix = draw(st.sampled_from(["base_model.model.", ""]))
    return prefix + ".".join([*path, draw(_FACTORS)])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_peft_keys(), min_size=1, max_size=30))
def test_parse_keys_is_parse_key_for_each_key(keys):
    renumbered = [k.replace("3", "41").replace("0", "9") for k in keys]  # same templates, other numbers
    keys = keys + renumbered
    fast = parse_keys(keys)
    assert list(fast) == list(dict.fromkeys(keys))
    for key in keys:
        plain = parse_key(key)
        assert fast[key] == plain and vars(fast[key]) == vars(plain), key


# ---- group_modules: the common module filled directly equals the general shape path -----------------------------
def _info(key: str, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(key, "BF16", shape, Path("adapter_model.safetensors"), 0, 2 * math.prod(shape))


_MODULE = "base_model.model.model.layers.{layer}.self_attn.{name}"


@st.composite
def _pairs(draw):
    """Tensors of a few 2-D (sometimes 3-D) LoRA pairs, ranks agreeing with the config or not."""
    tensors = {}
    for layer in range(draw(st.integers(1, 4))):
        for name in draw(st.sets(st.sampled_from(["q_proj", "k_proj", "o_proj"]), min_size=1)):
            module = _MODULE.format(layer=layer, name=name)
            rank_a, rank_b = draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4]))
            a_shape = (rank_a, 8) if draw(st.booleans()) or layer else (rank_a, 8, 1)
            for factor, shape in (("lora_A", a_shape), ("lora_B", (16, rank_b))):
                if draw(st.integers(0, 9)):  # now and then a factor is missing
                    tensors[f"{module}.{factor}.weight"] = _info(f"{module}.{factor}.weight", shape)
    return tensors


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_pairs(), st.sampled_from([{"r": 4, "lora_alpha": 8}, {"r": "4", "lora_alpha": 8}]))
def test_common_modules_equal_the_general_shape_path(tensors, raw_config):
    config = parse_config({"peft_type": "LORA", "target_modules": ["q_proj", "k_proj", "o_proj"], **raw_config})
    index = TensorIndex()
    index.add_all(tensors)
    parsed = parse_keys(index.tensors)
    fast_modules, fast_findings = group_modules(parsed, index, config)
    plain_modules, plain_findings = group_modules(parsed, index, config, shortcut=False)
    assert fast_modules == plain_modules
    assert fast_findings == plain_findings


@pytest.mark.parametrize("case", ["v4_deepseek_v3", "v5_deepseek_v3_rank_pattern", "v5_gemma3_vl"])
def test_modules_are_what_the_dataclass_builds(case):
    """group_modules builds LoraModule on a bare instance (its __init__ called directly): the same as the class call."""
    folder = Path(__file__).parent / "fixtures" / "data" / "cases" / case / "adapter"
    modules = load_adapter(folder, strict_config=False).modules
    assert modules
    for mod in modules:
        rebuilt = dataclasses.replace(mod)
        assert type(rebuilt) is type(mod) and rebuilt == mod and vars(rebuilt) == vars(mod)
