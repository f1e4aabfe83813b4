"""Shared launcher helpers (argument checks, block-size choice, slice/scaling tables) and the one masked
tile-product loop every kernel runs.

Only the op modules import this (it imports torch); ``lora_convert.kernels.availability`` stays light.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from lora_convert.io.dtypes import DTYPES

from .availability import interpreting

# The kernels take the IEEE floats up to 32 bits (they accumulate in float32), the 16-bit ones on tensor cores.
FLOAT_DTYPES = tuple(getattr(torch, d.name) for d in DTYPES if d.ieee and d.size <= 4)
LOW_DTYPES = tuple(getattr(torch, d.name) for d in DTYPES if d.ieee and d.size == 2)


@triton.jit
def masked_dot_loop(
    acc,
    l_ptrs,
    r_ptrs,
    row_mask,
    col_mask,
    offs_k,
    k_limit,
    l_step_k,
    r_step_k,
    LOOP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_LOW: tl.constexpr,
):
    """acc += L[rows, k] @ R[k, cols] over the reduction dimension in BLOCK_K steps, masked on every side.

    ``offs_k`` are the reduction offsets of the first step (they may start past 0 for a K split) and
    ``offs_k < k_limit - k0`` masks the tail; ``LOOP`` (constexpr: static bounds) is how far this program
    reduces. With DOT_LOW both tiles are fed to tl.dot in R's 16-bit dtype (tensor cores, fp32
    accumulation; the serving-kernel convention of rounding an fp32 left operand to it); otherwise both are
    cast to fp32 with IEEE precision, because tf32 would miss the fp32 tolerance.
    """
    for k0 in range(0, LOOP, BLOCK_K):
        k_mask = offs_k < k_limit - k0
        lt = tl.load(l_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        rt = tl.load(r_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_LOW:
            acc = tl.dot(lt.to(rt.dtype), rt, acc)
        else:
            acc = tl.dot(lt.to(tl.float32), rt.to(tl.float32), acc, input_precision="ieee")
        l_ptrs += BLOCK_K * l_step_k
        r_ptrs += BLOCK_K * r_step_k
    return acc


# tl.dot on a GPU needs every block dim >= 16; all blocks are padded up to this and masked.
MIN_BLOCK = 16


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block(n: int, lo: int = MIN_BLOCK, hi: int = 64) -> int:
    """Power-of-two block covering ``n`` (tl.arange needs powers of two), clamped to ``[lo, hi]``."""
    return max(lo, min(hi, next_pow2(n)))


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {supported}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, what: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}")


def check_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and that device runnable by Triton here."""
    devs = {n: t.device for n, t in tensors.items()}
    first = next(iter(devs.values()))
    if any(d != first for d in devs.values()):
        raise ValueError("tensors are on different devices: " + ", ".join(f"{n}={d}" for n, d in devs.items()))
    if first.type != "cuda" and not interpreting():
        raise ValueError(
            f"tensors are on {first}; Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set in the "
            "environment before lora_convert.kernels.* is imported (CPU interpreter)"
        )
    return first


def low_dot(*dtypes: torch.dtype) -> bool:
    """Feed tl.dot 16-bit operands (tensor cores, fp32 accumulation) only when all operands share one
    16-bit dtype. Otherwise both sides are cast to fp32 and multiplied with ``input_precision="ieee"``
    (not tf32: tf32 would cost ~1e-3 relative error, above the fp32 contract).

    Under TRITON_INTERPRET the answer is always False: the interpreter stores bf16 as raw uint16 and its
    tl.dot multiplies the bit patterns (relative error ~5e9 measured with triton 3.x), while casting to
    fp32 first is exact.
    """
    if interpreting():
        return False
    return dtypes[0] in LOW_DTYPES and all(d == dtypes[0] for d in dtypes)


def as_offsets(slice_offsets, total: int | None = None, name: str = "slice_offsets") -> list[int]:
    """Host list of the c+1 cumulative slice offsets, validated (0-based, non-decreasing, ends at total)."""
    if isinstance(slice_offsets, torch.Tensor):
        offs = [int(v) for v in slice_offsets.detach().reshape(-1).cpu().tolist()]
    else:
        try:
            offs = [int(v) for v in slice_offsets]
        except TypeError as e:
            raise ValueError(f"{name} must be a sequence or tensor of ints") from e
    if len(offs) < 2:
        raise ValueError(f"{name} needs c+1 >= 2 entries, got {offs}")
    if offs[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offs}")
    if any(b < a for a, b in itertools.pairwise(offs)):
        raise ValueError(f"{name} must be non-decreasing (slices may not overlap), got {offs}")
    if total is not None and offs[-1] != total:
        raise ValueError(f"{name} ends at {offs[-1]} but B has {total} rows")
    return offs


def as_scalings(scaling, c: int) -> list[float]:
    """Per-slice scalings as a host list of c floats (a scalar is broadcast)."""
    if isinstance(scaling, torch.Tensor):
        vals = [float(v) for v in scaling.detach().reshape(-1).cpu().tolist()]
    elif isinstance(scaling, (int, float)):
        vals = [float(scaling)]
    elif isinstance(scaling, Sequence):
        vals = [float(v) for v in scaling]
    else:
        raise ValueError(f"scaling must be a float or a sequence of {c} floats, got {type(scaling).__name__}")
    if len(vals) == 1:
        vals = vals * c
    if len(vals) != c:
        raise ValueError(f"scaling has {len(vals)} entries but the group has {c} slices")
    return vals


_TABLE_CACHE: dict = {}
_TABLE_CACHE_MAX = 256


def table(rows, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Per-group / per-slice parameter table the kernels read (int64 by default, so that row starts and
    element bases beyond 2^31 stay exact). A list of lists gives ``[n, cols]``, a flat list ``[n]``.

    Small tables are cached per (content, device): a fresh host-to-device copy on every call would cost
    more than the decode-sized kernels it feeds. Callers must not write to the returned tensor.
    """
    key = None
    if len(rows) <= 64:
        key = (tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in rows), str(device), dtype)
        hit = _TABLE_CACHE.get(key)
        if hit is not None:
            return hit
    t = torch.tensor(rows, dtype=dtype, device=device).contiguous()
    if key is not None:
        if len(_TABLE_CACHE) >= _TABLE_CACHE_MAX:
            _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = t
    return t


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessor count used to size K splits; the H100's 132 when not on CUDA (interpreter), so the
    interpreter runs the same launch shapes as the GPU."""
    if device.type == "cuda":
        return _sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132
