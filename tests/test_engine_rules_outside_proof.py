"""What SGLang's rules predict for the outside-proof Kimi-Linear and HY-V3 adapters, and what `--layout sglang`
leaves of them: the verdicts the proof harness measured by hand (tests/engine_proof/run_release.py on SGLang 0.5.23,
the fixtures' README says so), held here because the engine proof does not run these cases.

SGLang 0.5.23 refuses Kimi-Linear's Kimi Delta Attention projections (no get_hidden_dim for them: rule
kimi-linear-kda) and, like ERNIE-4.5-MoE's, the MLP / shared-expert / routed-expert LoRA of both models (their
configs name the shared-expert count `num_shared_experts`, which the LoRA pool does not read: rule
ernie-moe-mlp-buffers); the layout output without those modules loaded in SGLang with every module exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import helpers

OUTSIDE = helpers.FIXTURES / "outside_proof"


def _engine_findings(case: str, engine: str) -> dict[str, str]:
    from lora_convert.pipeline.commands import validate

    report = validate(str(OUTSIDE / case / "adapter"), base=str(helpers.FIXTURES / "bases" / case), engine=engine)
    prefix = f"engine.{engine.partition('==')[0]}."
    return {f.code.removeprefix(prefix): f.message for f in report.findings if f.code.startswith(prefix)}


def _layout_modules(case: str, engine: str, out: Path) -> set[str]:
    from safetensors import safe_open

    from lora_convert.pipeline.commands import normalize

    normalize(
        str(OUTSIDE / case / "adapter"),
        out,
        base=str(helpers.FIXTURES / "bases" / case),
        layout=engine,
        drop_unsupported=True,
    )
    with safe_open(out / "adapter_model.safetensors", "np") as f:
        names = list(f.keys())  # safe_open is not iterable
    return {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in names}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sglang==0.5.23", "sglang==0.5.19"])
def test_sglang_refuses_kimi_linear_kda_and_mlp_lora(engine):
    found = _engine_findings("v5_kimi_linear", engine)
    assert "get_hidden_dim not implemented for g_a_proj" in found["kimi-linear-kda"]
    assert "Kimi-Linear" in found["ernie-moe-mlp-buffers"]


@pytest.mark.slow
def test_sglang_layout_of_kimi_linear_keeps_what_sglang_loaded(tmp_path):
    modules = _layout_modules("v5_kimi_linear", "sglang==0.5.23", tmp_path / "out")
    # measured: SGLang 0.5.23 loads these two, exact; the KDA layers and every MLP are refused
    assert modules == {"model.layers.1.self_attn.kv_b_proj", "model.layers.1.self_attn.o_proj"}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sglang==0.5.23", "sglang==0.5.19"])
def test_sglang_refuses_hy_v3_mlp_lora(engine):
    found = _engine_findings("v5_hy_v3", engine)
    assert "HY-V3" in found["ernie-moe-mlp-buffers"]


@pytest.mark.slow
def test_sglang_layout_of_hy_v3_keeps_the_attention(tmp_path):
    modules = _layout_modules("v5_hy_v3", "sglang==0.5.23", tmp_path / "out")
    assert modules == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"}


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
