"""mlx-lm's own code against lora-convert's MLX reader and writer (tests/mlx_proof.py runs the cases): every proven
family is exact in both directions, the adapters change the logits, and docs/formats.md's table is this run's."""

from __future__ import annotations

import pytest

import mlx_proof
from lora_convert.peft.mlx_format import mlx_facts

pytestmark = [pytest.mark.slow, pytest.mark.mlx, pytest.mark.peft]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlx-proof")
    found = [mlx_proof.peft_to_mlx(case, work) for case in mlx_proof.CASES]
    effects = {}
    for case in mlx_proof.MLX_TRAINED:
        rows, effects[case] = mlx_proof.mlx_to_peft(case, work)
        found.extend(rows)
    for case in mlx_proof.PEFT_CANNOT_APPLY:
        found.extend(mlx_proof.mlx_to_peft_refused(case, work))
    return found, effects


def test_proven_families_are_exact_both_ways(rows):
    found, _ = rows
    families = set(mlx_proof.mlx_families())
    for row in found:
        if row.family in families and row.error is not None:
            assert row.error <= mlx_proof.TOLERANCE, row
    exact = {(r.family, r.direction) for r in found if r.error is not None and r.error <= mlx_proof.TOLERANCE}
    for family in families:
        assert (family, "PEFT -> MLX") in exact and (family, "MLX -> PEFT") in exact, family


def test_mlx_written_adapters_change_the_logits(rows):
    _, effects = rows
    assert all(effect > 100 * mlx_proof.TOLERANCE for effect in effects.values()), effects


def test_unproven_family_dora_and_modules_mlx_lm_cannot_wrap_are_refused(rows):
    found, _ = rows
    refused = {r.case: r.outcome for r in found if r.outcome.startswith("refused")}
    assert "for the minimax family: mlx-lm 0.32.2 has no model for" in refused["v5_minimax"]
    assert "DoRA" in refused["v5_llama_dora"]
    assert "kv_b_proj" in refused["v5_deepseek_v3"] and "embed_q" in refused["v5_deepseek_v3"]
    assert "kv_b_proj" in refused["v5_mistral4"] and "embed_q" in refused["v5_mistral4"]
    # a proven family's model type the proof does not cover (mlx_lm.json `unproven_model_types`)
    assert "model_type gemma4_unified_text (family gemma4)" in refused["v5_gemma4_unified_text"]
    assert "model_type gemma4 (family gemma4)" in refused["v5_gemma4_vl"]
    assert "outside the decoder layers" in refused["v5_gemma4_text"]


def test_modules_peft_cannot_apply_are_refused_for_peft_only(rows):
    """An mlx-lm router (or Nemotron-H mixer out_proj) LoRA: `--layout peft` refuses it, naming the module and why
    PEFT cannot apply it, where it used to write an adapter PEFT raised on or silently left the router out of;
    `--layout mlx`, which PEFT does not load, keeps it and mlx-lm reproduces the adapter's own logits."""
    found, _ = rows
    for case, modules in mlx_proof.PEFT_CANNOT_APPLY.items():
        mine = {r.direction: r for r in found if " + " in r.case and r.case.split(" + ")[0].split(",")[0] == case}
        assert set(mine) == {"MLX -> PEFT", "MLX -> MLX"}, (case, mine)
        refused = mine["MLX -> PEFT"].outcome
        assert refused.startswith("refused") and "PEFT itself cannot apply" in refused, (case, refused)
        # named as PEFT names it: mlx-lm's path through the family's renames (phimoe's gate is transformers' router)
        family = mine["MLX -> PEFT"].family
        assert all(mlx_facts().transformers_path(family, m) in refused for m in modules), (case, refused)
        assert mine["MLX -> MLX"].error is not None and mine["MLX -> MLX"].error <= mlx_proof.TOLERANCE, mine


def test_docs_table_is_this_run(rows):
    found, _ = rows
    begin, end = mlx_proof.SECTION
    text = mlx_proof.DOC.read_text()
    assert begin + mlx_proof.table(found) + end in text, "run `python tests/mlx_proof.py --write docs/formats.md`"
