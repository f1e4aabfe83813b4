"""Issue 25: a PEFT adapter of each new family, validated against a base of another family, is caught.

The six families whose cases run through the engine proof (tests/fixtures/data/cases: Ministral-3 of the mistral3
schema, OLMo-3, Seed-OSS, dots1, ERNIE-4.5-MoE, GLM-4.7-Flash) each get a base of another family whose geometry
differs (head_dim, expert layout or MLA projections); the same adapter on its own base is clean, so the errors
come from the wrong base and not from the adapter. A base of the same tiny geometry (Seed-OSS against llama) is
not a wrong base to a shape check and is not listed. Phi-3.5-MoE joined them once its engine rules were proven. The
outside-proof cases (Mistral-3's VL wrapper, ...) have the same check in tests/test_schema_outside_proof.py.
"""

from __future__ import annotations

import pytest

import helpers

WRONG_BASES = [
    ("v5_ministral3", "v5_olmo3"),
    ("v5_olmo3", "v5_seed_oss"),
    ("v5_seed_oss", "v5_olmo3"),
    ("v5_dots1", "v5_qwen3_moe"),
    ("v5_ernie4_5_moe", "v5_qwen3_moe"),
    ("v5_glm4_moe_lite", "v5_dots1"),
    ("v5_glm_moe_dsa", "v5_glm4_moe_lite"),  # fam-mla: the indexer is unknown to GLM-4.7-Flash, layer 2 past its end
    ("v5_phimoe", "v5_mixtral"),  # engproof: in cases/ since its engine rules (was in test_schema_outside_proof.py)
    ("v5_hy_v3", "v5_olmoe"),  # engproof: likewise
    ("v5_kimi_linear", "v5_deepseek_v3"),  # engproof: likewise
    ("v5_exaone_moe", "v5_qwen3_moe"),  # exaone: likewise (dots1's and ERNIE's tiny bases have its widths)
]
SHAPE_ERRORS = {"shapes.out-features", "shapes.in-features", "modules.unknown"}


def _errors(case: str, base: str) -> set[str]:
    from lora_convert.pipeline.commands import validate

    report = validate(str(helpers.case_dir(case) / "adapter"), base=str(helpers.FIXTURES / "bases" / base), smoke=False)
    return {f.code for f in report.findings if f.severity.value == "error"}


@pytest.mark.parametrize(("case", "other"), WRONG_BASES)
def test_a_wrong_base_is_caught(case, other):
    assert not _errors(case, case), f"{case} is not clean on its own base"
    codes = _errors(case, other)
    assert codes & SHAPE_ERRORS, f"{case} against {other}: {sorted(codes)}"
