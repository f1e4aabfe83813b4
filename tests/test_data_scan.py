from __future__ import annotations

import math

import pytest
import torch

from lora_convert.check import data_scan
from lora_convert.check.data_scan import dtype_findings, scan_adapter, tensor_stats
from lora_convert.peft.adapter import load_adapter


def _key(layer, module, factor):
    return f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{factor}.weight"


def _tensors(n_layers=4, r=4, h=16, scale_b=0.01):
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(n_layers):
        for module in ("q_proj", "v_proj"):
            out[_key(layer, module, "A")] = torch.randn(r, h, generator=g) / math.sqrt(h)
            out[_key(layer, module, "B")] = torch.randn(h, r, generator=g) * scale_b
    return out


def codes(findings):
    return sorted(f.code for f in findings)


def test_clean_adapter_has_no_data_findings(adapter_writer):
    adapter = load_adapter(adapter_writer(_tensors()), strict_config=False)
    result = scan_adapter(adapter)
    assert result.findings == []
    assert len(result.stats) == 16 and result.bytes_read == adapter.total_bytes


def test_nan_inf_counts_and_first_index(adapter_writer):
    t = _tensors()
    a = t[_key(1, "q_proj", "A")]
    a.view(-1)[[5, 9, 40]] = float("nan")
    t[_key(2, "v_proj", "B")].view(-1)[7] = float("inf")
    t[_key(2, "v_proj", "B")].view(-1)[11] = float("-inf")
    result = scan_adapter(load_adapter(adapter_writer(t), strict_config=False))
    nan = [f for f in result.findings if f.code == "data.nan"]
    inf = [f for f in result.findings if f.code == "data.inf"]
    assert len(nan) == 1 and nan[0].actual == 3 and "first at flat index 5" in nan[0].message
    assert len(inf) == 1 and inf[0].actual == 2 and "first at flat index 7" in inf[0].message
    assert all(f.severity.value == "error" for f in nan + inf)


def test_zero_b_is_a_warning(adapter_writer):
    t = _tensors()
    t[_key(3, "q_proj", "B")].zero_()
    result = scan_adapter(load_adapter(adapter_writer(t), strict_config=False))
    (f,) = [f for f in result.findings if f.code == "data.zero-b"]
    assert f.severity.value == "warning" and f.keys == [_key(3, "q_proj", "B")]
    assert "no-op" in f.message


def test_magnitude_outlier(adapter_writer):
    t = _tensors(n_layers=6)
    t[_key(4, "v_proj", "B")] *= 1000
    result = scan_adapter(load_adapter(adapter_writer(t), strict_config=False))
    (f,) = [f for f in result.findings if f.code == "data.magnitude-outlier"]
    assert f.keys == [_key(4, "v_proj", "B")] and f.severity.value == "warning"


def test_chunked_stats_match_whole_tensor(monkeypatch):
    monkeypatch.setattr(data_scan, "CHUNK_ELEMENTS", 7)
    x = torch.randn(13, 5, dtype=torch.bfloat16)
    x.view(-1)[[20, 33]] = float("nan")
    x.view(-1)[50] = float("inf")
    s = tensor_stats("k", "BF16", _numpy(x), "lora_B")
    assert (s.nan, s.first_nan, s.inf, s.first_inf) == (2, 20, 1, 50)
    finite = x.float().view(-1)
    finite = finite[torch.isfinite(finite)]
    assert s.rms == pytest.approx(float(finite.pow(2).mean().sqrt()), rel=1e-6)


def test_dtype_census(adapter_writer):
    t = _tensors(n_layers=1)
    t[_key(0, "q_proj", "A")] = t[_key(0, "q_proj", "A")].double()
    t[_key(0, "v_proj", "A")] = torch.ones(4, 16, dtype=torch.int32)
    adapter = load_adapter(adapter_writer(t), strict_config=False)
    got = {f.code: f for f in dtype_findings(adapter.index)}
    assert got["data.integer-dtype"].severity.value == "error"
    assert got["data.float64"].severity.value == "warning"
    assert got["data.mixed-dtypes"].severity.value == "warning"


def test_row_energy_matches_dense_product(adapter_writer):
    t = _tensors(n_layers=1)
    adapter = load_adapter(adapter_writer(t), strict_config=False)
    module = "model.layers.0.self_attn.q_proj"
    result = scan_adapter(adapter, row_energy_modules=[module])
    delta = t[_key(0, "q_proj", "B")].double() @ t[_key(0, "q_proj", "A")].double()
    assert result.row_energy[module] == pytest.approx(delta.pow(2).sum(1).tolist(), rel=1e-9)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_scan_reads_each_tensor_once_in_bounded_batches(adapter_writer, monkeypatch, threads):
    """Every tensor is read once, in batches of at most SCAN_BATCH_BYTES (or one larger tensor), through one reused
    arena per scanning thread: memory is bounded by the batch size, not the adapter."""
    from lora_convert.peft.adapter import Adapter

    adapter = load_adapter(adapter_writer(_tensors(n_layers=8, h=64)), strict_config=False)
    sizes = sorted(t.nbytes for t in adapter.index.tensors.values())
    batch = 3 * sizes[-1]  # several tensors fit in a batch, and the adapter takes many batches
    monkeypatch.setattr(data_scan, "SCAN_BATCH_BYTES", batch)
    monkeypatch.setattr(data_scan, "SCAN_THREADS", threads)
    requests: list[list[str]] = []
    arenas: set[int] = set()
    original = Adapter.read_many

    def read_many(self, keys, arena=None):
        requests.append(list(keys))
        arenas.add(id(arena))
        return original(self, keys, arena)

    monkeypatch.setattr(Adapter, "read_many", read_many)
    result = scan_adapter(adapter)
    read = [k for r in requests for k in r]
    assert sorted(read) == sorted(adapter.index.tensors)  # each once
    assert len(requests) > 1 and any(len(r) > 1 for r in requests)
    for r in requests:
        nbytes = sum(adapter.index.tensors[k].nbytes for k in r)
        assert len(r) == 1 or nbytes <= batch, r
    assert len(arenas) <= threads and id(None) not in arenas  # reused arenas, never fresh memory
    assert len(result.stats) == len(adapter.index.tensors) and result.bytes_read == adapter.total_bytes


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch_bytes", [1, 4096, 1 << 30])
def test_batched_scan_equals_tensor_by_tensor(adapter_writer, monkeypatch, batch_bytes, threads):
    """The same stats and findings whatever the batching: NaN/Inf/zero/huge/tiny tensors and mixed dtypes among
    the batched ones take the exact path, the rest the vectorized norms."""
    t = _tensors(n_layers=6, h=48)
    hostile = _hostile_tensors()
    for i, x in enumerate(hostile.values()):
        layer, module = divmod(i, 2)
        dtype = [torch.float32, torch.bfloat16, torch.float16][i % 3]
        t[_key(layer, ("q_proj", "v_proj")[module], "B")] = x.reshape(-1).repeat(192)[:192].reshape(48, 4).to(dtype)
    adapter = load_adapter(adapter_writer(t), strict_config=False)
    want = {}
    for key, info in adapter.index.tensors.items():
        parsed = adapter.parsed.get(key)
        kind = data_scan._factor_kind(parsed.factor) if parsed is not None else "unknown"
        want[key] = tensor_stats(key, info.dtype, adapter.read(key), kind)
    monkeypatch.setattr(data_scan, "SCAN_BATCH_BYTES", batch_bytes)
    result = scan_adapter(adapter, threads=threads)
    assert list(result.stats) == data_scan._scan_order(adapter)
    for key, w in want.items():
        g = result.stats[key]
        assert (g.nan, g.first_nan, g.inf, g.first_inf, g.all_zero) == (
            w.nan,
            w.first_nan,
            w.inf,
            w.first_inf,
            w.all_zero,
        ), key
        assert g.rms == pytest.approx(w.rms, rel=1e-6, abs=0.0), key
    assert result.findings == data_scan.stats_findings({k: want[k] for k in result.stats})
    assert {"data.nan", "data.inf"} <= {f.code for f in result.findings}


def test_a_read_failure_in_a_scanning_thread_is_raised(adapter_writer, monkeypatch):
    import threading

    from lora_convert.errors import AdapterFormatError
    from lora_convert.peft.adapter import Adapter

    adapter = load_adapter(adapter_writer(_tensors(n_layers=8, h=64)), strict_config=False)
    monkeypatch.setattr(data_scan, "SCAN_BATCH_BYTES", 1)  # one tensor a batch: many batches
    monkeypatch.setattr(data_scan, "SCAN_THREADS", 2)  # batches read and tested on two threads
    calls = {"n": 0}
    original = Adapter.read_many

    def read_many(self, keys, arena=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise AdapterFormatError("injected read failure")
        return original(self, keys, arena)

    monkeypatch.setattr(Adapter, "read_many", read_many)
    with pytest.raises(AdapterFormatError, match="injected"):
        scan_adapter(adapter)
    assert not [t for t in threading.enumerate() if t.name.startswith("lora-convert-")]


# ------------------------------------------------------------------- the numpy scan against the torch one
def _numpy(t: torch.Tensor):
    """A torch tensor as the numpy array the core reads (bf16 through ml_dtypes, same bytes)."""
    from lora_convert.io.dtypes import numpy_dtype

    tag = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}[t.dtype]
    return t.contiguous().view(-1).view(torch.uint8).numpy().view(numpy_dtype(tag)).reshape(tuple(t.shape))


def _torch_tensor_stats(key, dtype, tensor, factor):
    """The data scan's per-tensor statistics as the torch path computed them (the code before the numpy port)."""
    stats = data_scan.TensorStats(key=key, dtype=dtype, numel=int(tensor.numel()), factor=factor)
    if stats.numel == 0:
        return stats
    flat = tensor.reshape(-1)
    norm = float(torch.linalg.vector_norm(flat, 2))
    if math.isfinite(norm) and norm > 0.0:
        stats.rms = norm / math.sqrt(stats.numel)
        return stats
    sum_sq, finite_count, nonzero = 0.0, 0, False
    for start in range(0, stats.numel, data_scan.CHUNK_ELEMENTS):
        chunk = flat[start : start + data_scan.CHUNK_ELEMENTS].to(torch.float32)
        bad = None
        for kind, test in (("nan", torch.isnan), ("inf", torch.isinf)):
            mask = test(chunk)
            count = int(mask.sum())
            if not count:
                continue
            if getattr(stats, f"first_{kind}") is None:
                setattr(stats, f"first_{kind}", start + int(mask.to(torch.uint8).argmax()))
            setattr(stats, kind, getattr(stats, kind) + count)
            bad = mask if bad is None else bad | mask
        if bad is not None:
            chunk = chunk[~bad]
        if chunk.numel():
            as64 = chunk.to(torch.float64)
            sum_sq += float((as64 * as64).sum())
            nonzero = nonzero or bool(chunk.any())
            finite_count += int(chunk.numel())
    stats.rms = math.sqrt(sum_sq / finite_count) if finite_count else 0.0
    stats.all_zero = not nonzero and stats.nan == 0 and stats.inf == 0
    return stats


def _hostile_tensors():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 48, generator=g)
    out = {"plain": base, "zeros": torch.zeros(64, 48), "neg-zeros": -torch.zeros(64, 48)}
    x = base.clone()
    x.view(-1)[[5, 900, 3000]] = float("nan")
    x.view(-1)[[7, 2000]] = float("inf")
    x.view(-1)[8] = float("-inf")
    out["nan-inf"] = x
    out["huge"] = base * 1e30  # squares overflow float32
    out["big-f16-norm"] = base * 3000  # an f16 norm above 65504
    out["tiny"] = base * 1e-42  # float32 subnormals; zero in bf16/f16
    out["one-nan"] = torch.full((3, 3), float("nan"))
    out["scalar-like"] = torch.tensor([[2.5]])
    return out


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F64"])
def test_numpy_stats_equal_the_torch_scan(dtype):
    """Counts, first indices and all-zero are identical; RMS equal to the last bit of the stored dtype's norm."""
    tdtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[dtype]
    ulp = {"F32": 1e-6, "F16": 2**-10, "BF16": 2**-7, "F64": 1e-12}[dtype]
    for name, t in _hostile_tensors().items():
        t = t.to(tdtype)
        want = _torch_tensor_stats(name, dtype, t, "lora_B")
        got = tensor_stats(name, dtype, _numpy(t), "lora_B")
        assert (got.nan, got.first_nan, got.inf, got.first_inf, got.all_zero) == (
            want.nan,
            want.first_nan,
            want.inf,
            want.first_inf,
            want.all_zero,
        ), name
        assert got.rms == pytest.approx(want.rms, rel=ulp, abs=0.0), name


def test_numpy_scan_findings_equal_the_torch_scan_on_every_fixture():
    from helpers import case_dir, fixture_cases

    for case in fixture_cases():
        adapter = load_adapter(str(case_dir(case) / "adapter"))
        result = scan_adapter(adapter)
        want = {}
        for key, info in adapter.index.tensors.items():
            t = torch.from_numpy(adapter.read(key).copy())
            want[key] = _torch_tensor_stats(key, info.dtype, t, result.stats[key].factor)
            got = result.stats[key]
            assert (got.nan, got.inf, got.all_zero) == (want[key].nan, want[key].inf, want[key].all_zero)
            assert got.rms == pytest.approx(want[key].rms, rel=1e-6), (case, key)
        assert data_scan.stats_findings(want) == result.findings, case
