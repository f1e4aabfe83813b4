"""LongCat-Flash's dense `mlps.N` projections, which PEFT 0.21 cannot apply on transformers 5: its config conversion
for MoE models (peft/utils/transformers_weight_conversion.py:444-482) re-targets every `gate_proj`/`up_proj`/`down_proj`
to the routed experts' 3-D parameters, so an adapter that holds LoRA on the dense MLPs (written as PEFT writes it
without that conversion: transformers 4 / the Hub's remote code use the same module names) reloads without it. The
schema says `peft_cannot_apply` there; validate reports it and `normalize --layout peft` refuses it, named."""

from __future__ import annotations

import json

import pytest

import helpers

BASE = helpers.FIXTURES / "bases" / "v5_longcat_flash"
IDS = [[1, 5, 9, 3, 7, 2]]
DENSE = r"model\.layers\.\d+\.mlps\.\d+\.(gate_proj|up_proj|down_proj)"


def _base_model():
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32).eval()


def _logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.clone()


@pytest.fixture(scope="module")
def dense_mlp_adapter(tmp_path_factory):
    """(adapter folder, base logits, the adapted model's logits in memory) of a PEFT LoRA on every dense mlps.N
    projection, written by PEFT with its transformers-5 config conversion switched off (else it never wraps them)."""
    pytest.importorskip("peft")
    import peft
    import peft.utils.transformers_weight_conversion as conversion
    import torch

    model = _base_model()
    base_logits = _logits(model)
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=DENSE, init_lora_weights=False)
    convert = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        adapted = peft.get_peft_model(model, lora).eval()
    finally:
        conversion.convert_peft_config_for_transformers = convert
    out = tmp_path_factory.mktemp("dense-mlps") / "adapter"
    adapted.save_pretrained(str(out))
    return out, base_logits, _logits(adapted)


@pytest.mark.peft
@pytest.mark.slow
def test_peft_reloads_a_dense_mlp_adapter_as_the_base(dense_mlp_adapter):
    """In memory the LoRA changes the logits; reloaded by PEFT itself, no dense MLP is wrapped (PEFT wraps the routed
    experts instead, whose LoRA the adapter does not hold) and the adapted logits are not reproduced: the measurement
    behind the schema's `peft_cannot_apply` on every mlps group."""
    import peft

    from lora_convert.arch.schema import bind

    adapter, base_logits, adapted_logits = dense_mlp_adapter
    assert float((adapted_logits - base_logits).abs().max()) > 1e-3
    keys = json.loads((adapter / "adapter_config.json").read_text())
    assert keys["peft_type"] == "LORA"
    reloaded = peft.PeftModel.from_pretrained(_base_model(), str(adapter)).eval()
    assert not [name for name, _ in reloaded.named_modules() if ".mlps." in name and name.endswith("lora_A")]
    assert float((_logits(reloaded) - adapted_logits).abs().max()) > 1e-3
    arch = bind(json.loads((BASE / "config.json").read_text()))
    dense = [g for g in arch.groups(0) if g.local_path.startswith("mlps.")]
    assert len(dense) == 4 and all(g.peft_cannot_apply for g in dense), dense


@pytest.mark.peft
@pytest.mark.slow
def test_validate_reports_and_layout_peft_refuses_the_dense_mlps(dense_mlp_adapter, tmp_path):
    from lora_convert.errors import UnsupportedAdapterError
    from lora_convert.pipeline.commands import normalize, validate

    adapter, _, _ = dense_mlp_adapter
    report = validate(str(adapter), base=str(BASE), smoke=False)
    flagged = [f for f in report.findings if f.code == "modules.peft-cannot-apply"]
    assert flagged and all(".mlps." in k for f in flagged for k in f.keys), [f.code for f in report.findings]
    assert "--layout peft refuses" in flagged[0].message, flagged[0].message
    with pytest.raises(UnsupportedAdapterError) as refused:
        normalize(str(adapter), tmp_path / "peft", base=str(BASE), layout="peft")
    assert "mlps" in refused.value.message and "PEFT itself cannot apply" in refused.value.message
    assert not (tmp_path / "peft").exists()
    stacked = normalize(str(adapter), tmp_path / "stacked", base=str(BASE))
    assert not stacked.dropped and sum(".mlps." in g.key for g in stacked.plan.groups) == 8
