"""The PEFT proof of `normalize --layout peft`: real PEFT loads the output onto the fixture's tiny base model and
reproduces the original adapter's logits (float32, max abs diff <= 1e-4).

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
from lora_convert.errors import UnsupportedAdapterError  # noqa: E402
from lora_convert.peft.naming import parse_key  # noqa: E402

pytestmark = pytest.mark.peft
TOLERANCE = 1e-4
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

# PEFT itself cannot apply these adapters exactly on transformers 5: for the model types it converts from
# transformers 4 (deepseek_v3, qwen3_moe, qwen3_next, mixtral, ...) it maps every `gate_proj`/`up_proj`/`down_proj`
# target onto the routed experts' 3-D parameters, with rank 2r (peft/utils/transformers_weight_conversion.py,
# `_convert_peft_config_moe`), so a dense-layer or shared-expert MLP LoRA next to routed experts has no module, in
# the original adapter as in any file. test_peft_cannot_apply_these_either checks that PEFT loses them on the
# ORIGINAL adapter too; when a PEFT release applies them, that test fails and these move to the logits test.
PEFT_LOSES_DENSE_MLP_NEXT_TO_EXPERTS = {
    "v4_deepseek_v3": "dense-layer MLP (layer 0) next to routed experts",
    "v4_deepseek_v3_gate_only": "dense-layer MLP next to routed experts",
    "v4_qwen3_moe": "dense-layer MLP (mlp_only_layers) next to routed experts",
    "v4_qwen3_next": "shared-expert MLP next to routed experts",
    "v5emu_deepseek_v3_noconv": "dense/shared-expert MLP next to routed experts",
}


def _produce(case: str, out: Path):
    from lora_convert.convert.normalize import normalize

    base = str(case_base_dir(case))
    try:
        return normalize(str(case_dir(case) / "adapter"), out, base=base, layout="peft"), False
    except UnsupportedAdapterError:
        return normalize(str(case_dir(case) / "adapter"), out, base=base, layout="peft", drop_unsupported=True), True


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


def _logits(model, adapter_dir: Path, input_ids, zero_modules=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    root = pm.base_model.model
    for path in zero_modules:
        # transformers 5 renamed Mixtral's block_sparse_moe to mlp; PEFT converts v4 adapters on load
        candidates = [path, path.replace(".block_sparse_moe.", ".mlp.")]
        module = next((root.get_submodule(p) for p in candidates if _has(root, p)), None)
        if module is None:
            raise KeyError(path)
        module.lora_B["default"].weight.data.zero_()
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


def _has(root, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def _cases():
    out = []
    for case in fixture_cases():
        meta = case_meta(case)
        reason = None
        if meta["auto_class"] is None:
            reason = f"emulated model ({meta['emulated']}): no transformers class to load it with"
        elif "dora" in case:
            reason = "DoRA: refused by every layout (no plain-LoRA form)"
        elif TRANSFORMERS_5 and case in PEFT_LOSES_DENSE_MLP_NEXT_TO_EXPERTS:
            reason = (
                "PEFT itself cannot apply it on transformers 5 "
                f"({PEFT_LOSES_DENSE_MLP_NEXT_TO_EXPERTS[case]}; checked by test_peft_cannot_apply_these_either)"
            )
        out.append(pytest.param(case, marks=pytest.mark.skip(reason=reason)) if reason else case)
    return out


@pytest.mark.parametrize("case", _cases())
def test_peft_layout_reproduces_peft_logits(case, tmp_path):
    out = tmp_path / "peft"
    result, dropped = _produce(case, out)
    ref = load_file(str(case_dir(case) / "reference.safetensors"))
    ids = ref["logits::input_ids"]
    model = _load_base(case, out)
    got = _logits(model, out, ids)
    if not dropped:
        want = ref["logits::adapted"]
    else:
        # The layout left modules out (MoE router or kv_b_proj LoRA, which vLLM does not apply; vision modules):
        # compare with PEFT's own forward of the original adapter with exactly those modules switched off.
        paths = sorted({parse_key(k).module for d in result.dropped for k in d.keys})
        model = _load_base(case, out)
        try:
            want = _logits(model, case_dir(case) / "adapter", ids, zero_modules=paths)
        except (AttributeError, KeyError) as exc:
            pytest.fail(f"PEFT's in-memory modules of the original adapter do not match the dropped paths ({exc})")
        assert (want - ref["logits::adapted"]).abs().max() > 0  # the dropped modules did matter
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


def test_embedding_lora_round_trips_through_peft(tmp_path):
    from helpers import write_adapter
    from lora_convert.convert.normalize import normalize

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
