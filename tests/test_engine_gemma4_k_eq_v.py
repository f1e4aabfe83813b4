"""Gemma-4's key projection that is also the value (attention_k_eq_v) on vLLM: 0.30.0-0.33.0 apply a k_proj LoRA to
the keys only, 0.34.0 to keys and values (rule `gemma4-k-eq-v-value-lora`, measured by the engine proof's second
read of the V slice, tests/engine_proof/vllm_0_33_0.py `read_second_reads`); `--layout vllm` writes the k_proj LoRA
a second time as v_proj, which every release serves exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import case_base_dir, case_dir
from lora_convert.pipeline.commands import normalize, predict

RULE = "gemma4-k-eq-v-value-lora"
# the full-attention layers below the KV-shared ones: no v_proj in the base (tests/fixtures/README.md)
K_EQ_V = {
    "v5_gemma4_vl": ("model.language_model.layers.1", "model.language_model.layers.3"),
    "v5_gemma4_unified_vl": ("model.language_model.layers.1",),
}


def _predicted(release: str, case: str):
    return predict(release, case_dir(case) / "adapter", case_base_dir(case))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(K_EQ_V))
@pytest.mark.parametrize("release", ["vllm==0.30.0", "vllm==0.33.0"])
def test_older_vllm_is_predicted_to_miss_the_value_half_of_k_proj(release, case):
    predicted = _predicted(release, case)
    wrong = sorted(m for m, v in predicted.modules.items() if v != "exact")
    assert wrong == [f"{layer}.self_attn.k_proj" for layer in K_EQ_V[case]]
    assert not predicted.load_failure


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(K_EQ_V))
def test_vllm_0_34_is_predicted_exact(case):
    predicted = _predicted("vllm==0.34.0", case)
    assert set(predicted.modules.values()) == {"exact"}


@pytest.mark.slow
def test_the_transformers_backend_class_is_not_flagged():
    # Gemma4UnifiedForCausalLM has no vLLM class: the Transformers backend runs transformers' forward, which reads
    # the adapted k_proj output as the values (measured exact on 0.30.0-0.34.0)
    predicted = _predicted("vllm==0.33.0", "v5_gemma4_unified_text")
    assert set(predicted.modules.values()) == {"exact"}


@pytest.mark.slow
@pytest.mark.parametrize("release", ["vllm==0.33.0", "vllm==0.34.0"])
def test_layout_vllm_writes_the_k_proj_lora_again_as_v_proj(tmp_path, release):
    case = "v5_gemma4_vl"
    out = tmp_path / "out"
    normalize(str(case_dir(case) / "adapter"), out, base=str(case_base_dir(case)), layout=release)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for layer in K_EQ_V[case]:
        for factor in ("lora_A", "lora_B"):
            k = tensors[f"base_model.model.{layer}.self_attn.k_proj.{factor}.weight"]
            v = tensors[f"base_model.model.{layer}.self_attn.v_proj.{factor}.weight"]
            np.testing.assert_array_equal(k, v)
    # the sliding layers keep their own, different v_proj
    k0 = tensors["base_model.model.model.language_model.layers.0.self_attn.k_proj.lora_B.weight"]
    v0 = tensors["base_model.model.model.language_model.layers.0.self_attn.v_proj.lora_B.weight"]
    assert not np.array_equal(k0, v0)
    assert "v_proj" in json.loads((out / "adapter_config.json").read_text())["target_modules"]
