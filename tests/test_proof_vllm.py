"""vLLM 0.33.0's own LoRA loader on every PEFT-written fixture (tests/engine_proof/vllm_0_33_0.py), on its CPU
platform.

(a) the `--layout vllm` output of lora-convert (normalize, --drop-unsupported): vLLM loads it and every module it
    holds is exact against PEFT's reference delta;
(b) the original PEFT adapter: what vLLM does (a load error, or exact/dropped/wrong per module) equals the
    prediction of `validate --engine vllm` (lora_convert.check.engine.predict).
vLLM runs in a process of its own (engine_proof.common.run_truth). Needs vllm==0.33.0
(tests/engine_proof/requirements.txt, installed by `make test`); skipped only where it is not installed, and
`LORA_CONVERT_REQUIRE_PROOF=1` (CI) turns that skip into a failure.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from engine_proof.common import check_layout, check_prediction, run_truth
from helpers import fixture_cases

if os.environ.get("LORA_CONVERT_REQUIRE_PROOF") and importlib.util.find_spec("vllm") is None:
    raise ImportError("vllm==0.33.0 is not installed (make setup installs it); CI requires the engine proof")

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (0.33.0) is not installed"),
]
CASES = fixture_cases()


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> dict:
    return run_truth("vllm_0_33_0.py", tmp_path_factory.mktemp("vllm-proof"))


@pytest.mark.parametrize("case", CASES)
def test_vllm_layout_output_is_exact_in_vllm(case, truth):
    check_layout("vLLM", truth[case]["layout"])


@pytest.mark.parametrize("case", CASES)
def test_vllm_prediction_matches_vllm(case, truth):
    check_prediction("vllm", case, truth[case])
