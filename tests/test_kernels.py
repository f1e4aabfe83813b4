"""Tests of the Triton LoRA kernels (lora_convert.kernels.*) against plain float64 torch references.

How these run:
* By default (CI, no GPU) every test runs on CPU tensors through Triton's interpreter. TRITON_INTERPRET
  must be set BEFORE triton.jit decorates the kernels, so this module sets it (``setdefault``) at the top,
  before importing any kernel module, and reloads the kernel modules if something imported them earlier
  in the other mode.
* ``test_gpu_suite`` (marked ``gpu``, skipped without CUDA) re-runs this file in a subprocess with
  ``LORA_KERNELS_TEST_DEVICE=cuda`` and the interpreter off: the same checks on compiled kernels and CUDA
  tensors, plus the GPU-only int64 indexing test.
"""

from __future__ import annotations

import os

_GPU_RUN = os.environ.get("LORA_KERNELS_TEST_DEVICE") == "cuda"
if _GPU_RUN:
    os.environ["TRITON_INTERPRET"] = "0"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if sys.platform == "linux":
    import triton  # noqa: F401  (a dependency on Linux: missing there is a failure, not a skip)
else:
    pytest.importorskip("triton")

_MODS = ["_utils", "shrink", "expand", "moe", "batched"]


def _load_kernels():
    """Import the op modules; reload them if they were decorated under the other TRITON_INTERPRET mode."""
    from triton.runtime.interpreter import InterpretedFunction

    from lora_convert.kernels.availability import interpreting

    mods = {n: importlib.import_module(f"lora_convert.kernels.{n}") for n in _MODS}
    if isinstance(mods["shrink"]._shrink_kernel, InterpretedFunction) != interpreting():
        for n in _MODS:
            mods[n] = importlib.reload(mods[n])
    return mods


_K = _load_kernels()
lora_shrink = _K["shrink"].lora_shrink
lora_expand = _K["expand"].lora_expand
lora_moe = _K["moe"].lora_moe
lora_shrink_expand_batched = _K["batched"].lora_shrink_expand_batched

DEVICE = "cuda" if _GPU_RUN else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative error ||out - ref|| / ||ref|| allowed per lowest-precision dtype involved
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

if not _GPU_RUN and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "TRITON_INTERPRET was set to something other than 1 in the environment; the CPU tests need the interpreter",
        allow_module_level=True,
    )


def _tol(*dtypes):
    return max(TOL[d] for d in dtypes)


def _rel(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def _rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def _offsets(outs):
    offs = [0]
    for o in outs:
        offs.append(offs[-1] + o)
    return offs


def _ref_expand(h, B, offs, R, scal, y0=None):
    h, B = h.double().cpu(), B.double().cpu()
    y = torch.zeros(h.shape[0], offs[-1], dtype=torch.float64) if y0 is None else y0.double().cpu().clone()
    for i in range(len(offs) - 1):
        y[:, offs[i] : offs[i + 1]] += scal[i] * h[:, i * R : (i + 1) * R] @ B[offs[i] : offs[i + 1]].T
    return y


def _ref_moe(x, A, B, ids, offs, R, scal, w=None):
    x, A, B = x.double().cpu(), A.double().cpu(), B.double().cpu()
    ids = ids.cpu()
    T, k = ids.shape
    y = torch.zeros(T, k, offs[-1], dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = x[t] @ A[e].T
            ww = 1.0 if w is None else float(w[t, j])
            for i in range(len(offs) - 1):
                y[t, j, offs[i] : offs[i + 1]] = ww * scal[i] * (h[i * R : (i + 1) * R] @ B[e, offs[i] : offs[i + 1]].T)
    return y


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ----------------------------------------------------------------------------------------------- shrink
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,N", [(160, 131, 9), (1, 7, 3), (37, 64, 64), (130, 200, 48)])
def test_shrink(dtype, T, K, N, gen):
    x = _rand(T, K, dtype=dtype, gen=gen)
    A = _rand(N, K, dtype=dtype, gen=gen)
    h = lora_shrink(x, A)
    assert h.dtype == torch.float32 and tuple(h.shape) == (T, N)
    assert _rel(h, x.double().cpu() @ A.double().cpu().T) < _tol(dtype)


@pytest.mark.parametrize(
    "xd,ad", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32), (torch.bfloat16, torch.float16)]
)
def test_shrink_mixed_dtypes_and_strides(xd, ad, gen):
    # x is a transposed (column-major) view, A a row-strided slice: launcher must honour strides
    x = _rand(131, 160, dtype=xd, gen=gen).T
    A = _rand(2 * 16, 131, dtype=ad, gen=gen)[::2]
    assert not x.is_contiguous() and not A.is_contiguous()
    h = lora_shrink(x, A)
    assert _rel(h, x.double().cpu() @ A.double().cpu().T) < _tol(xd, ad)


@pytest.mark.parametrize("split_k", [2, 3, 7])
def test_shrink_split_k(split_k, gen):
    # K split across programs with fp32 atomics (the path decode-sized shapes take on a GPU); out= reused
    # with garbage in it must still come back exact (the launcher zeroes it before the atomics).
    T, K, N = 21, 451, 24
    x = _rand(T, K, dtype=torch.bfloat16, gen=gen)
    A = _rand(N, K, dtype=torch.bfloat16, gen=gen)
    out = torch.full((T, N), 7.0, device=DEVICE)
    h = lora_shrink(x, A, out=out, split_k=split_k)
    assert h is out
    assert _rel(h, x.double().cpu() @ A.double().cpu().T) < 1e-5


# ----------------------------------------------------------------------------------------------- expand
EXPAND_CASES = [
    # (T, R, outs): c = 1..4, unequal out_i, one not a multiple of anything (131), an empty slice
    (160, 3, [131]),
    (160, 16, [7, 200]),
    (37, 3, [5, 131, 64]),
    (1, 16, [33, 7, 0, 130]),
    (70, 5, [3, 17, 129, 1]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,R,outs", EXPAND_CASES)
def test_expand_accumulates_in_place(dtype, T, R, outs, gen):
    offs = _offsets(outs)
    c = len(outs)
    h = _rand(T, c * R, gen=gen)  # shrink output: fp32
    B = _rand(offs[-1], R, dtype=dtype, gen=gen)
    y0 = _rand(T, offs[-1], dtype=dtype, gen=gen)
    scal = [0.5, -2.0, 1.25, 3.0][:c]
    y = y0.clone()
    ret = lora_expand(h, B, offs, R, scal, y)
    assert ret is y
    ref = _ref_expand(h, B, offs, R, scal, y0)
    assert _rel(y, ref) < _tol(dtype)
    # and the delta alone (y=None -> fresh fp32 zeros), tensor offsets/scalings accepted too
    d = lora_expand(h, B, torch.tensor(offs), R, torch.tensor(scal))
    assert d.dtype == torch.float32
    assert _rel(d, _ref_expand(h, B, offs, R, scal)) < _tol(dtype)


def test_expand_scalar_scaling_and_strided_y(gen):
    T, R, outs = 45, 3, [9, 4, 131]
    offs = _offsets(outs)
    h = _rand(T, 3 * R, gen=gen)
    B = _rand(offs[-1], R, gen=gen)
    big = _rand(offs[-1] + 10, T, gen=gen)
    y = big.T[:, 5 : 5 + offs[-1]]  # column-major, offset view
    y0, before = y.clone(), big.clone()
    lora_expand(h, B, offs, R, 0.75, y)
    assert _rel(y, _ref_expand(h, B, offs, R, [0.75] * 3, y0)) < 1e-5
    # rows of `big` outside the view untouched
    assert torch.equal(big[:5], before[:5]) and torch.equal(big[5 + offs[-1] :], before[5 + offs[-1] :])


def test_expand_swapped_offsets_change_result(gen):
    # Guard that the tests can fail: offsets of a different slice split must not match the reference.
    T, R, outs = 20, 4, [10, 30]
    h = _rand(T, 2 * R, gen=gen)
    B = _rand(40, R, gen=gen)
    good = lora_expand(h, B, _offsets(outs), R)
    swapped = lora_expand(h, B, _offsets(outs[::-1]), R)
    ref = _ref_expand(h, B, _offsets(outs), R, [1.0, 1.0])
    assert _rel(good, ref) < 1e-5
    assert _rel(swapped, ref) > 0.1
    # per-slice scaling is applied per slice, not globally
    assert _rel(lora_expand(h, B, _offsets(outs), R, [1.0, 2.0]), ref) > 0.1


def test_shrink_expand_chain_matches_dense_delta(gen):
    T, K, R, outs = 160, 131, 3, [7, 64, 131]
    offs = _offsets(outs)
    x = _rand(T, K, gen=gen)
    A = _rand(3 * R, K, gen=gen)
    B = _rand(offs[-1], R, gen=gen)
    y = lora_expand(lora_shrink(x, A), B, offs, R)
    delta = torch.cat(
        [B.double().cpu()[offs[i] : offs[i + 1]] @ A.double().cpu()[i * R : (i + 1) * R] for i in range(3)]
    )
    assert _rel(y, x.double().cpu() @ delta.T) < 1e-5


# -------------------------------------------------------------------------------------------------- moe
MOE_CASES = [
    # (T, K, R, outs)
    (160, 131, 3, [131]),
    (160, 64, 16, [7, 40]),
    (9, 131, 3, [5, 17, 129]),
    (23, 33, 16, [16, 1, 70, 9]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,R,outs", MOE_CASES)
def test_moe(dtype, T, K, R, outs, gen):
    E, k = 5, 2
    offs = _offsets(outs)
    c = len(outs)
    x = _rand(T, K, dtype=dtype, gen=gen)
    A = _rand(E, c * R, K, dtype=dtype, gen=gen)
    B = _rand(E, offs[-1], R, dtype=dtype, gen=gen)
    ids = torch.randint(-1, E, (T, k), generator=gen)
    ids[0, :] = -1  # a token routed nowhere
    ids[-1, :] = 4  # same expert twice
    w = torch.rand(T, k, generator=gen)
    scal = [1.5, -0.5, 2.0, 1.0][:c]
    y = lora_moe(x, A, B, ids.to(DEVICE), offs, R, scal, topk_weights=w.to(DEVICE))
    assert tuple(y.shape) == (T, k, offs[-1]) and y.dtype == dtype
    ref = _ref_moe(x, A, B, ids, offs, R, scal, w)
    assert _rel(y, ref) < _tol(dtype)
    assert torch.count_nonzero(y[0].float()) == 0
    # without weights, scalar scaling, fp32 output
    y1 = lora_moe(x, A, B, ids.to(torch.int32).to(DEVICE), offs, R, out_dtype=torch.float32)
    assert _rel(y1, _ref_moe(x, A, B, ids, offs, R, [1.0] * c)) < _tol(dtype)


def test_moe_mixed_dtypes_and_edge_routing(gen):
    T, K, R, outs, E = 17, 131, 3, [7, 5], 5
    offs = _offsets(outs)
    x = _rand(T, K, gen=gen)  # fp32 x, bf16 weights
    A = _rand(E, 2 * R, K, dtype=torch.bfloat16, gen=gen)
    B = _rand(E, 12, R, dtype=torch.bfloat16, gen=gen)
    ids = torch.full((T, 3), -1, dtype=torch.int64)
    assert torch.count_nonzero(lora_moe(x, A, B, ids.to(DEVICE), offs, R)) == 0
    ids[:, 1] = 3  # everyone on one expert, k=3 with two empty choices
    y = lora_moe(x, A, B, ids.to(DEVICE), offs, R)
    assert _rel(y, _ref_moe(x, A, B, ids, offs, R, [1.0, 1.0])) < _tol(torch.bfloat16)
    # a wrong expert swap must be detected
    wrong = lora_moe(x, A, B, torch.where(ids == 3, 2, ids).to(DEVICE), offs, R)
    assert _rel(wrong, _ref_moe(x, A, B, ids, offs, R, [1.0, 1.0])) > 0.1
    with pytest.raises(ValueError, match="topk_ids"):
        lora_moe(x, A, B, torch.full((T, 1), E).to(DEVICE), offs, R)
    with pytest.raises(ValueError, match="topk_ids"):
        lora_moe(x, A, B, torch.full((T, 1), -2).to(DEVICE), offs, R)


# ---------------------------------------------------------------------------------------------- batched
def _batched_groups(gen, dtype, R=3, K=131):
    specs = [[7], [5, 131, 2], [64, 1], [16, 16, 16, 3], [0, 9]]
    A_list, B_list, offs_list, scal = [], [], [], []
    for g, outs in enumerate(specs):
        offs = _offsets(outs)
        A_list.append(_rand(len(outs) * R, K, dtype=dtype, gen=gen))
        B_list.append(_rand(offs[-1], R, dtype=dtype, gen=gen))
        offs_list.append(offs)
        scal.append([0.5 + g + i for i in range(len(outs))] if g % 2 else 2.0 - g)
    return A_list, B_list, offs_list, scal


def _ref_group(x, A, B, offs, R, s):
    c = len(offs) - 1
    s = [float(s)] * c if isinstance(s, (int, float)) else s
    return _ref_expand(x.double().cpu() @ A.double().cpu().T, B, offs, R, s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_shared_x(dtype, gen):
    R, K = 3, 131
    A_list, B_list, offs_list, scal = _batched_groups(gen, dtype, R, K)
    x = _rand(160, K, dtype=dtype, gen=gen)
    ys = lora_shrink_expand_batched(x, A_list, B_list, offs_list, R, scal)
    assert len(ys) == len(A_list)
    for g, y in enumerate(ys):
        assert tuple(y.shape) == (160, offs_list[g][-1])
        ref = _ref_group(x, A_list[g], B_list[g], offs_list[g], R, scal[g])
        assert _rel(y, ref) < _tol(dtype), f"group {g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_per_group_x(dtype, gen):
    R, K = 16, 131
    A_list, B_list, offs_list, scal = _batched_groups(gen, dtype, R, K)
    xs = [_rand(t, K, dtype=dtype, gen=gen) for t in (160, 1, 37, 64, 5)]
    ys = lora_shrink_expand_batched(xs, A_list, B_list, offs_list, R, scal, out_dtype=dtype)
    for g, y in enumerate(ys):
        assert y.dtype == dtype and tuple(y.shape) == (xs[g].shape[0], offs_list[g][-1])
        ref = _ref_group(xs[g], A_list[g], B_list[g], offs_list[g], R, scal[g])
        assert _rel(y, ref) < _tol(dtype), f"group {g}"
    # matches the unbatched ops exactly in structure: group 1 via shrink + expand
    single = lora_expand(lora_shrink(xs[1], A_list[1]), B_list[1], offs_list[1], R, scal[1])
    assert _rel(ys[1], single) < _tol(dtype)


# ----------------------------------------------------------------------------------------------- errors
def test_argument_errors(gen):
    x = _rand(4, 8, gen=gen)
    A = _rand(6, 8, gen=gen)
    B = _rand(10, 3, gen=gen)
    h = _rand(4, 6, gen=gen)
    with pytest.raises(ValueError, match="dtype"):
        lora_shrink(x.to(torch.int32), A)
    with pytest.raises(ValueError, match="in="):
        lora_shrink(x, _rand(6, 9, gen=gen))
    with pytest.raises(ValueError, match="non-decreasing"):
        lora_expand(h, B, [0, 7, 5, 10], 3)
    with pytest.raises(ValueError, match="ends at"):
        lora_expand(h, B, [0, 4, 9], 3)
    with pytest.raises(ValueError, match="rank"):
        lora_expand(h, B, [0, 4, 10], 2)
    with pytest.raises(ValueError, match="scaling"):
        lora_expand(h, B, [0, 4, 10], 3, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="shape"):
        lora_expand(h, B, [0, 4, 10], 3, 1.0, torch.zeros(4, 9, device=DEVICE))


def test_package_import_is_light():
    # Asking whether the kernels can run (lora_convert.kernels.availability) must not pull in torch or triton.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    code = (
        "import sys, lora_convert.kernels.availability as k; k.is_available(); "
        "bad = [m for m in ('triton', 'torch') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    from lora_convert.kernels.availability import is_available

    assert is_available()


# -------------------------------------------------------------------------------------------------- gpu
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(_GPU_RUN, reason="this is the launcher of the GPU run itself")
def test_gpu_suite():
    """Every check above, again, on CUDA tensors with compiled (not interpreted) kernels."""
    env = dict(
        os.environ,
        LORA_KERNELS_TEST_DEVICE="cuda",
        TRITON_INTERPRET="0",
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "not test_gpu_suite",
            str(Path(__file__).resolve()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU_RUN, reason="runs inside test_gpu_suite's CUDA subprocess")
def test_gpu_int64_row_offsets(gen):
    # Row starts x row stride beyond 2^31 elements: x rows 2^24 apart (160 rows -> offset ~2.7e9),
    # y rows likewise. An int32 offset would wrap and read/write the wrong place.
    T, K, R, outs = 160, 131, 16, [40, 24]
    stride = 1 << 24
    buf = torch.zeros(T * stride, dtype=torch.bfloat16, device="cuda")
    x = buf.as_strided((T, K), (stride, 1))
    x.copy_(torch.randn(T, K, generator=gen).to(torch.bfloat16))
    A = _rand(2 * R, K, dtype=torch.bfloat16, gen=gen)
    B = _rand(64, R, dtype=torch.bfloat16, gen=gen)
    h = lora_shrink(x, A)
    assert _rel(h, x.double().cpu() @ A.double().cpu().T) < 1e-5
    del buf
    ybuf = torch.zeros(T * stride, dtype=torch.bfloat16, device="cuda")
    y = ybuf.as_strided((T, 64), (stride, 1))
    lora_expand(h, B, _offsets(outs), R, 1.0, y)
    assert _rel(y, _ref_expand(h, B, _offsets(outs), R, [1.0, 1.0])) < _tol(torch.bfloat16)
