"""The dtype table: every safetensors dtype lora-convert reads or writes, and what each stage needs to know of it.

One row per safetensors dtype tag: its bytes per element, its name (the same in torch, numpy and ml_dtypes: numpy
has no bfloat16 or float8, ml_dtypes provides them as numpy dtypes with the bit layouts safetensors uses), whether
it is a float, the bit fields of the IEEE 754 formats, and the `normalize --dtype` choice that writes it. The header
parser, the writers, the data scan, the smoke staging and the kernels' argument checks all derive what they need
from this table. No numpy import here: the header-only commands read the table without loading numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Dtype:
    tag: str  # the safetensors header's dtype tag
    size: int  # bytes per element
    name: str  # torch.<name>; numpy.dtype(<name>), or ml_dtypes.<name> when `from_ml_dtypes`
    is_float: bool
    from_ml_dtypes: bool = False  # numpy lacks it (bfloat16, the float8 formats): ml_dtypes provides it
    # IEEE 754 layout (sign, exponent, mantissa; NaN or infinite exactly when every exponent bit is set): the
    # exponent bits as a mask of the unsigned word, and the mantissa's width. None for the formats without it
    # (float8 e4m3fn has no infinity, e8m0 no sign or mantissa) and for integers.
    exponent_mask: int | None = None
    mantissa_bits: int | None = None
    option: str | None = None  # the `normalize --dtype` choice that writes it

    @property
    def ieee(self) -> bool:
        return self.exponent_mask is not None

    @property
    def largest_exponent_field(self) -> int:
        """The largest biased exponent a finite value has (all exponent bits set means NaN or infinite)."""
        if self.exponent_mask is None or self.mantissa_bits is None:
            raise ValueError(f"{self.tag} is not an IEEE 754 float")
        return (self.exponent_mask >> self.mantissa_bits) - 1


# Sub-byte float formats (F4, F6) are not LoRA dtypes. Order: floats widest first, then the integers.
DTYPES: tuple[Dtype, ...] = (
    Dtype("F64", 8, "float64", True, exponent_mask=0x7FF0000000000000, mantissa_bits=52),
    Dtype("F32", 4, "float32", True, exponent_mask=0x7F800000, mantissa_bits=23, option="fp32"),
    Dtype("F16", 2, "float16", True, exponent_mask=0x7C00, mantissa_bits=10, option="fp16"),
    Dtype("BF16", 2, "bfloat16", True, True, exponent_mask=0x7F80, mantissa_bits=7, option="bf16"),
    Dtype("F8_E4M3", 1, "float8_e4m3fn", True, True),
    Dtype("F8_E5M2", 1, "float8_e5m2", True, True),
    Dtype("F8_E8M0", 1, "float8_e8m0fnu", True, True),
    Dtype("I64", 8, "int64", False),
    Dtype("I32", 4, "int32", False),
    Dtype("I16", 2, "int16", False),
    Dtype("I8", 1, "int8", False),
    Dtype("U64", 8, "uint64", False),
    Dtype("U32", 4, "uint32", False),
    Dtype("U16", 2, "uint16", False),
    Dtype("U8", 1, "uint8", False),
    Dtype("BOOL", 1, "bool", False),
)
BY_TAG: dict[str, Dtype] = {d.tag: d for d in DTYPES}

# Views of the table, by tag.
DTYPE_SIZES: dict[str, int] = {d.tag: d.size for d in DTYPES}
FLOAT_DTYPES: frozenset[str] = frozenset(d.tag for d in DTYPES if d.is_float)
IEEE_FLOAT_DTYPES: frozenset[str] = frozenset(d.tag for d in DTYPES if d.ieee)
TORCH_DTYPE_NAMES: dict[str, str] = {d.tag: d.name for d in DTYPES}  # data only: no torch import
# `normalize --dtype`: keep the sources' dtype, or one of the table's choices (in name order: bf16, fp16, fp32)
KEEP = "keep"
OUTPUT_DTYPES: dict[str, str] = {d.option: d.tag for d in sorted(DTYPES, key=lambda d: d.option or "") if d.option}
OUTPUT_DTYPE_CHOICES: tuple[str, ...] = (KEEP, *OUTPUT_DTYPES)


@cache
def _numpy_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes
    import numpy as np

    return {d.tag: np.dtype(getattr(ml_dtypes, d.name) if d.from_ml_dtypes else d.name) for d in DTYPES}


@cache
def _tags_of_numpy() -> dict[np.dtype, str]:
    return {dt: tag for tag, dt in _numpy_dtypes().items()}


def numpy_dtype(tag: str) -> np.dtype:
    """The numpy dtype of a safetensors dtype tag."""
    return _numpy_dtypes()[tag]


def dtype_tag(dtype) -> str:
    """The safetensors dtype tag of a numpy dtype."""
    import numpy as np

    return _tags_of_numpy()[np.dtype(dtype)]


def tag_of_torch_name(name: str) -> str | None:
    """The safetensors tag of a torch dtype's name (`str(t.dtype)` without `torch.`); None for one we do not know."""
    return _tags_of_torch_names().get(name)


@cache
def _tags_of_torch_names() -> dict[str, str]:
    return {name: tag for tag, name in TORCH_DTYPE_NAMES.items()}


def smallest_normal(tag: str) -> float:
    """The smallest positive normal value of an IEEE float dtype: 2 ** (1 - bias), from its exponent field alone."""
    dtype = BY_TAG[tag]
    bias = (dtype.largest_exponent_field + 1) // 2
    return math.ldexp(1.0, 1 - bias)
