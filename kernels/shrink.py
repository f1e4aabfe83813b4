"""LoRA shrink: ``h = x @ A^T`` with fp32 accumulation and fp32 output.

The kernel is table driven: each row of an int64 table describes one independent matmul (a "group")
as ``(x_row0, rows, a_row0, n, h_row0, h_col0)``. :func:`lora_shrink` is the one-group case; the batched
path (``lora_convert.kernels.batched``) passes one row per group so that thousands of groups share one
launch. Scalar table loads cost a few cycles per program, nothing next to the K loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils as U
from ._utils import masked_dot_loop

# One table row per group: x_row0, rows, a_row0, n, h_row0, h_col0. A constexpr global, so the kernel reads it.
_TABLE_COLS = tl.constexpr(6)


# Counts that differ from group to group are not specialized on (==1, divisible by 16): each value class would
# be another compile, and the smoke run launches hundreds of groups of a handful of shape classes.
@triton.jit(do_not_specialize=["n_row_tiles", "n_col_tiles"])
def _shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    table_ptr,
    n_row_tiles,
    n_col_tiles,
    stride_xm,
    stride_xk,
    stride_am,
    stride_ak,
    stride_hm,
    stride_hn,
    K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_LOW: tl.constexpr,
):
    # K (= in) is a constexpr: one compile per distinct `in` (a handful per model), static loop bounds,
    # and it sidesteps triton 3.6's interpreter, whose runtime-int `range` bound fails under numpy >= 2.5.
    # 1-D grid, decomposed here: CUDA caps grid dims y/z at 65535, and a batched launch can have more
    # groups than that. int64 from the start so row * stride never wraps (T * in may exceed 2^31).
    pid = tl.program_id(0).to(tl.int64)
    ks = pid % SPLIT_K
    pid = pid // SPLIT_K
    tiles = n_row_tiles * n_col_tiles
    g = pid // tiles
    rem = pid % tiles
    pid_m = rem // n_col_tiles
    pid_n = rem % n_col_tiles

    tb = table_ptr + g * _TABLE_COLS
    x_row0 = tl.load(tb + 0)
    rows = tl.load(tb + 1)
    a_row0 = tl.load(tb + 2)
    n = tl.load(tb + 3)
    h_row0 = tl.load(tb + 4)
    h_col0 = tl.load(tb + 5)
    # The grid is sized for the largest group; smaller groups' surplus tiles leave at once.
    if pid_m * BLOCK_M >= rows:
        return
    if pid_n * BLOCK_N >= n:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = ks * K_PER_SPLIT
    offs_k = k_start + tl.arange(0, BLOCK_K)
    m_mask = offs_m < rows
    n_mask = offs_n < n

    x_ptrs = x_ptr + (x_row0 + offs_m)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # A is read transposed ([BLOCK_K, BLOCK_N]) so the tile feeds tl.dot directly.
    a_ptrs = a_ptr + (a_row0 + offs_n)[None, :] * stride_am + offs_k[:, None] * stride_ak

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = masked_dot_loop(
        acc,
        x_ptrs,
        a_ptrs,
        m_mask,
        n_mask,
        offs_k,
        K,
        stride_xk,
        stride_ak,
        LOOP=K_PER_SPLIT,
        BLOCK_K=BLOCK_K,
        DOT_LOW=DOT_LOW,
    )

    h_ptrs = h_ptr + (h_row0 + offs_m)[:, None] * stride_hm + (h_col0 + offs_n)[None, :] * stride_hn
    if SPLIT_K == 1:
        tl.store(h_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        # K split across programs (small T, long K): partial sums meet in h, which the launcher zeroed.
        tl.atomic_add(h_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


def _launch_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    h: torch.Tensor,
    groups: list[list[int]],
    max_rows: int,
    max_n: int,
    h_is_zero: bool = False,
    split_k: int | None = None,
) -> None:
    """Run the shrink kernel over ``groups`` (rows of the table above); x, a, h already validated."""
    if not groups or max_rows == 0 or max_n == 0:
        return
    K = x.shape[1]
    low = U.low_dot(x.dtype, a.dtype)
    BLOCK_M = U.block(max_rows, hi=64)
    BLOCK_N = U.block(max_n, hi=64)
    # Wider K steps for 16-bit operands keep the smem tile at the fp32 size (64x64x64x4 B = 32 KiB/stage).
    BLOCK_K = U.block(K, hi=128 if low else 64)
    n_row_tiles = triton.cdiv(max_rows, BLOCK_M)
    n_col_tiles = triton.cdiv(max_n, BLOCK_N)
    n_tiles = len(groups) * n_row_tiles * n_col_tiles
    k_tiles = triton.cdiv(K, BLOCK_K)
    if split_k is None:
        # LoRA shrink at decode sizes is a few output tiles with a long K. H100, bf16, in=7168, N=48,
        # CUDA-graph timings (eager calls are host-bound at ~60 us, the Python launch path):
        #   T=16:   1 program 24.1 us -> split 14 ways 10.1 us (torch x @ A.T: 6.6 us)
        #   T=4096: 64 tiles, no split 35.2 us; split 5 ways 76.8 us (atomics + zeroing lose; torch 27.6)
        # So split only when the tiles fill under a quarter of the SMs, up to ~2 programs per SM,
        # keeping >= 4 K steps per split for the software pipeline.
        sms = U.num_sms(x.device)
        if n_tiles * 4 <= sms:
            split_k = max(1, min(triton.cdiv(2 * sms, n_tiles), k_tiles // 4))
        else:
            split_k = 1
    split_k = max(1, min(int(split_k), k_tiles))
    per_split = triton.cdiv(k_tiles, split_k)
    split_k = triton.cdiv(k_tiles, per_split)  # no empty splits
    if split_k > 1 and not h_is_zero:
        h.zero_()
    tbl = U.table(groups, x.device)
    if tbl.shape[1] != _TABLE_COLS.value:
        raise ValueError(f"shrink table rows have {tbl.shape[1]} entries; the kernel reads {_TABLE_COLS.value}")
    grid = (n_tiles * split_k,)
    _shrink_kernel[grid](
        x,
        a,
        h,
        tbl,
        n_row_tiles,
        n_col_tiles,
        x.stride(0),
        x.stride(1),
        a.stride(0),
        a.stride(1),
        h.stride(0),
        h.stride(1),
        K=K,
        K_PER_SPLIT=per_split * BLOCK_K,
        SPLIT_K=split_k,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        DOT_LOW=low,
    )


def lora_shrink(
    x: torch.Tensor, A: torch.Tensor, out: torch.Tensor | None = None, split_k: int | None = None
) -> torch.Tensor:
    """``h[T, c*R] = x[T, in] @ A[c*R, in]^T``, accumulated and returned in float32.

    ``x`` and ``A`` may be float32/float16/bfloat16 and need not share a dtype (each is cast on load).
    Any strides are accepted. ``out`` (float32, ``[T, c*R]``) is written instead of a new tensor.
    ``split_k`` overrides the K-split heuristic (>1 sums partials with fp32 atomics: run-to-run order
    may differ in the last bits).
    """
    U.check_float("x", x)
    U.check_float("A", A)
    U.check_ndim("x", x, 2, "[T, in]")
    U.check_ndim("A", A, 2, "[c*R, in]")
    if x.shape[1] != A.shape[1]:
        raise ValueError(f"x has in={x.shape[1]} but A has in={A.shape[1]}")
    T, N = x.shape[0], A.shape[0]
    if out is None:
        U.check_device(x=x, A=A)
        out = torch.empty((T, N), dtype=torch.float32, device=x.device)
    else:
        U.check_device(x=x, A=A, out=out)
        if out.dtype != torch.float32 or tuple(out.shape) != (T, N):
            raise ValueError(f"out must be float32 of shape {(T, N)}, got {out.dtype} {tuple(out.shape)}")
    if x.shape[1] == 0:
        return out.zero_()
    _launch_shrink(x, A, out, [[0, T, 0, N, 0, 0]], T, N, split_k=split_k)
    return out
