"""Writing a normalize plan: every output layout, decided from the plan before a byte is written.

`lora-convert normalize` plans first (lora_convert/pipeline/commands.py: the adapter prepared once, its plan from
lora_convert.convert.plan; for an engine layout also lora_convert.convert.engine_layouts, whose only data reads are
an explicit verification step), so that every tensor name, shape and dtype, every refusal and every drop is known
before a byte is written; a dry run stops there and shows it all. `write_normalized` then only produces what was
planned: the tensors of each group, built one group at a time (lora_convert.convert.group_tensors), streamed into a
temporary folder that is swapped into place (lora_convert.io.output_folder). The output folder may never be,
contain or lie inside the input adapter or a local base, and --force replaces only a previous lora-convert output
(recognised by its manifest).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_convert.convert import engine_layouts, gguf_layout, layout_rules, mlx_layout
from lora_convert.convert.group_tensors import iter_group_tensors, output_dtype, stacked_specs
from lora_convert.convert.output_config import STACKED_LAYOUT_FILE, output_config
from lora_convert.convert.plan import DroppedModule, Plan
from lora_convert.io.gguf_file import StreamingGgufWriter
from lora_convert.io.output_folder import ADAPTER_FILE, WriteProgress, protected_inputs, write_folder
from lora_convert.io.safetensors_writer import TensorSpec
from lora_convert.peft.mlx_format import mlx_facts

__all__ = ["NormalizeResult", "WriteChoices", "WriteProgress", "write_normalized"]

LAYOUT_FILE = STACKED_LAYOUT_FILE


@dataclass
class NormalizeResult:
    plan: Plan
    output: Path | None  # None for a dry run
    dtype: str
    bytes_in: int
    bytes_out: int
    seconds: float
    tensors_written: int = 0
    notes: list[str] = field(default_factory=list)
    layout: str = "stacked"  # or an engine layout (engine_layouts.LAYOUTS)
    layout_summary: dict[str, Any] | None = None  # engine layouts: modules written, target_modules, notes
    specs: list[TensorSpec] = field(default_factory=list)  # every tensor written (or, for a dry run, to be written)
    files: list[str] = field(default_factory=list)  # the other files of the output, beside the tensors and manifest
    dropped: list[DroppedModule] = field(default_factory=list)  # everything left out, with why

    def summary_json(self) -> dict[str, Any]:
        plan = self.plan
        doc = {
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
            "dropped": [d.to_json() for d in self.dropped],
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
        }
        if self.layout != "stacked":
            doc["layout"] = self.layout
            doc.update(self.layout_summary or {})
        doc["notes"] = list(self.notes)  # the plan's (a preset standing in for the base) and the layout's
        return doc

    def tensors_json(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in self.specs]


@dataclass(frozen=True)
class WriteChoices:
    """How a plan is written: the caller's choices, checked before planning."""

    layout: str = "stacked"  # or an engine layout (engine_layouts.LAYOUTS)
    dtype: str = "keep"
    dry_run: bool = False
    force: bool = False
    drop_unsupported: bool = False
    allow_non_finite: bool = False


@dataclass
class _Output:
    """Everything one layout writes, decided before writing: tensor specs, the producer of their data, files."""

    specs: list[TensorSpec]
    files: dict[str, str]
    tensors: Any  # (progress) -> iterator of (name, tensor) in specs order; called only when writing
    notes: list[str]
    dropped: list[DroppedModule]
    summary: dict[str, Any] | None
    tensor_file: str = ADAPTER_FILE
    open_writer: Any = None  # (path, specs) -> a streaming writer; None: safetensors


def _mlx_output(plan: Plan, layout: str, tag: str, choices: WriteChoices) -> _Output:
    mp = mlx_layout.plan_mlx_layout(plan, drop_unsupported=choices.drop_unsupported)
    return _Output(
        mp.tensor_specs(tag),
        mlx_layout.mlx_files(mp),
        lambda progress: mlx_layout.iter_mlx_tensors(mp, tag, progress, allow_non_finite=choices.allow_non_finite),
        [],
        list(mp.dropped),
        mp.summary(),
        mlx_facts().weights_file,
    )


def _gguf_output(plan: Plan, layout: str, tag: str, choices: WriteChoices) -> _Output:
    gl = gguf_layout.plan_gguf_layout(plan, tag, drop_unsupported=choices.drop_unsupported)
    return _Output(
        gl.tensor_specs(tag),
        gguf_layout.gguf_files(gl),
        lambda progress: gguf_layout.iter_gguf_tensors(gl, tag, progress, allow_non_finite=choices.allow_non_finite),
        list(gl.notes),
        list(gl.dropped),
        gl.summary(),
        gguf_layout.GGUF_FILE,
        lambda path, specs: StreamingGgufWriter(path, specs, gl.architecture, gl.metadata()),
    )


def _stacked_output(plan: Plan, layout: str, tag: str, choices: WriteChoices) -> _Output:
    def tensors(progress: WriteProgress | None) -> Iterator[tuple[str, Any]]:
        for group, A, B in iter_group_tensors(plan, plan.groups, tag, allow_non_finite=choices.allow_non_finite):
            yield f"base_model.model.{group.key}.lora_A.weight", A
            yield f"base_model.model.{group.key}.lora_B.weight", B
            if progress is not None:
                progress.advance(A.nbytes + B.nbytes)
            del A, B

    marker = {"layout": "stacked", "version": 1, "source_peft_version": plan.adapter.config.raw.get("peft_version")}
    files = {
        "adapter_config.json": json.dumps(
            output_config(plan, sorted({g.name for g in plan.groups}), {"lora_convert": marker}), indent=2
        )
        + "\n",
        LAYOUT_FILE: json.dumps(plan.layout_json(), indent=2) + "\n",
    }
    return _Output(stacked_specs(plan, tag), files, tensors, [], list(plan.dropped), None)


def _engine_output(plan: Plan, layout: str, tag: str, choices: WriteChoices) -> _Output:
    lp = engine_layouts.plan_engine_layout(plan, layout, drop_unsupported=choices.drop_unsupported)
    files = {
        "adapter_config.json": json.dumps(lp.adapter_config(), indent=2) + "\n",
        engine_layouts.REPORT_FILE: json.dumps(lp.report_json(), indent=2) + "\n",
    }
    return _Output(
        lp.tensor_specs(tag),
        files,
        lambda progress: engine_layouts.iter_layout_tensors(
            lp, tag, progress=progress, allow_non_finite=choices.allow_non_finite
        ),
        list(lp.notes),
        list(lp.dropped),
        lp.summary(),
    )


# The built-in layouts' planners; every other layout is an engine's (its rule file's `layout` object).
_OUTPUT_OF_LAYOUT = {
    layout_rules.STACKED_LAYOUT: _stacked_output,
    gguf_layout.GGUF_LAYOUT: _gguf_output,
    mlx_layout.MLX_LAYOUT: _mlx_output,
}


def write_normalized(
    plan: Plan,
    output: Path | None,
    choices: WriteChoices,
    *,
    protected: list[Path],
    started: float,
    progress: WriteProgress | None = None,
) -> NormalizeResult:
    """Write `plan` in `choices.layout` to `output` (nothing for a dry run) and say what was written.

    `progress` (optional) gets `start(total_bytes)` once writing begins and `advance(nbytes)` per group (see
    WriteProgress). `protected`: the input folders the output may not touch (the output folder was already checked
    against them before planning; write_folder checks again, adding the adapter as resolved and a local base).

    NaN and Inf are in the data, not the headers: unless `allow_non_finite`, a group that would be written with
    them (NaN or Inf in a source, or a finite source value the scaling fold or the output dtype makes infinite)
    raises NonFiniteValuesError while writing (checked on each group's sources as they are read, no extra read), and
    the temporary folder is removed, so no output (and no change to a previous one) is left."""
    layout = choices.layout
    tag = output_dtype(plan, choices.dtype)
    planned = _OUTPUT_OF_LAYOUT.get(layout, _engine_output)(plan, layout, tag, choices)
    written = 0
    if not choices.dry_run and output is not None:
        # The adapter as resolved (a Hub snapshot, say) and a local base read by path are protected as well.
        protected = protected + protected_inputs(plan.adapter.path, plan.base_name)
        written = write_folder(
            output,
            planned.specs,
            planned.tensors(progress),
            planned.files,
            protected=protected,
            force=choices.force,
            layout=layout,
            progress=progress,
            tensor_file=planned.tensor_file,
            open_writer=planned.open_writer,
        )
    return NormalizeResult(
        plan=plan,
        output=None if choices.dry_run else output,
        dtype=tag,
        bytes_in=plan.adapter.total_bytes,
        bytes_out=sum(s.nbytes for s in planned.specs),
        seconds=time.perf_counter() - started,
        tensors_written=written,
        notes=[*plan.notes, *planned.notes],
        layout=layout,
        layout_summary=planned.summary,
        specs=planned.specs,
        files=sorted(planned.files),
        dropped=planned.dropped,
    )
