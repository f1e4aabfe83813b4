"""What `validate --engine` predicts for DeepSeek-V4 and Mistral-Large-4 LoRA (outside-proof cases v5_deepseek_v4 and
v5_mistral_large4, written by PEFT).

DeepSeek-V4's attention has q_a_proj but no kv_lora_rank, so no kv_a_proj_with_mqa: SGLang's DeepSeek MLA rules
(the q_a + kv_a fusion, kv_b/q_b exact) do not describe it. SGLang serves DeepseekV4ForCausalLM with its own class,
whose attention projections (wq_a/wkv, wq_b, wo_a, wo_b) are no LoRA target, so the adapter's attention modules
fail at the first request in every version 0.5.19-0.5.23. vLLM 0.30.0-0.34.0 serve DeepseekV4ForCausalLM with LoRA
(its CUDA class lists SupportsLoRA) but under DeepSeek's own module names, so an adapter in transformers 5's names is
refused. The engine proof cannot build DeepSeek-V4 here (tests/fixtures/data/outside_proof/README.md), so these
predictions rest on the cited sources. No SGLang version has a Mistral-Large-4 class: its Transformers fallback cannot
load the Mistral-format checkpoint (measured on 0.5.23, outside_proof/README.md), so no adapter of it is served.
"""

from __future__ import annotations

import pytest

import helpers
from lora_convert.pipeline.commands import validate

CASE = "v5_deepseek_v4"
SGLANG_RELEASES = ["0.5.19", "0.5.20", "0.5.21", "0.5.22", "0.5.23"]
VLLM_RELEASES = ["0.30.0", "0.31.0", "0.32.0", "0.33.0", "0.34.0"]


def _engine_findings(engine: str, version: str, case: str = CASE) -> dict:
    adapter, base = helpers.FIXTURES / "outside_proof" / case / "adapter", helpers.FIXTURES / "bases" / case
    report = validate(str(adapter), base=str(base), engine=f"{engine}=={version}", smoke=False)
    return {f.code: f for f in report.findings if f.code.startswith(f"engine.{engine}.")}


@pytest.mark.parametrize("version", SGLANG_RELEASES)
def test_sglang_says_deepseek_v4_attention_is_no_lora_target(version):
    found = _engine_findings("sglang", version)
    # the DeepSeek-V2/V3 MLA rules misfired here: a zero-filled kv_a and an exact q_b on a class that has neither
    assert "engine.sglang.mla-missing-kv-a" not in found
    assert "engine.sglang.kv-b-proj" not in found
    finding = found["engine.sglang.deepseek-v4-attention-not-lora-target"]
    assert finding.severity.value == "error"
    assert f"sglang=={version}: sglang/srt/models/deepseek_v4.py:" in finding.message  # cites its own version
    # every attention module of the four layers, compressor and indexer included; not the shared experts
    keys = " ".join(finding.keys)
    for leaf in ("q_a_proj", "q_b_proj", "kv_proj", "o_b_proj", "compressor.kv_proj", "indexer.q_b_proj"):
        assert f".{leaf}.lora_A.weight" in keys, leaf
    assert "shared_experts" not in keys
    assert "engine.sglang.target-parameters-3d" in found  # the routed experts' own finding stays


def test_sglang_still_fuses_deepseek_v3_q_a_without_kv_a():
    """`not_families` narrows the MLA fusion rule to the families it describes: DeepSeek-V3 keeps it."""
    report = validate(
        str(helpers.case_dir("v5_deepseek_v3_q_a_only") / "adapter"),
        base=str(helpers.case_base_dir("v5_deepseek_v3_q_a_only")),
        engine="sglang==0.5.23",
        smoke=False,
    )
    assert "engine.sglang.mla-missing-kv-a" in {f.code for f in report.findings}


@pytest.mark.parametrize("version", VLLM_RELEASES)
def test_vllm_refuses_deepseek_v4_lora_in_transformers_names(version):
    found = _engine_findings("vllm", version)
    finding = found["engine.vllm.deepseek-v4-transformers-names"]
    assert finding.severity.value == "error"
    assert f"vllm=={version}: vllm/models/deepseek_v4/attention.py:" in finding.message  # cites its own version
    keys = " ".join(finding.keys)
    for leaf in ("q_a_proj", "kv_proj", "o_b_proj", "compressor.gate_proj", "shared_experts.up_proj"):
        assert f".{leaf}.lora_A.weight" in keys, leaf
    assert "mlp.experts.lora" not in keys  # the routed experts' 3-D LoRA has its own finding
    assert "engine.vllm.fused-3d-on-2d-wrapper" in found


@pytest.mark.parametrize("version", SGLANG_RELEASES)
def test_sglang_says_it_cannot_load_a_mistral_large4_base(version):
    found = _engine_findings("sglang", version, "v5_mistral_large4")
    finding = found["engine.sglang.mistral-large4-checkpoint-not-loaded"]
    assert finding.severity.value == "error"
    assert f"sglang=={version}: sglang/srt/model_loader/utils.py:" in finding.message  # cites its own version
    assert "No module or parameter named" in finding.message
