"""A wrapper of a wrapper (Qwen3-Omni-MoE: the language model's config at `thinker_config.text_config`) binds by its
schema's dotted `text_config` path, and the inner wrapper saved on its own (the thinker, `text_config`) binds by the
path's tail, each with its own checkpoint names; an adapter PEFT wrote on the thinker validates against both."""

from __future__ import annotations

import json

import pytest

import helpers

THINKER_BASE = helpers.FIXTURES / "bases" / "v5_qwen3_omni_moe"
ADAPTER = helpers.FIXTURES / "outside_proof" / "v5_qwen3_omni_moe" / "adapter"


def _thinker_config() -> dict:
    return json.loads((THINKER_BASE / "config.json").read_text())


def _hub_config() -> dict:
    """The Hub's layout of the same model: the full class's config, the thinker's config under `thinker_config`."""
    return {
        "model_type": "qwen3_omni_moe",
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
        "enable_audio_output": False,
        "thinker_config": _thinker_config(),
    }


def test_the_hub_config_binds_through_the_dotted_path():
    from lora_convert.arch.schema import bind

    arch = bind(_hub_config())
    assert arch.family == "qwen3_omni_moe" and arch.wrapped
    assert arch.config == _thinker_config()["text_config"]
    assert arch.num_layers == 2 and arch.expert_count() == 4
    assert arch.checkpoint_prefix == "thinker.model.layers"
    assert {g.path for g in arch.top_level_groups()} == {"thinker.model.embed_tokens", "thinker.lm_head"}


def test_the_thinker_saved_alone_binds_through_the_tail_with_its_own_names():
    from lora_convert.arch.schema import bind

    arch = bind(_thinker_config())
    assert arch.family == "qwen3_omni_moe" and not arch.wrapped
    assert arch.config == _thinker_config()["text_config"]
    assert arch.checkpoint_prefix == "model.layers"  # as transformers saves the thinker (bases/v5_qwen3_omni_moe)
    assert {g.path for g in arch.top_level_groups()} == {"model.embed_tokens", "lm_head"}
    for stack in ("model.language_model.layers", "thinker.model.layers", "thinker.model.language_model.layers"):
        assert arch.resolve_path(f"{stack}.0.self_attn.q_proj") is not None, stack


def test_a_base_config_of_the_hub_layout_exposes_the_language_models_config():
    from lora_convert.arch.base_config import config_from_mapping

    assert config_from_mapping(_hub_config()).text_config == _thinker_config()["text_config"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hub", "thinker"])
def test_the_thinker_adapter_validates_clean_against_either_config(layout, tmp_path):
    from lora_convert.pipeline.commands import validate

    base = tmp_path / "base"
    base.mkdir()
    config = _hub_config() if layout == "hub" else _thinker_config()
    (base / "config.json").write_text(json.dumps(config))
    report = validate(str(ADAPTER), base=str(base), smoke=False)
    errors = [f.code for f in report.findings if f.severity.value in ("error", "warning")]
    assert not errors, errors
    assert "shapes.unchecked" not in {f.code for f in report.findings}
