import json
import os
import shutil

import numpy as np
import pytest
import torch

from lora_convert.errors import AdapterFormatError, AdapterNotFoundError, EnvironmentProblem, UsageError
from lora_convert.io import tensor_files
from lora_convert.peft.adapter import ExpertLayout, ModuleKind, load_adapter

P = "base_model.model.model.layers"


def lin(out, inp, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)


def test_dense_modules_ranks_and_scaling(adapter_writer):
    a0, b0 = lin(32, 16, 4)
    a1, b1 = lin(32, 16, 2, seed=1)
    folder = adapter_writer(
        {
            f"{P}.0.self_attn.q_proj.lora_A.weight": a0,
            f"{P}.0.self_attn.q_proj.lora_B.weight": b0,
            f"{P}.1.self_attn.q_proj.lora_A.weight": a1,
            f"{P}.1.self_attn.q_proj.lora_B.weight": b1,
        },
        {"r": 4, "lora_alpha": 8, "rank_pattern": {"model.layers.1.self_attn.q_proj": 2}},
    )
    adapter = load_adapter(str(folder))
    mods = {m.layer: m for m in adapter.modules}
    assert mods[0].rank == 4 and mods[0].scaling == 2.0
    assert mods[1].rank == 2 and mods[1].scaling == 4.0  # alpha 8 / pattern rank 2
    assert (mods[0].in_features, mods[0].out_features) == (16, 32)
    assert not [f for f in adapter.findings if f.severity.value == "error"]


def test_listing_reads_no_tensor_data(adapter_writer, monkeypatch):
    a, b = lin(8, 8, 2)
    folder = adapter_writer({f"{P}.0.mlp.down_proj.lora_A.weight": a, f"{P}.0.mlp.down_proj.lora_B.weight": b})

    def forbidden(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(tensor_files, "read_tensor_data", forbidden)
    adapter = load_adapter(str(folder))
    from lora_convert.pipeline.inspect_report import build_report

    assert build_report(adapter)["module_count"] == 1
    with pytest.raises(AssertionError):
        adapter.read(f"{P}.0.mlp.down_proj.lora_A.weight")


def test_leftover_adapter_name_segment_is_read(adapter_writer):
    a, b = lin(8, 8, 2)
    folder = adapter_writer(
        {f"{P}.0.self_attn.v_proj.lora_A.default.weight": a, f"{P}.0.self_attn.v_proj.lora_B.default.weight": b},
        {"r": 2},
    )
    adapter = load_adapter(str(folder))
    (mod,) = adapter.modules
    assert mod.module == "model.layers.0.self_attn.v_proj" and mod.rank == 2 and mod.adapter_name == "default"
    assert "keys.adapter-name-segment" in {f.code for f in adapter.findings}
    assert np.array_equal(adapter.read(mod.lora_A.key), a.numpy())


def test_fused_experts_decided_by_target_parameters(adapter_writer):
    E, r, H, I = 4, 2, 12, 6
    folder = adapter_writer(
        {
            f"{P}.1.mlp.experts.base_layer.lora_A.weight": torch.randn(E * r, H),
            f"{P}.1.mlp.experts.base_layer.lora_B.weight": torch.randn(2 * I, r * E),
            f"{P}.1.mlp.experts.lora_A.weight": torch.randn(E * r, I),
            f"{P}.1.mlp.experts.lora_B.weight": torch.randn(H, r * E),
        },
        {
            "r": r,
            "lora_alpha": 4,
            "target_modules": [],
            "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        },
    )
    adapter = load_adapter(str(folder))
    by_param = {m.param: m for m in adapter.modules}
    assert by_param["gate_up_proj"].base_layer_depth == 1 and by_param["gate_up_proj"].in_features == H
    assert by_param["down_proj"].base_layer_depth == 0 and by_param["down_proj"].out_features == H
    assert all(m.kind == ModuleKind.FUSED_EXPERTS and m.experts == E for m in adapter.modules)
    assert adapter.expert_layout == ExpertLayout.FUSED_3D


def test_module_kinds_and_expert_layouts_are_enums_written_as_their_values(adapter_writer):
    """One form for named string choices (as Factor and Severity): an Enum whose members are the strings that
    inspect writes, in JSON and in text."""
    from enum import Enum

    assert issubclass(ModuleKind, Enum) and issubclass(ExpertLayout, Enum)
    assert {k.value for k in ModuleKind} == {"linear", "embedding", "fused_experts"}
    assert {k.value for k in ExpertLayout} == {"none", "per-expert-2d", "fused-3d", "mixed"}
    a, b = lin(32, 16, 4)
    adapter = load_adapter(
        str(adapter_writer({f"{P}.0.self_attn.q_proj.lora_A.weight": a, f"{P}.0.self_attn.q_proj.lora_B.weight": b}))
    )
    assert json.dumps(adapter.modules[0].to_json()["kind"]) == '"linear"'
    assert f"{adapter.expert_layout}" == "none" and type(adapter.expert_layout) is str


@pytest.mark.parametrize("param, in_dim, out_dim", [("down_proj", 6, 12), ("gate_up_proj", 12, 12)])
def test_single_targeted_parameter_has_no_base_layer(adapter_writer, param, in_dim, out_dim):
    # Only one parameter targeted: the key is `experts.lora_A` either way; the config says which it is.
    E, r = 4, 2
    folder = adapter_writer(
        {
            f"{P}.1.mlp.experts.lora_A.weight": torch.randn(E * r, in_dim),
            f"{P}.1.mlp.experts.lora_B.weight": torch.randn(out_dim, r * E),
        },
        {"r": r, "lora_alpha": 4, "target_modules": [], "target_parameters": [f"experts.{param}"]},
    )
    (mod,) = load_adapter(str(folder)).modules
    assert (
        mod.param == param and mod.param_source == "target_parameters" and mod.target_name.endswith(f"experts.{param}")
    )


def test_sharded_adapter_with_index(tmp_path):
    from safetensors.torch import save_file

    a, b = lin(8, 8, 2)
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({f"{P}.0.mlp.up_proj.lora_A.weight": a}, str(folder / "adapter_model-00001-of-00002.safetensors"))
    save_file({f"{P}.0.mlp.up_proj.lora_B.weight": b}, str(folder / "adapter_model-00002-of-00002.safetensors"))
    (folder / "adapter_model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    f"{P}.0.mlp.up_proj.lora_A.weight": "adapter_model-00001-of-00002.safetensors",
                    f"{P}.0.mlp.up_proj.lora_B.weight": "adapter_model-00002-of-00002.safetensors",
                }
            }
        )
    )
    adapter = load_adapter(str(folder))
    assert adapter.file_format == "safetensors-sharded" and adapter.modules[0].is_complete
    assert np.array_equal(adapter.read(f"{P}.0.mlp.up_proj.lora_B.weight"), b.numpy())


def test_bin_adapter_weights_only(tmp_path):
    a, b = lin(8, 8, 2)
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    torch.save(
        {f"{P}.0.mlp.up_proj.lora_A.weight": a, f"{P}.0.mlp.up_proj.lora_B.weight": b}, folder / "adapter_model.bin"
    )
    adapter = load_adapter(str(folder))
    assert adapter.file_format == "bin"
    assert np.array_equal(adapter.read(f"{P}.0.mlp.up_proj.lora_A.weight"), a.numpy())


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_bin_needing_full_unpickling_is_refused(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    torch.save({"x": _Payload()}, folder / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="full unpickling"):
        load_adapter(str(folder))


def test_symlink_out_of_the_folder_is_refused(tmp_path, adapter_writer):
    a, b = lin(8, 8, 2)
    outside = adapter_writer(
        {f"{P}.0.mlp.up_proj.lora_A.weight": a, f"{P}.0.mlp.up_proj.lora_B.weight": b}, name="outside"
    )
    folder = tmp_path / "linked"
    folder.mkdir()
    shutil.copy(outside / "adapter_config.json", folder / "adapter_config.json")
    (folder / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="outside the adapter folder"):
        load_adapter(str(folder))


def _hub_cache(cache, repo, files, revision="main", sha="0123456789abcdef0123456789abcdef01234567"):
    """Lay out a Hugging Face cache the way huggingface_hub writes it: refs, blobs, and snapshot links."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / revision).write_text(sha)
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    for name, src in files.items():
        blob = root / "blobs" / f"blob-{name}"
        shutil.copy(src, blob)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return root


def test_hub_id_offline_from_cache(tmp_path, adapter_writer):
    a, b = lin(8, 8, 2)
    src = adapter_writer({f"{P}.0.mlp.up_proj.lora_A.weight": a, f"{P}.0.mlp.up_proj.lora_B.weight": b})
    cache = tmp_path / "hub-cache"
    _hub_cache(
        cache,
        "acme/tiny-lora",
        {
            "adapter_config.json": src / "adapter_config.json",
            "adapter_model.safetensors": src / "adapter_model.safetensors",
        },
    )
    adapter = load_adapter("acme/tiny-lora", cache_dir=cache)
    assert adapter.source.origin == "hub" and adapter.source.repo_id == "acme/tiny-lora"
    assert np.array_equal(adapter.read(f"{P}.0.mlp.up_proj.lora_B.weight"), b.numpy())


def test_hub_id_not_cached_offline(tmp_path):
    with pytest.raises(EnvironmentProblem, match="not in the local Hugging Face cache"):
        load_adapter("acme/not-here", cache_dir=tmp_path / "empty-cache")


@pytest.mark.parametrize(
    "spec, error",
    [
        ("acme/bad--name", UsageError),
        ("./no/such/folder", AdapterNotFoundError),
        ("a/b/c", AdapterNotFoundError),
        ("-x/y", UsageError),
    ],
)
def test_bad_sources(spec, error):
    with pytest.raises(error):
        load_adapter(spec)


# ---- an invalid config is reported, not filled in with numbers the file never said -----------------------------
@pytest.mark.parametrize("config", [{"r": "4"}, {"r": 0}, {"r": True}])
def test_invalid_rank_is_not_compared_with_the_tensors(adapter_writer, config):
    """The tensors have rank 2; with `r` invalid the parser keeps a placeholder, and that placeholder must not
    turn into a claim such as "adapter_config.json says r = 8"."""
    a, b = lin(8, 8, 2)
    folder = adapter_writer(
        {f"{P}.0.self_attn.q_proj.lora_A.weight": a, f"{P}.0.self_attn.q_proj.lora_B.weight": b}, config
    )
    adapter = load_adapter(str(folder), strict_config=False)
    codes = [f.code for f in adapter.findings if f.severity.value == "error"]
    assert len(codes) == 1 and codes[0].startswith("config.")
    (mod,) = adapter.modules
    assert mod.rank == 2  # from the tensor shapes, which are facts
    doc = mod.to_json()
    assert doc["config_rank"] is None and doc["scaling"] is None and doc["alpha"] is None


def test_invalid_alpha_leaves_the_rank_known(adapter_writer):
    a, b = lin(8, 8, 4)
    folder = adapter_writer(
        {f"{P}.0.self_attn.q_proj.lora_A.weight": a, f"{P}.0.self_attn.q_proj.lora_B.weight": b}, {"lora_alpha": "8"}
    )
    (mod,) = load_adapter(str(folder), strict_config=False).modules
    doc = mod.to_json()
    assert doc["config_rank"] == 4 and doc["rank"] == 4 and doc["scaling"] is None


def test_fused_experts_with_invalid_rank_get_no_invented_expert_count(adapter_writer):
    # PEFT 3-D expert LoRA: A [E*r, in], B [out, r*E]; without a valid r, E and r cannot be told apart.
    experts, r = 4, 2
    keys = {
        f"{P}.0.mlp.experts.lora_A.weight": torch.randn(experts * r, 16),
        f"{P}.0.mlp.experts.lora_B.weight": torch.randn(32, r * experts),
    }
    folder = adapter_writer(keys, {"r": "2", "target_modules": None, "target_parameters": ["mlp.experts.down_proj"]})
    adapter = load_adapter(str(folder), strict_config=False)
    (mod,) = adapter.modules
    assert mod.rank is None and mod.experts is None
    assert [f.code for f in adapter.findings if f.severity.value == "error"] == ["config.wrong-type"]


def _same_bytes(array: np.ndarray, tensor: torch.Tensor) -> bool:
    return array.tobytes() == tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn])
def test_read_gives_numpy_with_the_stored_bytes(adapter_writer, tmp_path, dtype):
    """safetensors and legacy .bin alike: a numpy array of the stored dtype (bf16/float8 through ml_dtypes)."""
    from lora_convert.io.dtypes import dtype_tag

    a, b = lin(8, 8, 2)
    a, b = a.to(dtype), b.to(dtype)
    keys = (f"{P}.0.mlp.up_proj.lora_A.weight", f"{P}.0.mlp.up_proj.lora_B.weight")
    st = load_adapter(str(adapter_writer(dict(zip(keys, (a, b), strict=True)), {"r": 2})))
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    torch.save(dict(zip(keys, (a, b), strict=True)), binary / "adapter_model.bin")
    for adapter in (st, load_adapter(str(binary))):
        got = adapter.read(keys[1])
        assert isinstance(got, np.ndarray) and got.shape == (8, 2)
        assert dtype_tag(got.dtype) == adapter.index.tensors[keys[1]].dtype
        assert _same_bytes(got, b)


def test_bin_without_torch_says_how_to_install_it(tmp_path, monkeypatch):
    a, b = lin(8, 8, 2)
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    torch.save(
        {f"{P}.0.mlp.up_proj.lora_A.weight": a, f"{P}.0.mlp.up_proj.lora_B.weight": b}, folder / "adapter_model.bin"
    )
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(EnvironmentProblem) as info:
        load_adapter(str(folder))
    assert info.value.exit_code == 3 and "pip install 'lora-convert[smoke]'" in (info.value.hint or "")
