"""What SGLang's rules predict for the outside-proof Mistral-3 VL adapters, and what `--layout sglang` leaves of them:
the verdicts the proof harness measured by hand (tests/engine_proof/run_release.py on SGLang 0.5.23 and 0.5.22, the
fixtures' README says so), held here because the engine proof does not run these cases.

SGLang's Mistral3ForConditionalGeneration has no should_apply_lora, so a text target also wraps the Pixtral tower's
linear of that name, filed under text layer N: its gate_up_proj fails when it is handed the text layer's buffer,
whichever layers the adapter trains (rule mistral3-vision-gate-up-buffer: `LoRA B output dim 144 does not match base
partition prefix dim 96 for 2 slices`), its qkv_proj and down_proj when layer N's weights are copied in (rule
mistral3-vision-qkv-down-slices, only layers the tower has: `LoRA buffer shape ... does not match weight shape ...`).
What the rules leave loaded exact.
"""

from __future__ import annotations

import pytest

import helpers

BASE = helpers.FIXTURES / "bases" / "v5_mistral3"


def _adapter(case: str) -> str:
    return str(helpers.FIXTURES / "outside_proof" / case / "adapter")


@pytest.mark.parametrize("engine", ["sglang==0.5.23", "sglang==0.5.19"])
@pytest.mark.parametrize("case", ["v5_mistral3_vl", "v5_mistral3_vl_names"])
def test_sglang_refuses_text_targets_the_pixtral_tower_shares(case, engine):
    from lora_convert.pipeline.commands import validate

    report = validate(_adapter(case), base=str(BASE), engine=engine, smoke=False, data_scan=False)
    found = {f.code.removeprefix("engine.sglang."): f.message for f in report.findings}
    gate_up, qkv_down = found["mistral3-vision-gate-up-buffer"], found["mistral3-vision-qkv-down-slices"]
    assert "layers 0-1" in gate_up  # every layer: the buffer check does not need the layer's weights
    assert "layers 0;" in qkv_down and "pixtral tower has 1 layer(s)" in qkv_down  # only the tower's layer


def test_sglang_layout_of_mistral3_vl_keeps_what_sglang_loaded(tmp_path):
    from safetensors import safe_open

    from lora_convert.pipeline.commands import normalize

    out = tmp_path / "out"
    normalize(_adapter("v5_mistral3_vl"), out, base=str(BASE), layout="sglang==0.5.23", drop_unsupported=True)
    with safe_open(out / "adapter_model.safetensors", "np") as f:
        names = list(f.keys())  # safe_open is not iterable
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in names}
    # measured: SGLang 0.5.23 (and 0.5.22) load these, exact
    layer1 = {f"language_model.model.layers.1.self_attn.{p}_proj" for p in "qkvo"}
    assert (
        modules
        == {"language_model.model.layers.0.self_attn.o_proj", "language_model.model.layers.1.mlp.down_proj"} | layer1
    )
