"""Whether the Triton kernels (``lora_convert.kernels``) can run here, and the layout contract they share.

``lora_convert.kernels`` is a folder without ``__init__.py`` (so the repository's top-level ``kernels/`` can never
be imported as, and shadow, PyPI's package of that name). Ops live one per module and are imported explicitly;
this module imports neither torch nor triton, so asking :func:`is_available` stays cheap:

* ``lora_convert.kernels.shrink.lora_shrink``     h = x @ A^T                              (fp32 out)
* ``lora_convert.kernels.expand.lora_expand``     y[:, slice_i] += s_i * h[:, rank block i] @ B_i^T
* ``lora_convert.kernels.moe.lora_moe``           per (token, expert) shrink + expand for expert groups
* ``lora_convert.kernels.batched.lora_shrink_expand_batched``  many dense groups in two launches

Layout contract (dense group of c slices, rank R): ``A`` is ``[c*R, in]``, ``B`` is ``[sum(out_i), R]``;
slice i owns A rows ``[i*R, (i+1)*R)`` and B rows ``[off_i, off_i + out_i)``. Expert groups add a leading
``E`` dimension to both.

``TRITON_INTERPRET=1`` must be in the environment *before* an op module is imported: ``triton.jit``
decides at decoration time whether a kernel is compiled or interpreted.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["is_available", "interpreting"]


def interpreting() -> bool:
    """True when Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def is_available() -> bool:
    """Whether the kernels can run here: triton importable and either a CUDA device or the interpreter.

    Cheap when the answer is no: triton's presence (a dependency on Linux only) is checked with ``find_spec``
    (no import), and torch is only imported when it is needed to ask for CUDA.
    """
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):
        return False
    if interpreting():
        return True
    import torch  # a dependency of lora-convert: always importable

    return bool(torch.cuda.is_available())
