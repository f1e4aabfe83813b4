"""The 3-D expert layouts' fast paths in lora_convert.convert.factors, each held to its plain form.

`expert_minor_into` (a stacked B's rows written in PEFT's rank-major order through a cache-sized band) against
numpy's plain transposed copy; `fold_expert_major_into` (PEFT's rank-major B folded and moved to its expert-major
place band by band) against `fold_into` of the whole `fused_expert_b`; `peft_3d_module` (B written straight into
its final order) against the 3-D module built as its docstring defines it, on the groups of PEFT-written fixtures.
Odd shapes (rank 1, one expert, sizes that are no power of two, a last band shorter than the others) run with the
bands shrunk so that every loop runs several times.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from helpers import case_base_dir, case_dir
from lora_convert.convert import factors
from lora_convert.convert.group_tensors import build_group_tensors
from lora_convert.pipeline.commands import plan_normalize

BF16 = np.dtype(ml_dtypes.bfloat16)


def _random(shape, dtype, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")


ODD_SHAPES = [(1, 1, 1), (1, 5, 3), (3, 1, 2), (7, 33, 1), (5, 9, 16), (256, 3, 16), (2, 4, 300)]


@pytest.mark.parametrize("band", [1, 3, 128])
@pytest.mark.parametrize(("E", "n", "r"), ODD_SHAPES)
def test_expert_minor_into_equals_the_plain_transposed_copy(E, n, r, band, monkeypatch):
    monkeypatch.setattr(factors, "TRANSPOSE_BAND", band)
    stacked = _random((E, n + 3, r + 2), BF16, seed=E * 1000 + n * 10 + r)
    src = stacked[:, 1 : n + 1, :r]  # rows of one slice of a stacked B at a smaller rank: a strided view
    rank = r + 5
    got, want = np.zeros((n + 2, rank, E), BF16), np.zeros((n + 2, rank, E), BF16)
    factors.expert_minor_into(got[1 : n + 1, 2 : 2 + r], src)
    want[1 : n + 1, 2 : 2 + r] = src.transpose(1, 2, 0)
    assert np.array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("band", [1, 40, 1 << 17])
@pytest.mark.parametrize(("E", "n", "r"), ODD_SHAPES)
@pytest.mark.parametrize(
    ("source", "output", "scaling"),
    [(BF16, BF16, 2.0), (BF16, BF16, 0.37), (BF16, np.dtype(np.float32), 4.0), (np.dtype(np.float32), BF16, 0.5)],
)
def test_fold_expert_major_into_equals_fold_of_the_whole_expert_major_b(
    E, n, r, band, source, output, scaling, monkeypatch
):
    monkeypatch.setattr(factors, "FOLD_BAND", band)
    b = _random((2 * n + 1, r * E), source, seed=E + n + r)
    b[0, 0] = 0  # a zero: the power-of-two fold takes the multiply for that chunk
    R = r + 1
    for rows in (slice(None, n), slice(1, None, 2)):  # contiguous rows, and every other row (an interleaved source)
        got, want = np.zeros((E, n + 2, R), output), np.zeros((E, n + 2, R), output)
        factors.fold_expert_major_into(got[:, 1 : n + 1, :r], b, E, r, rows, scaling)
        factors.fold_into(want[:, 1 : n + 1, :r], factors.fused_expert_b(b, E, r, rows), scaling)
        assert np.array_equal(_bits(got), _bits(want)), rows


def _plain_peft_3d(A, B, group, R: int, rank: int):
    """PEFT's 3-D pair as peft_3d_module's docstring defines it, built the plain way: an expert-major B3
    [E, out, rank] (block-diagonal over the slices unless they share one A), then B3's columns rank-major."""
    E, out, n = group.experts, group.out_features, len(group.slices)
    shared = factors.shares_one_a(group.slices)
    A3 = np.zeros((E, rank, group.in_features), A.dtype)
    B3 = np.zeros((E, out, rank), B.dtype)
    if shared:
        A3[:, :R] = A[:, :R]
        B3[:, :, :R] = B
    else:
        for i, sl in enumerate(group.slices):
            A3[:, i * R : (i + 1) * R] = A[:, factors.a_rows(i, R)]
            B3[:, factors.b_rows(sl), i * R : (i + 1) * R] = B[:, factors.b_rows(sl)]
    assert rank >= (R if shared else n * R)
    return A3.reshape(E * rank, -1), np.ascontiguousarray(B3.transpose(1, 2, 0)).reshape(out, rank * E)


@pytest.mark.parametrize(
    "case",
    [
        "v4_deepseek_v3",  # per-expert 2-D sources: gate and up are two modules (B block-diagonal)
        "v4emu_nemotron_h",  # per-expert, one slice per group
        "v5_deepseek_v3_rank_pattern",  # PEFT 3-D sources, ranks below the group's R
        "v5_llama4_text_experts",  # PEFT's swapped sides of an [E, in, out] parameter
    ],
)
def test_peft_3d_module_equals_the_plain_construction(case, monkeypatch):
    monkeypatch.setattr(factors, "TRANSPOSE_BAND", 3)
    plan = plan_normalize(str(case_dir(case) / "adapter"), base=str(case_base_dir(case)), drop_unsupported=True)
    R, checked = plan.rank, 0
    for group in (g for g in plan.groups if g.experts):
        A, B = build_group_tensors(plan, group, "BF16", plan.adapter.read)
        least = R if factors.shares_one_a(group.slices) else len(group.slices) * R
        for rank in (least, least + 1, least + 5):
            a, b = factors.peft_3d_module(A, B, group, R, rank)
            want_a, want_b = _plain_peft_3d(A, B, group, R, rank)
            assert np.array_equal(_bits(a), _bits(want_a)) and np.array_equal(_bits(b), _bits(want_b))
            checked += 1
    assert checked
