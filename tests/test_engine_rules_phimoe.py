"""What vLLM's rules say about a Phi-3.5-MoE adapter as PEFT writes it on transformers 5, and how `--layout vllm`
names its experts: measured with tests/engine_proof/run_release.py on v5_phimoe on every vLLM release 0.30.0-0.34.0
(the engine proof holds every release to it once its truth is recorded; these hold the rules themselves).

vLLM's PhiMoE keeps the Hub checkpoint's block name `block_sparse_moe` and stacks only q/k/v in its name mapper, so
the adapter's `mlp.experts` LoRA loads without error and is not applied (rule phimoe-mlp-names); the fused 3-D check
(fused-3d-on-2d-wrapper) is never reached. Its FusedMoE takes the experts under the checkpoint's w1/w3/w2 names, so
`--layout vllm` renames gate/up/down_proj per expert (else vLLM refuses them as unexpected target modules).
"""

from __future__ import annotations

import pytest

import helpers

CASE = "v5_phimoe"
RELEASES = ["vllm==0.30.0", "vllm==0.31.0", "vllm==0.32.0", "vllm==0.33.0", "vllm==0.34.0"]


@pytest.mark.parametrize("release", RELEASES)
def test_vllm_loads_the_adapter_and_drops_its_mlp_experts(release):
    from lora_convert.pipeline.commands import predict

    predicted = predict(release, helpers.case_dir(CASE) / "adapter", helpers.case_base_dir(CASE))
    assert not predicted.load_failure, predicted.load_failure
    dropped = {m for m, v in predicted.modules.items() if v == "dropped"}
    assert dropped == {f"model.layers.{i}.mlp.experts{s}" for i in (0, 1) for s in ("", ".base_layer")}
    assert all(v == "exact" for m, v in predicted.modules.items() if ".self_attn." in m)


def test_vllm_layout_names_the_experts_as_the_checkpoint_does(tmp_path):
    from safetensors import safe_open

    from lora_convert.pipeline.commands import normalize

    out = tmp_path / "out"
    adapter = helpers.case_dir(CASE) / "adapter"
    normalize(str(adapter), out, base=str(helpers.case_base_dir(CASE)), layout="vllm==0.33.0", drop_unsupported=True)
    with safe_open(out / "adapter_model.safetensors", "np") as f:
        names = [k for k in list(f.keys()) if ".experts." in k]  # safe_open is not iterable
    assert names and all(".block_sparse_moe.experts." in k for k in names)
    assert {k.split(".experts.")[1].split(".")[1] for k in names} == {"w1", "w2", "w3"}
