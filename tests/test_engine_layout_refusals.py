"""What an older release's layout refuses, named per module group with that release's reason, and a base a release
refuses whatever the adapter (the engine proof, tests/test_proof_*.py, shows that what is left loads exactly)."""

from __future__ import annotations

import json

import pytest

from helpers import case_base_dir, case_dir
from lora_convert.errors import UnsupportedAdapterError
from lora_convert.pipeline.commands import normalize


def _normalize(case: str, layout: str, out, base: str | None = None, **kw):
    base = base or str(case_base_dir(case))
    return normalize(str(case_dir(case) / "adapter"), out, base=base, layout=layout, **kw)


@pytest.mark.parametrize("release", ["sglang==0.5.19", "sglang==0.5.20"])
def test_shared_expert_buffer_width_is_refused_per_group(release, tmp_path):
    """SGLang 0.5.19/0.5.20 size the dense gate_up/down buffers from intermediate_size and wrap the shared experts'
    too: every gate/up/down group (routed experts included) is refused, named, with the rule's code."""
    with pytest.raises(UnsupportedAdapterError) as refused:
        _normalize("v5_qwen2_moe_experts", release, tmp_path / "out")
    message = refused.value.message
    assert "model.layers.1.mlp.experts.gate_up_proj" in message and "model.layers.1.mlp.experts.down_proj" in message
    assert "shared_expert_intermediate_size" in message and not (tmp_path / "out").exists()
    _normalize("v5_qwen2_moe_experts", release, tmp_path / "dropped", drop_unsupported=True)
    report = json.loads((tmp_path / "dropped" / "lora_convert_report.json").read_text())
    assert {d["code"] for d in report["dropped"]} == {"engine.sglang.shared-expert-buffer-width"}


def test_sglang_0_5_21_serves_the_shared_expert_groups(tmp_path):
    _normalize("v5_qwen2_moe_experts", "sglang==0.5.21", tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("release", ["sglang==0.5.19", "sglang==0.5.21"])
def test_text_modules_named_like_the_vision_towers_linears_are_refused(release, tmp_path):
    with pytest.raises(UnsupportedAdapterError) as refused:
        _normalize("v5_gemma3_vl", release, tmp_path / "out", base=str(case_base_dir("v5_gemma3_vl")))
    assert "layers.0.self_attn.qkv_proj" in refused.value.message and "siglip_vision_model" in refused.value.message
    assert "layers.1.self_attn.qkv_proj" not in refused.value.message  # the tower has one layer


@pytest.mark.parametrize("release", ["vllm==0.30.0", "vllm==0.34.0"])
@pytest.mark.parametrize("case", ["v5_llama_bnb4", "v5_llama_bnb8"])
def test_a_base_the_release_refuses_is_refused_whole(release, case, tmp_path):
    """vLLM has no bitsandbytes method: no output of any adapter on that base can be served, so normalize writes
    nothing, --drop-unsupported or not, and says why with the rule's code and source."""
    base = str(case_dir(case).parent.parent / "bases" / case)
    for drop in (False, True):
        with pytest.raises(UnsupportedAdapterError) as refused:
            _normalize(case, release, tmp_path / "out", base=base, drop_unsupported=drop)
        assert "engine.vllm.quant-method-unknown" in refused.value.message
        assert "refuses the base model" in refused.value.message and not (tmp_path / "out").exists()
    _normalize(case, "sglang", tmp_path / "sglang", base=base)  # SGLang registers bitsandbytes
