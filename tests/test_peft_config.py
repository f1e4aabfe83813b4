import math

import pytest

from lora_convert.errors import AdapterConfigError
from lora_convert.peft_config import load_config_file, match_pattern, parse_config


def test_scaling_plain_and_rslora():
    cfg = parse_config({"peft_type": "LORA", "r": 16, "lora_alpha": 32})
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
    rs = parse_config({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": True})
    assert rs.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(32 / math.sqrt(16))


def test_patterns_follow_peft_matching():
    cfg = parse_config({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16,
        "rank_pattern": {"model.layers.1.self_attn.q_b_proj": 12, "experts.down_proj": 4},
        "alpha_pattern": {"o_proj": 64},
    })
    # the layer-specific key hits layer 1 only
    assert cfg.rank_for("model.layers.1.self_attn.q_b_proj") == 12
    assert cfg.rank_for("model.layers.11.self_attn.q_b_proj") == 8
    assert cfg.rank_for("model.layers.2.mlp.experts.down_proj") == 4
    assert cfg.scaling_for("model.layers.1.self_attn.q_b_proj") == pytest.approx(16 / 12)
    # alpha-only key changes only the scaling
    assert cfg.rank_for("model.layers.0.self_attn.o_proj") == 8
    assert cfg.scaling_for("model.layers.0.self_attn.o_proj") == pytest.approx(64 / 8)
    # the key must end the name at a dot boundary: `proj` does not match `o_proj`'s tail "o_proj"? it does not start at a dot
    assert match_pattern({"proj": 1}, "model.layers.0.self_attn.o_proj") is None
    assert match_pattern({"o_proj": 1}, "model.layers.0.self_attn.xo_proj") is None


def test_first_matching_pattern_wins():
    cfg = parse_config({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "rank_pattern": {".*proj": 2, "q_proj": 4}})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 2


def test_v4_to_v5_conversion_pattern():
    cfg = parse_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {".*\\.gate_up_proj": 16}, "alpha_pattern": {".*\\.gate_up_proj": 32}})
    assert cfg.rank_for("model.layers.1.mlp.experts.gate_up_proj") == 16
    assert cfg.scaling_for("model.layers.1.mlp.experts.gate_up_proj") == 2.0


def test_target_parameters_rule():
    cfg = parse_config({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_parameters": ["mlp.experts.gate_up_proj", "down_proj"]})
    assert cfg.targets_parameter("model.layers.1.mlp.experts", "gate_up_proj")
    assert cfg.targets_parameter("model.layers.1.mlp.experts", "down_proj")
    assert not cfg.targets_parameter("model.layers.1.mlp.experts", "up_proj")


@pytest.mark.parametrize(
    "raw, code",
    [
        ({"peft_type": "LORA", "lora_alpha": 8}, "config.missing-field"),
        ({"peft_type": "LORA", "r": 0, "lora_alpha": 8}, "config.rank-not-positive"),
        ({"peft_type": "LORA", "r": "8", "lora_alpha": 8}, "config.wrong-type"),
        ({"peft_type": "LORA", "r": 8, "lora_alpha": [1]}, "config.wrong-type"),
        ({"peft_type": "IA3", "r": 8, "lora_alpha": 8}, "config.not-lora"),
        ({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "rank_pattern": {"(": 4}}, "config.bad-pattern"),
        ({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "use_dora": "yes"}, "config.wrong-type"),
        ([1, 2], "config.not-an-object"),
    ],
)
def test_config_problems_are_findings(raw, code):
    cfg = parse_config(raw)
    assert code in {f.code for f in cfg.findings}


def test_unsupported_variants_are_recorded():
    cfg = parse_config({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "use_qalora": True, "alora_invocation_tokens": [1, 2]})
    assert set(cfg.variants) == {"use_qalora", "alora_invocation_tokens"}


@pytest.mark.parametrize("content, words", [(None, "no adapter_config.json"), ("", "empty"), ("{oops", "not valid JSON")])
def test_unreadable_config_files(tmp_path, content, words):
    path = tmp_path / "adapter_config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AdapterConfigError, match=words):
        load_config_file(path)
