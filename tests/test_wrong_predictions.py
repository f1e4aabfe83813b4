"""Issue 24: the wrong predictions found by running the engines' own loaders on PEFT-written adapters, each on a
fixture written by PEFT (tests/fixtures/make_fixtures.py `issue24_cases`). What each engine did is measured by
tests/test_proof_vllm.py / tests/test_proof_sglang.py on the same fixtures; these tests hold the prediction and the
layouts to it without the engines installed."""

from __future__ import annotations

import json

import pytest

from helpers import case_base_dir, case_dir
from lora_convert.errors import UnsupportedAdapterError
from lora_convert.pipeline.commands import normalize, predict, validate

VLLM = "vllm==0.33.0"
SGLANG = "sglang==0.5.23"


def _predict(engine: str, case: str):
    return predict(engine, case_dir(case) / "adapter", case_base_dir(case))


def _codes(case: str, engine: str) -> dict[str, object]:
    report = validate(str(case_dir(case) / "adapter"), base=str(case_base_dir(case)), engine=engine)
    return {f.code: f for f in report.findings}


def _layout_report(case: str, layout: str, out) -> dict:
    normalize(str(case_dir(case) / "adapter"), out, base=str(case_base_dir(case)), layout=layout, drop_unsupported=True)
    return json.loads((out / "lora_convert_report.json").read_text())


# ---- 1. lm_head LoRA on a vLLM class that declares no embedding_modules: refused by vLLM 0.33.0
def test_vllm_refuses_lm_head_lora_on_a_class_without_embedding_modules():
    predicted = _predict(VLLM, "v5_glm4_lm_head")
    assert "lm-head-not-a-target" in predicted.load_failure
    # the PEFT copy of the base lm_head (`lm_head.base_layer.weight`) is skipped by vLLM: not what it refuses
    assert "modules-to-save-rejected" not in predicted.load_failure


def test_vllm_layout_refuses_lm_head_lora(tmp_path):
    with pytest.raises(UnsupportedAdapterError, match="lm_head"):
        normalize(
            str(case_dir("v5_glm4_lm_head") / "adapter"),
            tmp_path / "strict",
            base=str(case_base_dir("v5_glm4_lm_head")),
            layout=VLLM,
        )
    report = _layout_report("v5_glm4_lm_head", VLLM, tmp_path / "out")
    dropped = {k for d in report["dropped"] for k in d["keys"]}
    assert "base_model.model.lm_head.lora_A.weight" in dropped
    assert "base_model.model.lm_head.lora_B.weight" in dropped


# ---- 2. PEFT's trainable tokens: a genuine PEFT key; vLLM refuses it, SGLang serves the LoRA without it
def test_trainable_tokens_key_is_a_peft_key():
    codes = _codes("v5_llama_trainable_tokens", SGLANG)
    assert "keys.unparseable" not in codes
    assert "keys.trainable-tokens" in codes


def test_vllm_refuses_trainable_tokens():
    predicted = _predict(VLLM, "v5_llama_trainable_tokens")
    assert "trainable-tokens-rejected" in predicted.load_failure


def test_trainable_tokens_keep_the_sglang_check_on():
    predicted = _predict(SGLANG, "v5_llama_trainable_tokens")
    assert predicted.unchecked is None
    assert not predicted.load_failure
    assert set(predicted.modules.values()) == {"exact"}


# ---- 3. Nemotron-H target_modules up_proj/down_proj reach the shared experts: SGLang 0.5.23 has no such target
def test_sglang_refuses_nemotron_shared_expert_up_down_targets():
    predicted = _predict(SGLANG, "v5_nemotron_h_up_down")
    assert "nemotron-up-proj-target" in predicted.load_failure
    # vLLM serves the same adapter (measured): the rule is SGLang's
    assert not _predict(VLLM, "v5_nemotron_h_up_down").load_failure


# ---- 7. PEFT's automatic copy of the base lm_head / embed_tokens weight (`<module>.base_layer.weight`)
def test_peft_base_layer_copy_is_no_error_and_sglang_serves_the_adapter():
    codes = _codes("v5_glm4_lm_head", SGLANG)
    assert "keys.full-weight" not in codes
    assert codes["keys.base-layer-copy"].severity.value == "info"
    assert not any(f.severity.value == "error" for f in codes.values()), sorted(codes)
    predicted = _predict(SGLANG, "v5_glm4_lm_head")
    assert not predicted.load_failure
    assert set(predicted.modules.values()) == {"exact"}  # measured: SGLang applies lm_head LoRA too


def test_normalize_leaves_the_base_layer_copy_out_without_refusing(tmp_path):
    out = tmp_path / "out"
    normalize(
        str(case_dir("v5_glm4_lm_head") / "adapter"), out, base=str(case_base_dir("v5_glm4_lm_head")), layout=SGLANG
    )
    report = json.loads((out / "lora_convert_report.json").read_text())
    assert [d["keys"] for d in report["dropped"]] == [["base_model.model.lm_head.base_layer.weight"]]
    assert report["dropped"][0]["code"] == "keys.base-layer-copy"


# ---- 4. Gemma-3 adapter trained on the VL class, served on the text-only class: vLLM applies none of it
def test_vllm_drops_a_vl_trained_gemma3_adapter_on_the_text_class():
    predicted = _predict(VLLM, "v5_gemma3_vl_on_text")
    assert not predicted.load_failure
    assert len(predicted.modules) == 14
    assert set(predicted.modules.values()) == {"dropped"}
    # on the VL class the same names are the class's own (its weights mapper maps them)
    vl = predict(VLLM, case_dir("v5_gemma3_vl") / "adapter", case_base_dir("v5_gemma3_vl"))
    assert set(vl.modules.values()) == {"exact"}


def test_vllm_layout_renames_a_vl_trained_gemma3_adapter_for_the_text_class(tmp_path):
    # not a fix (the layout already renamed): the fix the finding names, held to what vLLM applied in the proof
    report = _layout_report("v5_gemma3_vl_on_text", VLLM, tmp_path / "out")
    written = {m["module"] for g in report["groups"] for m in g["modules"]}
    assert written and all(name.startswith("model.layers.") for name in written), sorted(written)[:3]


# ---- 5. vision-tower LoRA whose keys have no `layers.N.`, listed by name in target_modules: SGLang fails at start-up
def test_sglang_refuses_a_vision_target_name_without_a_hidden_dim():
    predicted = _predict(SGLANG, "v5_qwen3_vl_moe_vision")
    assert "vision-target-no-hidden-dim" in predicted.load_failure
    assert "vision-keys-as-text-layers" not in predicted.load_failure  # the keys are model.visual.blocks.N...
    # vLLM loads it and leaves the vision tower out (measured)
    vllm = _predict(VLLM, "v5_qwen3_vl_moe_vision")
    assert not vllm.load_failure
    assert vllm.modules["model.visual.blocks.0.attn.qkv"] == "dropped"


# ---- 7. every engine finding puts the outcome in expected/actual (mla-missing-kv-a put B widths there)
def test_engine_findings_put_the_outcome_in_expected_and_actual():
    codes = _codes("v5_deepseek_v3_q_a_only", SGLANG)
    f = codes["engine.sglang.mla-missing-kv-a"]
    assert (f.expected, f.actual) == ("exact", "load-failure")
    assert "the fused B becomes [" in f.message  # the widths stay in the message


def test_vllm_kv_b_proj_finding_says_neither_path_applies_it():
    # vLLM 0.33.0 wraps kv_b_proj, but its MLA impl keeps the base layer for prefill and splits the base weight for
    # decode (mla_attention.py:594, :2929, :3043/:3186/:3252, :1242-1349): dropped on both paths, not "prefill only"
    codes = _codes("v5_deepseek_v3", VLLM)
    f = codes["engine.vllm.kv-b-proj-not-applied"]
    assert f.actual == "dropped"
    assert "neither path" in f.message and "prefill calls the base kv_b_proj" in f.message
    assert "mla_attention.py:594" in f.message


# ---- 8. a bitsandbytes-quantized base: vLLM 0.30-0.34 have no bitsandbytes method and refuse the base at start-up;
# SGLang 0.5.19-0.5.23 register one and serve the LoRA over it
@pytest.mark.parametrize("release", ["vllm==0.30.0", "vllm==0.32.0", VLLM, "vllm==0.34.0"])
def test_vllm_refuses_a_bitsandbytes_base(release):
    predicted = _predict(release, "v5_llama_bnb4")
    assert predicted.load_failure == ["quant-method-unknown"]
    codes = _codes("v5_llama_bnb4", release)
    f = codes["engine.vllm.quant-method-unknown"]
    assert (f.expected, f.actual) == ("exact", "load-failure")
    assert "bitsandbytes" in f.message


@pytest.mark.parametrize("release", ["sglang==0.5.19", "sglang==0.5.22", SGLANG])
def test_sglang_serves_lora_over_a_bitsandbytes_base(release):
    predicted = _predict(release, "v5_llama_bnb4")
    assert not predicted.load_failure
    assert set(predicted.modules.values()) == {"exact"}
    assert "quant-dense-lora" in {c.rsplit(".", 1)[-1] for c in _codes("v5_llama_bnb4", release)}
