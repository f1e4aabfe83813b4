"""The smoke forward: run stacked groups through the Triton kernels and hold them to PEFT's semantics.

For each group: a random input x (more than 128 rows by default: some kernel bugs only show past 128 rows),
the kernel output, and a float64 reference computed from the ORIGINAL adapter's factors with PEFT's rules
(lora_convert.peft.reference), never from the stacked tensors. A group passes when ||out - ref|| / ||ref|| is within
the dtype's tolerance, nothing is NaN, every slice whose source is non-zero changes the output, and every
zero-filled slice leaves its rows exactly untouched. Errors are attributed per slice, so a report names the
slice that is wrong (swapped rows, a doubled scale, an expert's factors taken from its neighbour).

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) and, unless `layers="all"`, a sample
of layers is checked: the first, one of each layer type, and the last.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lora_convert.codes import finding
from lora_convert.errors import EnvironmentProblem, UsageError
from lora_convert.findings import Finding

# Relative-error tolerances per stored dtype (||out - ref|| / ||ref||).
TOLERANCES = {"F32": 1e-5, "F16": 2e-3, "BF16": 1.6e-2, "F64": 1e-5}

# torch and triton are the `[smoke]` extra, not dependencies of the core: inspect, validate and normalize run
# without them. Only the smoke forward needs them, and whether it can run is decided here, without importing either
# (find_spec only looks for the package; importing torch alone costs a second or more).
SMOKE_PACKAGES = ("torch", "triton")
SMOKE_INSTALL = "pip install 'lora-convert[smoke]'"


def missing_smoke_packages() -> list[str]:
    """The packages the smoke forward needs that are not installed here (empty when it can run)."""
    return [name for name in SMOKE_PACKAGES if importlib.util.find_spec(name) is None]


def not_installed_reason(missing: list[str]) -> str:
    """The verdict's "Not run" entry: the first missing package (torch, on a light install) and the command that
    installs both."""
    return f"{missing[0]} not installed: {SMOKE_INSTALL}"


def require_smoke_packages() -> None:
    """Raise EnvironmentProblem (exit 3) with the install command when torch or triton is missing."""
    missing = missing_smoke_packages()
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise EnvironmentProblem(
            f"The smoke forward needs torch and triton, and {' and '.join(missing)} {verb} not installed here.",
            hint=f"Install the smoke extra: {SMOKE_INSTALL} (Triton ships Linux wheels only).",
        )


@dataclass
class SliceCheck:
    name: str
    rel_err: float | None
    zero_filled: bool
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass
class GroupCheck:
    key: str
    layer: int | None
    kind: str
    experts: int | None
    dtype: str
    rel_err: float
    slices: list[SliceCheck]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.ok for s in self.slices)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "layer": self.layer,
            "kind": self.kind,
            "experts": self.experts,
            "dtype": self.dtype,
            "rel_err": self.rel_err,
            "ok": self.ok,
            "problems": self.problems,
            "slices": [
                {"name": s.name, "rel_err": s.rel_err, "zero_filled": s.zero_filled, "ok": s.ok, "problem": s.problem}
                for s in self.slices
            ],
        }


@dataclass
class SmokeReport:
    adapter: str
    original: str | None
    device: str
    interpreter: bool
    tokens: int
    seed: int
    rank: int
    layers_checked: list[int]
    layers_total: int
    sampled: bool
    groups: list[GroupCheck]
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (build, to_device, kernels, reference)
    bytes_to_device: int = 0

    @property
    def ok(self) -> bool:
        return all(g.ok for g in self.groups)

    def findings(self) -> list[Finding]:
        out = []
        for g in self.groups:
            for problem in g.problems:
                out.append(finding("smoke.group", f"{g.key}: {problem}", keys=[g.key]))
            for s in g.slices:
                if s.problem:
                    out.append(
                        finding(
                            "smoke.slice",
                            f"{g.key} slice {s.name}: {s.problem}",
                            keys=[g.key],
                            expected=f"rel err <= {TOLERANCES.get(g.dtype, 1e-5)}",
                            actual=s.rel_err,
                        )
                    )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "adapter": self.adapter,
            "original": self.original,
            "device": self.device,
            "interpreter": self.interpreter,
            "tokens": self.tokens,
            "seed": self.seed,
            "rank": self.rank,
            "layers_checked": self.layers_checked,
            "layers_total": self.layers_total,
            "sampled": self.sampled,
            "groups_checked": len(self.groups),
            "groups_failed": sum(not g.ok for g in self.groups),
            "seconds": round(self.seconds, 3),
            "phases": {k: round(v, 4) for k, v in self.phases.items()},
            "bytes_to_device": self.bytes_to_device,
            "groups": [g.to_json() for g in self.groups],
        }


class PhaseTimer:
    """Seconds spent per phase (build, to_device, kernels, reference). On CUDA each phase is bracketed by a
    synchronize, so kernel time is kernel time and not launch time."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: dict[str, float] = {}
        self.bytes_to_device = 0

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def to_torch(array):
    """A numpy array from the core (lora_convert.io reads numpy) as a CPU torch tensor on the same memory.

    bfloat16 and float8 are ml_dtypes types that torch.from_numpy does not know: their raw unsigned integers of the
    same width go across, then torch reinterprets them (exact, no copy)."""
    import torch

    from lora_convert.io.tensor_files import TORCH_DTYPE_NAMES, dtype_tag, raw_view

    tag = dtype_tag(array.dtype)
    if tag in ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"):
        return torch.from_numpy(raw_view(array)).view(getattr(torch, TORCH_DTYPE_NAMES[tag]))
    return torch.from_numpy(array)


def _group_reader(read: Callable[[str], Any], device) -> Callable[[str], Any]:
    """Original tensors as float64 on the device, each read once per group (a 3-D expert module feeds every
    expert of its group: re-reading it per expert would read it E times)."""
    import torch

    cache: dict[str, Any] = {}

    def cached(key: str):
        if key not in cache:
            cache[key] = to_torch(read(key)).to(device=device, dtype=torch.float64)
        return cache[key]

    return cached


# ------------------------------------------------------------------------------------------------ devices
def select_device(device: str) -> tuple[str, bool]:
    """Return (torch device, interpreter?) or raise EnvironmentProblem (exit 3)."""
    require_smoke_packages()
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise EnvironmentProblem(
            "--device cuda was asked for, but torch sees no CUDA device here.",
            hint="Use --device cpu (the Triton interpreter) or --device auto, or run on a GPU machine.",
        )
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(
            f"--device must be auto, cpu or cuda, not {device!r}.", hint="auto picks CUDA when present, else the CPU."
        )
    if device == "cuda" or (device == "auto" and has_cuda):
        return "cuda", False
    # The interpreter must be requested before the kernel modules are imported (triton.jit decides then).
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu", True


def parse_layers(spec: str, num_layers: int) -> list[int] | None:
    """`all` -> None (every layer); `auto` handled by the caller; `0,3,5-7` -> a list."""
    if spec == "all":
        return None
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise UsageError(
            f"--layers {spec!r} is not a layer list.", hint="Use all, auto, or a list such as 0,3,5-7."
        ) from None
    bad = sorted(x for x in layers if x < 0 or x >= num_layers)
    if bad:
        raise UsageError(
            f"--layers names layer(s) {bad}, but the base model has layers 0..{num_layers - 1}.",
            hint="Pick layers inside that range, or pass --layers all.",
        )
    return sorted(layers)


def sample_layers(arch, present: list[int]) -> list[int]:
    """The first and last layer holding groups, and the first of each layer type."""
    if not present:
        return []
    chosen = {present[0], present[-1]}
    seen: set[frozenset] = set()
    for layer in present:
        kind = arch.layer_types(layer)
        if kind not in seen:
            seen.add(kind)
            chosen.add(layer)
    return sorted(chosen)


# --------------------------------------------------------------------------------------------------- checks
def _rel(diff_norm: float, ref_norm: float) -> float:
    if ref_norm == 0.0:
        return 0.0 if diff_norm == 0.0 else float("inf")
    return diff_norm / ref_norm


def _seed_for(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31)


def _reference_slice(plan_slice, x64, read, device, expert=None):
    """s * (x @ A^T) @ B[rows]^T for the slice's source module, float64; None when zero-filled."""
    from lora_convert.convert.factors import slice_source, source_rows
    from lora_convert.peft.reference import module_factors

    src, inner_expert = slice_source(plan_slice, expert)
    if src is None:
        return None
    a, b, s = module_factors(src.module, read, expert=inner_expert, device=device)
    return s * (x64 @ a.T) @ b[source_rows(src)].T


def check_dense_group(group, A, B, R: int, tag: str, x, read, device, timer: PhaseTimer) -> GroupCheck:
    import torch

    from lora_convert.convert.factors import b_rows, kernel_offsets
    from lora_convert.kernels.expand import lora_expand
    from lora_convert.kernels.shrink import lora_shrink

    offsets = kernel_offsets(group)
    with timer("kernels"):
        h = lora_shrink(x, A)
        y = lora_expand(h, B, offsets, R)  # fresh zero float32 output: the delta alone
    x64 = x.to(torch.float64)
    slices: list[SliceCheck] = []
    diff_sq = ref_sq = 0.0
    problems = []
    if torch.isnan(y).any():
        problems.append(f"the kernel output holds {int(torch.isnan(y).sum())} NaN values")
    zero_rows = []
    for sl in group.slices:
        rows = b_rows(sl)
        got = y[:, rows].to(torch.float64)
        with timer("reference"):
            ref = _reference_slice(sl, x64, read, device)
        slices.append(_judge_slice(sl.name, got, ref, tag))
        if ref is None:
            zero_rows.append(rows)
            continue
        diff_sq += float((got - ref).norm()) ** 2
        ref_sq += float(ref.norm()) ** 2
    if zero_rows:
        # Zero-filled slices must leave pre-existing output untouched, bit for bit.
        base = torch.randn(
            y.shape, dtype=torch.float32, device=device, generator=torch.Generator(device=device).manual_seed(1)
        )
        after = lora_expand(h, B, offsets, R, y=base.clone())
        for rows, sl_check in zip(zero_rows, [s for s in slices if s.zero_filled], strict=True):
            if not torch.equal(after[:, rows], base[:, rows]):
                sl_check.problem = "a zero-filled slice changed the output rows it owns"
    return GroupCheck(group.key, group.layer, group.kind, None, tag, _rel(diff_sq**0.5, ref_sq**0.5), slices, problems)


def _judge_slice(name: str, got, ref, tag: str) -> SliceCheck:
    import torch

    tol = TOLERANCES.get(tag, 1e-5)
    if ref is None:
        untouched = bool(torch.count_nonzero(got) == 0)
        return SliceCheck(name, None, True, None if untouched else "a zero-filled slice changed the output")
    if torch.isnan(got).any():
        return SliceCheck(name, float("nan"), False, "NaN in the output")
    ref_norm = float(ref.norm())
    got_norm = float(got.norm())
    rel = _rel(float((got - ref).norm()), ref_norm)
    if ref_norm > 0 and got_norm == 0:
        return SliceCheck(name, rel, False, "no-op: the source module is non-zero but the slice changes nothing")
    if rel > tol:
        return SliceCheck(name, rel, False, f"relative error {rel:.3g} exceeds {tol:g} for {tag}")
    return SliceCheck(name, rel, zero_filled=False)


def route_tokens(T: int, E: int, k: int, seed: int, device):
    """Top-k routing that reaches every expert: a seeded permutation of tokens, experts taken round-robin."""
    import torch

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(T, generator=g)
    ids = torch.empty(T, k, dtype=torch.int64)
    for j in range(k):
        ids[:, j] = (perm * k + j) % E
    return ids.to(device)


def check_expert_group(group, A, B, R: int, tag: str, x, read, device, seed: int, timer: PhaseTimer) -> GroupCheck:
    import torch

    from lora_convert.convert.factors import b_rows, kernel_offsets
    from lora_convert.kernels.moe import lora_moe

    E = group.experts
    T = x.shape[0]
    k = min(2, E)
    ids = route_tokens(T, E, k, seed, device)
    offsets = kernel_offsets(group)
    with timer("kernels"):
        y = lora_moe(x, A, B, ids, offsets, R, out_dtype=torch.float32)  # [T, k, out]
    problems = []
    if torch.isnan(y).any():
        problems.append(f"the kernel output holds {int(torch.isnan(y).sum())} NaN values")
    x64 = x.to(torch.float64)
    per_slice = {sl.name: [0.0, 0.0, 0.0] for sl in group.slices}  # diff^2, ref^2, got^2
    zero_touched = {sl.name: False for sl in group.slices}
    for e in range(E):
        pairs = (ids == e).nonzero(as_tuple=False)
        if pairs.numel() == 0:
            continue
        tok, choice = pairs[:, 0], pairs[:, 1]
        xe = x64[tok]
        for sl in group.slices:
            rows = b_rows(sl)
            got = y[tok, choice][:, rows].to(torch.float64)
            with timer("reference"):
                ref = _reference_slice(sl, xe, read, device, expert=e)
            acc = per_slice[sl.name]
            if ref is None:
                if torch.count_nonzero(got):
                    zero_touched[sl.name] = True
                continue
            acc[0] += float((got - ref).norm()) ** 2
            acc[1] += float(ref.norm()) ** 2
            acc[2] += float(got.norm()) ** 2
    slices = []
    tol = TOLERANCES.get(tag, 1e-5)
    diff_sq = ref_sq = 0.0
    for sl in group.slices:
        d2, r2, g2 = per_slice[sl.name]
        if sl.is_zero_filled:
            problem = "a zero-filled slice changed the output" if zero_touched[sl.name] else None
            slices.append(SliceCheck(sl.name, None, True, problem))
            continue
        rel = _rel(d2**0.5, r2**0.5)
        problem = None
        if zero_touched[sl.name]:
            problem = "a missing expert's zero-filled rows changed the output"
        elif r2 > 0 and g2 == 0:
            problem = "no-op: the source experts are non-zero but the slice changes nothing"
        elif rel > tol:
            problem = f"relative error {rel:.3g} exceeds {tol:g} for {tag}"
        slices.append(SliceCheck(sl.name, rel, False, problem))
        diff_sq += d2
        ref_sq += r2
    return GroupCheck(group.key, group.layer, group.kind, E, tag, _rel(diff_sq**0.5, ref_sq**0.5), slices, problems)


# ------------------------------------------------------------------------------------------------ driver
def _stacked_reader(folder):
    """Read a stacked output from disk and check its groups line up with the plan from the original."""
    from lora_convert.io.tensor_files import read_safetensors_header, read_tensor_data

    infos, _ = read_safetensors_header(folder / "adapter_model.safetensors")

    def read(group):
        a = infos.get(f"base_model.model.{group.key}.lora_A.weight")
        b = infos.get(f"base_model.model.{group.key}.lora_B.weight")
        if a is None or b is None:
            return None, None
        return read_tensor_data(a), read_tensor_data(b)

    return read


def run_smoke(
    adapter_spec: str,
    *,
    base: str | None = None,
    original: str | None = None,
    device: str = "auto",
    tokens: int = 160,
    layers: str = "auto",
    seed: int = 0,
    cache_dir=None,
    token=None,
    progress: Callable[[str], None] | None = None,
) -> SmokeReport:
    """Smoke-test a raw PEFT adapter (normalized in memory) or a stacked output against its original."""
    require_smoke_packages()  # before anything imports torch: exit 3 with the install command, not a traceback
    import torch

    from lora_convert.convert.group_tensors import build_group_tensors, output_dtype
    from lora_convert.convert.normalize import plan_normalize
    from lora_convert.io.source import resolve_adapter_source
    from lora_convert.peft.adapter import LAYOUT_NAME

    started = time.perf_counter()
    if tokens < 1:
        raise UsageError(
            "--tokens must be at least 1.", hint="The default, 160 tokens, is enough to exercise every slice."
        )
    torch_device, interpreter = select_device(device)
    target = resolve_adapter_source(adapter_spec, cache_dir=cache_dir, token=token)
    stacked_layout = None
    if (target.path / LAYOUT_NAME).exists():
        try:
            stacked_layout = json.loads((target.path / LAYOUT_NAME).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(
                f"{target.path / LAYOUT_NAME} is not valid JSON ({exc}).",
                hint="Re-create the output with lora-convert normalize; the file is written by it.",
            ) from None
        if original is None:
            raise UsageError(
                f"{adapter_spec} is a stacked output; the smoke check needs the original PEFT adapter to compare with.",
                hint="Pass --original PATH (the adapter it was normalized from).",
            )
        plan = plan_normalize(
            original,
            base=base or stacked_layout.get("base"),
            rank=None,
            drop_unsupported=bool(stacked_layout.get("dropped")),
            cache_dir=cache_dir,
            token=token,
        )
        rank = int(stacked_layout.get("rank", plan.rank))
        read_stacked = _stacked_reader(target.path)
        # the stacked file's dtype decides the tolerance
        tag = None
    else:
        if original is not None:
            raise UsageError(
                f"--original is only for stacked outputs, and {adapter_spec} has no {LAYOUT_NAME}.",
                hint="Drop --original to smoke-test a PEFT adapter directly (it is normalized in memory).",
            )
        plan = plan_normalize(
            adapter_spec, base=base, rank=None, drop_unsupported=True, cache_dir=cache_dir, token=token
        )
        rank = plan.rank
        tag = output_dtype(plan, "keep")
        read_stacked = None
    arch = plan.arch
    present = sorted({g.layer for g in plan.groups if g.layer is not None})
    if layers == "auto":
        chosen = present if not interpreter else sample_layers(arch, present)
        sampled = interpreter and chosen != present
    else:
        wanted = parse_layers(layers, arch.num_layers)
        chosen = present if wanted is None else [layer for layer in present if layer in wanted]
        sampled = False
    read = plan.adapter.read
    timer = PhaseTimer(cuda=torch_device == "cuda")
    checks: list[GroupCheck] = []
    for group in plan.groups:
        if group.layer is not None and group.layer not in chosen:
            continue
        if read_stacked is not None:
            with timer("read"):
                A, B = read_stacked(group)
            if A is None:
                checks.append(
                    GroupCheck(
                        group.key,
                        group.layer,
                        group.kind,
                        group.experts,
                        "?",
                        float("inf"),
                        [],
                        [f"the stacked output has no tensors for {group.key}"],
                    )
                )
                continue
            from lora_convert.io.safetensors_writer import dtype_tag

            group_tag = dtype_tag(A.dtype)
            want_a, want_b = group.a_shape(rank), group.b_shape(rank)
            if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
                checks.append(
                    GroupCheck(
                        group.key,
                        group.layer,
                        group.kind,
                        group.experts,
                        group_tag,
                        float("inf"),
                        [],
                        [
                            f"shapes A {list(A.shape)} B {list(B.shape)}, "
                            f"expected A {list(want_a)} B {list(want_b)} from the schema"
                        ],
                    )
                )
                continue
        else:
            group_tag = tag
            with timer("build"):
                A, B = build_group_tensors(plan, group, tag, plan.adapter.read)
        with timer("to_device"):
            A, B = to_torch(A).to(torch_device), to_torch(B).to(torch_device)
        timer.bytes_to_device += A.numel() * A.element_size() + B.numel() * B.element_size()
        reader = _group_reader(read, torch_device)
        gen = torch.Generator().manual_seed(_seed_for(seed, group.key))
        x = torch.randn(tokens, group.in_features, generator=gen, dtype=torch.float32).to(
            device=torch_device, dtype=A.dtype
        )
        if group.experts:
            checks.append(
                check_expert_group(
                    group, A, B, rank, group_tag, x, reader, torch_device, _seed_for(seed, group.key), timer
                )
            )
        else:
            checks.append(check_dense_group(group, A, B, rank, group_tag, x, reader, torch_device, timer))
        if progress:
            progress(group.key)
    return SmokeReport(
        adapter=target.describe(),
        original=original,
        device=torch_device,
        interpreter=interpreter,
        tokens=tokens,
        seed=seed,
        rank=rank,
        layers_checked=chosen,
        layers_total=len(present),
        sampled=sampled,
        groups=checks,
        seconds=time.perf_counter() - started,
        phases=dict(timer.seconds),
        bytes_to_device=timer.bytes_to_device,
    )
