"""The read/build/write pipeline of normalize (issue 16): same bytes as one group at a time, and a failure in any
stage stops the others and leaves no output. Coalesced reads give the same arrays as one read per tensor.

No timings here (bench/pipeline_phases.py and docs/benchmarks.md have them)."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

from helpers import case_base_dir, case_dir, fixture_cases
from lora_convert.convert import group_tensors
from lora_convert.errors import AdapterFormatError
from lora_convert.io import tensor_files
from lora_convert.io.safetensors_writer import StreamingSafetensorsWriter
from lora_convert.peft.adapter import Adapter, load_adapter
from lora_convert.pipeline.commands import normalize

CASES = [c for c in fixture_cases() if not any(refused in c for refused in ("dora", "vision", "trainable_tokens"))]
LAYOUTS = ["stacked", "sglang", "peft"]


def _run(case: str, out, **kw):
    return normalize(str(case_dir(case) / "adapter"), out, base=str(case_base_dir(case)), drop_unsupported=True, **kw)


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _stage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lora-convert-")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_pipelined_output_equals_one_group_at_a_time(tmp_path, monkeypatch, case, layout):
    outs = {}
    for depth in (0, 1, 3):
        monkeypatch.setattr(group_tensors, "PIPELINE_DEPTH", depth)
        try:
            _run(case, tmp_path / f"d{depth}", layout=layout, dtype="bf16")
        except Exception as exc:  # noqa: BLE001 - a layout that refuses this case refuses it at every depth
            outs[depth] = type(exc).__name__
            continue
        outs[depth] = _digest(tmp_path / f"d{depth}")
    assert outs[0] == outs[1] == outs[3]
    assert not _stage_threads()


def _many_groups_case() -> str:
    """The fixture with the most groups, so a failure can land in the middle of the pipeline."""
    from lora_convert.pipeline.commands import plan_normalize

    best = max(
        CASES,
        key=lambda c: len(plan_normalize(str(case_dir(c) / "adapter"), base=str(case_base_dir(c))).groups),
    )
    return best


@pytest.fixture(scope="module")
def deep_case() -> str:
    case = _many_groups_case()
    return case


def _fail_on_call(n: int, exc: BaseException, real):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*args, **kwargs)

    return wrapper, calls


@pytest.mark.parametrize(
    "stage",
    ["read", "build", "write"],
)
def test_a_failing_stage_stops_the_others_and_leaves_no_output(tmp_path, monkeypatch, deep_case, stage):
    monkeypatch.setattr(group_tensors, "PIPELINE_DEPTH", 2)
    error = AdapterFormatError(f"injected {stage} failure")
    if stage == "read":
        wrapper, calls = _fail_on_call(3, error, Adapter.read_many)
        monkeypatch.setattr(Adapter, "read_many", wrapper)
    elif stage == "build":
        wrapper, calls = _fail_on_call(3, error, group_tensors.build_group_tensors)
        monkeypatch.setattr(group_tensors, "build_group_tensors", wrapper)
    else:
        wrapper, calls = _fail_on_call(3, error, StreamingSafetensorsWriter.write)
        monkeypatch.setattr(StreamingSafetensorsWriter, "write", wrapper)
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    with pytest.raises(AdapterFormatError, match=f"injected {stage} failure"):
        _run(deep_case, out)
    assert calls["n"] >= 3
    assert list(out.parent.iterdir()) == []  # neither the output nor a temporary folder
    assert not _stage_threads(), "a pipeline thread outlived the failure"


def test_a_consumer_that_stops_early_stops_the_threads(deep_case):
    from lora_convert.pipeline.commands import plan_normalize

    plan = plan_normalize(str(case_dir(deep_case) / "adapter"), base=str(case_base_dir(deep_case)))
    assert len(plan.groups) >= 3
    it = group_tensors.iter_group_tensors(plan, plan.groups, "F32", depth=2)
    next(it)
    it.close()
    assert not _stage_threads()


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "copied"])
def test_coalesced_reads_equal_single_reads(tmp_path, mapped):
    case = max(CASES, key=lambda c: len(load_adapter(str(case_dir(c) / "adapter")).index))
    adapter = load_adapter(str(case_dir(case) / "adapter"))
    keys = list(adapter.index.tensors)
    arena = tensor_files.ReadArena(mapped=mapped)
    for chunk in (keys, keys[::-1], keys[::3]):
        many = adapter.read_many(chunk, arena)
        assert list(many) == chunk
        for k in chunk:
            one = adapter.read(k)
            assert many[k].dtype == one.dtype and many[k].shape == one.shape
            assert np.array_equal(tensor_files.raw_view(many[k]), tensor_files.raw_view(one)), k
    # a mapped tensor is the file itself: nothing may write through it
    assert all(not a.flags.writeable for a in many.values() if a.size) is mapped
    assert (arena.nbytes == 0) is mapped


def test_a_file_that_cannot_be_mapped_is_read_instead(monkeypatch):
    import mmap

    case = CASES[0]
    adapter = load_adapter(str(case_dir(case) / "adapter"))
    keys = list(adapter.index.tensors)

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # what mmap says on file systems that cannot map

    monkeypatch.setattr(mmap, "mmap", refuse)
    arena = tensor_files.ReadArena()
    many = adapter.read_many(keys, arena)
    assert arena.nbytes > 0  # read into the arena's memory
    for k in keys:
        assert np.array_equal(tensor_files.raw_view(many[k]), tensor_files.raw_view(adapter.read(k))), k


def test_normalize_writes_the_same_bytes_from_mapped_and_copied_reads(tmp_path, monkeypatch):
    case = _many_groups_case()
    _run(case, tmp_path / "mapped", dtype="bf16")
    original = tensor_files.ReadArena.__init__

    def copying(self, *, mapped=True):
        original(self, mapped=False)

    monkeypatch.setattr(tensor_files.ReadArena, "__init__", copying)
    _run(case, tmp_path / "copied", dtype="bf16")
    assert _digest(tmp_path / "mapped") == _digest(tmp_path / "copied")


def _truncated_copy_infos(tmp_path) -> list[tensor_files.TensorInfo]:
    """The first case's tensors, as they lie in a copy of its file cut 2 bytes short: the header promises bytes the
    file does not have."""
    case = CASES[0]
    adapter = load_adapter(str(case_dir(case) / "adapter"))
    path = next(iter(adapter.index.tensors.values())).path
    data = path.read_bytes()
    copy = tmp_path / "adapter_model.safetensors"
    copy.write_bytes(data[: len(data) - 2])
    return [
        tensor_files.TensorInfo(i.key, i.dtype, i.shape, copy, i.start, i.nbytes)
        for i in adapter.index.tensors.values()
    ]


def test_a_truncated_file_is_reported_by_a_mapped_read(tmp_path):
    infos = _truncated_copy_infos(tmp_path)
    with pytest.raises(AdapterFormatError, match="truncated"):
        tensor_files.map_many(infos)


def _info(start: int, nbytes: int, path="f") -> tensor_files.TensorInfo:
    from pathlib import Path

    return tensor_files.TensorInfo(f"t{start}", "U8", (nbytes,), Path(path), start, nbytes)


def test_read_runs_join_neighbours_and_split_at_large_gaps():
    gap = tensor_files.COALESCE_GAP
    infos = [_info(100, 10), _info(0, 100), _info(110 + gap, 5), _info(116 + 2 * gap, 4), _info(0, 3, "g")]
    runs = tensor_files.read_runs(infos)
    assert [[i.start for i in r] for r in runs] == [[0, 100, 110 + gap], [116 + 2 * gap], [0]]
    assert tensor_files.run_span(runs[0]) == 115 + gap


def test_a_truncated_file_is_reported_by_a_coalesced_read(tmp_path):
    infos = _truncated_copy_infos(tmp_path)
    with pytest.raises(AdapterFormatError, match="could be read"):
        for run in tensor_files.read_runs(infos):
            tensor_files.read_run(run)
