"""LoRA expand: ``y[:, off_i:off_i+out_i] += scaling_i * h[:, i*R:(i+1)*R] @ B[off_i:off_i+out_i, :]^T``.

One launch covers every slice of a group (and, through the batched path, every slice of many groups):
the grid is slices x row tiles x column tiles, flattened to one dimension. Each slice is a row of an
int64 table ``(h_row0, rows, h_col0, b_row0, n_out, y_base, y_stride_m)``: ``y_base`` is the element
offset of the slice's first output element and ``y_stride_m`` its row stride, which lets the batched
path pack outputs of different widths into one flat buffer. Slices own disjoint output columns, so every
output element has exactly one writer and the read-add-write needs no atomics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import _utils as U
from ._utils import masked_dot_loop

# One table row per slice: h_row0, rows, h_col0, b_row0, n_out, y_base, y_stride_m (the module docstring).
_TABLE_COLS = tl.constexpr(7)


# Counts that differ from group to group are not specialized on (==1, divisible by 16): each value class would
# be another compile, and the smoke run launches hundreds of groups of a handful of shape classes.
@triton.jit(do_not_specialize=["n_row_tiles", "n_col_tiles"])
def _expand_kernel(
    h_ptr,
    b_ptr,
    y_ptr,
    table_ptr,
    scale_ptr,
    n_row_tiles,
    n_col_tiles,
    stride_hm,
    stride_hk,
    stride_bn,
    stride_bk,
    stride_yn,
    R: tl.constexpr,  # rank: fixed per adapter; static loop bound (see shrink.py on why constexpr)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_LOW: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    # 1-D grid (slice-major): grid dims y/z are capped at 65535 on CUDA, a batched launch has more slices.
    pid = tl.program_id(0).to(tl.int64)
    tiles = n_row_tiles * n_col_tiles
    s = pid // tiles
    rem = pid % tiles
    pid_m = rem // n_col_tiles
    pid_n = rem % n_col_tiles

    tb = table_ptr + s * _TABLE_COLS
    h_row0 = tl.load(tb + 0)
    rows = tl.load(tb + 1)
    h_col0 = tl.load(tb + 2)
    b_row0 = tl.load(tb + 3)
    n_out = tl.load(tb + 4)
    y_base = tl.load(tb + 5)
    y_stride_m = tl.load(tb + 6)
    # Grid is sized for the widest slice / tallest group; surplus tiles leave at once.
    if pid_m * BLOCK_M >= rows:
        return
    if pid_n * BLOCK_N >= n_out:
        return
    scale = tl.load(scale_ptr + s)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < rows
    n_mask = offs_n < n_out

    h_ptrs = h_ptr + (h_row0 + offs_m)[:, None] * stride_hm + (h_col0 + offs_r)[None, :] * stride_hk
    # B read transposed ([BLOCK_R, BLOCK_N]) so it feeds tl.dot directly.
    b_ptrs = b_ptr + (b_row0 + offs_n)[None, :] * stride_bn + offs_r[:, None] * stride_bk

    # The rank is usually <= BLOCK_R (one trip); the loop keeps large ranks (R > 64) correct. R < 16 is
    # padded to BLOCK_R = 16 (tl.dot minimum on GPU) and the padding masked to zero on both operands.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = masked_dot_loop(
        acc, h_ptrs, b_ptrs, m_mask, n_mask, offs_r, R, stride_hk, stride_bk, LOOP=R, BLOCK_K=BLOCK_R, DOT_LOW=DOT_LOW
    )

    acc = acc * scale
    y_ptrs = y_ptr + y_base + offs_m[:, None] * y_stride_m + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _launch_expand(
    h: torch.Tensor,
    b: torch.Tensor,
    y: torch.Tensor,
    slices: list[list[int]],
    scales: list[float],
    R: int,
    max_rows: int,
    max_out: int,
    stride_yn: int,
    accumulate: bool = True,
) -> None:
    """Run the expand kernel over ``slices`` (rows of the table above); tensors already validated."""
    if not slices or max_rows == 0 or max_out == 0 or R == 0:
        return
    low = U.low_dot(b.dtype)  # h is fp32: cast to B's dtype when B is 16-bit
    BLOCK_M = U.block(max_rows, hi=64)
    # Outputs are wide (up to tens of thousands): larger N tiles. Not tuned yet. H100, bf16, c=3,
    # out=3x4096, R=16, CUDA graph: T=16 2.8 us; T=4096 122 us, i.e. ~1.6 TB/s on the 200 MB read+write
    # of y (torch's bmm, which only writes, 43 us). Candidates: num_warps=8, BLOCK_M=128, TMA stores.
    BLOCK_N = U.block(max_out, hi=128)
    BLOCK_R = U.block(R, hi=64)
    n_row_tiles = triton.cdiv(max_rows, BLOCK_M)
    n_col_tiles = triton.cdiv(max_out, BLOCK_N)
    tbl = U.table(slices, h.device)
    if tbl.shape[1] != _TABLE_COLS.value:
        raise ValueError(f"expand table rows have {tbl.shape[1]} entries; the kernel reads {_TABLE_COLS.value}")
    scale_t = U.table(scales, h.device, torch.float32)
    grid = (len(slices) * n_row_tiles * n_col_tiles,)
    _expand_kernel[grid](
        h,
        b,
        y,
        tbl,
        scale_t,
        n_row_tiles,
        n_col_tiles,
        h.stride(0),
        h.stride(1),
        b.stride(0),
        b.stride(1),
        stride_yn,
        R=R,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_R=BLOCK_R,
        DOT_LOW=low,
        ACCUMULATE=accumulate,
    )


def lora_expand(
    h: torch.Tensor,
    B: torch.Tensor,
    slice_offsets: Sequence[int] | torch.Tensor,
    rank: int,
    scaling: float | Sequence[float] | torch.Tensor = 1.0,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Accumulate every slice's delta into ``y`` in place and return ``y``.

    ``h`` is ``[T, c*R]`` (normally the float32 output of ``lora_shrink``), ``B`` is ``[sum_out, R]``,
    ``slice_offsets`` the c+1 cumulative row offsets into B (``[0, out_0, out_0+out_1, ...]``), ``scaling``
    a float or one float per slice. ``y`` is ``[T, sum_out]`` of any float dtype and strides; when None a
    zero float32 tensor is allocated (so the result is the delta alone). Accumulation is in fp32 and
    rounded once to y's dtype.
    """
    U.check_float("h", h)
    U.check_float("B", B)
    U.check_ndim("h", h, 2, "[T, c*R]")
    U.check_ndim("B", B, 2, "[sum_out, R]")
    R = int(rank)
    if R <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    if B.shape[1] != R:
        raise ValueError(f"B has {B.shape[1]} columns but rank is {R}")
    offs = U.as_offsets(slice_offsets, total=B.shape[0])
    c = len(offs) - 1
    if h.shape[1] != c * R:
        raise ValueError(f"h has {h.shape[1]} columns but {c} slices x rank {R} = {c * R}")
    scales = U.as_scalings(scaling, c)
    T, sum_out = h.shape[0], offs[-1]
    if y is None:
        y = torch.zeros((T, sum_out), dtype=torch.float32, device=h.device)
    U.check_float("y", y)
    if tuple(y.shape) != (T, sum_out):
        raise ValueError(f"y must have shape {(T, sum_out)}, got {tuple(y.shape)}")
    U.check_device(h=h, B=B, y=y)
    sy_m, sy_n = y.stride()
    slices = [[0, T, i * R, offs[i], offs[i + 1] - offs[i], offs[i] * sy_n, sy_m] for i in range(c)]
    max_out = max(offs[i + 1] - offs[i] for i in range(c))
    _launch_expand(h, B, y, slices, scales, R, T, max_out, sy_n)
    return y
