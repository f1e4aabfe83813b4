"""`write_array` (pieces, views written part by part) against its oracle `write_array_plain` (one contiguous copy)."""

import io

import ml_dtypes
import numpy as np
import pytest

from lora_convert.io import safetensors_writer
from lora_convert.io.safetensors_writer import write_array, write_array_plain


class RecordingFile(io.BytesIO):
    """A binary file in memory that remembers the size of every write() call."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def write(self, data) -> int:  # type: ignore[override]
        self.sizes.append(memoryview(data).nbytes)
        return super().write(data)


def _stacked_group(dtype) -> np.ndarray:
    """A stacked group's A, [experts, slices * rank, in], with distinct values (bit patterns) everywhere."""
    raw = np.arange(6 * 8 * 300, dtype=np.uint16).reshape(6, 8, 300)
    return raw.view(dtype) if np.dtype(dtype).itemsize == 2 else raw.astype(dtype)


def _views(dtype) -> dict[str, np.ndarray]:
    group = _stacked_group(dtype)
    return {
        "contiguous": group,
        "one slice of every expert": group[:, 4:8],
        "every other expert": group[::2],
        "one expert's rows, cut columns": group[2, :, 10:200],
        "transposed": group.transpose(0, 2, 1),
        "reversed": group[::-1, ::-1],
        "one element": group[1, 2, 3:4],
        "a scalar": group[1, 2, 3],
        "empty": group[:, 4:4],
    }


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("parts_from", [64, 1 << 30], ids=["parts", "copies"])
def test_write_array_writes_the_oracles_bytes(monkeypatch, dtype, parts_from):
    monkeypatch.setattr(safetensors_writer, "WRITE_PIECE_BYTES", 1000)  # pieces that cut rows and elements
    monkeypatch.setattr(safetensors_writer, "WRITE_PARTS_FROM_BYTES", parts_from)
    for what, view in _views(dtype).items():
        fast, plain = RecordingFile(), io.BytesIO()
        write_array(fast, view)
        write_array_plain(plain, np.asarray(view))
        assert fast.getvalue() == plain.getvalue() == np.ascontiguousarray(view).tobytes(), what
        assert all(0 < size <= 1000 for size in fast.sizes), (what, fast.sizes)


def test_a_large_strided_cut_is_written_part_by_part_not_copied(monkeypatch):
    monkeypatch.setattr(safetensors_writer, "WRITE_PARTS_FROM_BYTES", 1024)
    group = _stacked_group(ml_dtypes.bfloat16)
    cut = group[:, 4:8]  # each expert's part: 4 x 300 x 2 = 2400 contiguous bytes
    copies = []
    real = np.ascontiguousarray

    def counting(array, *args, **kwargs):
        if not array.flags.c_contiguous:
            copies.append(array.shape)
        return real(array, *args, **kwargs)

    monkeypatch.setattr(safetensors_writer.np, "ascontiguousarray", counting)
    out = RecordingFile()
    write_array(out, cut)
    assert copies == []
    assert out.sizes == [2400] * 6
    assert out.getvalue() == real(cut).tobytes()
