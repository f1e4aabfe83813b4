"""`normalize --layout gguf` without llama.cpp: the file's metadata, names, shapes and values, read back with gguf-py,
against the `peft` layout of the same adapter; and what it refuses. tests/test_gguf_proof.py runs llama.cpp on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import FIXTURES, case_base_dir, case_dir
from lora_convert.errors import UnsupportedAdapterError

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.slow  # each writes an adapter through the pipeline (~0.3-1 s on 2 cores)
OUTSIDE = FIXTURES / "outside_proof"  # make_fixtures.py issue26_gguf_cases: bases in the forms llama.cpp takes


def located(case: str):
    """A fixture case's folder: cases/, or outside_proof/ (cases the engine proof does not run)."""
    return case_dir(case) if case_dir(case).is_dir() else OUTSIDE / case


def write(case: str, out, layout: str = "gguf", **kw):
    import lora_convert

    meta = json.loads((located(case) / "case.json").read_text())
    base = FIXTURES / "bases" / meta["base"]
    return lora_convert.normalize_adapter(located(case) / "adapter", out, base=base, layout=layout, **kw)


def read_gguf(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def permuted(b: np.ndarray, heads: int) -> np.ndarray:
    out, rank = b.shape
    return b.reshape(heads, 2, out // heads // 2, rank).swapaxes(1, 2).reshape(out, rank)


@pytest.mark.parametrize("case, arch", [("v5_llama", "llama"), ("v5_qwen3", "qwen3")])
def test_file_is_the_peft_layout_under_llama_cpp_names(case, arch, tmp_path):
    write(case, tmp_path / "gguf")
    write(case, tmp_path / "peft", layout="peft")
    fields, tensors = read_gguf(tmp_path / "gguf" / "adapter.gguf")
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    rank = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"]
    assert fields["general.architecture"] == arch
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == float(rank)
    config = json.loads((case_base_dir(case) / "config.json").read_text())
    names = gguf.TensorNameMap(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), 2)
    assert len(tensors) == len(peft)
    for key, want in peft.items():
        module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
        side = "lora_a" if ".lora_A." in key else "lora_b"
        name = f"{names.get_name(module + '.weight', try_suffixes=('.weight',))}.{side}"
        got = np.asarray(tensors[name].data)
        assert list(tensors[name].shape) == list(reversed(want.shape)), name  # GGUF lists ne: innermost first
        heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
        kind = name.split(".")[2]
        if arch == "llama" and side == "lora_b" and kind in heads:
            want = permuted(want, heads[kind])  # llama.cpp's converter reorders q/k rows for its RoPE
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_bf16_is_written_as_ggml_bf16(tmp_path):
    write("v5_qwen3", tmp_path / "o", dtype="bf16")
    _, tensors = read_gguf(tmp_path / "o" / "adapter.gguf")
    assert {t.tensor_type.name for t in tensors.values()} == {"BF16"}


@pytest.mark.parametrize("case", ["v4_mixtral", "v5_mixtral"])
def test_routed_experts_are_llama_cpps_stacked_pairs(case, tmp_path):
    """Per slice, lora_a [E, R, in] and lora_b [E, out, R]: expert e's delta is PEFT's (lora_b[e] @ lora_a[e])."""
    write(case, tmp_path / "o")
    _, tensors = read_gguf(tmp_path / "o" / "adapter.gguf")
    reference = load_file(str(case_dir(case) / "reference.safetensors"))
    config = json.loads((case_base_dir(case) / "config.json").read_text())
    E, inner = config["num_local_experts"], config["intermediate_size"]
    for layer in range(config["num_hidden_layers"]):
        for kind in ("gate", "up", "down"):
            a = np.asarray(tensors[f"blk.{layer}.ffn_{kind}_exps.weight.lora_a"].data)
            b = np.asarray(tensors[f"blk.{layer}.ffn_{kind}_exps.weight.lora_b"].data)
            assert a.shape[0] == b.shape[0] == E and a.shape[1] == b.shape[2]
            delta = np.einsum("eor,eri->eoi", b, a)
            want = _peft_expert_delta(reference, layer, kind, inner)
            np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-6)


def _peft_expert_delta(reference: dict, layer: int, kind: str, inner: int) -> np.ndarray:
    """PEFT's recorded delta of one expert projection, [E, out, in], from per-expert or 3-D fixture entries."""
    per_expert = {"gate": "w1", "up": "w3", "down": "w2"}[kind]
    keys = sorted(k for k in reference if f"layers.{layer}." in k and f".{per_expert}::delta_weight" in k)
    if keys:
        return np.stack([reference[k] for k in sorted(keys, key=lambda k: int(k.split(".experts.")[1].split(".")[0]))])
    # transformers 5: one 3-D delta per parameter (PEFT nests the second as `.base_layer`): told apart by shape
    deltas = [
        v for k, v in reference.items() if f"layers.{layer}." in k and k.endswith("::delta_weight") and v.ndim == 3
    ]
    if kind == "down":
        (delta,) = [d for d in deltas if d.shape[2] == inner]
        return delta
    (delta,) = [d for d in deltas if d.shape[1] == 2 * inner]  # rows gate then up (schemas/mixtral.json)
    return delta[:, :inner] if kind == "gate" else delta[:, inner:]


@pytest.mark.parametrize(
    "case, why",
    [
        ("v5_llama4_text", "tensor buffer not set"),
        ("v5_minimax", "registers only MiniMax's remote-code"),
        ("v5_mistral4", "TEXT_MODEL_MAP) has no Mistral4ForCausalLM"),  # llama.cpp's converter lacks it
        ("v5_hy_v3", "(PyPI gguf 0.19.0) has no MODEL_ARCH HY_V3"),  # the gguf lora-convert names tensors with lacks it
        ("v5_kimi_linear", "never build_lora_mm (src/models/kimi-linear.cpp"),
        ("v5_glm_moe_dsa", "GGML_ASSERT(ggml_can_mul_mat(a, b))"),
    ],
)
def test_a_family_llama_cpp_is_not_proven_on_is_refused_with_the_reason(case, why, tmp_path):
    with pytest.raises(UnsupportedAdapterError, match="has not proven llama.cpp on model_type") as info:
        write(case, tmp_path / "o")
    assert why in info.value.message
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "case, form",
    [
        ("v5_qwen3_moe", r"mlp_only_layers = \[0\]\): a dense layer"),  # the issue-14 bases: layer 0 dense
        ("v5_qwen2_moe", r"mlp_only_layers = \[0\]\): a dense layer"),
        ("v5_olmoe", r"num_key_value_heads = 2, num_attention_heads = 4\): llama.cpp's OLMoE loader"),
        ("v5_dots1", r"num_key_value_heads = 2, num_attention_heads = 4\): llama.cpp's dots1 loader"),
        ("v5_ernie4_5_moe", r"intermediate_size = 72, .*\): convert_hf_to_gguf.py writes the shared expert's width"),
        ("v5_nemotron_h", r".*mamba_head_dim = 24, mamba_num_heads = 4\): .* not a multiple of its SSM head dim"),
        ("v5_granitemoehybrid", r"layer_types = \['linear_attention', 'full_attention'\]\): .* named \"attention\""),
        ("v5_minimax_m2", r"rotary_dim = None\): convert_hf_to_gguf.py reads rotary_dim"),
        ("v5_gemma3_text", r"layer_types = \['sliding_attention', 'full_attention'\]\): .* every sixth layer"),
        ("v5_lfm2_moe", r"conv_bias = True\): llama.cpp's lfm2moe loader has no short-conv"),
        ("v5_falcon_h1", r"mamba_norm_before_gate = True\): llama.cpp's Mamba-2 layer multiplies by silu\(z\)"),
        ("v5_gemma4_text", r"final_logit_softcapping = None\): convert_hf_to_gguf.py writes no final logit"),
    ],
)
def test_a_base_llama_cpp_cannot_take_is_refused_named(case, form, tmp_path):
    """The same families on bases llama.cpp takes (v5_qwen3_moe_sparse, v5_qwen2_moe_sparse, v5_olmoe_mha, and the
    outside_proof/ cases of make_fixtures.py issue26_gguf_cases) are proven by tests/test_gguf_proof.py."""
    with pytest.raises(UnsupportedAdapterError, match=r"llama.cpp cannot take this \w+ base \(" + form):
        write(case, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "model_type, config, refused",
    [
        # released-like forms pass; one field off refuses; a field the expression needs and the config lacks refuses
        ("nemotron_h", {"num_experts_per_tok": 2, "mamba_num_heads": 4, "mamba_head_dim": 16}, False),
        ("nemotron_h", {"num_experts_per_tok": 2, "mamba_num_heads": 4, "mamba_head_dim": 16, "d_head": 32}, False),
        ("nemotron_h", {"num_experts_per_tok": 2, "mamba_num_heads": 4, "mamba_head_dim": 24}, True),
        ("nemotron_h", {"num_experts_per_tok": 2, "mamba_num_heads": 4}, True),
        ("nemotron_h", {"mamba_num_heads": 4, "mamba_head_dim": 16}, True),  # no experts: llama.cpp's nemotron_h
        (
            "nemotron_h",
            {
                "num_experts_per_tok": 2,
                "mamba_num_heads": 4,
                "mamba_head_dim": 16,
                "layers_block_type": ["mamba", "mlp"],
            },
            True,
        ),  # noqa: E501
        (
            "nemotron_h",
            {"num_experts_per_tok": 2, "mamba_num_heads": 4, "mamba_head_dim": 16, "hybrid_override_pattern": "ME*"},
            False,
        ),  # noqa: E501
        (
            "nemotron_h",
            {"num_experts_per_tok": 2, "mamba_num_heads": 4, "mamba_head_dim": 16, "hybrid_override_pattern": "M-*"},
            True,
        ),  # noqa: E501
        (
            "granitemoehybrid",
            {
                "layer_types": ["mamba", "attention"],
                "position_embedding_type": "nope",
                "mamba_expand": 2,
                "hidden_size": 48,
                "mamba_d_head": 24,
            },
            False,
        ),  # noqa: E501
        (
            "granitemoehybrid",
            {
                "layer_types": ["mamba", "attention"],
                "position_embedding_type": "rope",
                "mamba_expand": 2,
                "hidden_size": 48,
                "mamba_d_head": 24,
            },
            True,
        ),  # noqa: E501
        (
            "granitemoehybrid",
            {
                "layer_types": ["attention", "attention"],
                "position_embedding_type": "nope",
                "mamba_expand": 2,
                "hidden_size": 48,
                "mamba_d_head": 24,
            },
            True,
        ),  # noqa: E501
        (
            "ernie4_5_moe",
            {
                "intermediate_size": 12288,
                "num_key_value_heads": 4,
                "moe_intermediate_size": 1536,
                "moe_num_shared_experts": 2,
            },
            False,
        ),  # noqa: E501
        (
            "ernie4_5_moe",
            {
                "intermediate_size": 72,
                "num_key_value_heads": 2,
                "moe_intermediate_size": 20,
                "moe_num_shared_experts": 0,
            },
            False,
        ),  # noqa: E501
        (
            "gemma3_text",
            {
                "num_hidden_layers": 7,
                "layer_types": ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"],
            },
            False,
        ),  # noqa: E501
        ("gemma3_text", {"num_hidden_layers": 6, "layer_types": ["sliding_attention"] * 6}, True),
        ("minimax_m2", {"rotary_dim": 64}, False),
        ("lfm2_moe", {"conv_bias": False, "tie_word_embeddings": True}, False),
        ("lfm2_moe", {"conv_bias": False, "tie_word_embeddings": False}, True),  # lm_head: gguf-py has no output
        ("falcon_h1", {"mamba_norm_before_gate": False, "mamba_d_ssm": 96, "mamba_d_head": 24}, False),
        ("falcon_h1", {"mamba_d_ssm": 96, "mamba_d_head": 24}, True),  # transformers' default: norm before gate
        ("falcon_h1", {"mamba_norm_before_gate": False, "mamba_d_ssm": 96, "mamba_d_head": 36}, True),
        ("gemma4_text", {"final_logit_softcapping": 30.0}, False),
        ("gemma4_text", {"final_logit_softcapping": 30.0, "enable_moe_block": True}, True),
        ("gemma4_text", {"final_logit_softcapping": 30.0, "attention_k_eq_v": True}, True),
    ],
)
def test_the_base_forms_are_read_from_the_config(model_type, config, refused):
    from lora_convert.convert import gguf_layout

    target = gguf_layout.gguf_model_types()[model_type]
    if refused:
        with pytest.raises(UnsupportedAdapterError, match=f"llama.cpp cannot take this {model_type} base"):
            gguf_layout._refuse_base_form(target, config, model_type)
    else:
        gguf_layout._refuse_base_form(target, config, model_type)


def test_nemotron_h_is_written_under_the_converters_own_renames(tmp_path):
    """transformers 5's model.layers.N.mixer.* reach gguf-py's names through the converter's renames (backbone.*,
    the stacked experts as mlp.experts.*): mamba, shared expert, attention and routed experts all written."""
    import lora_convert

    case = OUTSIDE / "v5_nemotron_h_gguf"
    base = case_base_dir("v5_nemotron_h").parent / "v5_nemotron_h_gguf"
    lora_convert.normalize_adapter(case / "adapter", tmp_path / "o", base=base, layout="gguf")
    _, tensors = read_gguf(tmp_path / "o" / "adapter.gguf")
    kinds = {name.split(".")[2] for name in tensors}
    assert {"ssm_in", "ffn_up_shexp", "ffn_down_shexp", "attn_q", "attn_output", "ffn_up_exps"} <= kinds, kinds
    assert {"ffn_down_exps"} <= kinds


def test_modules_llama_cpp_never_applies_are_refused_or_dropped_named(tmp_path):
    """DeepSeek-V3's MLA projections: llama.cpp multiplies by them without LoRA, or splits kv_b_proj per head; the
    routed experts and o_proj are written."""
    with pytest.raises(
        UnsupportedAdapterError, match=r"self_attn\.\w+ on layers 0-2 \(llama.cpp's (deepseek2 graph|converter)"
    ):
        write("v5_deepseek_v3", tmp_path / "o")
    write("v5_deepseek_v3", tmp_path / "d", drop_unsupported=True)
    _, tensors = read_gguf(tmp_path / "d" / "adapter.gguf")
    kinds = {name.split(".")[2] for name in tensors}
    assert not kinds & {"attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_kv_b"}, kinds
    assert {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"} <= kinds
    report = json.loads((tmp_path / "d" / "lora_convert_report.json").read_text())
    dropped = json.dumps(report)
    assert "kv_b_proj" in dropped and "plain ggml_mul_mat" in dropped


def test_only_the_floats_llama_cpp_applies_have_a_ggml_type():
    from lora_convert.convert import gguf_layout

    assert gguf_layout.ggml_type("F8_E4M3") is None  # plan_gguf_layout refuses such an output dtype, named
    assert gguf_layout.ggml_type("BF16") is not None


def test_a_nan_leaves_no_output_and_no_half_written_file(tmp_path):
    """The GGUF writer streams into the temporary folder; a refusal while writing removes it (output_folder.py)."""
    import shutil

    from safetensors.numpy import save_file

    from lora_convert.errors import NonFiniteValuesError

    adapter = tmp_path / "adapter"
    shutil.copytree(case_dir("v5_llama") / "adapter", adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = sorted(tensors)[-1]
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] = np.nan
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    import lora_convert

    with pytest.raises(NonFiniteValuesError):
        lora_convert.normalize_adapter(adapter, tmp_path / "o", base=case_base_dir("v5_llama"), layout="gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_b_rows_are_scaled_as_the_converter_scales_the_base_weights(tmp_path):
    """Falcon-H1: llama.cpp's converter folds the muP multipliers into the weights (conversion/falcon_h1.py:62-86),
    so B's rows carry the same factors: in_proj's z | x | B | C | dt blocks each its own, the MLP and attention one
    each, lm_head its lm_head_multiplier; up_proj none. Without them the GGUF proof is 2.6e-2 off PEFT, without
    lm_head's alone 4.1e-2 (measured)."""
    case = "v5_falcon_h1_gguf"
    write(case, tmp_path / "gguf")
    write(case, tmp_path / "peft", layout="peft")
    _, tensors = read_gguf(tmp_path / "gguf" / "adapter.gguf")
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    c = json.loads((FIXTURES / "bases" / case / "config.json").read_text())
    d, g = c["mamba_d_ssm"], c["mamba_n_groups"] * c["mamba_d_state"]
    blocks = [d, d, g, g, c["mamba_n_heads"]]
    ssm_in = np.repeat([c["ssm_in_multiplier"] * m for m in c["ssm_multipliers"]], blocks)
    factors = {
        "mamba.in_proj": ssm_in,
        "feed_forward.gate_proj": c["mlp_multipliers"][0],
        "feed_forward.down_proj": c["mlp_multipliers"][1],
        "feed_forward.up_proj": 1.0,
        "self_attn.q_proj": c["attention_in_multiplier"],
        "self_attn.k_proj": c["key_multiplier"] * c["attention_in_multiplier"],
        "self_attn.v_proj": c["attention_in_multiplier"],
        "self_attn.o_proj": c["attention_out_multiplier"],
        "lm_head": c["lm_head_multiplier"],
    }
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.FALCON_H1, c["num_hidden_layers"])
    seen = set()
    for key, want in peft.items():
        module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        path, factor = next((path, f) for path, f in factors.items() if module.endswith(path))
        if ".lora_B." in key:
            want = want * np.reshape(factor, (-1, 1))
            seen.add(path)
        got = np.asarray(tensors[f"{name}.{'lora_b' if '.lora_B.' in key else 'lora_a'}"].data)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=key)
    assert seen == set(factors), seen


def test_row_factors_a_config_cannot_give_refuse(tmp_path):
    from lora_convert.convert import gguf_layout

    with pytest.raises(UnsupportedAdapterError, match="cover 10 rows, the weight has 12"):
        gguf_layout._row_scale((("10", "2.0"),), {}, 12, "falcon_h1 ffn_gate")
    with pytest.raises(UnsupportedAdapterError, match="the base config cannot give them"):
        gguf_layout._row_scale((("out", "mlp_multipliers[0]"),), {}, 12, "falcon_h1 ffn_gate")
    assert gguf_layout._row_scale((("out", "2.0"),), {}, 3, "x") == (2.0, 2.0, 2.0)


def test_a_tensor_llama_cpp_multiplies_without_lora_is_refused_on_a_base_it_takes(tmp_path):
    """Gemma-4's model-level per_layer_model_projection: llama.cpp multiplies by it with plain ggml_mul_mat
    (src/models/gemma4.cpp:515). v5_gemma4_text's adapter on its base with the released softcapping: refused named,
    or dropped with --drop-unsupported, the rest written."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "bases" / "v5_gemma4_text", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    import lora_convert

    adapter = located("v5_gemma4_text") / "adapter"
    with pytest.raises(UnsupportedAdapterError, match=r"per_layer_model_projection .*never build_lora_mm"):
        lora_convert.normalize_adapter(adapter, tmp_path / "o", base=base, layout="gguf")
    assert not (tmp_path / "o").exists()
    lora_convert.normalize_adapter(adapter, tmp_path / "d", base=base, layout="gguf", drop_unsupported=True)
    _, tensors = read_gguf(tmp_path / "d" / "adapter.gguf")
    kinds = {name.split(".")[-3] if name.startswith("blk.") else name.split(".")[0] for name in tensors}
    assert "per_layer_model_proj" not in kinds and {"attn_q", "inp_gate", "proj", "ffn_gate"} <= kinds, kinds


def test_a_wrapped_base_a_family_is_proven_on_only_as_text_is_refused(tmp_path):
    with pytest.raises(
        UnsupportedAdapterError, match="gemma4_text base in its wrapper: .*Gemma4ForConditionalGeneration"
    ):
        write("v5_gemma4_vl", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_routed_experts_the_converter_would_scale_are_refused_not_written_unscaled(monkeypatch, tmp_path):
    """No converter scales a stacked expert tensor today; the stacked writer scales no rows, so a row_scales entry on
    one must refuse (fails closed) rather than write the pair unscaled."""
    import dataclasses

    from lora_convert.convert import gguf_layout

    types = dict(gguf_layout.gguf_model_types())
    types["lfm2_moe"] = dataclasses.replace(types["lfm2_moe"], row_scales={"ffn_gate_exps": (("out", "2.0"),)})
    monkeypatch.setattr(gguf_layout, "gguf_model_types", lambda: types)
    with pytest.raises(UnsupportedAdapterError, match=r"scales the rows of blk\.1\.ffn_gate_exps\.weight"):
        write("v5_lfm2_moe_gguf", tmp_path / "o")
    assert not (tmp_path / "o").exists()
