"""validate on lora-convert's own `--layout vllm` output: the k_proj LoRA that layout writes a second time as v_proj
on Gemma-4's attention_k_eq_v layers (where the base has no v_proj) is recognised from the folder's manifest and the
vLLM rule file's layout cut, checked byte for byte, and reported as `modules.layout-copy`; anything else of that
shape is still a module on the wrong layer type (lora_convert/check/layout_copies.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import case_base_dir, case_dir
from lora_convert.pipeline.commands import normalize, validate

pytestmark = pytest.mark.slow

CASE = "v5_gemma4_moe"  # full-attention layers 1 and 3 are attention_k_eq_v (tests/fixtures/README.md)
COPIES = {"model.layers.1.self_attn.v_proj", "model.layers.3.self_attn.v_proj"}


@pytest.fixture(scope="module")
def vllm_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("layout-copies") / "vllm"
    normalize(str(case_dir(CASE) / "adapter"), out, base=str(case_base_dir(CASE)), layout="vllm==0.34.0")
    return out


def _validate(folder):
    return validate(str(folder), base=str(case_base_dir(CASE)), smoke=False)


def _codes(report) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for f in report.findings:
        found.setdefault(f.code, []).extend(f.keys)
    return found


def _modules(keys) -> set[str]:
    return {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in keys}


def test_the_layouts_own_copy_is_a_note_not_an_error(vllm_output):
    report = _validate(vllm_output)
    codes = _codes(report)
    assert report.ok, [(f.code, f.message) for f in report.errors]
    assert "modules.not-on-layer-type" not in codes
    assert _modules(codes["modules.layout-copy"]) == COPIES


def _copy_of(vllm_output, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(vllm_output, folder)
    return folder


def test_a_copy_that_differs_from_k_proj_is_still_an_error(vllm_output, tmp_path):
    folder = _copy_of(vllm_output, tmp_path)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"
    tensors[key] = tensors[key] + np.float32(1e-3)
    save_file(tensors, str(path))
    codes = _codes(_validate(folder))
    assert _modules(codes["modules.not-on-layer-type"]) == {"model.layers.3.self_attn.v_proj"}
    assert _modules(codes["modules.layout-copy"]) == {"model.layers.1.self_attn.v_proj"}


def test_without_lora_converts_manifest_nothing_is_taken_for_a_copy(vllm_output, tmp_path):
    folder = _copy_of(vllm_output, tmp_path)
    (folder / "lora_convert_manifest.json").unlink()
    codes = _codes(_validate(folder))
    assert _modules(codes["modules.not-on-layer-type"]) == COPIES
    assert "modules.layout-copy" not in codes


def test_a_layout_without_copies_names_none(vllm_output, tmp_path):
    # the same file said to be the stacked layout's output: no rule file's cut writes a copy there
    folder = _copy_of(vllm_output, tmp_path)
    manifest = folder / "lora_convert_manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "layout": "stacked"}))
    codes = _codes(_validate(folder))
    assert _modules(codes["modules.not-on-layer-type"]) == COPIES
