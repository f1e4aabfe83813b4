"""`lora-convert normalize`: execute a plan into the stacked, kernel-ready layout (docs/stacked-layout.md).

Each source tensor is read once and each output tensor written once, group by group, so peak memory is one
output group plus its sources, not the adapter. Scaling is folded into B in float32 and rounded once to the
output dtype; A is copied exactly. The output is written into a temporary folder beside the target and swapped
into place at the end: an interrupted run leaves no new output and any previous output as it was. The output
folder may never be, contain or lie inside the input adapter or a local base, and --force replaces only an empty
folder or a previous lora-convert output (recognised by its manifest), never a folder of other files.
"""

from __future__ import annotations

import json
import os
import shutil
import secrets
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from lora_convert.peft.adapter import Adapter, load_adapter
from lora_convert.errors import UsageError
from lora_convert.convert.plan import Plan, PlannedGroup, build_plan
from lora_convert.io.safetensors_writer import StreamingSafetensorsWriter, TensorSpec

OUTPUT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
ADAPTER_FILE = "adapter_model.safetensors"
LAYOUT_FILE = "lora_layout.json"
# Every output layout writes this file, listing the files of the output: it is how --force recognises a folder
# as a previous lora-convert output (and so as safe to replace) rather than a folder of someone's files.
MANIFEST_FILE = "lora_convert_manifest.json"
MANIFEST_FORMAT = "lora-convert/output"


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
    layout: str = "stacked"  # or an engine layout (engine_layouts.LAYOUTS)
    layout_summary: dict[str, Any] | None = None  # engine layouts: modules written, target_modules, notes

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
            "dropped": [d.to_json() for d in plan.dropped],
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
        }
        if self.layout != "stacked":
            doc["layout"] = self.layout
            doc.update(self.layout_summary or {})
        return doc


def plan_normalize(adapter_spec: str | os.PathLike, *, base: str | None = None, rank: int | None = None, drop_unsupported: bool = False,
                   cache_dir=None, token=None) -> Plan:
    from lora_convert.arch.base_config import resolve_base
    from lora_convert.arch.schema import bind
    from lora_convert.arch.shape_check import check_shapes

    adapter = load_adapter(os.fspath(adapter_spec), cache_dir=cache_dir, token=token)
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


def output_config(plan: Plan, target_modules: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """adapter_config.json of every output layout: one rank, scaling folded (r = lora_alpha, no patterns, no
    rsLoRA), nothing but LoRA factors in the file."""
    src = plan.adapter.config.raw
    config = {
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
        "target_modules": target_modules,
        "target_parameters": None,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    config.update(extra or {})
    return config


# ------------------------------------------------------------------------------------------ tensor building
class GroupBuffers:
    """One reusable byte buffer each for the A and the B of the group being built (perf, docs/benchmarks.md).

    Fresh memory is expensive to touch on the benchmark VM (~0.15 s per GB in page faults, against 0.04 s to
    rewrite memory already mapped), and torch.zeros of every output group touched a fresh 2 GB per 2 GB adapter.
    Every group is built into a prefix of the same two buffers instead, grown to the largest group. Only one
    group's A and B exist at a time: a tensor handed out is overwritten by the next group, so callers must be
    done with it (the streaming writer is) before asking for the next one.
    """

    def __init__(self) -> None:
        self._raw: dict[str, Any] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype, *, zero: bool):
        import math

        import torch

        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        raw = self._raw.get(role)
        if raw is None or raw.numel() < nbytes:
            self._raw[role] = raw = None  # drop the old buffer before allocating the larger one
            self._raw[role] = raw = torch.empty(nbytes, dtype=torch.uint8)
        out = raw[:nbytes].view(dtype).view(shape)
        if zero:
            out.zero_()
        return out


def _fully_covered(group: PlannedGroup, R: int) -> bool:
    """Every row of the group's A and B gets written (no zero-filled slice, padded rank or missing expert)."""
    for sl in group.slices:
        if sl.rank != R:
            return False
        if group.experts and sl.fused_source is None and len(sl.expert_sources) != group.experts:
            return False
        if not group.experts and sl.dense_source is None:
            return False
    return True


def _fold_into(dest, b, scaling: float) -> None:
    """dest[...] = b * scaling, computed in float32 and rounded once to dest's dtype.

    perf: when b already has dest's dtype, torch.mul(..., out=dest) does exactly that in one pass (torch's CPU
    kernels compute reduced-precision products in float32 and round once; checked bit for bit, NaN payloads
    aside) without the two float32 temporaries of `(b.float() * s).to(dtype)`, which were ~40% of normalize.
    """
    import torch

    if b.dtype == dest.dtype and b.dtype in (torch.bfloat16, torch.float16, torch.float32):
        torch.mul(b, scaling, out=dest)
    else:
        dest.copy_((b.float() * scaling).to(dest.dtype))


def build_group_tensors(plan: Plan, group: PlannedGroup, dtype_tag: str, read: Callable[[str], Any],
                        buffers: GroupBuffers | None = None):
    """The stacked A and B of one group. A rows of slice i: [i*R, i*R + r_i); B rows: [off_i, off_i + out_i).

    With `buffers`, A and B are views into reused memory that the next call overwrites (see GroupBuffers)."""
    import torch

    from lora_convert.io.tensor_files import torch_dtype

    out_dtype = torch_dtype(dtype_tag)
    R = plan.rank
    # perf: zero-fill only when some row is not written below (a zero-filled slice, rank < R, a missing expert).
    zero = not _fully_covered(group, R)
    if buffers is not None:
        A = buffers.get("A", group.a_shape(R), out_dtype, zero=zero)
        B = buffers.get("B", group.b_shape(R), out_dtype, zero=zero)
    else:
        alloc = torch.zeros if zero else torch.empty
        A = alloc(group.a_shape(R), dtype=out_dtype)
        B = alloc(group.b_shape(R), dtype=out_dtype)
    if group.experts:
        E = group.experts
        for i, sl in enumerate(group.slices):
            if sl.fused_source is not None:
                src = sl.fused_source
                mod = src.module
                r = mod.rank
                a = read(mod.lora_A.key)  # [E*r, in], expert-major
                b = read(mod.lora_B.key)  # [out, r*E], rank-major: column k*E + e
                a3 = a.reshape(E, r, a.shape[-1])
                rows = src.row_stop - src.row_start
                # perf: with columns k*E + e, B's rows viewed as [rows*r, E] are the transpose of the expert-major
                # [E, rows*r] wanted here. A contiguous 2-D transpose copy (cache-blocked by torch), then a
                # contiguous fold, is ~3x faster than folding through the permuted 3-D view, which reads with stride
                # E (the 3-D normalize spent most of its time there; docs/benchmarks.md).
                b3 = b[src.row_start:src.row_stop].reshape(rows * r, E).t().contiguous().view(E, rows, r)
                A[:, i * R:i * R + r, :].copy_(a3)
                _fold_into(B[:, sl.out_offset:sl.out_offset + sl.out_features, :r], b3, src.scaling)
                del a, b, a3, b3
                continue
            for e, src in sl.expert_sources.items():
                mod = src.module
                r = mod.rank
                A[e, i * R:i * R + r, :].copy_(read(mod.lora_A.key))
                b = read(mod.lora_B.key)[src.row_start:src.row_stop]
                _fold_into(B[e, sl.out_offset:sl.out_offset + sl.out_features, :r], b, src.scaling)
        return A, B
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
        A[i * R:i * R + r, :].copy_(a)
        _fold_into(B[sl.out_offset:sl.out_offset + sl.out_features, :r], b[src.row_start:src.row_stop], src.scaling)
    return A, B


def iter_group_tensors(plan: Plan, dtype_tag: str) -> Iterator[tuple[PlannedGroup, Any, Any]]:
    """Each group's A and B in plan order. They live in reused buffers: consume them before the next step."""
    buffers = GroupBuffers()
    for group in plan.groups:
        A, B = build_group_tensors(plan, group, dtype_tag, plan.adapter.read, buffers)
        yield group, A, B


# ---------------------------------------------------------------------------------------------- safe output
class WriteProgress(Protocol):
    """What `normalize(progress=...)` is told while writing: `start` once with the bytes the plan will write
    (known before any tensor is read), then `advance` after each group with the bytes written for it. The
    advances sum to the total. The library never renders anything; the CLI draws a bar from these calls."""

    def start(self, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


def _relation(target: Path, protected: Path) -> str | None:
    """How the resolved output folder relates to a resolved protected path, or None when they are apart."""
    if target == protected:
        return "is"
    if protected in target.parents:
        return "is inside"
    if target in protected.parents:
        return "contains"
    return None


def protected_inputs(adapter_path: Path | None, base: str | None) -> list[tuple[str, Path]]:
    """The local paths an output folder must stay clear of: the adapter folder and a local base (folder or file)."""
    out: list[tuple[str, Path]] = []
    if adapter_path is not None:
        out.append(("input adapter folder", adapter_path))
    if base:
        path = Path(str(base).strip()).expanduser()
        if path.exists():  # otherwise a preset or Hub id: nothing on disk of the user's to protect
            out.append(("base model folder" if path.is_dir() else "base model config", path))
    return out


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a previous lora-convert output in `folder`, or None when there is none (or it is not ours)."""
    try:
        doc = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("files"), list):
        return None
    return doc


def _owned_entries(folder: Path, manifest: dict[str, Any]) -> set[str]:
    listed = {f for f in manifest["files"] if isinstance(f, str) and "/" not in f and f not in (".", "..")}
    return listed | {MANIFEST_FILE}


def check_output_dir(output: str | Path, *, force: bool, protected: list[tuple[str, Path]]) -> Path:
    """Refuse an output folder that could destroy anything but our own previous output; return its resolved path.

    Resolving first (symlinks, `.`, `..`) is what makes `-o .`, `-o ..` and `-o link-to-input` comparable with the
    input. --force replaces only an empty folder or a folder whose every entry its manifest lists."""
    shown = str(output)
    target = Path(output).expanduser().resolve()
    for what, path in protected:
        real = path.resolve()
        relation = _relation(target, real)
        if relation:
            raise UsageError(
                f"The output folder {shown} ({target}) {relation} the {what} {path} ({real}); normalize never writes "
                "over or inside its inputs, and --force does not change that.",
                hint="Choose an output folder outside the adapter and the base, e.g. -o ./my-adapter-stacked.")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        # The new output is swapped in by renaming folders; renaming the folder a shell sits in would leave that
        # shell in a deleted folder, so the working directory is never an output.
        raise UsageError(
            f"The output folder {shown} ({target}) is{' ' if target == cwd else ' above '}the current working directory; "
            "normalize writes a new folder and swaps it into place, which it will not do to the folder it runs in.",
            hint=f"Run from another folder (e.g. `cd {target.parent}`) and pass -o {target.name}, or choose a new folder name.")
    if not target.exists():
        return target
    if not target.is_dir():
        raise UsageError(f"The output {shown} exists and is not a folder.", hint="Choose another -o path.")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return target
    if not force:
        raise UsageError(f"The output folder {shown} exists and is not empty.",
                         hint="Pass --force to replace a previous lora-convert output, or choose another -o path.")
    manifest = read_manifest(target)
    if manifest is None:
        raise UsageError(
            f"--force replaces only an empty folder or a previous lora-convert output, and {shown} is neither: it holds "
            f"{_listing(entries)} and no {MANIFEST_FILE}.",
            hint="Choose another -o path, or move those files away yourself.")
    owned = _owned_entries(target, manifest)
    unexpected = [e for e in entries if e not in owned or not (target / e).is_file() or (target / e).is_symlink()]
    if unexpected:
        raise UsageError(
            f"{shown} is a previous lora-convert output but also holds {_listing(unexpected)}, which its {MANIFEST_FILE} "
            "does not list; --force removes only files lora-convert wrote.",
            hint="Move those entries elsewhere, or choose another -o path.")
    return target


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _remove_previous_output(old: Path) -> None:
    """Delete a renamed-away previous output: only the files its manifest lists, then the (then empty) folder.
    Anything that appeared since the check keeps the folder, so no stranger's file is ever deleted."""
    manifest = read_manifest(old)
    for name in sorted(_owned_entries(old, manifest)) if manifest else ():
        path = old / name
        if path.is_symlink() or path.is_file():  # never a folder: the check refused those as not ours
            path.unlink(missing_ok=True)
    try:
        old.rmdir()
    except OSError:
        pass


def _manifest_text(layout: str, names: list[str]) -> str:
    doc = {"format": MANIFEST_FORMAT, "version": 1, "layout": layout, "files": sorted(names)}
    return json.dumps(doc, indent=2) + "\n"


def _new_sibling(parent: Path, prefix: str) -> Path:
    """A new folder `prefix-XXXXXXXX` in `parent`. mkdir fails on an existing name, so nothing is ever reused or
    removed; unlike tempfile.mkdtemp (0700) it keeps the user's umask, and so the output's usual permissions."""
    while True:
        path = parent / f"{prefix}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


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


def write_folder(output: str | Path, adapter: Adapter, specs: list[TensorSpec], tensors: Iterator[tuple[str, Any]],
                 files: dict[str, str], *, force: bool = False, layout: str = "stacked",
                 protected: list[tuple[str, Path]] | None = None, progress: WriteProgress | None = None) -> int:
    """Write `tensors` (in `specs` order), `files` and the manifest into a temporary folder beside the output, then
    swap it into place. A previous output is renamed away only once the new one is complete and deleted only
    after the swap, so an interrupted run leaves it as it was. Shared by the stacked and the engine layouts."""
    protected = list(protected or []) + protected_inputs(adapter.path, None)
    target = check_output_dir(output, force=force, protected=protected)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    files = {**files, MANIFEST_FILE: _manifest_text(layout, [ADAPTER_FILE, *files])}
    if progress is not None:
        progress.start(sum(s.nbytes for s in specs))
    # Names come from the resolved path: `-o .` or `-o sub/..` have no usable name of their own.
    temp = _new_sibling(parent, f".{target.name}.lora-convert-tmp-{os.getpid()}")
    old: Path | None = None
    written = 0
    try:
        with _terminate_as_interrupt():
            writer = StreamingSafetensorsWriter(temp / ADAPTER_FILE, specs, metadata={"format": "pt"})
            try:
                for name, tensor in tensors:
                    writer.write(name, tensor)
                    written += 1
                writer.close()
            except BaseException:
                writer.abort()
                raise
            for name, text in files.items():
                (temp / name).write_text(text)
            # The write took a while: check again that what is about to be replaced is still only ours.
            check_output_dir(target, force=force, protected=protected)
            if target.exists():
                old = parent / f".{target.name}.lora-convert-old-{os.getpid()}-{secrets.token_hex(4)}"
                target.rename(old)
            temp.rename(target)
        if old is not None:
            _remove_previous_output(old)
            old = None
    finally:
        if old is not None and old.exists() and not target.exists():
            old.rename(target)  # interrupted between the two renames: put the previous output back
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return written


def write_output(plan: Plan, output: str | Path, *, dtype: str = "keep", force: bool = False,
                 progress: WriteProgress | None = None, protected: list[tuple[str, Path]] | None = None) -> NormalizeResult:
    started = time.perf_counter()
    adapter = plan.adapter
    tag = output_dtype(plan, dtype)
    specs = tensor_specs(plan, tag)

    def tensors():
        for group, A, B in iter_group_tensors(plan, tag):
            yield f"base_model.model.{group.key}.lora_A.weight", A
            yield f"base_model.model.{group.key}.lora_B.weight", B
            if progress is not None:
                progress.advance(A.numel() * A.element_size() + B.numel() * B.element_size())
            del A, B

    files = {
        "adapter_config.json": json.dumps(output_config(plan, sorted({g.name for g in plan.groups}), {
            "lora_convert": {"layout": "stacked", "version": 1, "source_peft_version": plan.adapter.config.raw.get("peft_version")}}),
            indent=2) + "\n",
        LAYOUT_FILE: json.dumps(plan.layout_json(), indent=2) + "\n",
    }
    written = write_folder(output, adapter, specs, tensors(), files, force=force, layout="stacked",
                           protected=_with_base(protected, plan), progress=progress)
    bytes_out = sum(s.nbytes for s in specs)
    return NormalizeResult(plan=plan, output=Path(output), dtype=tag, bytes_in=adapter.total_bytes, bytes_out=bytes_out,
                           seconds=time.perf_counter() - started, tensors_written=written)


def _with_base(protected: list[tuple[str, Path]] | None, plan: Plan) -> list[tuple[str, Path]]:
    """`protected` plus the plan's base when it was read from a local path (resolve_base names it by that path)."""
    return list(protected or []) + protected_inputs(None, plan.base_name)


def _local_adapter_folder(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    if not path.exists():
        return None
    return path if path.is_dir() else path.parent


def normalize(adapter_spec: str | os.PathLike, output: str | os.PathLike | None, *, base: str | None = None,
              rank: int | None = None, dtype: str = "keep", dry_run: bool = False, force: bool = False,
              drop_unsupported: bool = False, cache_dir=None, token=None, progress: WriteProgress | None = None,
              layout: str = "stacked") -> NormalizeResult:
    """The whole command as one library call: plan, then (unless dry_run) write the output in `layout`
    (`stacked`, or an engine layout from lora_convert.convert.engine_layouts: `sglang`, `peft`).

    `progress` (optional) gets `start(total_bytes)` once writing begins and `advance(nbytes)` per group
    (see WriteProgress). The output folder is refused, before any planning, when it is, contains or lies inside
    the adapter or a local base, or is the working directory; --force replaces only a previous output."""
    started = time.perf_counter()
    adapter_spec = os.fspath(adapter_spec)
    output = Path(output) if output is not None else None
    protected = protected_inputs(_local_adapter_folder(adapter_spec), base)
    if output is not None and not dry_run:
        check_output_dir(output, force=force, protected=protected)  # fail before seconds of planning
    plan = plan_normalize(adapter_spec, base=base, rank=rank, drop_unsupported=drop_unsupported, cache_dir=cache_dir, token=token)
    if layout != "stacked":
        from lora_convert.convert import engine_layouts

        lp = engine_layouts.plan_layout(plan, layout, drop_unsupported=drop_unsupported)
        if dry_run or output is None:
            tag = output_dtype(plan, dtype)
            return NormalizeResult(plan=plan, output=None, dtype=tag, bytes_in=plan.adapter.total_bytes,
                                   bytes_out=sum(s.nbytes for s in lp.tensor_specs(tag)), seconds=time.perf_counter() - started,
                                   notes=list(lp.notes), layout=layout, layout_summary=engine_layouts.layout_summary(lp))
        return engine_layouts.write_layout(lp, output, dtype=dtype, force=force, progress=progress,
                                           protected=_with_base(protected, plan))
    if dry_run or output is None:
        tag = output_dtype(plan, dtype)
        return NormalizeResult(plan=plan, output=None, dtype=tag, bytes_in=plan.adapter.total_bytes,
                               bytes_out=sum(s.nbytes for s in tensor_specs(plan, tag)), seconds=time.perf_counter() - started)
    return write_output(plan, output, dtype=dtype, force=force, progress=progress, protected=protected)
