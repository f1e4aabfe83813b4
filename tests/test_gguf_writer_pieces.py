"""StreamingGgufWriter writes the bytes gguf-py's own write of contiguous copies writes, for views of stacked groups."""

import ml_dtypes
import numpy as np

from lora_convert.io import safetensors_writer
from lora_convert.io.gguf_file import StreamingGgufWriter, import_gguf
from lora_convert.io.safetensors_writer import TensorSpec


def _tensors() -> dict[str, np.ndarray]:
    """Cuts of a stacked group [experts, 2 * rank, in] as the GGUF layout yields them: strided views and whole ones."""
    group = np.arange(8 * 32 * 300, dtype=np.uint16).reshape(8, 32, 300).view(ml_dtypes.bfloat16)
    return {
        "blk.0.ffn_gate_exps.weight.lora_a": group[:, :16],  # one slice of every expert: not contiguous
        "blk.0.ffn_up_exps.weight.lora_a": group[:, 16:],
        "blk.0.ffn_down_exps.weight.lora_a": group,
        "blk.0.attn_q.weight.lora_b": group[3, :, 7:9],  # a narrow strided cut: copied, not written row by row
        "blk.0.attn_k.weight.lora_b": np.ones((5, 3), np.float32),  # a size that needs alignment padding after it
        "blk.0.attn_v.weight.lora_b": group[::-1, 0],
    }


def _write(path, tensors, write) -> None:
    specs = [
        TensorSpec(name, "BF16" if a.dtype == ml_dtypes.bfloat16 else "F32", a.shape) for name, a in tensors.items()
    ]
    writer = StreamingGgufWriter(path, specs, "llama", {"adapter.type": "lora", "adapter.lora.alpha": 16.0})
    for name, array in tensors.items():
        write(writer, name, array)
    writer.close()


def test_the_file_equals_gguf_pys_write_of_contiguous_copies(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_writer, "WRITE_PIECE_BYTES", 4096)  # pieces that cut tensors
    monkeypatch.setattr(safetensors_writer, "WRITE_PARTS_FROM_BYTES", 1024)  # strided cuts written part by part
    tensors = _tensors()
    written = []
    real_write_array = safetensors_writer.write_array

    def spy(handle, array):
        written.append(array.shape)
        real_write_array(handle, array)

    monkeypatch.setattr(safetensors_writer, "write_array", spy)
    _write(tmp_path / "fast.gguf", tensors, StreamingGgufWriter.write)
    assert set(written) >= {a.shape for a in tensors.values()}  # every tensor went through write_array
    monkeypatch.setattr(safetensors_writer, "write_array", real_write_array)

    def plain(writer, name, array):  # gguf-py's own path: one tofile of a contiguous copy
        writer._writer.write_tensor_data(np.ascontiguousarray(array))
        writer._next += 1

    _write(tmp_path / "plain.gguf", tensors, plain)
    assert (tmp_path / "fast.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()
    reader = import_gguf().GGUFReader(tmp_path / "fast.gguf")
    for t in reader.tensors:
        assert t.data.tobytes() == np.ascontiguousarray(tensors[t.name]).tobytes(), t.name
