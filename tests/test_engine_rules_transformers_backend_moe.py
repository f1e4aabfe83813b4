"""What SGLang's rules predict for the outside-proof Qwen3-Omni-MoE thinker adapter, which SGLang serves through its
Transformers backend (it registers only the full Qwen3-Omni class), and what `--layout sglang` leaves of it: the
verdicts the proof harness measured by hand (tests/engine_proof/run_release.py on SGLang 0.5.23 and 0.5.22, the
fixtures' README says so), held here because the engine proof does not run this case.

That backend keeps transformers' dense layers (mlp_only_layers) and wraps their down_proj by name, and the LoRA pool
of a MoE model without shared experts has no plain down_proj buffer: the layout with the routed experts failed with
`KeyError: 'down_proj'` (rule transformers-moe-dense-layer-buffers, whose `when` asks the base for a dense-MLP layer:
`base_has_kind`). Its q/k/v LoRA is fused into `qkv_proj`, a name no layer of transformers' thinker has (rule
transformers-fallback-class-qkv). What the rules leave, o_proj, loaded exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import helpers

CASE = "v5_qwen3_omni_moe"
ADAPTER = helpers.FIXTURES / "outside_proof" / CASE / "adapter"
BASE = helpers.FIXTURES / "bases" / CASE


def _engine_findings(engine: str, base: Path = BASE) -> dict[str, str]:
    return helpers.engine_rules_fired(ADAPTER, base, engine)


def _base_without_dense_layers(tmp_path: Path) -> Path:
    """The fixture's base with every layer sparse (mlp_only_layers empty, as in the released Qwen3-Omni configs)."""
    return helpers.base_with_config(
        BASE,
        tmp_path / "base",
        lambda config: {**config, "text_config": {**config["text_config"], "mlp_only_layers": []}},
    )


@pytest.mark.parametrize("engine", ["sglang==0.5.23", "sglang==0.5.19"])
def test_sglang_refuses_experts_of_a_thinker_with_dense_layers(engine):
    found = _engine_findings(engine)
    assert "KeyError: 'down_proj'" in found["transformers-moe-dense-layer-buffers"]
    assert "dense layers 0" in found["transformers-moe-dense-layer-buffers"]
    assert "qkv_proj" in found["transformers-fallback-class-qkv"]


def test_sglang_dense_layer_rule_needs_a_dense_layer_in_the_base(tmp_path):
    found = _engine_findings("sglang==0.5.23", _base_without_dense_layers(tmp_path))
    assert "transformers-moe-dense-layer-buffers" not in found
    assert "transformers-fallback-class-qkv" in found  # the class, not the layers, decides this one


def test_sglang_layout_of_the_thinker_keeps_what_sglang_loaded(tmp_path):
    from safetensors import safe_open

    from lora_convert.pipeline.commands import normalize

    out = tmp_path / "out"
    normalize(str(ADAPTER), out, base=str(BASE), layout="sglang==0.5.23", drop_unsupported=True)
    with safe_open(out / "adapter_model.safetensors", "np") as f:
        names = list(f.keys())  # safe_open is not iterable
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in names}
    # measured: SGLang 0.5.23 (and 0.5.22) load these two, exact
    assert modules == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}


def test_base_has_kind_matches_only_a_base_holding_that_kind():
    from lora_convert.arch.base_config import config_from_mapping
    from lora_convert.arch.schema import bind
    from lora_convert.convert.layout_rules import When

    def arch(mlp_only_layers):
        config = json.loads((BASE / "config.json").read_text())
        config["text_config"] = {**config["text_config"], "mlp_only_layers": mlp_only_layers}
        return bind(config_from_mapping(config))

    group = type("Group", (), {"name": "mlp.experts.down_proj", "kind": "routed_experts", "slices": ()})()
    when = When({"base_has_kind": ["mlp"]})
    assert when.match(group, "qwen3_omni_moe", {}, arch=arch([0])) == {"base_kind": "mlp", "base_kind_layers": "0"}
    assert when.match(group, "qwen3_omni_moe", {}, arch=arch([])) is None
    assert when.match(group, "qwen3_omni_moe", {}) is None  # no bound base: no match
