"""What both engines' rules say about the outside-proof Bailing-hybrid adapter (tests/fixtures/data/outside_proof/
README.md says why the engine proof does not run it): neither engine serves BailingHybridForCausalLM with LoRA,
measured by hand with tests/engine_proof/run_release.py (SGLang 0.5.23, vLLM 0.33.0).

Kimi-Linear and HY-V3, whose SGLang predictions were held here before, are in cases/ now: the engine proof runs them
on every release of both engines.
"""

from __future__ import annotations

import pytest

import helpers

OUTSIDE = helpers.FIXTURES / "outside_proof"


def _engine_findings(case: str, engine: str) -> dict[str, str]:
    from lora_convert.pipeline.commands import validate

    report = validate(str(OUTSIDE / case / "adapter"), base=str(helpers.FIXTURES / "bases" / case), engine=engine)
    prefix = f"engine.{engine.partition('==')[0]}."
    return {f.code.removeprefix(prefix): f.message for f in report.findings if f.code.startswith(prefix)}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "rule"),
    [
        ("sglang==0.5.23", "hybrid-class-not-served"),
        ("sglang==0.5.19", "hybrid-class-not-served"),
        ("vllm==0.33.0", "bailing-hybrid-no-lora"),
        ("vllm==0.30.0", "bailing-hybrid-no-lora"),
    ],
)
def test_neither_engine_serves_bailing_hybrid_lora(engine, rule):
    # measured on SGLang 0.5.23 (`BailingHybridForCausalLM has no SGlang implementation ...`) and vLLM 0.33.0
    # (`Layer 0 (linear_attention) does not dispatch through the Transformers attention interface ...`)
    assert "BailingHybridForCausalLM" in _engine_findings("v5_bailing_hybrid", engine)[rule]


@pytest.mark.slow
def test_sglang_serves_bailing_hybrid_under_its_own_class_name(tmp_path):
    import json

    from lora_convert.pipeline.commands import validate

    base = helpers.FIXTURES / "bases" / "v5_bailing_hybrid"
    copy = tmp_path / "base"
    copy.mkdir()
    for file in base.iterdir():
        (copy / file.name).symlink_to(file)
    config = json.loads((base / "config.json").read_text())
    (copy / "config.json").unlink()
    (copy / "config.json").write_text(json.dumps({**config, "architectures": ["BailingMoeV3ForCausalLM"]}))
    adapter = str(OUTSIDE / "v5_bailing_hybrid" / "adapter")
    codes = {f.code for f in validate(adapter, base=str(copy), engine="sglang==0.5.23").findings}
    assert "engine.sglang.hybrid-class-not-served" not in codes
