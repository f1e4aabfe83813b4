import math

import pytest

from lora_convert.errors import AdapterConfigError
from lora_convert.peft.config import load_config_file, match_pattern, parse_config


def test_scaling_plain_and_rslora():
    cfg = parse_config({"peft_type": "LORA", "r": 16, "lora_alpha": 32})
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
    rs = parse_config({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": True})
    assert rs.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(32 / math.sqrt(16))


def test_patterns_follow_peft_matching():
    cfg = parse_config(
        {
            "peft_type": "LORA",
            "r": 8,
            "lora_alpha": 16,
            "rank_pattern": {"model.layers.1.self_attn.q_b_proj": 12, "experts.down_proj": 4},
            "alpha_pattern": {"o_proj": 64},
        }
    )
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
    cfg = parse_config(
        {
            "peft_type": "LORA",
            "r": 8,
            "lora_alpha": 16,
            "rank_pattern": {".*\\.gate_up_proj": 16},
            "alpha_pattern": {".*\\.gate_up_proj": 32},
        }
    )
    assert cfg.rank_for("model.layers.1.mlp.experts.gate_up_proj") == 16
    assert cfg.scaling_for("model.layers.1.mlp.experts.gate_up_proj") == 2.0


def test_target_parameters_rule():
    cfg = parse_config(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_parameters": ["mlp.experts.gate_up_proj", "down_proj"]}
    )
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
    cfg = parse_config(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "use_qalora": True, "alora_invocation_tokens": [1, 2]}
    )
    assert set(cfg.variants) == {"use_qalora", "alora_invocation_tokens"}


@pytest.mark.parametrize(
    "content, words", [(None, "no adapter_config.json"), ("", "empty"), ("{oops", "not valid JSON")]
)
def test_unreadable_config_files(tmp_path, content, words):
    path = tmp_path / "adapter_config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AdapterConfigError, match=words):
        load_config_file(path)


# ---- invalid fields are findings that name the key, expected vs actual, and never pass as config values ------
GOOD = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}


def _with(**changes):
    raw = dict(GOOD)
    for key, value in changes.items():
        if value is _MISSING:
            raw.pop(key)
        else:
            raw[key] = value
    return raw


_MISSING = object()

# (changes, the field named invalid, the code, words the message must hold: the key, what was expected, what was found)
BAD_FIELDS = [
    ({"r": 0}, "r", "config.rank-not-positive", ["`r`", "positive integer", "0"]),
    ({"r": -4}, "r", "config.rank-not-positive", ["`r`", "positive integer", "-4"]),
    ({"r": "8"}, "r", "config.wrong-type", ["`r`", "positive integer", '"8"', "a string"]),
    ({"r": 8.0}, "r", "config.wrong-type", ["`r`", "positive integer", "8.0", "a number"]),
    ({"r": True}, "r", "config.wrong-type", ["`r`", "positive integer", "true", "a boolean"]),
    ({"r": _MISSING}, "r", "config.missing-field", ["`r`"]),
    ({"lora_alpha": "16"}, "lora_alpha", "config.wrong-type", ["`lora_alpha`", "positive number", '"16"', "a string"]),
    ({"lora_alpha": 0}, "lora_alpha", "config.alpha-not-positive", ["`lora_alpha`", "0"]),
    ({"lora_alpha": -16}, "lora_alpha", "config.alpha-not-positive", ["`lora_alpha`", "-16"]),
    ({"lora_alpha": _MISSING}, "lora_alpha", "config.missing-field", ["`lora_alpha`"]),
    (
        {"target_modules": 5},
        "target_modules",
        "config.wrong-type",
        ["`target_modules`", "list of module names", "5", "an integer"],
    ),
    (
        {"target_modules": ["q_proj", 3]},
        "target_modules",
        "config.wrong-type",
        ["`target_modules`", '["q_proj", 3]', "an array"],
    ),
    ({"rank_pattern": []}, "rank_pattern", "config.wrong-type", ["`rank_pattern`", "an object", "an array"]),
    (
        {"rank_pattern": {"q_proj": 0}},
        "rank_pattern",
        "config.rank-not-positive",
        ["`rank_pattern.q_proj`", "positive integer", "0"],
    ),
    (
        {"rank_pattern": {"q_proj": "4"}},
        "rank_pattern",
        "config.wrong-type",
        ["`rank_pattern.q_proj`", "positive integer", '"4"'],
    ),
    ({"alpha_pattern": "q_proj"}, "alpha_pattern", "config.wrong-type", ["`alpha_pattern`", "an object", "a string"]),
    (
        {"alpha_pattern": {"q_proj": -1}},
        "alpha_pattern",
        "config.alpha-not-positive",
        ["`alpha_pattern.q_proj`", "positive number", "-1"],
    ),
    (
        {"alpha_pattern": {"q_proj": None}},
        "alpha_pattern",
        "config.wrong-type",
        ["`alpha_pattern.q_proj`", "positive number", "null"],
    ),
    ({"use_rslora": "yes"}, "use_rslora", "config.wrong-type", ["`use_rslora`", "true or false", '"yes"']),
    ({"exclude_modules": 3}, "exclude_modules", "config.wrong-type", ["`exclude_modules`", "3"]),
    ({"layers_pattern": {"a": 1}}, "layers_pattern", "config.wrong-type", ["`layers_pattern`", "an object"]),
    ({"bias": 7}, "bias", "config.wrong-type", ["`bias`", "7"]),
]


@pytest.mark.parametrize(
    "changes, field_name, code, words", BAD_FIELDS, ids=[f"{c[1]}-{c[2]}-{i}" for i, c in enumerate(BAD_FIELDS)]
)
def test_bad_field_is_an_error_naming_key_expected_and_actual(changes, field_name, code, words):
    cfg = parse_config(_with(**changes))
    assert not cfg.is_valid and cfg.invalid == [field_name]
    [finding] = [f for f in cfg.errors]
    assert finding.code == code
    assert finding.keys and finding.keys[0].split(".")[0] == field_name
    assert finding.expected is not None
    for word in words:
        assert word in finding.message, (word, finding.message)
    assert GOOD["r"] == 8 and parse_config(GOOD).is_valid  # the mutation, not the base config, is what failed


@pytest.mark.parametrize("raw", [[1, 2], "LORA", 8, None])
def test_config_that_is_not_an_object_makes_every_field_invalid(raw):
    cfg = parse_config(raw)
    [finding] = cfg.errors
    assert finding.code == "config.not-an-object" and finding.expected == "a JSON object"
    assert "r" in cfg.invalid and "lora_alpha" in cfg.invalid and "target_modules" in cfg.invalid
    assert not cfg.rank_known("model.layers.0.self_attn.q_proj")
    assert not cfg.scaling_known("model.layers.0.self_attn.q_proj")


def test_actual_keeps_strings_and_numbers_apart():
    assert parse_config(_with(r="8")).errors[0].actual == "8"
    assert parse_config(_with(r=8.0)).errors[0].actual == 8.0
    assert parse_config(_with(r=True)).errors[0].actual is True


def test_empty_or_null_patterns_are_fine_but_other_falsy_values_are_not():
    assert parse_config(_with(rank_pattern=None, alpha_pattern={})).is_valid
    for value in ([], "", 0, False):
        cfg = parse_config(_with(rank_pattern=value))
        assert cfg.invalid == ["rank_pattern"], value


def test_known_rank_and_scaling_follow_the_fields_they_come_from():
    target = "model.layers.0.self_attn.q_proj"
    bad_r = parse_config(_with(r="8", rank_pattern={"q_proj": 4}))
    assert bad_r.rank_known(target)  # a valid pattern gives this module its rank
    assert not bad_r.rank_known("model.layers.0.self_attn.k_proj")  # the others would need r
    bad_alpha = parse_config(_with(lora_alpha=None, alpha_pattern={"q_proj": 32}))
    assert bad_alpha.rank_known("model.layers.0.self_attn.k_proj")
    assert bad_alpha.scaling_known(target) and bad_alpha.scaling_for(target) == 4.0
    assert not bad_alpha.scaling_known("model.layers.0.self_attn.k_proj")
    bad_pattern_entry = parse_config(_with(rank_pattern={"q_proj": 4, "k_proj": "x"}))
    assert not bad_pattern_entry.rank_known(target)  # an invalid entry might have matched first
    assert not parse_config(_with(use_rslora="yes")).scaling_known(target)
    assert parse_config(GOOD).scaling_known(target)


def test_strict_loading_names_the_key(tmp_path):
    import json

    from lora_convert.peft.adapter import load_adapter

    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(_with(r="8")))
    with pytest.raises(AdapterConfigError) as caught:
        load_adapter(folder)
    assert "`r` should be a positive integer" in caught.value.message and caught.value.hint
