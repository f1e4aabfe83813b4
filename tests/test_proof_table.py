"""The proof table of docs/engine-layouts.md is the recorded truth of every release with a rule file
(tests/engine_proof/proof_table.py; `make proof-truth` rewrites both), and a cell says what the record says."""

from __future__ import annotations

from pathlib import Path

from engine_proof import proof_table
from engine_proof.releases import proof_releases
from engine_proof.runs import recorded

DOC = Path(__file__).resolve().parents[1] / "docs" / "engine-layouts.md"


def test_every_release_with_a_rule_file_has_a_recorded_truth():
    assert [r for r in proof_releases() if recorded(r) is None] == []


def test_the_proof_table_in_the_doc_is_the_recorded_truth():
    text = DOC.read_text(encoding="utf-8")
    assert proof_table.render_into(text) == text, "stale: python tests/engine_proof/proof_table.py --write " + str(DOC)


def test_a_cell_names_the_outcome():
    assert proof_table.cell({"load_error": "ValueError: x"}) == "load failure"
    assert proof_table.cell({"load_error": None, "modules": {"a": "exact", "b": "exact"}}) == "exact"
    assert proof_table.cell({"load_error": None, "modules": {"a": "exact", "b": "dropped"}}) == "1 exact, 1 dropped"
    assert proof_table.cell({"cpu_unbuildable": {}}) == "not built on a CPU"
