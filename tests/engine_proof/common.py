"""What an engine harness returns, and how a module's delta is classified against PEFT's own reference.

An engine harness (sglang_0_5_23.py, vllm_0_33_0.py) loads one adapter folder onto one fixture base with the
engine's own, unmodified LoRA loading code and returns an `EngineLoad`:

- `load_error`: the engine refused the adapter or failed while loading it (exception type and message), or None;
- `deltas`: for every PEFT module (the names of `case.json` `modules` / the `<module>::delta_weight` keys of the
  fixture's reference.safetensors) the delta the engine would ADD to that module's base weight, as float64
  `[out, in]` (`[E, out, in]` for a 3-D expert parameter, like the reference), computed from what the engine holds
  after loading (its LoRA buffers, scaling included), with fused engine modules (qkv_proj, gate_up_proj,
  stacked experts) cut back into the base's modules by rows. A module the engine holds no LoRA for is absent.

`classify` turns that into one word per PEFT module: exact / dropped / wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from helpers import case_dir

# fp32 data, fp64 arithmetic on both sides: what is left is the fp32 rounding of the factors (measured ~1e-7).
EXACT_RTOL = 1e-5


@dataclass
class EngineLoad:
    load_error: str | None = None
    deltas: dict[str, np.ndarray] = field(default_factory=dict)


@cache
def reference_deltas(case: str) -> dict[str, np.ndarray]:
    """PEFT's own delta per module (`get_delta_weight`, scaling included), float64."""
    ref = load_file(str(case_dir(case) / "reference.safetensors"))
    suffix = "::delta_weight"
    return {k[: -len(suffix)]: v.astype(np.float64) for k, v in ref.items() if k.endswith(suffix)}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        return float("inf")
    scale = float(np.linalg.norm(want))
    return float(np.linalg.norm(got - want)) / (scale if scale > 0 else 1.0)


def classify(case: str, load: EngineLoad) -> dict[str, str]:
    """PEFT module -> "exact" | "dropped" | "wrong" (every reference module; a zero engine delta is "dropped")."""
    out = {}
    for module, want in reference_deltas(case).items():
        got = load.deltas.get(module)
        if got is None or not np.any(got):
            out[module] = "dropped"
        elif relative_error(got, want) <= EXACT_RTOL:
            out[module] = "exact"
        else:
            out[module] = "wrong"
    return out


def fixture_adapter(case: str) -> Path:
    return case_dir(case) / "adapter"
