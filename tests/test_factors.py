"""The one module of slice and factor arithmetic (lora_convert.convert.factors), held to PEFT's own numbers.

The expected deltas are PEFT's `get_delta_weight` per module, recorded when PEFT wrote each fixture
(tests/fixtures/make_fixtures.py); nothing here recomputes them with our own rules.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import case_base_dir, case_dir, case_meta, fixture_cases, orient_reference
from lora_convert.convert import factors
from lora_convert.convert.group_tensors import build_group_tensors
from lora_convert.peft.adapter import ModuleKind, load_adapter
from lora_convert.peft.naming import parse_key
from lora_convert.pipeline.commands import plan_normalize

TOL = 1e-5


def _reference_name(key: str) -> str:
    p = parse_key(key)
    return p.module + ".base_layer" * p.base_layer_depth + "::delta_weight"


def _f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _rel(got, want) -> float:
    return float(np.linalg.norm(_f64(got) - _f64(want)) / max(np.linalg.norm(_f64(want)), 1e-30))


FUSED_CASES = [
    c
    for c in fixture_cases()
    if any(m.kind == ModuleKind.FUSED_EXPERTS for m in load_adapter(str(case_dir(c) / "adapter")).modules)
]


def test_there_are_fixtures_with_peft_3d_experts():
    assert len(FUSED_CASES) >= 3, FUSED_CASES


@pytest.mark.parametrize("case", FUSED_CASES)
def test_expert_factors_give_peft_delta_per_expert(case):
    """expert-major A [E*r, in], rank-major B [out, r*E]: expert e's own pair reproduces PEFT's delta of expert e."""
    adapter = load_adapter(str(case_dir(case) / "adapter"))
    reference = orient_reference(case, load_file(str(case_dir(case) / "reference.safetensors")))
    recorded = case_meta(case)["modules"]
    checked = 0
    for mod in adapter.modules:
        if mod.kind != ModuleKind.FUSED_EXPERTS:
            continue
        a, b = adapter.read(mod.lora_A.key), adapter.read(mod.lora_B.key)
        E, r = mod.experts, int(mod.rank)
        name = _reference_name(mod.lora_A.key)
        info = recorded[name.removesuffix("::delta_weight")]
        if info.get("peft_swapped") and info.get("forward_contracts") == 1:
            # PEFT swapped in/out of an [E, in, out] parameter (Llama-4): its lora_A is the output side
            a, b = factors.swapped_expert_factors(a, b, E, r)
        want = reference[name]
        assert want.shape[0] == E
        stacked_a = factors.fused_expert_a(a, E, r)
        stacked_b = factors.fused_expert_b(b, E, r)
        for e in range(E):
            a_e, b_e = factors.expert_factors(a, b, E, r, e)
            assert _rel(mod.scaling * _f64(b_e) @ _f64(a_e), want[e]) <= TOL, (mod.module, e)
            # the bulk forms used by the stacked writer hold the same expert
            assert np.array_equal(stacked_a[e], a_e) and np.array_equal(stacked_b[e], b_e)
            checked += 1
    assert checked


@pytest.mark.parametrize("case", FUSED_CASES[:2] + ["v5_llama", "v4emu_nemotron_h", "v5_qwen3_5"])
def test_place_then_cut_reproduces_each_slice(case):
    """Every slice placed into a stacked group (scaling folded into B) and cut back out as a module of rank R holds
    PEFT's delta for the rows of its source that feed it."""
    plan = plan_normalize(str(case_dir(case) / "adapter"), base=str(case_base_dir(case)), drop_unsupported=True)
    reference = orient_reference(case, load_file(str(case_dir(case) / "reference.safetensors")))
    R = plan.rank
    checked = 0
    for group in plan.groups:
        A, B = build_group_tensors(plan, group, "F32", plan.adapter.read)
        for i, sl in enumerate(group.slices):
            for e in range(group.experts) if group.experts else [None]:
                src, inner = factors.slice_source(sl, e)
                if src is None:
                    a, b = factors.cut_module(A, B, group, [i], R, e)
                    assert np.count_nonzero(a) == 0 and np.count_nonzero(b) == 0
                    continue
                want = reference[_reference_name(src.module.lora_A.key)]
                if inner is not None or (want.ndim == 3 and e is not None):
                    want = want[e]
                want = want[factors.source_rows(src)]
                a, b = factors.cut_module(A, B, group, [i], R, e)
                assert a.shape == (R, group.in_features) and b.shape == (sl.out_features, R)
                assert _rel(_f64(b) @ _f64(a), want) <= TOL, (case, group.key, sl.name, e)
                # the padding beyond the slice's own rank is zero in both factors
                assert np.count_nonzero(a[src.rank :]) == 0 and np.count_nonzero(b[:, src.rank :]) == 0
                checked += 1
    assert checked


def test_positions_of_slices():
    plan = plan_normalize(str(case_dir("v5_llama") / "adapter"), base=str(case_base_dir("v5_llama")))
    qkv = next(g for g in plan.groups if g.name == "qkv_proj")
    q, k, v = qkv.slices
    assert factors.a_rows(1, 8) == slice(8, 16) and factors.a_rows(2, 8, 3) == slice(16, 19)
    assert factors.b_rows(k) == slice(q.out_features, q.out_features + k.out_features)
    assert factors.span_rows([k, v]) == slice(q.out_features, qkv.out_features)
    assert factors.kernel_offsets(qkv) == [0, q.out_features, q.out_features + k.out_features, qkv.out_features]


def test_one_a_is_decided_from_the_plan():
    """A run of slices is one module of rank R only when one source (one A) feeds all of them: a mamba in_proj
    adapted as one module is; slices from different modules or a zero fill beside a source are not."""
    plan = plan_normalize(
        str(case_dir("v4emu_nemotron_h") / "adapter"),
        base=str(case_base_dir("v4emu_nemotron_h")),
        drop_unsupported=True,
    )
    in_proj = next(g for g in plan.groups if g.name == "in_proj")
    assert factors.shares_one_a(in_proj.slices)
    llama = plan_normalize(str(case_dir("v5_llama") / "adapter"), base=str(case_base_dir("v5_llama")))
    qkv = next(g for g in llama.groups if g.name == "qkv_proj")
    assert not any(s.is_zero_filled for s in qkv.slices)
    assert not factors.shares_one_a(qkv.slices)  # q_proj, k_proj and v_proj have an A each
    q_a_only = plan_normalize(
        str(case_dir("v5_deepseek_v3_q_a_only") / "adapter"), base=str(case_base_dir("v5_deepseek_v3_q_a_only"))
    )
    fused = next(g for g in q_a_only.groups if g.name == "fused_qkv_a_proj_with_mqa")
    assert fused.slices[1].is_zero_filled and not factors.shares_one_a(fused.slices)
    assert factors.shares_one_a(fused.slices[1:])


def test_fold_into_rounds_once():
    """(Bit-for-bit agreement with the torch path on hostile values: tests/test_torch_free_bytes.py.)"""
    import ml_dtypes

    b = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    dest = np.empty((7, 3), dtype=ml_dtypes.bfloat16)
    factors.fold_into(dest, b, 0.37)
    assert np.array_equal(dest.view(np.uint16), (b * np.float32(0.37)).astype(ml_dtypes.bfloat16).view(np.uint16))
    dest32 = np.empty((7, 3), dtype=np.float32)
    factors.fold_into(dest32, b.astype(np.float64), 2.5)  # a source of another dtype goes through float32
    assert np.array_equal(dest32, b.astype(np.float64).astype(np.float32) * np.float32(2.5))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_power_of_two_fold_equals_the_float32_multiply_on_every_bit_pattern(dtype, monkeypatch):
    """The exponent-add path of fold_into (power-of-two scaling, one 16-bit dtype) against the float32 multiply and
    rounding it replaces, on all 65,536 bit patterns: chunks of normal values take the add, chunks holding zeros,
    subnormals, inf, NaN or values that leave the normal range take the multiply; the bits are the same."""
    import ml_dtypes

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np_dtype)
    monkeypatch.setattr(factors, "POW2_CHUNK", 64)  # small chunks: most are all-normal, so the add path runs
    taken = {"add": 0}
    real_add = np.add

    def counting_add(*args, **kwargs):
        taken["add"] += 1
        return real_add(*args, **kwargs)

    for k in range(-24, 25):
        scaling = 2.0**k
        want = np.empty_like(patterns)
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(patterns, np.float32(scaling), out=want, dtype=np.float32, casting="unsafe")
        got = np.empty_like(patterns)
        monkeypatch.setattr(np, "add", counting_add)
        factors.fold_into(got, patterns, scaling)
        monkeypatch.setattr(np, "add", real_add)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), (dtype, k)
        assert factors._fold_power_of_two(np.empty_like(patterns[:4]), patterns[256:260], scaling) is True
    assert taken["add"] > 1000  # the exponent add did the work for most chunks
    # not a power of two, another dtype, or a strided destination: the general path
    assert factors._fold_power_of_two(np.empty_like(patterns), patterns, 0.37) is False
    assert factors._fold_power_of_two(np.empty(4, np.float32), np.ones(4, np.float32), 2.0) is False
    assert factors._fold_power_of_two(np.empty((4, 4), np_dtype)[:, :2], np.ones((4, 2), np_dtype), 2.0) is False


def test_power_of_two_fold_of_one_expert_slice_equals_the_multiply():
    """A routed-expert group's slice B[:, rows, :] is not contiguous; each expert's block is, and is folded alone."""
    import ml_dtypes

    rng = np.random.default_rng(3)
    b = rng.standard_normal((5, 6, 4)).astype(ml_dtypes.bfloat16)
    b[2, 3, 1] = 0.0  # a zero: that expert's chunk takes the multiply
    dest, want = np.zeros((5, 10, 4), ml_dtypes.bfloat16), np.zeros((5, 10, 4), ml_dtypes.bfloat16)
    factors.fold_into(dest[:, 2:8, :], b, 0.25)
    np.multiply(b, np.float32(0.25), out=want[:, 2:8, :], dtype=np.float32, casting="unsafe")
    assert factors._fold_power_of_two(np.empty_like(b), b, 0.25) is True
    assert np.array_equal(dest.view(np.uint16), want.view(np.uint16))
