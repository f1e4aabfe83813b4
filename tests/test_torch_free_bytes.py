"""The numpy data path writes the same bytes the torch path wrote, on every fixture, layout and --dtype.

Two yardsticks, because either alone can rot:

- Golden hashes (`tests/torch_path_golden.json`): the sha256 of `adapter_model.safetensors` that the torch-based
  code at commit `source_commit` wrote for every PEFT fixture (plus dtype variants of a few, below), in every layout
  and --dtype. They were produced by running THAT code (`git archive` of the commit, first on sys.path, in a
  subprocess: see `_regenerate` at the bottom), so they check the real old path end to end (group building, 3-D
  expert transposes, cuts, the writer) and stay meaningful after the commit moves on. A fixture regeneration
  changes them: rerun `_regenerate` against a commit that still has the torch path.
- A torch reference of the fold itself (`test_fold_matches_torch_*`): the one rounding rule of the old code
  (`torch.mul(b, s, out=dest)` for same-dtype bf16/f16/f32, else `(b.float() * s).to(dtype)`; A through
  `copy_`), run by today's torch on hostile values: -0.0, subnormals, overflow, every source/output dtype pair.
  NaN stays NaN but its bit pattern is not compared: torch itself writes different NaN bits for the same input
  depending on where in a vector loop the element falls (0xFFFF in vector lanes, 0x7FC0 in the scalar tail, for
  bf16), so no fixed rule can equal it; the numpy path writes the sign-preserving quiet NaN of ml_dtypes/IEEE.

The fixtures are all float32, so the dtype variants (bf16, f16, f64 and mixed f16/bf16 sources, and float32 with
-0.0, subnormals and values that overflow on scaling) cover the mixed-dtype branches of the fold.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import FAMILIES_BEFORE_ISSUE_14, case_family

FIXTURES = Path(__file__).parent / "fixtures" / "data"
GOLDEN = Path(__file__).parent / "torch_path_golden.json"
LAYOUTS = ("stacked", "sglang")  # peft: see CHANGED_BY_RULES
DTYPES = ("keep", "bf16", "fp16", "fp32")
# dtype variants of fixtures: dense (llama), PEFT 3-D experts (deepseek v5), per-expert experts (mixtral v4)
VARIANT_CASES = ("v5_llama", "v5_deepseek_v3", "v4_mixtral")
VARIANTS = ("bf16", "f16", "f64", "mixed", "specials")


def fixture_cases() -> list[str]:
    return sorted(p.name for p in (FIXTURES / "cases").iterdir() if (p / "adapter").is_dir())


def base_of(case: str) -> Path:
    meta = json.loads((FIXTURES / "cases" / case / "case.json").read_text())
    return FIXTURES / "bases" / meta["base"]


# ----------------------------------------------------------------------------------- dtype variants
def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for key, entry in header.items():
        assert entry["dtype"] == "F32", "the fixtures are float32; the variants below assume so"
        begin, end = entry["data_offsets"]
        out[key] = np.frombuffer(raw, np.float32, math.prod(entry["shape"]), 8 + n + begin).reshape(entry["shape"])
    return out, meta


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], meta: dict) -> None:
    tags = {"float32": "F32", "float16": "F16", "float64": "F64", "bfloat16": "BF16"}
    header: dict = {"__metadata__": meta} if meta else {}
    offset = 0
    for key, t in tensors.items():
        header[key] = {"dtype": tags[t.dtype.name], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).tobytes())


def make_variant(case: str, variant: str, folder: Path) -> Path:
    """A copy of fixture `case` with its tensors in another dtype (casts are RNE, as torch's)."""
    import ml_dtypes

    src = FIXTURES / "cases" / case / "adapter"
    tensors, meta = _read_safetensors(src / "adapter_model.safetensors")
    out = {}
    for i, (key, t) in enumerate(tensors.items()):
        is_b = ".lora_B" in key
        if variant == "bf16":
            out[key] = t.astype(ml_dtypes.bfloat16)
        elif variant == "f16":
            out[key] = t.astype(np.float16)
        elif variant == "f64":
            # float64 values with bits below float32's precision, so the f64 -> f32 rounding is exercised
            out[key] = t.astype(np.float64) * (1.0 + 2.0**-30) + 1e-12
        elif variant == "mixed":
            out[key] = t.astype(ml_dtypes.bfloat16 if is_b else np.float16)
        elif variant == "specials":
            t = t.copy()
            flat = t.reshape(-1)
            specials = np.array(
                [-0.0, 1e-40, -1e-45, 3.0e38, -3.0e38, 1.17e-38, 9.2e-41, 6.1e-5, 5.96e-8, 65504.0, 65520.0],
                dtype=np.float32,
            )
            k = min(len(specials), flat.size)
            start = (i * 7) % max(1, flat.size - k + 1)
            flat[start : start + k] = specials[:k]
            out[key] = t
        else:
            raise ValueError(variant)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    _write_safetensors(folder / "adapter_model.safetensors", out, meta)
    return folder


# A fixture of a family added by issue 14 has no torch-path output to compare with: the code at `source_commit`
# refused it (`No schema matches model_type`). Its numpy output is held to PEFT's own deltas instead
# (tests/test_normalize.py, every layout).


# Fixtures of those families written after the golden (issue 24): the torch path that wrote it is gone; their
# outputs are compared with PEFT's deltas by tests/test_normalize.py like every fixture's.
AFTER_THE_GOLDEN = frozenset(
    {
        "v5_llama_trainable_tokens",
        "v5_nemotron_h_up_down",
        "v5_llama_bnb4",
        "v5_llama_bnb8",
        "v5_llama_tied_embed",
        "v5_deepseek_v3_nvfp4_shared",
        "v5_qwen3_moe_sparse",  # issue 26 (the GGUF proof's bases); olmoe/qwen2_moe ones are later families anyway
        "v5_qwen2_moe_sparse",
        "v5_olmoe_mha",
        "v5_deepseek_v3_gguf",
        "v5_qwen3_next_gguf",
    }
)


def all_targets() -> list[tuple[str, str | None]]:
    """(fixture case, dtype variant or None) for every adapter compared: every fixture of a family the torch path
    knew."""
    known = [c for c in fixture_cases() if case_family(c) in FAMILIES_BEFORE_ISSUE_14 and c not in AFTER_THE_GOLDEN]
    return [(c, None) for c in known] + [(c, v) for c in VARIANT_CASES for v in VARIANTS]


def target_id(case: str, variant: str | None) -> str:
    return case if variant is None else f"{case}+{variant}"


def outputs_of(case: str, variant: str | None, work: Path) -> dict[str, str]:
    """sha256 of adapter_model.safetensors (or the refusal's error class) per layout and --dtype, with whichever
    lora_convert is importable."""
    import functools
    import inspect

    from lora_convert.pipeline.commands import normalize

    if "allow_non_finite" in inspect.signature(normalize).parameters:
        # The bytes of the arithmetic are compared, Inf from the "specials" variant's overflows included (the torch
        # path wrote them); refusing non-finite values by default is tested in tests/test_non_finite.py. An older
        # tree (writing the golden file) has no such flag and never refused them.
        normalize = functools.partial(normalize, allow_non_finite=True)
    adapter = FIXTURES / "cases" / case / "adapter"
    if variant is not None:
        adapter = make_variant(case, variant, work / "variant")
    out: dict[str, str] = {}
    for layout in LAYOUTS:
        for dtype in DTYPES:
            target = work / f"{layout}-{dtype}"
            try:
                normalize(str(adapter), target, base=str(base_of(case)), dtype=dtype, layout=layout)
            except Exception as exc:  # a refusal is part of the behaviour compared ...
                out[f"{layout}/{dtype}"] = f"error:{type(exc).__name__}"
                # ... and what is written without the refused modules (partial refusals come from a data check)
                target = work / f"{layout}-{dtype}-drop"
                try:
                    normalize(
                        str(adapter), target, base=str(base_of(case)), dtype=dtype, layout=layout, drop_unsupported=True
                    )
                except Exception as again:  # nothing left to write
                    out[f"{layout}/{dtype}/drop"] = f"error:{type(again).__name__}"
                else:
                    out[f"{layout}/{dtype}/drop"] = _sha256(target / "adapter_model.safetensors")
                continue
            out[f"{layout}/{dtype}"] = _sha256(target / "adapter_model.safetensors")
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- the tests
def _golden() -> dict:
    return json.loads(GOLDEN.read_text())


# Outputs whose MODULE SET changed after the golden commit because the engine rules changed (issue 12), not the data
# path: their bytes per module are still the stacked buffers' (tests/test_engine_layouts.py compares every module of
# every layout with the stacked output, which is golden-checked here in every dtype).
CHANGED_BY_RULES = {
    # `--layout peft` now writes every module PEFT applies (MLA kv_b_proj and routers were refused for vLLM's sake)
    "peft": "all",
    # SGLang 0.5.23 serves the Qwen3-Next shared-expert MLP (its memory pool sizes it from the real layer), and its
    # Mixtral class cannot serve attention LoRA on the fixture base (head_dim x heads != hidden_size): both proven
    # by tests/test_proof_sglang.py, after the golden was written
    "sglang": {"v4_qwen3_next", "v4_mixtral", "v5_mixtral", "v5conv_mixtral"},
}


def _compared(key: str, case: str) -> bool:
    changed = CHANGED_BY_RULES.get(key.split("/")[0])
    return not (changed == "all" or (changed and case.split("+")[0] in changed))


@pytest.mark.parametrize(("case", "variant"), all_targets(), ids=[target_id(*t) for t in all_targets()])
def test_numpy_path_writes_the_torch_paths_bytes(case, variant, tmp_path):
    expected = _golden()["outputs"][target_id(case, variant)]
    got = outputs_of(case, variant, tmp_path)
    expected = {k: v for k, v in expected.items() if _compared(k, case)}
    got = {k: v for k, v in got.items() if _compared(k, case)}
    assert any(k.startswith("stacked/") for k in got)
    assert got == expected


def test_golden_covers_every_fixture_and_mostly_written_bytes():
    outputs = _golden()["outputs"]
    assert set(outputs) == {target_id(*t) for t in all_targets()}
    # not vacuous: refusals (DoRA-only adapters refuse everywhere) are a minority of what is compared
    results = [h for per_target in outputs.values() for h in per_target.values()]
    written = [h for h in results if not h.startswith("error:")]
    assert len(written) > 0.7 * len(results) and len(set(written)) > 300


HOSTILE_F32 = np.array(
    [0.0, -0.0, 1.0, -1.5, 1e-40, -1e-45, 1.17549435e-38, 3.0e38, -3.0e38, np.inf, -np.inf, 65504.0, 65520.0]
    + [5.96e-8, 2.98e-8, 6.1e-5, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-9, 1.0 + 2.0**-11, 1.0 + 2.0**-24, 0.1, -0.3]
    + list(np.random.default_rng(0).standard_normal(500).astype(np.float32) * 10.0 ** np.arange(-20, 30, 0.1)[:500]),
    dtype=np.float32,
)


def _torch_reference_fold(b_torch, dest_dtype, scaling):
    """The old code's fold (lora_convert/convert/factors.py at the golden commit)."""
    import torch

    dest = torch.empty(b_torch.shape, dtype=dest_dtype)
    if b_torch.dtype == dest.dtype and b_torch.dtype in (torch.bfloat16, torch.float16, torch.float32):
        torch.mul(b_torch, scaling, out=dest)
    else:
        dest.copy_((b_torch.float() * scaling).to(dest.dtype))
    return dest


def _source(dtype_name: str):
    """HOSTILE_F32 in a source dtype, as (numpy array, torch tensor) holding the same bytes."""
    import torch

    t = torch.from_numpy(HOSTILE_F32.copy())
    if dtype_name == "F64":
        t = t.double() * (1 + 2.0**-30)  # bits below float32's precision
    else:
        t = t.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype_name])
    from lora_convert.io.dtypes import numpy_dtype

    raw = t.contiguous().view(-1).view(torch.uint8).numpy().copy()
    return raw.view(numpy_dtype(dtype_name)), t


def _bits(x) -> np.ndarray:
    import torch

    if isinstance(x, torch.Tensor):
        x = x.contiguous().view(torch.uint8).numpy()
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


@pytest.mark.parametrize("src", ["F32", "F16", "BF16", "F64"])
@pytest.mark.parametrize("out", ["F32", "F16", "BF16", "F64"])
@pytest.mark.parametrize("scaling", [2.0, 0.37, 1 / 3, 16 / math.sqrt(7), 1e-3])
def test_fold_matches_torch_bit_for_bit(src, out, scaling):
    import torch

    from lora_convert.convert import factors
    from lora_convert.io.dtypes import numpy_dtype

    b_np, b_t = _source(src)
    ref = _torch_reference_fold(
        b_t, {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[out], scaling
    )
    dest = np.empty(b_np.shape, dtype=numpy_dtype(out))
    factors.fold_into(dest, b_np, scaling)
    assert np.array_equal(_bits(dest), _bits(ref))


@pytest.mark.parametrize("src", ["F32", "F16", "BF16", "F64"])
@pytest.mark.parametrize("out", ["F32", "F16", "BF16", "F64"])
def test_copy_matches_torch_copy_(src, out):
    """A is copied with `copy_` in the old code: F64 goes through float32 on its way to bf16/f16."""
    import torch

    from lora_convert.convert import factors
    from lora_convert.io.dtypes import numpy_dtype

    a_np, a_t = _source(src)
    ref = torch.empty(
        a_t.shape, dtype={"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[out]
    )
    ref.copy_(a_t)
    dest = np.empty(a_np.shape, dtype=numpy_dtype(out))
    factors.copy_into(dest, a_np)
    assert np.array_equal(_bits(dest), _bits(ref))


@pytest.mark.parametrize("src", ["F32", "F16", "BF16", "F64"])
@pytest.mark.parametrize("out", ["F32", "F16", "BF16", "F64"])
def test_nan_stays_nan_with_its_sign(src, out):
    from lora_convert.convert import factors
    from lora_convert.io.dtypes import numpy_dtype

    b = np.array([np.nan, -np.nan, 1.0, np.nan], dtype=np.float64).astype(numpy_dtype(src))
    dest = np.empty(b.shape, dtype=numpy_dtype(out))
    factors.fold_into(dest, b, 0.5)
    as64 = dest.astype(np.float64)
    assert np.isnan(as64[[0, 1, 3]]).all() and as64[2] == 0.5
    assert not np.signbit(as64[0]) and np.signbit(as64[1])


# ------------------------------------------------------------------------------------------ regeneration
def _regenerate(out_path: Path) -> None:  # pragma: no cover - run by hand, see the module docstring
    """Run with the OLD (torch) lora_convert first on sys.path, e.g.

    rm -rf /tmp/head && mkdir /tmp/head && git archive HEAD lora_convert | tar -x -C /tmp/head
    git archive HEAD schemas | tar -x -C /tmp/head && mv /tmp/head/schemas /tmp/head/lora_convert/schemas
    git archive HEAD kernels | tar -x -C /tmp/head && mv /tmp/head/kernels /tmp/head/lora_convert/kernels
    PYTHONPATH=/tmp/head .venv/bin/python tests/test_torch_free_bytes.py HEAD-COMMIT
    """
    import tempfile

    import lora_convert

    outputs = {}
    for case, variant in all_targets():
        with tempfile.TemporaryDirectory() as tmp:
            outputs[target_id(case, variant)] = outputs_of(case, variant, Path(tmp))
        print(target_id(case, variant), file=sys.stderr)
    doc = {"source_commit": sys.argv[1], "lora_convert": str(Path(lora_convert.__file__).parent), "outputs": outputs}
    out_path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":  # pragma: no cover
    _regenerate(GOLDEN)
