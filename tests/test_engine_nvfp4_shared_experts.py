"""ModelOpt NVFP4 bases and SGLang's fused NVFP4 shared-expert kernel (issue 24).

SGLang 0.5.19-0.5.21 switch DeepSeek-style shared experts to a fused NVFP4 GEMM+SwiGLU kernel on sm100 GPUs without
looking at LoRA; the kernel reads the quantized weights off `shared_experts.gate_up_proj`, which the LoRA wrapper has
replaced, so the first forward fails. 0.5.22 added the LoRA check. The prediction is tested on a PEFT-written DeepSeek-V3
adapter with shared-expert LoRA (v5_deepseek_v3_nvfp4_shared) over a config-only ModelOpt NVFP4 base (as the
bitsandbytes cases; the engine proof declares it CannotRun: both engines refuse the harness's float32 for
modelopt_fp4, and no CPU run reaches the sm100 path), and the cited code is read in each release's sources (the
proof cache; no CPU run reaches `get_platform().is_sm100`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine_proof.releases import is_installed, release_dir
from helpers import case_base_dir, case_dir
from lora_convert.arch.quantization import base_quantization
from lora_convert.pipeline.commands import predict, validate

CASE = "v5_deepseek_v3_nvfp4_shared"  # served on bases/v5_deepseek_v3_nvfp4 (ModelOpt NVFP4, config only)
RULE = "nvfp4-shared-expert-fused-kernel"
OLD = ["sglang==0.5.19", "sglang==0.5.20", "sglang==0.5.21"]
FIXED = ["sglang==0.5.22", "sglang==0.5.23"]


def _variant(tmp_path, **changes):
    """The case's served base with some config fields changed (quantization_config keys or model widths)."""
    base = tmp_path / "base"
    base.mkdir()
    config = json.loads((case_base_dir(CASE) / "config.json").read_text())
    config["quantization_config"].update(changes.pop("quantization", {}))
    config.update(changes)
    (base / "config.json").write_text(json.dumps(config))
    return base


def test_modelopt_exclude_globs_mark_modules_unquantized():
    quant = base_quantization(
        {
            "quantization_config": {
                "quant_method": "modelopt",
                "quant_algo": "NVFP4",
                "exclude_modules": ["lm_head", "*self_attn*", "mtp*"],
            }
        }
    )
    assert quant.known and quant.active[0].scheme.id == "modelopt-nvfp4"
    assert quant.skipped_by("model.layers.4.self_attn.q_a_proj") == "*self_attn*"
    assert quant.skipped_by("mtp_layers.0.proj") == "mtp*"
    assert quant.skipped_by("lm_head") == "lm_head"
    assert quant.skipped_by("model.layers.4.mlp.shared_experts.gate_proj") is None
    fp8 = base_quantization({"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}})
    assert not fp8.known  # ModelOpt FP8 is another scheme, not described yet


@pytest.mark.slow
@pytest.mark.parametrize("release", OLD)
def test_old_sglang_fails_on_nvfp4_shared_expert_lora(release):
    predicted = predict(release, case_dir(CASE) / "adapter", case_base_dir(CASE))
    assert predicted.load_failure == [RULE]
    report = validate(str(case_dir(CASE) / "adapter"), base=str(case_base_dir(CASE)), engine=release)
    finding = next(f for f in report.findings if f.code.endswith(RULE))
    assert "sm100" in finding.message and "shared_experts" in finding.message


@pytest.mark.slow
@pytest.mark.parametrize("release", FIXED)
def test_fixed_sglang_serves_nvfp4_shared_expert_lora(release):
    predicted = predict(release, case_dir(CASE) / "adapter", case_base_dir(CASE))
    assert not predicted.load_failure and set(predicted.modules.values()) == {"exact"}


@pytest.mark.slow
@pytest.mark.parametrize("release", OLD)
def test_unquantized_shared_experts_do_not_take_the_fused_kernel(release, tmp_path):
    base = _variant(tmp_path, quantization={"exclude_modules": ["lm_head", "*shared_experts*"]})
    assert not predict(release, case_dir(CASE) / "adapter", base).load_failure


@pytest.mark.slow
@pytest.mark.parametrize("release", OLD)
def test_a_shared_expert_width_the_kernel_cannot_take_is_served(release, tmp_path):
    """gate_up width 2 x 20 = 40 is no multiple of 128: the fused kernel is not chosen."""
    base = _variant(tmp_path, moe_intermediate_size=20)
    assert not predict(release, case_dir(CASE) / "adapter", base).load_failure


def _source(release: str, path: str) -> str:
    if is_installed(release):
        import sglang

        return (Path(sglang.__file__).parent.parent / path).read_text()
    file = release_dir(release) / path
    if not file.exists():
        pytest.skip(f"{release} sources are not cached (make proof-cache)")
    return file.read_text()


@pytest.mark.parametrize("release", OLD + FIXED)
def test_the_cited_code_takes_the_fused_kernel_without_a_lora_check(release):
    """The build-time condition of each release: sm100 + ModelOpt NVFP4 shared experts switch the fused kernel on;
    only 0.5.22 and later also require LoRA to be off. The LoRA wrapper forwards none of the attributes the fused
    forward reads."""
    model = _source(release, "sglang/srt/models/deepseek_v2.py")
    start = model.index("fc1_n = self.shared_experts.gate_up_proj.output_size_per_partition")
    condition = model[start : model.index("self.shared_experts._enable_nvfp4_gemm_swiglu_fusion = True", start)]
    assert "get_platform().is_sm100" in condition and "ModelOptFp4LinearMethod" in condition
    assert ("get_lora().enable_lora" in condition) == (release in FIXED)
    forward = model[model.index('getattr(self, "_enable_nvfp4_gemm_swiglu_fusion", False)') :][:1500]
    assert "self.gate_up_proj.input_scale_inv" in forward and "self.down_proj((out_fp4, out_scale))" in forward
    layers = _source(release, "sglang/srt/lora/layers.py")
    wrapper = layers[layers.index("class BaseLayerWithLoRA") : layers.index("class VocabParallelEmbeddingWithLoRA")]
    assert "__getattr__" not in wrapper and not re.search(r"input_scale_inv|weight_swiglu_interleaved", wrapper)
