"""SGLang 0.5.23's own LoRA loader on every PEFT-written fixture (tests/engine_proof/sglang_0_5_23.py), on a CPU.

(a) the `--layout sglang` output of lora-convert (normalize, --drop-unsupported): SGLang loads it and every module
    it holds is exact against PEFT's reference delta; modules whose rows the layout cut away (reported as dropped
    rows) are the only ones served differently;
(b) the original PEFT adapter: what SGLang does (a load error, or exact/dropped/wrong per module) equals the
    prediction of `validate --engine sglang` (lora_convert.check.engine.predict) for the same base config.
SGLang runs in a process of its own (engine_proof.common.run_truth). Needs sglang==0.5.23
(tests/engine_proof/requirements.txt, installed by `make test`); skipped only where it is not installed, and
`LORA_CONVERT_REQUIRE_PROOF=1` (CI) turns that skip into a failure.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from engine_proof.common import check_layout, check_prediction, run_truth
from helpers import fixture_cases

if os.environ.get("LORA_CONVERT_REQUIRE_PROOF") and importlib.util.find_spec("sglang") is None:
    raise ImportError("sglang==0.5.23 is not installed (make setup installs it); CI requires the engine proof")

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang (0.5.23) is not installed"),
]
CASES = fixture_cases()


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> dict:
    return run_truth("sglang_0_5_23.py", tmp_path_factory.mktemp("sglang-proof"))


@pytest.mark.parametrize("case", CASES)
def test_sglang_layout_output_is_exact_in_sglang(case, truth):
    check_layout("SGLang", truth[case]["layout"])


@pytest.mark.parametrize("case", CASES)
def test_sglang_prediction_matches_sglang(case, truth):
    check_prediction("sglang", case, truth[case])
