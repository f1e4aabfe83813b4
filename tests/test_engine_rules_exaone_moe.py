"""What SGLang's rules predict for the EXAONE-MoE adapter, and what `--layout sglang` leaves of it: the verdicts the
proof harness measured on SGLang 0.5.23 and 0.5.22 (with attention_backend=triton and the released config's
is_moe_layer, tests/engine_proof/sglang_0_5_23.py), which the engine proof now runs too (tests/test_proof_sglang.py);
these hold the rule's class-name condition, which the proof's one base does not reach.

EXAONE-MoE's config names its shared experts `num_shared_experts`, which SGLang's LoRA pool does not read, so a MoE
model without "shared experts" gets no plain gate_up_proj/down_proj buffer while SGLang wraps the dense layers' and
the shared experts' (rule exaone-moe-mlp-buffers: `KeyError: 'gate_up_proj'`); the attention loaded exact. SGLang
0.5.19-0.5.21 register only LG's spelling ExaoneMoEForCausalLM, so there the rule holds for that class alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import helpers

CASE = "v5_exaone_moe"
ADAPTER = helpers.case_dir(CASE) / "adapter"
BASE = helpers.FIXTURES / "bases" / CASE


def _rules_fired(engine: str, base: Path = BASE) -> dict[str, str]:
    return helpers.engine_rules_fired(ADAPTER, base, engine)


def _base_declaring(tmp_path: Path, architecture: str) -> Path:
    return helpers.base_with_config(BASE, tmp_path / "base", lambda config: {**config, "architectures": [architecture]})


@pytest.mark.parametrize("engine", ["sglang==0.5.23", "sglang==0.5.22"])
def test_sglang_refuses_exaone_moe_expert_lora(engine):
    assert "KeyError: 'gate_up_proj'" in _rules_fired(engine)["exaone-moe-mlp-buffers"]


@pytest.mark.parametrize(("architecture", "refused"), [("ExaoneMoEForCausalLM", True), ("ExaoneMoeForCausalLM", False)])
def test_sglang_0_5_21_rule_holds_for_its_own_class_name_only(tmp_path, architecture, refused):
    # 0.5.21 registers only ExaoneMoEForCausalLM; transformers' spelling goes to its Transformers backend (not traced)
    fired = _rules_fired("sglang==0.5.21", _base_declaring(tmp_path, architecture))
    assert ("exaone-moe-mlp-buffers" in fired) is refused


def test_sglang_layout_of_exaone_moe_keeps_the_attention(tmp_path):
    from safetensors import safe_open

    from lora_convert.pipeline.commands import normalize

    out = tmp_path / "out"
    normalize(str(ADAPTER), out, base=str(BASE), layout="sglang==0.5.23", drop_unsupported=True)
    with safe_open(out / "adapter_model.safetensors", "np") as f:
        names = list(f.keys())  # safe_open is not iterable
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in names}
    # measured: SGLang 0.5.23 and 0.5.22 load these, exact
    assert modules == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"}
