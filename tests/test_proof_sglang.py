"""SGLang's own LoRA loader, every release with a rule file (lora_convert/engines/sglang-*.json), on every PEFT-written
fixture, on a CPU (tests/engine_proof/sglang_0_5_23.py; other releases than the installed one from their
cached sources with their adaptations: tests/engine_proof/run_release.py).

(a) the `--layout sglang` output of lora-convert for that release (normalize, --drop-unsupported): the release loads it
    and every module it holds is exact against PEFT's reference delta;
(b) the original PEFT adapter: what the release does (a load error, or exact/dropped/wrong per module) equals the
    prediction of `validate --engine sglang==<release>` (lora_convert.pipeline.commands.predict);
(c) the live run equals the release's recorded truth (tests/engine_proof/truth/sglang-<version>.json), from which the
    proof table of docs/engine-layouts.md is generated.
Every release runs in a process of its own, releases side by side (engine_proof.session). Needs the installed sglang
(tests/engine_proof/requirements.txt) and the other releases' cached sources (`make proof-cache`; both done by
`make test`); skipped only where they are missing, and `LORA_CONVERT_REQUIRE_PROOF=1` (CI) turns a skip into a failure.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from engine_proof.common import check_layout, check_prediction
from engine_proof.releases import proof_releases
from engine_proof.runs import check_run_equals_truth
from engine_proof.session import case_row, release_run
from helpers import fixture_cases

if os.environ.get("LORA_CONVERT_REQUIRE_PROOF") and importlib.util.find_spec("sglang") is None:
    raise ImportError("sglang is not installed (make setup installs it); CI requires the engine proof")

pytestmark = [pytest.mark.engine]
CASES = fixture_cases()
RELEASES = proof_releases("sglang")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("release", RELEASES)
def test_sglang_layout_output_is_exact_in_sglang(release, case, request):
    row, _ = case_row(request, release, case)
    check_layout(release, row["layout"])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("release", RELEASES)
def test_sglang_prediction_matches_sglang(release, case, request):
    row, served_base = case_row(request, release, case)
    check_prediction(release, case, row, served_base)


@pytest.mark.parametrize("release", RELEASES)
def test_sglang_run_equals_its_recorded_truth(release, request):
    live, _ = release_run(request, release)
    check_run_equals_truth(release, live, CASES)
