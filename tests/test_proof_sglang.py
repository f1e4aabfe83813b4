"""SGLang 0.5.23's own LoRA loader on every PEFT-written fixture (tests/engine_proof/sglang_0_5_23.py), on a CPU.

(a) the `--layout sglang` output of lora-convert (normalize, --drop-unsupported): SGLang loads it and every module
    it holds is exact against PEFT's reference delta; modules whose rows the layout cut away (reported as dropped
    rows) are the only ones served differently;
(b) the original PEFT adapter: what SGLang does (a load error, or exact/dropped/wrong per module) equals the
    prediction of `validate --engine sglang` (lora_convert.check.engine.predict) for the same base config.
Needs sglang==0.5.23 (tests/engine_proof/requirements-sglang.txt, installed by `make test`); skipped only where it is
not installed, and `LORA_CONVERT_REQUIRE_PROOF=1` (CI) turns that skip into a failure.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from functools import cache
from pathlib import Path

import pytest

from helpers import fixture_cases

if os.environ.get("LORA_CONVERT_REQUIRE_PROOF"):
    import sglang  # noqa: F401  (CI installs it: a missing engine is a failure there, not a skip)

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang (0.5.23) is not installed"),
]

sys.path.insert(0, str(Path(__file__).parent / "engine_proof"))

CASES = fixture_cases()
_ROOT: list[Path] = []


def _root() -> Path:
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="sglang-proof-layout-")))
    return _ROOT[0]


@cache
def _harness():
    import sglang_0_5_23

    return sglang_0_5_23


@cache
def _layout(case: str):
    return _harness().layout_output(case, _root())


@cache
def _original(case: str):
    from common import fixture_adapter

    return _harness().load(case, fixture_adapter(case), _harness().served_base(case))


def _rows_cut(out: Path) -> set[str]:
    """Modules of the layout output's report whose rows the layout left out (partially served)."""
    import json

    from lora_convert.convert.engine_layouts import REPORT_FILE

    report = json.loads((out / REPORT_FILE).read_text())
    return {
        k[len("base_model.model.") :].rsplit(".lora_", 1)[0]
        for d in report["dropped"]
        if d["module"].endswith(" rows)")
        for k in d["keys"]
    }


@pytest.mark.parametrize("case", CASES)
def test_sglang_layout_output_is_exact_in_sglang(case):
    from common import classify

    h = _harness()
    out, refused, nothing_left = _layout(case)
    if out is None:  # lora-convert refused every module: nothing for SGLang to load
        assert nothing_left, refused
        return
    load = h.load(case, out, h.served_base(case))
    assert load.load_error is None, f"SGLang failed on the sglang layout: {load.load_error} (refused: {refused})"
    verdicts = classify(case, load)
    held = {m: v for m, v in verdicts.items() if v != "dropped"}
    assert held, "SGLang holds no module of the sglang layout output"
    cut = _rows_cut(out)
    bad = {m: v for m, v in held.items() if v != "exact" and m not in cut}
    assert not bad, bad
    assert all(held.get(m) != "exact" for m in cut)  # a cut that left out rows with a delta is not exact


@pytest.mark.parametrize("case", CASES)
def test_sglang_prediction_matches_sglang(case):
    from common import classify, fixture_adapter

    from lora_convert.check.engine import predict

    truth = _original(case)
    predicted = predict("sglang", fixture_adapter(case), _harness().served_base(case))
    # the module-group rules need a plan; an adapter that cannot be planned (all DoRA) is predicted by the rest
    assert predicted.load_failure or predicted.unchecked is None, predicted.unchecked
    if truth.load_error is not None:
        assert predicted.load_failure, f"SGLang fails ({truth.load_error}) but the prediction loads it"
        return
    assert not predicted.load_failure, f"SGLang loads it; predicted failure {predicted.load_failure}"
    assert predicted.modules == classify(case, truth)
