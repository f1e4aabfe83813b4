"""Streams tensors into one GGUF file (gguf-py's GGUFWriter), one tensor at a time, in a planned order.

The header, the key-value metadata and every tensor's name, type and shape are written first, from the specs; then
each tensor's data as it comes, so the memory held is one tensor, never the adapter. The same write/close/abort
contract as the safetensors writer (lora_convert/io/safetensors_writer.py), so lora_convert/io/output_folder.py
swaps a GGUF file into place exactly as it does a safetensors one. The `gguf` package is imported only here, and
only when a GGUF file is written or read (the `gguf` extra). `read_gguf_header` lists a GGUF file's metadata and
tensors as TensorInfo (header only), so a GGUF LoRA is read one tensor at a time like a safetensors one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_convert.errors import AdapterFormatError, UsageError
from lora_convert.io.dtypes import FLOAT_DTYPES
from lora_convert.io.tensor_files import TensorInfo

if TYPE_CHECKING:  # numpy is imported where data is written: listing headers never imports it (tensor_files)
    import numpy as np

    from lora_convert.io.safetensors_writer import TensorSpec

GGUF_EXTRA_HINT = "Install the GGUF extra: pip install 'lora-convert[gguf]' (gguf-py, the package llama.cpp ships)."


def import_gguf() -> Any:
    """The `gguf` package, or a UsageError that says how to install it."""
    try:
        import gguf
    except ImportError:
        raise UsageError(
            "Reading or writing GGUF needs the `gguf` package, which is not installed.", hint=GGUF_EXTRA_HINT
        ) from None
    return gguf


def ggml_type(tag: str) -> Any | None:
    """The GGML tensor type of a safetensors dtype tag (same names in both for the floats llama.cpp applies), or
    None when GGML has none."""
    types = import_gguf().GGMLQuantizationType
    return types[tag] if tag in types.__members__ else None


def _array_written_in_pieces() -> type:
    """An ndarray subclass whose `tofile` into a binary file is the safetensors writer's `write_array`."""
    import numpy as np

    from lora_convert.io.safetensors_writer import write_array

    class ArrayWrittenInPieces(np.ndarray):
        # gguf-py's GGUFWriter.write_tensor_data (gguf 0.19.0, gguf/gguf_writer.py) writes each tensor with
        # `tofile`: numpy's one write() of the whole tensor, after a contiguous copy of a strided cut (one slice of
        # every expert). `write_array` writes the same bytes in pieces and a large cut part by part, which costs
        # this workplace's VM a fraction of the system time (docs/benchmarks.md). Should gguf-py stop calling
        # `tofile`, the file is still the same: only the speed-up is lost.
        def tofile(self, fid: Any, sep: str = "", format: str = "%s") -> None:
            if sep or not hasattr(fid, "write"):
                np.asarray(self).tofile(fid, sep, format)
            else:
                write_array(fid, np.asarray(self))

    return ArrayWrittenInPieces


class StreamingGgufWriter:
    """Writes `specs` (in order) with `metadata` (key -> str, float or int value) into a GGUF file at `path`."""

    def __init__(self, path: Path, specs: list[TensorSpec], architecture: str, metadata: Mapping[str, Any]):
        import numpy as np

        gguf = import_gguf()
        self.specs = specs
        self._next = 0
        self._array_type = _array_written_in_pieces()
        self._writer = gguf.GGUFWriter(path, architecture)
        for key, value in metadata.items():
            if isinstance(value, str):
                self._writer.add_string(key, value)
            elif isinstance(value, float):
                self._writer.add_float32(key, value)
            else:
                self._writer.add_uint32(key, value)
        for spec in specs:
            raw = ggml_type(spec.dtype)
            # numpy has no bfloat16: the writer takes the element size from `tensor_dtype`, the type from `raw`
            self._writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.uint16), spec.nbytes, raw_dtype=raw)
        self._writer.write_header_to_file(path)
        self._writer.write_kv_data_to_file()
        self._writer.write_ti_data_to_file()

    def write(self, name: str, array: np.ndarray) -> None:
        from lora_convert.io.safetensors_writer import check_planned  # imports numpy: only when data is written

        check_planned(self.specs[self._next], name, array)

        self._writer.write_tensor_data(array.view(self._array_type))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            self._writer.close()
            raise RuntimeError(f"only {self._next} of {len(self.specs)} planned tensors were written")
        self._writer.close()

    def abort(self) -> None:
        self._writer.close()


def read_gguf_header(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """The key-value metadata and every tensor's place in the GGUF file at `path`, data untouched: shapes in numpy
    order (GGUF lists ne innermost first), dtype the safetensors tag of the GGML type, "" when a float tag has none
    (a quantized tensor). Raises AdapterFormatError for a file gguf-py cannot parse."""
    gguf = import_gguf()
    try:
        # gguf-py maps the file (np.memmap): parsing reads the header only, no tensor's data is touched
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError, KeyError) as exc:
        raise AdapterFormatError(
            f"{path} is not a readable GGUF file: {exc}",
            hint="Point at the adapter.gguf that llama.cpp's convert_lora_to_gguf.py or `normalize --layout gguf` wrote.",
        ) from None
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    infos = {}
    for t in reader.tensors:
        tag = t.tensor_type.name
        dtype = tag if tag in FLOAT_DTYPES else ""  # GGML's float types carry the safetensors tags' names
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        infos[t.name] = TensorInfo(t.name, dtype, shape, Path(path), int(t.data_offset), int(t.n_bytes))
    return fields, infos
