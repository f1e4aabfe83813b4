"""`lora-convert normalize`: execute a plan into the stacked, kernel-ready layout (docs/stacked-layout.md).

Each source tensor is read once and each output tensor written once, group by group, so peak memory is one
output group plus its sources, not the adapter. Scaling is folded into B in float32 and rounded once to the
output dtype; A is copied exactly. The output is written into a temporary folder beside the target and renamed
into place at the end: an interrupted run leaves no output folder, and the input is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from lora_convert.adapter import Adapter, load_adapter
from lora_convert.errors import UsageError
from lora_convert.plan import Plan, PlannedGroup, build_plan
from lora_convert.safetensors_writer import StreamingSafetensorsWriter, TensorSpec

OUTPUT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
ADAPTER_FILE = "adapter_model.safetensors"
LAYOUT_FILE = "lora_layout.json"


@dataclass
class NormalizeResult:
    plan: Plan
    output: Path | None
    dtype: str
    bytes_in: int
    bytes_out: int
    seconds: float
    tensors_written: int = 0
    notes: list[str] = field(default_factory=list)

    def summary_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "adapter": plan.adapter.source.describe(),
            "output": str(self.output) if self.output else None,
            "base": plan.base_name,
            "family": plan.family,
            "rank": plan.rank,
            "dtype": self.dtype,
            "groups": len(plan.groups),
            "source_modules": plan.source_modules,
            "zero_filled_slices": [f"{g.key}:{s.name}" for g, s in plan.zero_filled],
            "missing_experts": {g.key: g.missing_experts for g in plan.groups if g.missing_experts},
            "dropped": [d.to_json() for d in plan.dropped],
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
        }


def plan_normalize(adapter_spec: str, *, base: str | None = None, rank: int | None = None, drop_unsupported: bool = False,
                   cache_dir=None, token=None) -> Plan:
    from lora_convert.base_config import resolve_base
    from lora_convert.schema import bind
    from lora_convert.shape_check import check_shapes

    adapter = load_adapter(adapter_spec, cache_dir=cache_dir, token=token)
    base_config = resolve_base(base, adapter_base_name=adapter.config.base_model_name_or_path, cache_dir=cache_dir, token=token)
    arch = bind(base_config)
    shape_findings = check_shapes(adapter, arch)
    return build_plan(adapter, arch, base_name=base_config.name, rank=rank, drop_unsupported=drop_unsupported,
                      shape_findings=shape_findings)


def output_dtype(plan: Plan, requested: str) -> str:
    if requested != "keep":
        return OUTPUT_DTYPES[requested]
    tags = {t.dtype for g in plan.groups for s in g.slices for src in s.sources() for t in (src.module.lora_A, src.module.lora_B)}
    floats = [t for t in ("F64", "F32", "BF16", "F16") if t in tags]
    if len(floats) == 1:
        return floats[0]
    # Mixed (or non-float) source dtypes: float32 holds every source without loss.
    return "F32"


def tensor_specs(plan: Plan, dtype: str) -> list[TensorSpec]:
    specs = []
    for g in plan.groups:
        specs.append(TensorSpec(f"base_model.model.{g.key}.lora_A.weight", dtype, g.a_shape(plan.rank)))
        specs.append(TensorSpec(f"base_model.model.{g.key}.lora_B.weight", dtype, g.b_shape(plan.rank)))
    return specs


def output_config(plan: Plan) -> dict[str, Any]:
    src = plan.adapter.config.raw
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": src.get("base_model_name_or_path"),
        "task_type": src.get("task_type"),
        "r": plan.rank,
        "lora_alpha": plan.rank,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "lora_dropout": 0.0,
        "target_modules": sorted({g.name for g in plan.groups}),
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "lora_convert": {"layout": "stacked", "version": 1, "source_peft_version": src.get("peft_version")},
    }


# ------------------------------------------------------------------------------------------ tensor building
def build_group_tensors(plan: Plan, group: PlannedGroup, dtype_tag: str, read: Callable[[str], Any]):
    """The stacked A and B of one group. A rows of slice i: [i*R, i*R + r_i); B rows: [off_i, off_i + out_i)."""
    import torch

    from lora_convert.tensor_files import torch_dtype

    out_dtype = torch_dtype(dtype_tag)
    R = plan.rank
    if group.experts:
        E = group.experts
        A = torch.zeros(group.a_shape(R), dtype=out_dtype)
        B = torch.zeros(group.b_shape(R), dtype=out_dtype)
        for i, sl in enumerate(group.slices):
            if sl.fused_source is not None:
                src = sl.fused_source
                mod = src.module
                r = mod.rank
                a = read(mod.lora_A.key)  # [E*r, in], expert-major
                b = read(mod.lora_B.key)  # [out, r*E], rank-major: column k*E + e
                a3 = a.reshape(E, r, a.shape[-1])
                b3 = b[src.row_start:src.row_stop].reshape(src.row_stop - src.row_start, r, E).permute(2, 0, 1)
                A[:, i * R:i * R + r, :] = a3.to(out_dtype)
                B[:, sl.out_offset:sl.out_offset + sl.out_features, :r] = (b3.float() * src.scaling).to(out_dtype)
                continue
            for e, src in sl.expert_sources.items():
                mod = src.module
                r = mod.rank
                A[e, i * R:i * R + r, :] = read(mod.lora_A.key).to(out_dtype)
                b = read(mod.lora_B.key)[src.row_start:src.row_stop]
                B[e, sl.out_offset:sl.out_offset + sl.out_features, :r] = (b.float() * src.scaling).to(out_dtype)
        return A, B
    A = torch.zeros(group.a_shape(R), dtype=out_dtype)
    B = torch.zeros(group.b_shape(R), dtype=out_dtype)
    cache: dict[str, Any] = {}  # a pre-merged source feeds several slices: read it once
    for i, sl in enumerate(group.slices):
        src = sl.dense_source
        if src is None:
            continue
        mod = src.module
        r = mod.rank
        if mod.lora_A.key not in cache:
            cache[mod.lora_A.key] = read(mod.lora_A.key)
            cache[mod.lora_B.key] = read(mod.lora_B.key)
        a, b = cache[mod.lora_A.key], cache[mod.lora_B.key]
        A[i * R:i * R + r, :] = a.to(out_dtype)
        B[sl.out_offset:sl.out_offset + sl.out_features, :r] = (b[src.row_start:src.row_stop].float() * src.scaling).to(out_dtype)
    return A, B


def iter_group_tensors(plan: Plan, dtype_tag: str) -> Iterator[tuple[PlannedGroup, Any, Any]]:
    for group in plan.groups:
        A, B = build_group_tensors(plan, group, dtype_tag, plan.adapter.read)
        yield group, A, B


# ---------------------------------------------------------------------------------------------- safe output
@contextmanager
def _terminate_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt so `finally` blocks remove the temporary folder."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_output_dir(output: Path, force: bool, adapter: Adapter) -> None:
    if output.resolve() == adapter.path.resolve() or adapter.path.resolve() in output.resolve().parents:
        raise UsageError(f"The output {output} is inside the input adapter folder {adapter.path}.",
                         hint="Choose an output folder elsewhere; the input is never modified.")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} exists and is not a folder.", hint="Choose another -o path.")
    if output.exists() and any(output.iterdir()) and not force:
        raise UsageError(f"The output folder {output} exists and is not empty.", hint="Pass --force to replace it, or choose another -o path.")


def write_output(plan: Plan, output: Path, *, dtype: str = "keep", force: bool = False,
                 progress: Callable[[PlannedGroup, int], None] | None = None) -> NormalizeResult:
    started = time.perf_counter()
    adapter = plan.adapter
    check_output_dir(output, force, adapter)
    tag = output_dtype(plan, dtype)
    specs = tensor_specs(plan, tag)
    parent = output.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    temp = parent / f".{output.name}.lora-convert-tmp-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    written = 0
    try:
        with _terminate_as_interrupt():
            writer = StreamingSafetensorsWriter(temp / ADAPTER_FILE, specs, metadata={"format": "pt"})
            try:
                for group, A, B in iter_group_tensors(plan, tag):
                    writer.write(f"base_model.model.{group.key}.lora_A.weight", A)
                    writer.write(f"base_model.model.{group.key}.lora_B.weight", B)
                    written += 2
                    if progress:
                        progress(group, A.numel() * A.element_size() + B.numel() * B.element_size())
                    del A, B
                writer.close()
            except BaseException:
                writer.abort()
                raise
            (temp / "adapter_config.json").write_text(json.dumps(output_config(plan), indent=2) + "\n")
            (temp / LAYOUT_FILE).write_text(json.dumps(plan.layout_json(), indent=2) + "\n")
            if output.exists():
                old = parent / f".{output.name}.lora-convert-old-{os.getpid()}"
                output.rename(old)
                temp.rename(output)
                shutil.rmtree(old, ignore_errors=True)
            else:
                temp.rename(output)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    bytes_out = sum(s.nbytes for s in specs)
    return NormalizeResult(plan=plan, output=output, dtype=tag, bytes_in=adapter.total_bytes, bytes_out=bytes_out,
                           seconds=time.perf_counter() - started, tensors_written=written)


def normalize(adapter_spec: str, output: Path | None, *, base: str | None = None, rank: int | None = None, dtype: str = "keep",
              dry_run: bool = False, force: bool = False, drop_unsupported: bool = False, cache_dir=None, token=None,
              progress=None) -> NormalizeResult:
    """The whole command as one library call: plan, then (unless dry_run) write the stacked output."""
    started = time.perf_counter()
    plan = plan_normalize(adapter_spec, base=base, rank=rank, drop_unsupported=drop_unsupported, cache_dir=cache_dir, token=token)
    if dry_run or output is None:
        tag = output_dtype(plan, dtype)
        return NormalizeResult(plan=plan, output=None, dtype=tag, bytes_in=plan.adapter.total_bytes,
                               bytes_out=sum(s.nbytes for s in tensor_specs(plan, tag)), seconds=time.perf_counter() - started)
    return write_output(plan, output, dtype=dtype, force=force, progress=progress)

