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


def _device_reader(sources) -> Callable[[str], Any]:
    """The reference's reader on a GPU: the group's source tensors already on the device (DeviceSources), as
    float64 there, each converted once per group."""
    import torch

    cache: dict[str, Any] = {}

    def cached(key: str):
        if key not in cache:
            cache[key] = sources(key).to(torch.float64)
        return cache[key]

    return cached


def _pinned_to_device(array, device):
    """A stacked tensor read from disk (numpy) to the device through pinned memory."""
    return to_torch(array).pin_memory().to(device, non_blocking=True)


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
    a, b, s = module_factors(src.module, read, expert=inner_expert, device=device, a_on_output=src.a_on_output)
    return s * (x64 @ a.T) @ b[source_rows(src)].T


def check_dense_group(group, A, B, R: int, tag: str, x, read, device, timer: PhaseTimer) -> GroupCheck:
    from lora_convert.convert.factors import kernel_offsets
    from lora_convert.kernels.expand import lora_expand
    from lora_convert.kernels.shrink import lora_shrink

    with timer("kernels"):
        h = lora_shrink(x, A)
        y = lora_expand(h, B, kernel_offsets(group), R)  # fresh zero float32 output: the delta alone
    return _judge_dense(group, A, B, R, tag, x, y, read, device, timer)


# Dense groups of one shape class waiting for one batched launch (kernels/batched.py): at most this many at a time,
# which bounds what they hold (their stacked A and B, input and float64 source factors; a few MB per group at
# DeepSeek-V3 size). 61 layers of DeepSeek-V3 make one launch per class.
DENSE_BATCH = 64


def check_dense_groups(items: list[tuple], R: int, device, timer: PhaseTimer) -> list[GroupCheck]:
    """Dense groups sharing in_features and dtype, (group, A, B, tag, x, read) each, in one shrink and one expand
    launch for all of them instead of two per group; each is then judged on its own."""
    import torch

    from lora_convert.convert.factors import kernel_offsets
    from lora_convert.kernels.batched import lora_shrink_expand_batched

    with timer("kernels"):
        ys = lora_shrink_expand_batched(
            [it[4] for it in items],
            [it[1] for it in items],
            [it[2] for it in items],
            [kernel_offsets(it[0]) for it in items],
            R,
            out_dtype=torch.float32,
        )
    return [
        _judge_dense(group, A, B, R, tag, x, y, read, device, timer)
        for (group, A, B, tag, x, read), y in zip(items, ys, strict=True)
    ]


def _judge_dense(group, A, B, R: int, tag: str, x, y, read, device, timer: PhaseTimer) -> GroupCheck:
    """Hold one dense group's kernel output y [T, out] (float32, the delta alone) to PEFT's reference."""
    import torch

    from lora_convert.convert.factors import b_rows, kernel_offsets
    from lora_convert.kernels.expand import lora_expand
    from lora_convert.kernels.shrink import lora_shrink

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
        with timer("kernels"):
            after = lora_expand(lora_shrink(x, A), B, kernel_offsets(group), R, y=base.clone())
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


def _expert_slice_reference(sl, x64, tok, eid, E: int, read, device):
    """PEFT's float64 output of one slice for every routed (token, expert) pair at once: (ref [P, out], has [P]),
    `has` False where the pair's expert has no source (its rows must stay zero); None when the slice is zero-filled.

    Batched (perf): one shrink of every token against every expert's A, then one gathered batched product per
    pair. The per-expert Python loop it replaces was 30.1 s of a 69.4 s full-size DeepSeek-V3 smoke (H200)."""
    import torch

    from lora_convert.convert.factors import source_rows
    from lora_convert.peft.reference import fused_expert_factors, module_factors

    if sl.fused_source is not None:
        src = sl.fused_source
        # a [E, r, in], b [E, out, r]
        a, b, s = fused_expert_factors(src.module, read, device=device, a_on_output=src.a_on_output)
        b = b[:, source_rows(src)] * s
        has = torch.ones(E, dtype=torch.bool, device=device)
    elif sl.expert_sources:
        # Per-expert modules may differ in rank and scaling (rank_pattern): pad every expert to the largest rank
        # with zeros (adds exact zeros) and fold each expert's own s into its B (in float64).
        per = {e: (src, module_factors(src.module, read, device=device)) for e, src in sl.expert_sources.items()}
        r = max(f[0].shape[0] for _, f in per.values())
        a = torch.zeros((E, r, x64.shape[1]), dtype=torch.float64, device=device)
        b = torch.zeros((E, sl.out_features, r), dtype=torch.float64, device=device)
        has = torch.zeros(E, dtype=torch.bool, device=device)
        for e, (src, (ae, be, se)) in per.items():
            a[e, : ae.shape[0]] = ae
            b[e, :, : ae.shape[0]] = be[source_rows(src)] * se
            has[e] = True
    else:
        return None
    r = a.shape[1]
    h = (x64 @ a.reshape(E * r, a.shape[2]).T).view(x64.shape[0], E, r)[tok, eid]  # [P, r]
    ref = torch.bmm(b[eid], h.unsqueeze(-1)).squeeze(-1)  # [P, out]
    return ref, has[eid]


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
    tok = torch.arange(T, device=device).repeat_interleave(k)
    eid = ids.reshape(-1)
    yp = y.reshape(T * k, -1)
    slices = []
    tol = TOLERANCES.get(tag, 1e-5)
    diff_sq = ref_sq = 0.0
    for sl in group.slices:
        got = yp[:, b_rows(sl)].to(torch.float64)
        with timer("reference"):
            out = _expert_slice_reference(sl, x64, tok, eid, E, read, device)
        if out is None:
            touched = bool(torch.count_nonzero(got))
            slices.append(
                SliceCheck(sl.name, None, True, "a zero-filled slice changed the output" if touched else None)
            )
            continue
        ref, has = out
        zero_touched = bool(torch.count_nonzero(got[~has]))
        got, ref = got[has], ref[has]
        d2 = float((got - ref).norm()) ** 2
        r2 = float(ref.norm()) ** 2
        g2 = float(got.norm()) ** 2
        rel = _rel(d2**0.5, r2**0.5)
        problem = None
        if zero_touched:
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
    from lora_convert.io.small_files import read_small_json
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
        # A FIFO, an LFS pointer, bad or too deeply nested JSON, not an object: UsageError naming the file.
        stacked_layout = read_small_json(
            target.path / LAYOUT_NAME,
            UsageError,
            hint="Re-create the output with lora-convert normalize; the file is written by it.",
        )
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
    if not any(g.layer is None or g.layer in chosen for g in plan.groups):
        # Only an explicit --layers can select nothing; a run that checked no group must not read as a pass.
        held = ", ".join(map(str, present)) if len(present) <= 12 else f"{present[0]}..{present[-1]}"
        raise UsageError(
            f"--layers {layers} selects none of the layers the adapter has LoRA on ({held}): nothing would be checked.",
            hint="Pick some of those layers, or pass --layers auto or all.",
        )
    read = plan.adapter.read
    # The set-up phase: resolving and planning (headers only), the CUDA context and the kernel modules' import
    # (triton), so that the per-group phases below hold only per-group work.
    import lora_convert.kernels.expand  # noqa: F401
    import lora_convert.kernels.moe  # noqa: F401
    import lora_convert.kernels.shrink  # noqa: F401

    if torch_device == "cuda":
        torch.zeros(1, device=torch_device)
        torch.cuda.synchronize()
    timer = PhaseTimer(cuda=torch_device == "cuda")
    timer.seconds["setup"] = time.perf_counter() - started
    on_gpu = torch_device == "cuda"
    sources = None
    if on_gpu:
        from lora_convert.smoke.device import DeviceSources, build_group_on_device, group_source_keys

        sources = DeviceSources(plan.adapter.index, read, torch_device, timer)
    checks: list[GroupCheck | None] = []
    pending: dict[tuple, list[tuple[int, tuple]]] = {}

    def flush(batch_key) -> None:
        batch = pending.pop(batch_key)
        judged = check_dense_groups([it for _, it in batch], rank, torch_device, timer)
        for (at, _), check in zip(batch, judged, strict=True):
            checks[at] = check

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
        if sources is not None:
            # GPU: the sources go to the device once; the stacked tensors are built there (smoke/device.py).
            sources.load(group_source_keys(group))
            reader = _device_reader(sources)
            if read_stacked is None:
                with timer("build"):
                    A, B = build_group_on_device(plan, group, tag, sources)
            else:
                with timer("to_device"):
                    A, B = _pinned_to_device(A, torch_device), _pinned_to_device(B, torch_device)
                timer.bytes_to_device += A.numel() * A.element_size() + B.numel() * B.element_size()
        else:
            if read_stacked is None:
                with timer("build"):
                    A, B = build_group_tensors(plan, group, tag, plan.adapter.read)
            with timer("to_device"):
                A, B = to_torch(A).to(torch_device), to_torch(B).to(torch_device)
            timer.bytes_to_device += A.numel() * A.element_size() + B.numel() * B.element_size()
            reader = _group_reader(read, torch_device)
        # The input is drawn where it is used: on a GPU from a CUDA generator (seeded the same way, so a run is
        # reproducible on its device). perf: the host generator drew ~400M normals for the 482 groups of a
        # full-size DeepSeek-V3 adapter, seconds of one CPU core, then copied them over.
        gen = torch.Generator(device=torch_device).manual_seed(_seed_for(seed, group.key))
        x = torch.randn(tokens, group.in_features, generator=gen, dtype=torch.float32, device=torch_device).to(A.dtype)
        if group.experts:
            checks.append(
                check_expert_group(
                    group, A, B, rank, group_tag, x, reader, torch_device, _seed_for(seed, group.key), timer
                )
            )
        else:
            # Deferred to one batched launch per shape class. Its float64 source factors are taken now: on a GPU
            # the next group's sources replace this one's (DeviceSources).
            for sl in group.slices:
                if sl.dense_source is not None:
                    reader(sl.dense_source.module.lora_A.key)
                    reader(sl.dense_source.module.lora_B.key)
            batch_key = (group.in_features, str(A.dtype))
            batch = pending.setdefault(batch_key, [])
            batch.append((len(checks), (group, A, B, group_tag, x, reader)))
            checks.append(None)
            if len(batch) >= DENSE_BATCH:
                flush(batch_key)
        if progress:
            progress(group.key)
    for batch_key in list(pending):
        flush(batch_key)
    if sources is not None:
        sources.close()
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
        bytes_to_device=timer.bytes_to_device + (sources.bytes_copied if sources is not None else 0),
    )
