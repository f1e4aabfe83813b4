"""mlx-lm's own code against lora-convert's MLX reader and writer (tests/mlx_proof.py runs the cases): every proven
family is exact in both directions, the adapters change the logits, and docs/formats.md's table is this run's."""

from __future__ import annotations

import pytest

import mlx_proof

pytestmark = [pytest.mark.slow, pytest.mark.mlx, pytest.mark.peft]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlx-proof")
    found = [mlx_proof.peft_to_mlx(case, work) for case in mlx_proof.CASES]
    effects = {}
    for case in mlx_proof.MLX_TRAINED:
        rows, effects[case] = mlx_proof.mlx_to_peft(case, work)
        found.extend(rows)
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


def test_docs_table_is_this_run(rows):
    found, _ = rows
    begin, end = mlx_proof.SECTION
    text = mlx_proof.DOC.read_text()
    assert begin + mlx_proof.table(found) + end in text, "run `python tests/mlx_proof.py --write docs/formats.md`"
