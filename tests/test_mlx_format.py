"""The MLX reader and writer on adapters mlx-lm's own training code wrote (tests/fixtures/mlx/, made by
make_mlx_fixtures.py): detection, PEFT orientation on read, the exact scale, switch experts, the base it needs,
mlx-lm's hazards, and `--layout mlx` giving back the same deltas. mlx-lm itself runs in tests/test_mlx_proof.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_convert
from lora_convert.errors import UnsupportedAdapterError, UsageError
from lora_convert.peft.mlx_format import is_mlx_adapter, mlx_facts
from lora_convert.pipeline.prepared import prepare

TESTS = Path(__file__).resolve().parent
MLX = TESTS / "fixtures" / "mlx"
DATA = TESTS / "fixtures" / "data"
LLAMA = MLX / "llama_last1"
MOE = MLX / "qwen3_moe_switch"
LLAMA_BASE = str(DATA / "bases" / "v5_llama")
MOE_BASE = str(DATA / "bases" / "v5_qwen3_moe")
PEFT = "base_model.model."


def _stored(folder: Path) -> dict[str, np.ndarray]:
    return load_file(folder / "adapters.safetensors")


def _mlx_deltas(folder: Path) -> dict[str, np.ndarray]:
    """What mlx-lm adds per module: scale * lora_b.T @ lora_a.T (dense), scale * lora_b[e] @ lora_a[e] (switch)."""
    scale = json.loads((folder / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    stored = _stored(folder)
    out = {}
    for key, a in stored.items():
        if key.endswith(".lora_a"):
            b = stored[key[: -len("lora_a")] + "lora_b"].astype(np.float64)
            a = a.astype(np.float64)
            out[key[: -len(".lora_a")]] = scale * (b @ a if a.ndim == 3 else b.T @ a.T)
    return out


def test_detection_is_by_mlx_lm_config_fields():
    assert is_mlx_adapter(LLAMA) and is_mlx_adapter(MOE)
    assert not is_mlx_adapter(DATA / "cases" / "v5_llama" / "adapter")


def test_dense_factors_read_in_peft_orientation_with_the_exact_scale():
    adapter = prepare(LLAMA).adapter
    stored = _stored(LLAMA)
    assert adapter.file_format == "mlx" and adapter.config.r == 4
    assert {m.module for m in adapter.modules} == {
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.down_proj",
    }
    for m in adapter.modules:
        assert m.scaling == 2.5 and m.alpha == 10.0 and m.rank == 4
        a, b = adapter.read(m.lora_A.key), adapter.read(m.lora_B.key)
        np.testing.assert_array_equal(a, stored[f"{m.module}.lora_a"].T)
        np.testing.assert_array_equal(b, stored[f"{m.module}.lora_b"].T)
        assert a.flags.c_contiguous and m.lora_A.shape == a.shape


def test_switch_experts_are_per_expert_slices_without_transposing():
    adapter = prepare(MOE).adapter
    stored = _stored(MOE)
    gate = stored["model.layers.1.mlp.switch_mlp.gate_proj.lora_a"]
    experts = [m for m in adapter.modules if m.module.endswith("gate_proj") and m.expert is not None]
    assert len(experts) == gate.shape[0] == 4
    for m in experts:
        np.testing.assert_array_equal(adapter.read(m.lora_A.key), gate[m.expert])
        lora_b = stored["model.layers.1.mlp.switch_mlp.gate_proj.lora_b"]
        np.testing.assert_array_equal(adapter.read(m.lora_B.key), lora_b[m.expert])
        assert m.module == f"model.layers.1.mlp.experts.{m.expert}.gate_proj" and m.scaling == 20.0


def test_family_renames_replace_whole_path_fragments_and_read_back():
    facts = mlx_facts()
    hf = "model.layers.3.mixer.switch_mlp.up_proj"
    assert facts.mlx_path("nemotron_h", hf) == "backbone.layers.3.mixer.switch_mlp.fc1"
    assert facts.transformers_path("nemotron_h", "backbone.layers.3.mixer.switch_mlp.fc1") == hf
    moe = "model.layers.0.mlp.switch_mlp.gate_proj"
    assert facts.mlx_path("minimax_m2", moe) == "model.layers.0.block_sparse_moe.switch_mlp.gate_proj"
    assert facts.mlx_path("minimax_m2", "model.layers.0.mlp_x.q") == "model.layers.0.mlp_x.q"  # not a whole fragment
    assert facts.mlx_path("llama", hf) == facts.mlx_path(None, hf) == hf  # no renames: transformers' names
    for family, pairs in facts.renames.items():
        assert family in facts.families, family  # a rename is proven with its family
        for old in pairs:
            path = f"{old}.7.q_proj"
            assert facts.transformers_path(family, facts.mlx_path(family, path)) == path, (family, old)


def test_every_schema_family_is_written_or_refused_with_a_reason():
    from lora_convert.arch.schema import list_schemas, load_schema

    facts = mlx_facts()
    schema_families = {load_schema(f).family for f in list_schemas()}
    assert not set(facts.families) & set(facts.unproven)
    assert schema_families == set(facts.families) | set(facts.unproven), "add the family to mlx_lm.json"
    assert all(why for why in facts.unproven.values())
    assert set(facts.unproven_model_types) <= set(facts.families)  # a model type of a proven family
    assert all(why for types in facts.unproven_model_types.values() for why in types.values())


def test_an_mlx_adapter_needs_a_base(tmp_path):
    with pytest.raises(UsageError, match="names no base model") as caught:
        lora_convert.normalize_adapter(LLAMA, tmp_path / "out", layout="peft")
    assert caught.value.exit_code == 2
    assert lora_convert.inspect_adapter(LLAMA).module_count == 3  # headers only: no base needed


@pytest.mark.parametrize(("folder", "base"), [(LLAMA, LLAMA_BASE), (MOE, MOE_BASE)])
def test_layout_mlx_gives_back_mlx_lm_deltas(tmp_path, folder, base):
    out = tmp_path / "out"
    lora_convert.normalize_adapter(folder, out, base=base, layout="mlx")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_layers"] == 1 and config["lora_parameters"]["scale"] == 1.0
    want, got = _mlx_deltas(folder), _mlx_deltas(out)
    assert set(got) == set(want)
    for key, delta in want.items():
        np.testing.assert_allclose(got[key], delta, rtol=0, atol=1e-6 * np.abs(delta).max())


def _copy(tmp_path: Path, folder: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _codes(folder: Path, base: str) -> set[str]:
    report = lora_convert.validate_adapter(folder, base=base, smoke=False)
    return {f.code for f in report.findings}


def test_validate_finds_factors_saved_in_peft_orientation(tmp_path):
    folder = _copy(tmp_path, LLAMA)
    stored = {k: np.ascontiguousarray(v.T) for k, v in _stored(folder).items()}
    save_file(stored, folder / "adapters.safetensors")
    assert "mlx.factors-peft-orientation" in _codes(folder, LLAMA_BASE)
    assert "mlx.factors-peft-orientation" not in _codes(LLAMA, LLAMA_BASE)


def test_validate_finds_alpha_in_scale_and_layers_outside_num_layers(tmp_path):
    folder = _copy(tmp_path, LLAMA)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_parameters"]["alpha"] = config["lora_parameters"]["scale"]
    config["num_layers"] = 1
    stored = _stored(folder)
    stored.update({k.replace("layers.1.", "layers.0."): v for k, v in stored.items()})
    save_file(stored, folder / "adapters.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    codes = _codes(folder, LLAMA_BASE)
    assert {"mlx.scale-looks-like-alpha", "mlx.layers-outside-num-layers"} <= codes
    config["num_layers"] = 0  # mlx-lm's model.layers[-0:]: every layer
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert "mlx.layers-outside-num-layers" not in _codes(folder, LLAMA_BASE)


def test_layout_mlx_refuses_a_family_mlx_lm_names_are_not_proven_for(tmp_path):
    with pytest.raises(UnsupportedAdapterError, match="for the minimax family: mlx-lm 0.32.2 has no model for"):
        lora_convert.normalize_adapter(
            DATA / "cases" / "v5_minimax" / "adapter",
            tmp_path / "o",
            base=str(DATA / "bases" / "v5_minimax"),
            layout="mlx",
        )
    assert not (tmp_path / "o").exists()
