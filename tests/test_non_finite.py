"""NaN and Inf in an adapter (issue 22, item 5): `normalize` refuses to write them by default, naming the source
tensor, and leaves no output (nor a changed previous one); `--allow-non-finite` writes them as they are. So are
finite values that the conversion makes infinite (the scaling folded in, a narrower output dtype). The check runs
on each group's sources as they are read (lora_convert.convert.group_tensors.FiniteCheck), with no extra read.
Fixtures: PEFT-written adapters (tests/fixtures/data), copied and poisoned."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from helpers import case_base_dir, case_dir
from lora_convert.cli import app

LLAMA_B = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
LLAMA_A = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
MIXTRAL_B = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"  # PEFT's 3-D experts
POISON = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


def poisoned(tmp_path: Path, case: str, key: str, value: float, index: int = 5) -> Path:
    """A copy of a fixture adapter with one value of `key` replaced."""
    folder = tmp_path / f"{case}-poisoned"
    shutil.copytree(case_dir(case) / "adapter", folder)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensor = tensors[key].copy()
    tensor.reshape(-1)[index] = value
    tensors[key] = tensor
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output and "Internal error" not in result.output, result.output
    return result


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "lora-convert" in p.name)


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("layout", ["stacked", "sglang", "vllm", "peft"])
@pytest.mark.parametrize("poison", sorted(POISON))
def test_refused_by_default_and_written_with_the_flag(tmp_path, layout, poison):
    adapter = poisoned(tmp_path, "v5_llama", LLAMA_B, POISON[poison])
    base = case_base_dir("v5_llama")
    out = tmp_path / "out" / "adapter"
    out.parent.mkdir()
    result = invoke("normalize", adapter, "--base", base, "-o", out, "--layout", layout)
    assert result.exit_code == 1, result.output
    message = " ".join(result.stderr.split())  # one paragraph, however the terminal wrapped it
    assert f"{LLAMA_B} holds" in message, message
    counts = "1 NaN and 0 infinite" if poison == "nan" else "0 NaN and 1 infinite"
    assert f"{counts} value(s), the first at flat index 5" in message, message
    assert "--allow-non-finite" in message and "Nothing was written" in message, message
    assert not out.exists() and leftovers(out.parent) == []

    result = invoke("normalize", adapter, "--base", base, "-o", out, "--layout", layout, "--allow-non-finite")
    assert result.exit_code == 0, result.output
    written = load_file(out / "adapter_model.safetensors")
    values = np.concatenate([t.reshape(-1).astype(np.float64) for t in written.values()])
    expected = np.isnan if poison == "nan" else (lambda v: v == POISON[poison])
    assert expected(values).sum() >= 1  # the poisoned value is there (a fused layout may not spread it)
    assert not np.isfinite(values).all()


def test_validate_reports_the_same_tensor(tmp_path):
    """validate already finds it (data.nan / data.inf): the refusal points there, the finding names the same key."""
    for poison, code in (("nan", "data.nan"), ("inf", "data.inf")):
        adapter = poisoned(tmp_path / poison, "v5_llama", LLAMA_B, POISON[poison])
        result = invoke("validate", adapter, "--base", case_base_dir("v5_llama"), "--no-smoke", "--format", "json")
        assert result.exit_code == 1, result.output
        found = [f for f in json.loads(result.stdout)["findings"] if f["code"] == code]
        assert len(found) == 1 and LLAMA_B in found[0]["keys"], found


def test_lora_a_and_several_tensors_are_named(tmp_path):
    adapter = poisoned(tmp_path, "v5_llama", LLAMA_A, np.nan, index=0)
    result = invoke("normalize", adapter, "--base", case_base_dir("v5_llama"), "-o", tmp_path / "out")
    assert result.exit_code == 1 and LLAMA_A in " ".join(result.stderr.split()), result.output


def test_experts_fused_3d_source_pipelined(tmp_path):
    """PEFT's 3-D expert LoRA (one source feeding every expert of a group), through the pipelined writer."""
    adapter = poisoned(tmp_path, "v5_mixtral", MIXTRAL_B, np.nan, index=100)
    out = tmp_path / "out"
    result = invoke("normalize", adapter, "--base", case_base_dir("v5_mixtral"), "-o", out)
    assert result.exit_code == 1, result.output
    assert f"{MIXTRAL_B} holds 1 NaN" in " ".join(result.stderr.split()), result.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_refusal_leaves_a_previous_output_as_it_was(tmp_path):
    base = case_base_dir("v5_llama")
    out = tmp_path / "out"
    assert invoke("normalize", case_dir("v5_llama") / "adapter", "--base", base, "-o", out).exit_code == 0
    before = tree_digest(out)
    adapter = poisoned(tmp_path, "v5_llama", LLAMA_B, np.inf)
    result = invoke("normalize", adapter, "--base", base, "-o", out, "--force")
    assert result.exit_code == 1, result.output
    assert tree_digest(out) == before and leftovers(tmp_path) == []


def test_library_raises_the_typed_error(tmp_path):
    from lora_convert.api import normalize_adapter
    from lora_convert.errors import NonFiniteValuesError, UnsupportedAdapterError

    adapter = poisoned(tmp_path, "v5_llama", LLAMA_B, np.nan)
    with pytest.raises(NonFiniteValuesError, match="k_proj.lora_B.weight holds 1 NaN") as refused:
        normalize_adapter(adapter, tmp_path / "out", base=case_base_dir("v5_llama"))
    assert isinstance(refused.value, UnsupportedAdapterError) and refused.value.exit_code == 1
    result = normalize_adapter(adapter, tmp_path / "out", base=case_base_dir("v5_llama"), allow_non_finite=True)
    assert result.tensors_written > 0


def test_overflow_to_fp16_is_refused_and_named(tmp_path):
    """Finite sources whose folded values exceed float16's range become Inf in a --dtype fp16 output."""
    adapter = poisoned(tmp_path, "v5_llama", LLAMA_B, 1e6)
    base = case_base_dir("v5_llama")
    result = invoke("normalize", adapter, "--base", base, "-o", tmp_path / "out16", "--dtype", "fp16")
    assert result.exit_code == 1, result.output
    message = " ".join(result.stderr.split())
    assert "to F16 makes some of its values infinite" in message and "every source value is finite" in message
    assert not (tmp_path / "out16").exists()
    assert invoke("normalize", adapter, "--base", base, "-o", tmp_path / "out32").exit_code == 0


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16])
def test_all_finite_agrees_with_numpy(dtype):
    from lora_convert.convert import group_tensors
    from lora_convert.convert.group_tensors import all_finite, non_finite_counts

    info = ml_dtypes.finfo(dtype) if dtype is ml_dtypes.bfloat16 else np.finfo(dtype)
    edge = np.array([0.0, -0.0, float(info.max), -float(info.max), float(info.tiny), float(info.smallest_subnormal)])
    size = group_tensors.FINITE_CHUNK_ELEMENTS * 2 + 7  # more than one chunk, and a partial last one
    base = np.zeros(size, dtype=dtype)
    base[: edge.size] = edge.astype(dtype)
    assert all_finite(base) and all_finite(base[::3])  # a non-contiguous view too
    assert non_finite_counts(base) is None
    for bad in (np.nan, np.inf, -np.inf):
        for where in (0, size - 1, group_tensors.FINITE_CHUNK_ELEMENTS):
            x = base.copy()
            x[where] = bad
            assert not all_finite(x), (dtype, bad, where)
            assert non_finite_counts(x) == (int(np.isnan(bad)), int(np.isinf(bad)), where)
    assert all_finite(np.array([1, 2], dtype=np.int32)) and all_finite(np.zeros(0, dtype=np.float32))


@pytest.mark.parametrize("depth", [0, 2])
def test_serial_and_pipelined_paths_refuse_alike(tmp_path, depth):
    from lora_convert.convert.group_tensors import iter_group_tensors
    from lora_convert.errors import NonFiniteValuesError
    from lora_convert.pipeline.commands import plan_normalize

    adapter = poisoned(tmp_path, "v5_llama", LLAMA_B, np.nan)
    plan = plan_normalize(adapter, base=str(case_base_dir("v5_llama")))
    with pytest.raises(NonFiniteValuesError, match="k_proj.lora_B.weight holds 1 NaN"):
        for _ in iter_group_tensors(plan, plan.groups, "F32", depth=depth):
            pass
    finite = [
        bool(np.isfinite(B).all())  # each group's arrays are reused by the next: looked at while iterating
        for _, _, B in iter_group_tensors(plan, plan.groups, "F32", depth=depth, allow_non_finite=True)
    ]
    assert len(finite) == len(plan.groups) and finite.count(False) == 1


F32_MAX = float(np.finfo(np.float32).max)
BF16_MAX = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)


@pytest.mark.parametrize("layout", ["stacked", "peft", "sglang", "vllm"])
@pytest.mark.parametrize("dtype", ["keep", "bf16", "fp32"])
def test_finite_b_that_overflows_once_scaled_is_refused_and_written_with_the_flag(tmp_path, layout, dtype):
    """v5_llama is float32 with scaling 16/8 = 2: a finite B value of 0.75 * float32's max is written as Inf once
    the scaling is folded in (into float32, or bfloat16), though no source value is NaN or Inf."""
    adapter = poisoned(tmp_path, "v5_llama", LLAMA_B, 0.75 * F32_MAX)
    base = case_base_dir("v5_llama")
    out = tmp_path / "out" / "adapter"
    out.parent.mkdir()
    args = ["normalize", adapter, "--base", base, "-o", out, "--layout", layout, "--dtype", dtype]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    message = " ".join(result.stderr.split())
    assert "makes some of its values infinite" in message and "every source value is finite" in message, message
    assert LLAMA_B in message and "scaling 2" in message, message
    assert "--allow-non-finite" in message and "Nothing was written" in message, message
    assert not out.exists() and leftovers(out.parent) == []

    result = invoke(*args, "--allow-non-finite")
    assert result.exit_code == 0, result.output
    written = load_file(out / "adapter_model.safetensors")
    values = np.concatenate([t.reshape(-1).astype(np.float64) for t in written.values()])
    assert np.isposinf(values).sum() == 1 and not np.isnan(values).any()


def test_a_factor_beyond_bfloat16_is_refused_only_for_bfloat16(tmp_path):
    """A is copied without scaling: a float32 value between bfloat16's largest value and float32's rounds to Inf
    in a bf16 output only; the float32 output keeps it."""
    adapter = poisoned(tmp_path, "v5_llama", LLAMA_A, -F32_MAX, index=0)
    base = case_base_dir("v5_llama")
    result = invoke("normalize", adapter, "--base", base, "-o", tmp_path / "bf16", "--dtype", "bf16")
    assert result.exit_code == 1, result.output
    message = " ".join(result.stderr.split())
    assert LLAMA_A in message and "to BF16 makes some of its values infinite" in message, message
    assert "--dtype fp32" in message, message  # a wider dtype holds it
    assert not (tmp_path / "bf16").exists()
    assert invoke("normalize", adapter, "--base", base, "-o", tmp_path / "f32").exit_code == 0
    written = load_file(tmp_path / "f32" / "adapter_model.safetensors")
    assert min(float(t.min()) for t in written.values()) == -F32_MAX


@pytest.mark.parametrize("dtype, largest", [("keep", F32_MAX), ("bf16", BF16_MAX)])
def test_the_largest_values_that_stay_finite_are_written(tmp_path, dtype, largest):
    """No refusal short of an actual overflow: B at the output dtype's largest value / scaling (2), A at it."""
    folder = poisoned(tmp_path, "v5_llama", LLAMA_B, largest / 2)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[LLAMA_A] = tensors[LLAMA_A].copy()
    tensors[LLAMA_A].reshape(-1)[0] = -largest
    save_file(tensors, path, metadata={"format": "pt"})
    out = tmp_path / "out"
    result = invoke("normalize", folder, "--base", case_base_dir("v5_llama"), "-o", out, "--dtype", dtype)
    assert result.exit_code == 0, result.output
    written = load_file(out / "adapter_model.safetensors")
    values = np.concatenate([t.reshape(-1).astype(np.float64) for t in written.values()])
    assert np.isfinite(values).all() and values.max() == largest and values.min() == -largest


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn])
def test_largest_finite_magnitude_agrees_with_numpy(dtype):
    from lora_convert.convert import group_tensors
    from lora_convert.convert.group_tensors import largest_finite_magnitude

    rng = np.random.default_rng(0)
    size = group_tensors.FINITE_CHUNK_ELEMENTS * 2 + 7
    values = (rng.standard_normal(size) * 10).astype(dtype)  # |x| < 100
    for x in (values, -np.abs(values), np.abs(values), values[::3], np.array([-0.0], dtype=dtype)):
        assert largest_finite_magnitude(x) == float(np.abs(x.astype(np.float64)).max()), x[:4]
    peak = values.copy()
    peak[group_tensors.FINITE_CHUNK_ELEMENTS + 1] = -448  # float8_e4m3fn's largest magnitude; beyond the others' data
    assert largest_finite_magnitude(peak) == 448.0
    assert largest_finite_magnitude(np.zeros(0, dtype=dtype)) == 0.0
    assert largest_finite_magnitude(np.array([-7, 3], dtype=np.int32)) == 7.0
    if dtype is not ml_dtypes.float8_e4m3fn:  # it has no infinity
        peak[size - 1] = np.inf
        assert largest_finite_magnitude(peak) is None
    peak[0] = np.nan
    assert largest_finite_magnitude(peak) is None
