"""The schema expression language: what it computes, and what it refuses."""

from __future__ import annotations

import pytest

from lora_convert.arch.expr import compile_expression, evaluate, names_in
from lora_convert.errors import SchemaError

CFG = {
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "head_dim": None,
    "layer_types": ["linear_attention", "full_attention"],
    "hybrid_override_pattern": "M*E-",
    "mlp_only_layers": [0],
    "rope_scaling": {"factor": 8.0},
    "q_lora_rank": None,
}


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("hidden_size // num_attention_heads", 128),
        ("head_dim or hidden_size // num_attention_heads", 128),  # `or` as a default for a null field
        ("missing_field or 7", 7),  # a field the config lacks is None
        ("2 * num_attention_heads * 128", 8192),
        ("hidden_size / 2", 2048.0),
        ("hidden_size % 1000 + 2 ** 3 - 1", 103),
        ("-hidden_size", -4096),
        ("layer_types[1] == 'full_attention'", True),
        ("hybrid_override_pattern[2]", "E"),
        ("rope_scaling['factor']", 8.0),
        ("len(hybrid_override_pattern)", 4),
        ("min(3, 1, 2) + max([4, 9])", 10),
        ("0 in mlp_only_layers", True),
        ("1 not in (mlp_only_layers or [])", True),
        ("q_lora_rank is None", True),
        ("not q_lora_rank", True),
        ("1 if q_lora_rank else 2", 2),
        ("1 < 2 < 3", True),
        ("1 < 3 < 2", False),
        ("bool(q_lora_rank) and 5", False),
        ("int(hidden_size / 3)", 1365),
        ("1536 + 512 + 64", 2112),
        ("(1, 2)", (1, 2)),
    ],
)
def test_evaluates(expression, expected):
    assert evaluate(expression, CFG) == expected


def test_variables_win_over_config_fields():
    assert evaluate("hidden_size + i", CFG, i=3) == 4099
    assert evaluate("hidden_size", CFG, hidden_size=1) == 1
    assert evaluate("layer_types[i]", CFG, i=0) == "linear_attention"


def test_names_in():
    assert names_in("head_dim or hidden_size // len(layer_types)") == {"head_dim", "hidden_size", "layer_types"}


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "__builtins__",
        "hidden_size.__class__",
        "rope_scaling.get('factor')",
        "(lambda: 1)()",
        "[x for x in layer_types]",
        "{1: 2}",
        "{1, 2}",
        "open('/etc/passwd')",
        "eval('1')",
        "getattr(rope_scaling, 'factor')",
        "max(*layer_types)",
        "min(1, key=2)",
        "layer_types[0:1]",
        "x := 1",
        "f'{hidden_size}'",
        "hidden_size if True",  # syntax error
        "1; 2",
        "a = 1",
    ],
)
def test_refuses(expression):
    with pytest.raises(SchemaError):
        compile_expression(expression)
    with pytest.raises(SchemaError):
        evaluate(expression, CFG)


def test_runtime_errors_become_schema_errors_naming_missing_fields():
    with pytest.raises(SchemaError, match="missing \\(None\\) field\\(s\\): head_dim"):
        evaluate("head_dim * 2", CFG)
    with pytest.raises(SchemaError, match="ZeroDivisionError"):
        evaluate("hidden_size // 0", CFG)
    with pytest.raises(SchemaError, match="IndexError"):
        evaluate("layer_types[5]", CFG)
    with pytest.raises(SchemaError):
        evaluate("missing[0]", CFG)


def test_resource_limits():
    with pytest.raises(SchemaError, match="exponent"):
        evaluate("10 ** 100000", CFG)
    with pytest.raises(SchemaError, match="repetition"):
        evaluate("'a' * 1000000000", CFG)
    with pytest.raises(SchemaError, match="longer"):
        compile_expression("1 + " * 1000 + "1")


def test_non_string_expression_is_refused():
    with pytest.raises(SchemaError):
        compile_expression(12)  # type: ignore[arg-type]
