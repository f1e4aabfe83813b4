"""Every command as the pipeline's steps, in order. Read this file first.

    spec ─▶ prepare ─▶ PreparedAdapter ─┬─▶ build_report ────────────────▶ inspect document        (inspect)
            (read once: headers,        ├─▶ run_checks ──────────────────▶ ValidationReport        (validate)
             config; base, shapes       ├─▶ plan ─▶ write_normalized ────▶ NormalizeResult         (normalize)
             and plans on first use)    ├─▶ plan ─▶ run_smoke ───────────▶ SmokeReport             (smoke)
                                        └─▶ predict_engine ──────────────▶ EnginePrediction        (engine proofs)

`prepare` (lora_convert/pipeline/prepared.py) reads the adapter once; the base, its architecture, the shape findings
and each plan are computed on first use and kept, so one command never reads or plans an adapter twice (`validate
--engine E --smoke` plans once for the engine rules and the smoke forward). Each function below accepts a spec (a
folder or Hub id) or an adapter already prepared (`scan` validates and then converts the same one). Checks that
need the machine (smoke's torch, triton and device) run before the adapter is read, so a missing extra is exit 3
whatever the adapter.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_convert.errors import AdapterConfigError, AdapterFormatError, UsageError
from lora_convert.io.source import AdapterSource, resolve_adapter_source
from lora_convert.pipeline.prepared import PreparedAdapter, prepare

# Each command imports the stages it runs when it runs: `inspect` reads headers only, and importing the checks, the
# writers and the smoke runner it never calls would be a quarter of its time on a 94,000-tensor adapter
# (docs/benchmarks.md).
if TYPE_CHECKING:
    from lora_convert.check.engine import EnginePrediction
    from lora_convert.check.validate import ValidationReport
    from lora_convert.convert.normalize import NormalizeResult, WriteProgress
    from lora_convert.convert.plan import Plan
    from lora_convert.smoke.report import SmokeReport

AdapterSpec = str | os.PathLike | PreparedAdapter

__all__ = ["inspect", "normalize", "plan_normalize", "predict", "prepared", "smoke", "validate"]


def prepared(spec: AdapterSpec, *, base: str | None = None, cache_dir=None, token=None) -> PreparedAdapter:
    """`spec` itself when it is already prepared, else the adapter it names, read once."""
    if isinstance(spec, PreparedAdapter):
        return spec
    return prepare(os.fspath(spec), base=base, cache_dir=cache_dir, token=token)


def inspect(spec: AdapterSpec, *, cache_dir=None, token=None) -> dict[str, Any]:
    """What an adapter holds, from headers and config alone (no base)."""
    from lora_convert.pipeline.inspect_report import build_report

    return build_report(prepared(spec, cache_dir=cache_dir, token=token).adapter)


def validate(
    spec: AdapterSpec | AdapterSource,
    *,
    base: str | None = None,
    engine: str = "none",
    tp: int | None = None,
    ep: int | None = None,
    data_scan: bool = True,
    smoke: bool | None = None,
    device: str = "auto",
    strict: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cache_dir=None,
    token: str | None = None,
    allow_unchecked: bool = False,
    checks: Collection[str] | None = None,
    server_args: str | None = None,
    server_args_file: str | os.PathLike | None = None,
) -> ValidationReport:
    """Every check on one adapter (lora_convert/check/validate.py). Bad options are a UsageError before anything is
    read; an adapter whose files cannot be read is a report with that finding, not an exception. `server_args` /
    `server_args_file`: the engine server's own flags (lora_convert/engines/server_args.py); their tensor-parallel
    size is --tp's when --tp is not given."""
    from lora_convert.check.context import ValidateOptions
    from lora_convert.check.validate import known_check_names, run_checks, unreadable_report
    from lora_convert.engines.server_args import parse_server_args

    known_check_names(checks)
    engine = (engine or "none").lower()
    server = parse_server_args(engine, server_args, server_args_file)
    options = ValidateOptions(
        base=base,
        engine=engine,
        server_args=server,
        tp=tp if tp is not None or server is None else server.tp,
        ep=ep,
        data_scan=data_scan,
        smoke=smoke,
        device=device,
        progress=progress,
        cache_dir=cache_dir,
        token=token,
        allow_unchecked=bool(allow_unchecked),
    )
    if not isinstance(spec, PreparedAdapter):
        source = (
            spec
            if isinstance(spec, AdapterSource)
            else resolve_adapter_source(str(spec), cache_dir=cache_dir, token=token)
        )
        try:
            spec = prepare(source, base=base, cache_dir=cache_dir, token=token)
        except (AdapterConfigError, AdapterFormatError) as exc:
            return unreadable_report(source, options, exc, strict=strict)
    return run_checks(spec, options, strict=strict, checks=checks)


def plan_normalize(
    spec: AdapterSpec,
    *,
    base: str | None = None,
    rank: int | None = None,
    drop_unsupported: bool = False,
    cache_dir=None,
    token=None,
    layout: str = "stacked",
) -> Plan:
    """The stacked plan of an adapter against its base (headers, config and schema only), with what `layout` keeps
    (vision modules for `peft`) and its refusal hints naming the file that layout writes. A shipped preset standing
    in for the base named is a note in `plan.notes`."""
    adapter = prepared(spec, base=base, cache_dir=cache_dir, token=token)
    return adapter.plan(rank=rank, drop_unsupported=drop_unsupported, layout=layout)


def normalize(
    spec: AdapterSpec,
    output: str | os.PathLike | None,
    *,
    base: str | None = None,
    rank: int | None = None,
    dtype: str = "keep",
    dry_run: bool = False,
    force: bool = False,
    drop_unsupported: bool = False,
    cache_dir=None,
    token=None,
    progress: WriteProgress | None = None,
    layout: str = "stacked",
    allow_non_finite: bool = False,
) -> NormalizeResult:
    """The whole `normalize` command: check the output folder, plan, then (unless dry_run) write `layout`
    (lora_convert/convert/normalize.py). Every refusal is raised (UnsupportedAdapterError) while planning, dry run
    or not, before anything is written. The output folder is refused, before any planning, when it is, contains or
    lies inside the adapter or a local base, or is the working directory; --force replaces only a previous output."""
    from lora_convert.convert.normalize import WriteChoices, write_normalized
    from lora_convert.io.output_folder import check_output_dir, protected_inputs

    started = time.perf_counter()
    output = Path(output) if output is not None else None
    protected = protected_inputs(_local_adapter_folder(spec), base)
    if output is not None and not dry_run:
        check_output_dir(output, force=force, protected=protected)  # fail before seconds of planning
    plan = plan_normalize(
        spec, base=base, rank=rank, drop_unsupported=drop_unsupported, cache_dir=cache_dir, token=token, layout=layout
    )
    choices = WriteChoices(layout, dtype, dry_run, force, drop_unsupported, allow_non_finite)
    return write_normalized(plan, output, choices, protected=protected, started=started, progress=progress)


def _local_adapter_folder(spec: AdapterSpec) -> Path | None:
    if isinstance(spec, PreparedAdapter):
        return spec.source.path
    path = Path(os.fspath(spec)).expanduser()
    if not path.exists():
        return None
    return path if path.is_dir() else path.parent


def smoke(
    spec: AdapterSpec,
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
    """Smoke-test a PEFT adapter (normalized in memory) or a stacked output against its original
    (lora_convert/smoke/runner.py). The machine is checked first: without torch and triton, exit 3 whatever the
    adapter."""
    from lora_convert.smoke.runner import run_smoke, smoke_machine
    from lora_convert.smoke.target import peft_target, stacked_layout_of, stacked_target

    machine = smoke_machine(device, tokens)
    if isinstance(spec, PreparedAdapter):
        source, layout = spec.source, None
    else:
        source = resolve_adapter_source(os.fspath(spec), cache_dir=cache_dir, token=token)
        layout = stacked_layout_of(source)
    if layout is None:
        if original is not None:
            raise UsageError(
                f"--original is only for stacked outputs, and {spec} has no lora_layout.json.",
                hint="Drop --original to smoke-test a PEFT adapter directly (it is normalized in memory).",
            )
        adapter = (
            spec if isinstance(spec, PreparedAdapter) else prepare(source, base=base, cache_dir=cache_dir, token=token)
        )
        target = peft_target(source, adapter.plan(drop_unsupported=True))
    else:
        if original is None:
            raise UsageError(
                f"{spec} is a stacked output; the smoke check needs the original PEFT adapter to compare with.",
                hint="Pass --original PATH (the adapter it was normalized from).",
            )
        base = base or layout.get("base")
        adapter = prepare(original, base=base, cache_dir=cache_dir, token=token)
        target = stacked_target(source, layout, adapter.plan(drop_unsupported=bool(layout.get("dropped"))))
    return run_smoke(target, machine, original=original, tokens=tokens, layers=layers, seed=seed, progress=progress)


def predict(
    engine: str, adapter_spec: AdapterSpec, base_spec: str | os.PathLike, server_args: str | None = None
) -> EnginePrediction:
    """`predict_engine` for an adapter (folder, Hub id or prepared) and a base (folder, config.json, preset or Hub
    id), as the engine proofs (tests/engine_proof/) compare it with the engines' own code; `server_args`: the
    server's flags (one command line), else the release's defaults."""
    from lora_convert.check.engine import predict_engine
    from lora_convert.engines.server_args import parse_server_args

    server = parse_server_args(engine, server_args)
    adapter = prepared(adapter_spec, base=os.fspath(base_spec))
    adapter.require_valid_config()
    adapter.require_arch()
    return predict_engine(engine, adapter, server_args=server)
