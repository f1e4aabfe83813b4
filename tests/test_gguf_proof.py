"""The GGUF proof (tests/gguf_proof/proof.py): llama.cpp itself, through llama-cpp-python, loads `--layout gguf`
output on a base converted by its own convert_hf_to_gguf.py and reproduces PEFT's logits; llama.cpp's own
convert_lora_to_gguf.py gives the same logits; docs/formats.md's GGUF table is this run's.

Needs the llama.cpp build (`make llama-cpp`; `make test` starts it in the background and these tests wait for it);
skipped only where it cannot be built, and `LORA_CONVERT_REQUIRE_PROOF=1` (CI) turns that skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "gguf_proof"))
import llama_cpp_build  # noqa: E402
import proof  # noqa: E402

pytestmark = [pytest.mark.gguf, pytest.mark.slow]

# `make test` starts the build in the background (tests/gguf_proof/llama_cpp_build.py) and these tests run last
# (tests/conftest.py): the wait is for that build, bounded so that a stuck build fails instead of hanging.
BUILD_WAIT_S = 45 * 60


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        return llama_cpp_build.wait_for_build(BUILD_WAIT_S)
    except RuntimeError as exc:
        if os.environ.get("LORA_CONVERT_REQUIRE_PROOF"):
            pytest.fail(f"the GGUF proof needs llama.cpp built (LORA_CONVERT_REQUIRE_PROOF=1): {exc}")
        pytest.skip(f"llama.cpp could not be built here (`make llama-cpp` says why): {exc}"[:500])


@pytest.fixture(scope="module")
def work(llama_cpp):
    folder = Path(tempfile.mkdtemp(prefix="gguf-proof-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def rows(work):
    return {r.case: r for r in proof.all_rows(work)}


@pytest.mark.parametrize("case", proof.CASES)
def test_llama_cpp_reproduces_peft_or_lora_convert_refuses(case, rows):
    row = rows[case]
    assert row.exact is not False, f"{case}: {row.outcome} (llama.cpp vs PEFT)"


@pytest.mark.parametrize("case", proof.PROVEN)
def test_these_families_are_proven_and_the_adapter_matters(case, rows):
    row = rows[case]
    assert row.exact, row.outcome
    # the adapter moves the logits far more than llama.cpp's error: a dropped or mis-scaled module would show
    assert row.effect > 1000 * row.error, (row.effect, row.error)


@pytest.mark.parametrize("case", proof.REFUSED)
def test_what_llama_cpp_cannot_apply_is_refused_with_a_reason(case, rows):
    assert rows[case].exact is None and rows[case].outcome.startswith("refused: "), rows[case].outcome


def test_llama_cpps_own_converter_gives_the_same_logits(rows):
    crossed = {case: r.cross for case, r in rows.items() if r.cross is not None}
    assert {"v5_llama", "v5_qwen3", "v5_phi3", "v4_mixtral", "v5_olmo3", "v5_glm4", "v5_gpt_oss"} <= set(crossed)
    # convert_lora_to_gguf.py writes a file for Ministral-3 that llama.cpp does not load (ours it does)
    assert crossed.pop("v5_ministral3") == float("inf")
    # except on rsLoRA: convert_lora_to_gguf.py writes lora_alpha (:528) and never reads use_rslora, so llama.cpp
    # scales that file by alpha/r instead of alpha/sqrt(r); ours folds PEFT's own scaling into B
    assert crossed.pop("v5_llama_rslora") > 1e-3
    # and on Granite-4 hybrid attention: it leaves q_proj/k_proj's lora_b rows in transformers' order where the
    # converter reorders the base's (conversion/llama.py:260-264); ours reorders them and is exact
    assert crossed.pop("v5_granitemoehybrid_gguf") > 1e-3
    assert all(c <= 1e-5 for c in crossed.values()), crossed


def test_doc_table_is_this_run(rows):
    from lora_convert.text import replace_generated_section

    text = proof.DOC.read_text()
    expected = replace_generated_section(text, *proof.SECTION, proof.table([rows[c] for c in proof.CASES]))
    assert text == expected, (
        "docs/formats.md's GGUF table is stale: python tests/gguf_proof/proof.py --write docs/formats.md"
    )


def test_an_adapter_llama_cpp_rejects_is_a_clear_failure_not_a_crash(work, rows):
    """A Llama adapter on the Qwen3 base: llama.cpp refuses it (architecture mismatch), and the harness says so
    instead of the interpreter crashing on the first eval (llama-cpp-python 0.3.36 can ignore a failed load)."""
    _, qwen3 = proof.base_gguf("v5_qwen3", work)
    with pytest.raises(RuntimeError, match=r"exit 3"):
        proof.llama_logits(qwen3, work / "out" / "v5_llama" / "adapter.gguf", [1, 2, 3], work)
