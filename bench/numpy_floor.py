"""The floor under the data scan: a bare numpy pass over an adapter's tensor bytes, nothing else.

For each tensor (in file order, neighbours mapped together in batches of 16 MB, as the scan reads them: a memory map
of the file, no copy; on one thread), one
integer exponent-mask test per dtype: any element whose exponent bits are all ones (NaN or Inf). No counts, no
first index, no norms: what `validate`'s data scan cannot go below in numpy on this machine (docs/benchmarks.md).

    .venv/bin/python bench/numpy_floor.py /tmp/lc-bench/pe9
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from lora_convert.io.tensor_files import map_many, read_runs, read_safetensors_header

# (unsigned view, exponent mask) per safetensors dtype
MASKS = {
    "BF16": (np.uint16, 0x7F80),
    "F16": (np.uint16, 0x7C00),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}
BATCH_BYTES = 16 << 20
CHUNK = 1 << 18  # elements per step: the temporaries stay in cache and are reused (no fresh pages)
_scratch: dict[type, tuple[np.ndarray, np.ndarray]] = {}


def _has_nan_or_inf(bits: np.ndarray, mask) -> bool:
    tmp, hit = _scratch.setdefault(bits.dtype.type, (np.empty(CHUNK, bits.dtype), np.empty(CHUNK, np.bool_)))
    for start in range(0, bits.size, CHUNK):
        part = bits[start : start + CHUNK]
        t, h = tmp[: part.size], hit[: part.size]
        np.bitwise_and(part, mask, out=t)
        np.equal(t, mask, out=h)
        if h.any():
            return True
    return False


def main(argv: list[str]) -> int:
    folder = Path(argv[0])
    started = time.perf_counter()
    bad = 0
    for path in sorted(folder.glob("*.safetensors")):
        tensors, _ = read_safetensors_header(path)
        for run in read_runs(list(tensors.values())):
            batch, size = [], 0
            for info in [*run, None]:
                if info is None or (batch and size + info.nbytes > BATCH_BYTES):
                    arrays = map_many(batch)
                    for i in batch:
                        a = arrays[i.key]
                        if i.dtype in MASKS and a.size:
                            view, mask = MASKS[i.dtype]
                            bits = a.reshape(-1).view(view)
                            bad += _has_nan_or_inf(bits, view(mask))
                    batch, size = [], 0
                if info is not None:
                    batch.append(info)
                    size += info.nbytes
    print(f"{bad} tensor(s) with NaN/Inf; {time.perf_counter() - started:.3f} s in-process", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
