"""The PEFT proof of `normalize --layout peft`: real PEFT loads the output onto the fixture's tiny base model and
reproduces the original adapter's logits (float32, max abs diff <= 1e-4), and, for the fixtures with vision-tower
and projector LoRA (which text-only logits do not reach), every module's delta.

Marked `peft`: it needs transformers and peft (`pip install transformers peft`; CI installs them for this group).
What is covered and what is skipped, and why, is listed below and in docs/engine-layouts.md.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

if os.environ.get("LORA_CONVERT_REQUIRE_PROOF"):
    # CI installs transformers and peft for this group: there, a missing package is a failure, not a skip.
    import peft  # noqa: F401
    import torch
    import transformers
else:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import torch  # a dependency of lora-convert itself

from safetensors.torch import load_file  # noqa: E402

from helpers import case_base_dir, case_dir, case_meta, fixture_cases  # noqa: E402

pytestmark = pytest.mark.peft
TOLERANCE = 1e-4
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

# PEFT itself cannot apply these ORIGINAL adapters exactly on transformers 5: for the model types it converts from
# transformers 4 (deepseek_v3, qwen3_moe, qwen3_next, mixtral, ...) it maps every `gate_proj`/`up_proj`/`down_proj`
# entry of target_modules (leaf, full path or regex alike) onto the routed experts' 3-D parameters, with rank 2r
# (peft/utils/transformers_weight_conversion.py `_convert_peft_config_moe`), so a dense-layer or shared-expert MLP
# LoRA next to routed experts gets no module (test_peft_cannot_apply_these_either). The `peft` layout writes those
# modules as full-path target_parameters (`<module>.weight`, which PEFT does not rewrite: convert/peft_layout.json
# `converted_targets`), and its output reproduces PEFT's logits for them (test_peft_layout_reproduces_peft_logits).
PEFT_LOSES_DENSE_MLP_NEXT_TO_EXPERTS = {
    "v4_deepseek_v3": "dense-layer MLP (layer 0) next to routed experts",
    "v4_deepseek_v3_gate_only": "dense-layer MLP next to routed experts",
    "v4_qwen3_moe": "dense-layer MLP (mlp_only_layers) next to routed experts",
    "v4_qwen3_next": "shared-expert MLP next to routed experts",
    "v5emu_deepseek_v3_noconv": "dense/shared-expert MLP next to routed experts",
}


def _produce(case: str, out: Path):
    """The `peft` output of a fixture, written whole: PEFT applied every module of it, so the layout refuses none
    (without --drop-unsupported; vision-tower and projector modules included)."""
    from lora_convert.pipeline.commands import normalize

    result = normalize(str(case_dir(case) / "adapter"), out, base=str(case_base_dir(case)), layout="peft")
    # PEFT's copy of a base weight (`lm_head.base_layer.weight`) is left out: the base has the weight
    dropped = [d.module for d in result.dropped if d.code != "keys.base-layer-copy"]
    assert dropped == [], dropped
    return result


def _load_base(case: str, out: Path):
    """The case's own model class; if the output's module paths (checkpoint naming) are not that class's, the
    composite class that has them (Qwen3.5: the text class has `model.layers`, the checkpoint
    `model.language_model.layers`)."""
    meta = case_meta(case)
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    wanted = {k[len("base_model.model.") :].rsplit(".lora_", 1)[0] for k in keys if ".experts." not in k}
    tried = []
    for name in dict.fromkeys([meta["auto_class"], "AutoModelForImageTextToText"]):
        try:
            model = getattr(transformers, name).from_pretrained(str(case_base_dir(case)), dtype=torch.float32)
        except (ValueError, KeyError) as exc:
            tried.append(f"{name}: {exc}"[:120])
            continue
        names = {n for n, _ in model.named_modules()}
        # transformers 5 renamed Mixtral's block_sparse_moe to mlp (a v4 checkpoint is converted on load)
        names |= {n.replace(".mlp.", ".block_sparse_moe.") for n in names} if TRANSFORMERS_5 else set()
        if wanted <= names:
            return model.eval()
        tried.append(f"{name}: lacks {sorted(wanted - names)[:2]}")
    pytest.fail(f"no model class of {case} has the output's module paths: {tried}")


def _logits(model, adapter_dir: Path, input_ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    root = pm.base_model.model
    with torch.no_grad():
        try:
            return pm(input_ids=input_ids).logits
        except AttributeError as exc:
            # transformers 5.24.0's Llama4ForConditionalGeneration.forward reads `outputs.image_outputs` from its
            # language model's output, which has none (transformers/models/llama4/modeling_llama4.py:1318; 5.23.0
            # has no such line). With text-only input the wrapper's logits are its language model's: ask it.
            language_model = getattr(root, "language_model", None)
            if "image_outputs" not in str(exc) or language_model is None:
                raise
            return language_model(input_ids=input_ids).logits


def _cases():
    out = []
    for case in fixture_cases():
        meta = case_meta(case)
        reason = None
        if meta["auto_class"] is None:
            reason = f"emulated model ({meta['emulated']}): no transformers class to load it with"
        elif "dora" in case:
            reason = "DoRA: refused by every layout (no plain-LoRA form)"
        elif "trainable_tokens" in case:
            reason = "trainable-token rows: no LoRA factor, refused by every layout (keys.trainable-tokens)"
        elif meta.get("served_class"):
            reason = "trained on another class's base: PEFT's logits are of that base, not of the one it is served on"
        out.append(pytest.param(case, marks=pytest.mark.skip(reason=reason)) if reason else case)
    return out


@pytest.mark.parametrize("case", _cases())
def test_peft_layout_reproduces_peft_logits(case, tmp_path):
    out = tmp_path / "peft"
    _produce(case, out)
    ref = load_file(str(case_dir(case) / "reference.safetensors"))
    ids = ref["logits::input_ids"]
    got = _logits(_load_base(case, out), out, ids)
    want = ref["logits::adapted"]
    diff = float((got - want).abs().max())
    effect = float((ref["logits::adapted"] - ref["logits::base"]).abs().max())
    assert diff <= TOLERANCE, f"{case}: max |logits diff| {diff:.3g} (the adapter moves the logits by {effect:.3g})"
    assert float((got - ref["logits::base"]).abs().max()) > 10 * diff  # the adapter was applied, not ignored


@pytest.mark.skipif(not TRANSFORMERS_5, reason="the limitation is PEFT's transformers-5 conversion")
@pytest.mark.parametrize("case", sorted(PEFT_LOSES_DENSE_MLP_NEXT_TO_EXPERTS))
def test_peft_cannot_apply_these_either(case):
    """The ORIGINAL adapter loaded by PEFT on transformers 5 does not reproduce PEFT's own logits (from the
    transformers-4 environment that wrote it): PEFT fails to load it or serves a different delta."""
    ref = load_file(str(case_dir(case) / "reference.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(case_base_dir(case)), dtype=torch.float32).eval()
    try:
        got = _logits(model, case_dir(case) / "adapter", ref["logits::input_ids"])
    except (RuntimeError, ValueError):
        return  # PEFT refuses it
    assert float((got - ref["logits::adapted"]).abs().max()) > TOLERANCE


def _is_vision(module: str) -> bool:
    from lora_convert.peft.naming import VISION_SEGMENTS

    return not VISION_SEGMENTS.isdisjoint(module.split("."))


def _vision_cases():
    return [c for c in fixture_cases() if case_meta(c)["auto_class"] and any(map(_is_vision, case_meta(c)["modules"]))]


@pytest.mark.parametrize("case", _vision_cases())
def test_peft_layout_reproduces_vision_tower_and_projector_deltas(case, tmp_path):
    """Text-only logits do not reach a vision tower, so the vision cases are held to PEFT's own reference deltas:
    PEFT loads the `peft` output (written without --drop-unsupported) onto the tiny base, and every LoRA module of
    the original, vision tower and projector included, is a LoRA layer there whose delta equals PEFT's
    `get_delta_weight` of the original (reference.safetensors)."""
    out = tmp_path / "peft"
    _produce(case, out)
    ref = load_file(str(case_dir(case) / "reference.safetensors"))
    model = _load_base(case, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = peft.PeftModel.from_pretrained(model, str(out)).base_model.model
    modules = case_meta(case)["modules"]
    assert any(map(_is_vision, modules)), case
    for name in modules:
        layer = root.get_submodule(name)
        assert isinstance(layer, peft.tuners.lora.LoraLayer), f"{name}: PEFT did not apply the output's module here"
        got, want = layer.get_delta_weight("default").detach(), ref[f"{name}::delta_weight"]
        assert float(want.abs().max()) > 0, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=name)


def test_embedding_lora_round_trips_through_peft(tmp_path):
    from helpers import write_adapter
    from lora_convert.pipeline.commands import normalize

    base = case_base_dir("v5_llama")
    cfg = json.loads((base / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    V, H = cfg["vocab_size"], cfg["hidden_size"]
    tensors = {
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(4, V, generator=g),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(H, 4, generator=g),
    }
    adapter = write_adapter(tmp_path / "emb", tensors, {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens"]})
    normalize(str(adapter), tmp_path / "peft", base=str(base), layout="peft")
    ids = torch.tensor([[1, 5, 9, 3, 127]])
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()  # noqa: E731
    want, got = _logits(load(), adapter, ids), _logits(load(), tmp_path / "peft", ids)
    assert float((got - want).abs().max()) <= TOLERANCE


def test_vision_embedding_lora_round_trips_through_peft(tmp_path):
    """An Embedding in a vision tower (Qwen3-VL's `pos_embed`): PEFT loads it from the `peft` output with the delta it
    loads from the original (no fixture holds one: vLLM 0.33.0 refuses such an adapter, which the engine proof of a
    fixture would hit)."""
    from helpers import write_adapter
    from lora_convert.pipeline.commands import normalize

    base = case_base_dir("v5_qwen3_vl")
    vision = json.loads((base / "config.json").read_text())["vision_config"]
    g = torch.Generator().manual_seed(0)
    N, D = vision["num_position_embeddings"], vision["hidden_size"]
    tensors = {
        "base_model.model.model.visual.pos_embed.lora_embedding_A": torch.randn(4, N, generator=g),
        "base_model.model.model.visual.pos_embed.lora_embedding_B": torch.randn(D, 4, generator=g),
        "base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight": torch.randn(2, D, generator=g),
        "base_model.model.model.visual.blocks.0.attn.qkv.lora_B.weight": torch.randn(3 * D, 2, generator=g),
    }
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["pos_embed", "qkv"], "rank_pattern": {"qkv": 2}}
    adapter = write_adapter(tmp_path / "vision", tensors, config)
    normalize(str(adapter), tmp_path / "peft", base=str(base), layout="peft")

    def deltas(folder):
        model = transformers.AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root = peft.PeftModel.from_pretrained(model, str(folder)).base_model.model
        kinds = {
            "model.visual.pos_embed": peft.tuners.lora.Embedding,
            "model.visual.blocks.0.attn.qkv": peft.tuners.lora.Linear,
        }
        for name, kind in kinds.items():
            assert isinstance(root.get_submodule(name), kind), (folder, name)
        return {n: root.get_submodule(n).get_delta_weight("default").detach() for n in kinds}

    want, got = deltas(adapter), deltas(tmp_path / "peft")
    for name, delta in want.items():
        assert float(delta.abs().max()) > 0, name
        torch.testing.assert_close(got[name], delta, rtol=1e-5, atol=1e-6 * float(delta.abs().max()), msg=name)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="the re-targeting is PEFT's transformers-5 conversion")
def test_peft_layout_writes_dense_mlp_next_to_experts_as_target_parameters(tmp_path):
    """Why the `peft` layout writes a dense/shared-expert MLP of a converted MoE model type as full-path
    target_parameters: as written, PEFT reproduces its own logits (float32, within TOLERANCE); with the dense
    `down_proj` named by its leaf in target_modules instead (the form every other base gets), PEFT re-targets the
    name onto the routed experts and silently leaves the dense module out; with `gate_proj` and `up_proj` so named,
    it doubles the experts' gate_up rank and refuses the file."""
    case = "v4_qwen3_moe"  # layer 0 dense (mlp_only_layers), layer 1 routed experts and router
    out = tmp_path / "peft"
    _produce(case, out)
    config = json.loads((out / "adapter_config.json").read_text())
    dense = [p for p in config["target_parameters"] if p.endswith(".weight")]
    assert dense == [f"model.layers.0.mlp.{leaf}.weight" for leaf in ("down_proj", "gate_proj", "up_proj")]
    assert not {"gate_proj", "up_proj", "down_proj"} & set(config["target_modules"])
    assert "gate" in config["target_modules"]  # the router: PEFT's `gate.weight` re-target is its own weight
    ref = load_file(str(case_dir(case) / "reference.safetensors"))
    ids, want = ref["logits::input_ids"], ref["logits::adapted"]
    assert float((_logits(_load_base(case, out), out, ids) - want).abs().max()) <= TOLERANCE

    def as_leaves(leaves: set[str]) -> Path:
        folder = tmp_path / "_".join(sorted(leaves))
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes((out / "adapter_model.safetensors").read_bytes())
        moved = [p for p in dense if p.split(".")[-2] in leaves]
        edited = {
            **config,
            "target_modules": sorted({*config["target_modules"], *leaves}),
            "target_parameters": [p for p in config["target_parameters"] if p not in moved],
        }
        (folder / "adapter_config.json").write_text(json.dumps(edited))
        return folder

    got = _logits(_load_base(case, out), as_leaves({"down_proj"}), ids)
    assert float((got - want).abs().max()) > TOLERANCE  # loaded, without the dense down_proj
    with pytest.raises(RuntimeError, match="size mismatch"):
        _logits(_load_base(case, out), as_leaves({"gate_proj", "up_proj"}), ids)
