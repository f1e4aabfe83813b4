"""Many dense groups in two launches: one shrink, one expand.

An adapter of DeepSeek size has tens of thousands of groups; launching two kernels per group costs more
in launch latency than the arithmetic. Groups that share ``in`` and the rank R are handled together:

* their A's are concatenated along rows (``A_cat [sum c_g*R, in]``) and their B's along rows
  (``B_cat [sum sum_out_g, R]``);
* the shrink and expand kernels are table driven (see ``shrink.py`` / ``expand.py``): one int64 row per
  group (shrink) or per slice (expand) holds its row / column starts, so one launch walks every group.

Choice: concatenation, not pointer arrays. Reason: one base pointer with uniform strides works the same
under TRITON_INTERPRET and on a GPU (the interpreter cannot turn integers into pointers reliably), keeps
dtype promotion in torch, and the copy is one pass over the adapter's weights, which a converter reads
anyway. The cost is that memory for one extra copy of the batch's A and B; chunk the group list if that
matters.

When ``x`` is a single tensor shared by all groups, the shrink is literally ``x @ A_cat^T`` (one big
matmul whose tiles span group borders) and the expand treats every group's slices as the slices of one
big group. When ``x`` is a list (one input per group, e.g. different layers), inputs are concatenated
along rows and each group's tile only meets its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _utils as U
from .expand import _launch_expand
from .shrink import _launch_shrink


def lora_shrink_expand_batched(
    x: torch.Tensor | Sequence[torch.Tensor],
    A_list: Sequence[torch.Tensor],
    B_list: Sequence[torch.Tensor],
    offsets_list: Sequence[Sequence[int] | torch.Tensor],
    rank: int,
    scalings: Sequence[float | Sequence[float]] | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Deltas ``y_g = sum_i scaling_gi * (x_g @ A_g[i]^T) @ B_g[i]^T`` of every group, in two launches.

    ``x``: one ``[T, in]`` tensor shared by all groups, or a list with one ``[T_g, in]`` tensor per group.
    ``A_list[g]`` is ``[c_g*R, in]``, ``B_list[g]`` ``[sum_out_g, R]``, ``offsets_list[g]`` its c_g+1 slice
    offsets, ``scalings[g]`` a float or one float per slice (default 1.0). All groups share ``in`` and R.
    Returns new tensors ``y_g [T_g, sum_out_g]`` of ``out_dtype``: views into one flat buffer.
    """
    G = len(A_list)
    _check_batch_lists(A_list, B_list, offsets_list, scalings, out_dtype)
    if G == 0:
        return []
    R = int(rank)
    if R <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    shared = isinstance(x, torch.Tensor)
    xs = [x] * G if shared else list(x)
    if len(xs) != G:
        raise ValueError(f"x has {len(xs)} tensors for {G} groups")
    offs_all = _check_groups(xs, shared, A_list, B_list, offsets_list, R)
    A_cat = torch.cat(list(A_list), 0)
    B_cat = torch.cat(list(B_list), 0)
    X = x if shared else torch.cat(xs, 0)
    U.check_device(x=X, A=A_cat, B=B_cat)
    ns = [(len(offs) - 1) * R for offs in offs_all]
    h, t_rows, h_row0, h_col0 = _shrink_all(X, xs, shared, A_cat, ns)
    return _expand_all(h, B_cat, offs_all, scalings, R, t_rows, h_row0, h_col0, out_dtype)


def _check_batch_lists(A_list, B_list, offsets_list, scalings, out_dtype) -> None:
    G = len(A_list)
    if len(B_list) != G or len(offsets_list) != G:
        raise ValueError(f"A_list, B_list, offsets_list lengths differ: {G}, {len(B_list)}, {len(offsets_list)}")
    if scalings is not None and len(scalings) != G:
        raise ValueError(f"scalings has {len(scalings)} entries for {G} groups")
    if out_dtype not in U.FLOAT_DTYPES:
        raise ValueError(f"out_dtype {out_dtype} not supported")


def _check_groups(xs, shared: bool, A_list, B_list, offsets_list, R: int) -> list[list[int]]:
    """Check every group's x, A, B and offsets against each other and the batch; return each group's offsets."""
    K = A_list[0].shape[1] if A_list[0].dim() == 2 else -1
    offs_all = []
    for g, (a, b, xg) in enumerate(zip(A_list, B_list, xs, strict=True)):
        U.check_float(f"A_list[{g}]", a)
        U.check_float(f"B_list[{g}]", b)
        U.check_float(f"x[{g}]" if not shared else "x", xg)
        U.check_ndim(f"A_list[{g}]", a, 2, "[c*R, in]")
        U.check_ndim(f"B_list[{g}]", b, 2, "[sum_out, R]")
        U.check_ndim(f"x[{g}]" if not shared else "x", xg, 2, "[T, in]")
        if a.shape[1] != K or xg.shape[1] != K:
            raise ValueError(f"group {g}: in={a.shape[1]} (A) / {xg.shape[1]} (x), batch uses in={K}")
        if b.shape[1] != R:
            raise ValueError(f"group {g}: B has {b.shape[1]} columns but rank is {R}")
        offs = U.as_offsets(offsets_list[g], total=b.shape[0], name=f"offsets_list[{g}]")
        c = len(offs) - 1
        if a.shape[0] != c * R:
            raise ValueError(f"group {g}: A has {a.shape[0]} rows but {c} slices x rank {R} = {c * R}")
        offs_all.append(offs)
    return offs_all


def _running_starts(sizes: list[int]) -> list[int]:
    starts = [0] * len(sizes)
    for g in range(1, len(sizes)):
        starts[g] = starts[g - 1] + sizes[g - 1]
    return starts


def _shrink_all(X, xs, shared: bool, A_cat, ns: list[int]):
    """The shrink of every group in one launch: h (fp32), each group's token rows, and where its h block starts."""
    G, K = len(ns), A_cat.shape[1]
    a_row0 = _running_starts(ns)
    if shared:
        T = X.shape[0]
        h = torch.zeros((T, A_cat.shape[0]), dtype=torch.float32, device=X.device)
        if K > 0:
            _launch_shrink(X, A_cat, h, [[0, T, 0, A_cat.shape[0], 0, 0]], T, A_cat.shape[0], h_is_zero=True)
        return h, [T] * G, [0] * G, a_row0
    t_rows = [xg.shape[0] for xg in xs]
    t0 = _running_starts(t_rows)
    h = torch.zeros((X.shape[0], max(ns)), dtype=torch.float32, device=X.device)
    if K > 0:
        groups = [[t0[g], t_rows[g], a_row0[g], ns[g], t0[g], 0] for g in range(G)]
        _launch_shrink(X, A_cat, h, groups, max(t_rows), max(ns), h_is_zero=True)
    return h, t_rows, t0, [0] * G


def _expand_all(h, B_cat, offs_all, scalings, R: int, t_rows, h_row0, h_col0, out_dtype) -> list[torch.Tensor]:
    """The expand of every slice of every group in one launch, outputs packed in one flat buffer."""
    G = len(offs_all)
    widths = [offs[-1] for offs in offs_all]
    bases = _running_starts([t_rows[g] * widths[g] for g in range(G)])
    flat = torch.zeros(bases[-1] + t_rows[-1] * widths[-1], dtype=out_dtype, device=h.device)
    slices, scales = [], []
    b_row0 = 0
    max_out = 0
    for g, offs in enumerate(offs_all):
        c = len(offs) - 1
        sc = U.as_scalings(1.0 if scalings is None else scalings[g], c)
        for i in range(c):
            out_i = offs[i + 1] - offs[i]
            max_out = max(max_out, out_i)
            slices.append(
                [h_row0[g], t_rows[g], h_col0[g] + i * R, b_row0 + offs[i], out_i, bases[g] + offs[i], widths[g]]
            )
            scales.append(sc[i])
        b_row0 += offs[-1]
    _launch_expand(h, B_cat, flat, slices, scales, R, max(t_rows), max_out, 1, accumulate=False)
    return [flat[bases[g] : bases[g] + t_rows[g] * widths[g]].view(t_rows[g], widths[g]) for g in range(G)]
