"""The public Python API: one function per command, the same functions the CLI commands call.

Each function accepts `str` or `os.PathLike` paths (and a Hub id string for the adapter), checks its arguments
(raising `UsageError` for a bad name or value), calls the library function that does the work and returns a
documented result object. Problems raise the typed errors of `lora_convert.errors`; docs/api.md says which, and
which CLI exit code each one becomes.

This module is imported lazily by `lora_convert.__getattr__`; it imports the heavy modules only inside the
functions, so that `import lora_convert` stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from lora_convert.errors import AdapterNotFoundError, UsageError
from lora_convert.io.dtypes import OUTPUT_DTYPE_CHOICES

if TYPE_CHECKING:
    from lora_convert.check.validate import ValidationReport
    from lora_convert.convert.normalize import NormalizeResult, WriteProgress
    from lora_convert.scan.report import ScanResult

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "FleetPage",
    "InspectResult",
    "fleet_page",
    "inspect_adapter",
    "validate_adapter",
    "normalize_adapter",
    "scan_adapters",
]

DTYPES = OUTPUT_DTYPE_CHOICES  # `dtype` of normalize_adapter: "keep" or a choice of the dtype table


def layouts() -> tuple[str, ...]:
    """Every `layout` normalize_adapter writes: `stacked`, `peft`, then one per engine with a rule file
    (lora_convert/engines/<engine>-<version>.json), which may also be named with its release: `sglang==0.5.23`."""
    from lora_convert.convert.layout_rules import output_layouts

    return output_layouts()


def _built_in_layouts() -> tuple[str, ...]:
    """The layouts that are not an engine's: `stacked` and `peft`."""
    from lora_convert.convert.layout_rules import BUILT_IN_LAYOUTS

    return BUILT_IN_LAYOUTS


# ------------------------------------------------------------------------------------------ argument checks
def _adapter_spec(adapter: Any) -> str:
    """What the library resolves: a `str` may be a folder or a Hub id; a path object is always a folder."""
    if isinstance(adapter, str):
        return adapter
    if isinstance(adapter, os.PathLike):
        path = os.fsdecode(adapter)
        # Without this a Path("org/name") that does not exist would be fetched from the Hub.
        if not Path(path).expanduser().exists():
            raise AdapterNotFoundError(
                f"No adapter folder at {path!r}.",
                hint="Check the path; a Hub id is passed as a str such as 'org/name'.",
            )
        return path
    raise UsageError(
        f"adapter must be a str or os.PathLike, got {type(adapter).__name__}.",
        hint="Pass a folder path or a Hub id such as 'org/name'.",
    )


def _optional_path(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fsdecode(value)
    raise UsageError(f"{name} must be a str, os.PathLike or None, got {type(value).__name__}.")


def _optional_text(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise UsageError(f"{name} must be a str or None, got {type(value).__name__}.")


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    text = value.value if hasattr(value, "value") else value  # the CLI passes its Enum members
    if not isinstance(text, str) or text.lower() not in choices:
        raise UsageError(f"Unknown {name} {value!r}.", hint=f"Use one of: {', '.join(choices)}.")
    return text.lower()


def _release(value: Any, name: str, fixed: tuple[str, ...]) -> str:
    """One of `fixed`, or an engine release: `sglang`, `vllm==0.33.0` (lora_convert/engines/rules.py). A name
    that is neither is one message listing every valid name once."""
    from lora_convert.engines.rules import installed_engines, releases, resolve_engine

    text = value.value if hasattr(value, "value") else value
    shown = text.strip().lower() if isinstance(text, str) else text
    if shown in fixed:
        return shown
    engine, _, version = shown.partition("==") if isinstance(shown, str) else (None, "", "")
    engines = installed_engines()
    if engine not in engines:
        article = "an" if name[0] in "aeiou" else "a"
        raise UsageError(
            f"--{name} {shown!r} is not {article} {name} lora-convert knows.",
            hint=f"Use one of: {', '.join((*fixed, *engines))} (an engine may name its release: "
            f"{', '.join(r.spec for r in releases())}).",
        )
    if version:
        try:
            resolve_engine(shown)
        except UsageError as exc:
            raise UsageError(f"--{name} {shown!r}: {exc.message}", hint=exc.hint) from None
    return shown


def _positive_int(value: Any, name: str) -> int | None:
    # bool is an int subclass; `rank=True` is a mistake, not rank 1.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}.")
    return value


# ----------------------------------------------------------------------------------------------- inspect
@dataclass
class InspectResult:
    """What `inspect_adapter` found, read from headers and config only (no tensor data).

    The fields are those of `lora-convert inspect --format json` (docs/api.md); `to_json()` returns that
    whole document, including any field added later that is not an attribute here.
    """

    ok: bool  # no finding has severity "error" (an invalid config is one); the CLI exits 0, else 1
    adapter: str  # the folder, or `org/name[@revision]` for a Hub adapter
    origin: str  # "local" or "hub"
    base_model: str | None  # the config's base_model_name_or_path
    file_format: str  # "safetensors", "safetensors-sharded" or "bin"
    files: list[str]  # the tensor files read
    stacked: bool  # True for a lora-convert stacked output (it has lora_layout.json)
    tensors: int  # number of tensors in the files
    dtypes: dict[str, int]  # safetensors dtype tag -> tensor count
    total_bytes: int  # bytes of tensor data
    total_params: int  # number of tensor elements
    config: dict[str, Any]  # valid, invalid_fields, errors, then r, lora_alpha, ... (None where missing or invalid)
    expert_layout: str  # "none", "per-expert-2d", "fused-3d" (PEFT 3-D) or "mixed"
    module_count: int  # number of LoRA modules
    families: dict[str, dict[str, Any]]  # display family -> {"modules": n, "entries": [per module name]}
    modules: list[dict[str, Any]]  # one entry per LoRA module (name, kind, layer, expert, rank, scaling, shapes)
    findings: list[dict[str, Any]]  # notes, warnings and errors: {"code", "severity", "message", ...}
    _document: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The JSON document of `lora-convert inspect --format json` (a copy)."""
        return dict(self._document)

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> InspectResult:
        """From `lora_convert.pipeline.inspect_report.build_report`'s document."""
        names = [f.name for f in fields(cls) if not f.name.startswith("_")]
        return cls(**{name: report.get(name) for name in names}, _document=dict(report))


def inspect_adapter(adapter: PathLike, *, cache_dir: PathLike | None = None, token: str | None = None) -> InspectResult:
    """What an adapter holds: files, dtypes, modules by family with ranks and scalings, the expert layout, and
    notes about its config. Reads headers only.

    An invalid adapter_config.json does not raise: it is reported in `config["errors"]` and makes `ok` False.
    Raises UsageError (bad argument), AdapterNotFoundError (no such folder or Hub repo), EnvironmentProblem (the
    Hub unreachable), AdapterFormatError (unreadable tensor files)."""
    from lora_convert.pipeline.commands import inspect

    spec = _adapter_spec(adapter)
    return InspectResult.from_report(inspect(spec, cache_dir=_optional_path(cache_dir, "cache_dir"), token=token))


# ---------------------------------------------------------------------------------------------- validate
def validate_adapter(
    adapter: PathLike,
    *,
    base: PathLike | None = None,
    engine: str = "none",
    tp: int | None = None,
    ep: int | None = None,
    data_scan: bool = True,
    smoke: bool | None = None,
    device: str = "auto",
    strict: bool = False,
    allow_unchecked: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cache_dir: PathLike | None = None,
    token: str | None = None,
    server_args: str | None = None,
    server_args_file: PathLike | None = None,
) -> ValidationReport:
    """Every check of `lora-convert validate` on one adapter; returns a `lora_convert.check.validate.ValidationReport`
    (`.ok` is the verdict). Problems in the adapter are findings in the report, not exceptions. `server_args` (one
    command line) or `server_args_file` (a file holding it): the flags the engine's server runs with, in the
    engine's own names (docs/validate.md, "Server flags"); without them the release's defaults are assumed.

    Raises UsageError (bad argument, no such folder), EnvironmentProblem (the Hub unreachable; with smoke=True and
    not allow_unchecked, torch/triton not installed or no CUDA for device="cuda")."""
    from lora_convert.check.validate import DEVICES
    from lora_convert.pipeline.commands import validate

    return validate(
        _adapter_spec(adapter),
        base=_optional_path(base, "base"),
        engine=_release(engine, "engine", ("none",)),
        tp=_positive_int(tp, "tp"),
        ep=_positive_int(ep, "ep"),
        data_scan=bool(data_scan),
        smoke=smoke,
        device=_choice(device, "device", DEVICES),
        strict=bool(strict),
        allow_unchecked=bool(allow_unchecked),
        progress=progress,
        cache_dir=_optional_path(cache_dir, "cache_dir"),
        token=token,
        server_args=_optional_text(server_args, "server_args"),
        server_args_file=_optional_path(server_args_file, "server_args_file"),
    )


# --------------------------------------------------------------------------------------------- normalize
def normalize_adapter(
    adapter: PathLike,
    output: PathLike | None = None,
    *,
    base: PathLike | None = None,
    layout: str = "stacked",
    rank: int | None = None,
    dtype: str = "keep",
    dry_run: bool = False,
    force: bool = False,
    drop_unsupported: bool = False,
    progress: WriteProgress | None = None,
    cache_dir: PathLike | None = None,
    token: str | None = None,
    allow_non_finite: bool = False,
) -> NormalizeResult:
    """Convert an adapter into `layout` (one of layouts(): "stacked", "peft", "sglang", "vllm") in `output`; with
    `dry_run=True` only plan. `progress` gets `start(total_bytes)` and then `advance(nbytes)` per group while
    the output is written (`lora_convert.convert.normalize.WriteProgress`). Returns a
    `lora_convert.convert.normalize.NormalizeResult`.

    Raises UsageError (bad argument, no output without dry_run, an output folder in the way),
    AdapterNotFoundError, EnvironmentProblem, AdapterFormatError / AdapterConfigError (unreadable adapter),
    BaseConfigError / SchemaError (base unresolvable or without a schema), UnsupportedAdapterError (modules it
    refuses to convert, unless drop_unsupported=True), NonFiniteValuesError (a subclass of it: NaN or Inf in a
    tensor to be written, found while writing; nothing is left in `output`; allow_non_finite=True writes them)."""
    from lora_convert.pipeline.commands import normalize

    spec = _adapter_spec(adapter)
    if progress is not None and not all(callable(getattr(progress, m, None)) for m in ("start", "advance")):
        # Caught here, not as an AttributeError after seconds of planning.
        raise UsageError(
            f"progress must have start(total_bytes) and advance(nbytes) methods, got {type(progress).__name__}.",
            hint="See lora_convert.convert.normalize.WriteProgress.",
        )
    out = _optional_path(output, "output")
    if out is None and not dry_run:
        raise UsageError(
            "normalize needs an output folder.", hint="Pass output=..., or dry_run=True to see the plan only."
        )
    return normalize(
        spec,
        Path(out) if out is not None else None,
        base=_optional_path(base, "base"),
        rank=_positive_int(rank, "rank"),
        dtype=_choice(dtype, "dtype", DTYPES),
        dry_run=bool(dry_run),
        force=bool(force),
        drop_unsupported=bool(drop_unsupported),
        cache_dir=_optional_path(cache_dir, "cache_dir"),
        token=token,
        progress=progress,
        layout=_release(layout, "layout", _built_in_layouts()),
        allow_non_finite=bool(allow_non_finite),
    )


# -------------------------------------------------------------------------------------------------- scan
def _scan_engines(engine: Any) -> list[str]:
    """The engine releases of a scan, in the order given, each release once (as the caller spelled it: the verdict
    names it so); [] for none. "all": every engine's newest release (its newest rule file)."""
    from lora_convert.engines.rules import installed_engines, resolve_engine

    items = [engine] if isinstance(engine, str) or hasattr(engine, "value") else list(engine or ["none"])
    names: list[str] = []
    seen: set[str] = set()
    for item in items:
        text = _release(item, "engine", ("none", "all"))
        for one in installed_engines() if text == "all" else [] if text == "none" else [text]:
            if resolve_engine(one).spec not in seen:
                seen.add(resolve_engine(one).spec)
                names.append(one)
    return names


def _scan_server_args(engines: list[str], text: Any, file: Any) -> str | None:
    """The server flags of a scan as one command line (a file read here, once), checked for its one engine."""
    import shlex

    from lora_convert.engines.server_args import parse_server_args, server_args_words

    words = server_args_words(_optional_text(text, "server_args"), _optional_path(file, "server_args_file"))
    if words is None:
        return None
    if len(engines) > 1:
        raise UsageError(
            f"--server-args describe one engine's server, but the scan checks several releases ({', '.join(engines)}).",
            hint="Scan once per engine, each with its server's flags.",
        )
    line = shlex.join(words)
    parse_server_args(engines[0] if engines else "none", line)  # a bad flag is exit 2 before the scan starts
    return line


def scan_adapters(
    sources: PathLike | list[PathLike],
    *,
    base: PathLike | None = None,
    engine: str | list[str] | tuple[str, ...] = "none",
    checks: list[str] | tuple[str, ...] | None = None,
    data_scan: bool = True,
    smoke: bool = False,
    strict: bool = False,
    allow_unchecked: bool = False,
    normalize: PathLike | None = None,
    layout: str | None = None,
    jobs: int | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    timeout: float = 600.0,
    output: PathLike | None = None,
    resume: bool = False,
    html: PathLike | None = None,
    on_start: Callable[[list[Any]], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    server_args: str | None = None,
    server_args_file: PathLike | None = None,
) -> ScanResult:
    """`lora-convert scan`: validate every adapter of `sources` (folders searched recursively, list files, Hub
    ids) in `jobs` worker processes (or on Ray with `ray=True`), appending one JSON record per adapter to `output`;
    with `normalize`, also convert each adapter without errors into normalize/<id> in `layout`. `engine` may be one
    release, a list of them (each adapter is checked against every one; the record's "engines" counts each
    release's outcomes) or "all" (every engine's newest release); `server_args` / `server_args_file`: the flags of
    that one engine's server, as for validate_adapter. With `html`, the fleet page of every record is
    written there when the scan ends, also when it was interrupted (`result.page`; docs/fleet-page.md). Returns a
    `lora_convert.scan.report.ScanResult` (`.records`, `.summary`, `.ok`, `.interrupted`, `.to_json()`).

    Raises UsageError (bad argument, no SOURCE, an existing report without resume), EnvironmentProblem (ray=True
    without Ray installed). Problems of single adapters are records, never exceptions."""
    from lora_convert.check.validate import CHECK_NAMES
    from lora_convert.scan.report import run_scan
    from lora_convert.scan.task import ScanOptions

    items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    specs = [_adapter_spec(s) if isinstance(s, os.PathLike) else s for s in items]
    if not all(isinstance(s, str) for s in specs):
        raise UsageError("sources must be str or os.PathLike values.")
    selected = None
    if checks is not None:
        unknown = [c for c in checks if c not in CHECK_NAMES]
        if unknown or not checks:
            raise UsageError(f"Unknown check group(s) {unknown or checks!r}.", hint=f"Use: {', '.join(CHECK_NAMES)}.")
        selected = tuple(c for c in CHECK_NAMES if c in checks)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise UsageError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    engines = _scan_engines(engine)
    flags = _scan_server_args(engines, server_args, server_args_file)
    options = ScanOptions(
        base=_optional_path(base, "base"),
        engine=engines[0] if engines else "none",
        more_engines=tuple(engines[1:]),
        server_args=flags,
        checks=selected,
        data_scan=bool(data_scan),
        smoke=bool(smoke),
        allow_unchecked=bool(allow_unchecked),
        strict=bool(strict),
        layout=_release(layout, "layout", _built_in_layouts()) if layout is not None else None,
        normalize_root=_optional_path(normalize, "normalize"),
        timeout_s=float(timeout),
    )
    page = _optional_path(html, "html")
    output_path = _optional_path(output, "output")
    if page is not None:
        from lora_convert.scan.fleet import check_page_path

        check_page_path(page, keep=(output_path,) if output_path else ())  # before the scan, not after it
    result = run_scan(
        specs,
        options,
        output=output_path,
        resume=bool(resume),
        jobs=_positive_int(jobs, "jobs"),
        backend="ray" if ray or ray_address else "local",
        address=ray_address,
        on_start=on_start,
        on_record=on_record,
    )
    if page is not None:
        from lora_convert.scan.fleet import render_page, write_page

        html_text = render_page(
            result.records, complete=not result.interrupted, discovered=result.discovered, source=output_path
        )
        result.page = str(write_page(html_text, page, keep=(output_path,) if output_path else ()))
    return result


# ------------------------------------------------------------------------------------------------ report
@dataclass
class FleetPage:
    """What `fleet_page` wrote."""

    path: str  # the page
    adapters: int  # records on it
    complete: bool  # False when the report ended in a torn line (a killed scan)


def fleet_page(report: PathLike, html: PathLike) -> FleetPage:
    """`lora-convert report REPORT.jsonl --html OUT.html`: the fleet page of an existing scan report (a resumed or
    interrupted one too: a torn last line is left out and the page says the scan is incomplete).

    Raises UsageError (no such report, a file that is not a scan report, an --html path that is a folder, the
    report itself, or a file that is not a previous fleet page)."""
    from lora_convert.scan.fleet import check_page_path, render_page, write_page
    from lora_convert.scan.report import read_report

    report_path = _optional_path(report, "report")
    page = _optional_path(html, "html")
    if report_path is None or page is None:
        raise UsageError("fleet_page needs a report and an html path.")
    path = Path(report_path)
    if not path.exists():
        raise UsageError(f"No report at {report_path}.", hint="Pass the JSONL file of `lora-convert scan --output`.")
    if not path.is_file():
        raise UsageError(f"The report {report_path} is not a file.", hint="Pass the JSONL file of `scan --output`.")
    check_page_path(page, keep=(report_path,))
    try:
        records, good = read_report(path)
    except UsageError as exc:
        raise UsageError(exc.message, hint="Pass the JSONL file of `lora-convert scan --output`.") from None
    complete = good == path.stat().st_size
    text = render_page(records, complete=complete, source=report_path)
    return FleetPage(str(write_page(text, page, keep=(report_path,))), len(records), complete)


# ------------------------------------------------------------------------------------------------ engines
def engine_releases() -> list[dict[str, Any]]:
    """`lora-convert engines list`: every engine release that has a rule file, oldest first per engine, as
    `{"engine", "version", "spec", "label", "file", "extends" (the release it inherits from, or None), "rules",
    "newest" (what `--engine ENGINE` means)}`. Raises SchemaError for a rule file that does not load."""
    from lora_convert.engines.rules import engine_info, load_rules, releases

    known = releases()
    newest = {r.engine: r for r in known}  # sorted by version: the last of each engine wins
    return [
        {
            "engine": r.engine,
            "version": r.version,
            "spec": r.spec,
            "label": engine_info(r.spec)["label"],
            "file": f"lora_convert/engines/{r.file}",
            "extends": engine_info(r.spec).get("extends"),
            "rules": len(load_rules(r.spec)),
            "newest": newest[r.engine] == r,
        }
        for r in known
    ]


def _rule_summary(rule: dict | None) -> dict[str, Any] | None:
    if rule is None:
        return None
    return {k: rule.get(k) for k in ("outcome", "feature", "message", "fix", "source")}


def engines_diff(
    old: str,
    new: str,
    adapter: PathLike | None = None,
    *,
    base: PathLike | None = None,
    all_modules: bool = False,
    cache_dir: PathLike | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """`lora-convert engines diff OLD NEW [ADAPTER]`: what differs between two releases of one engine.

    Without an adapter: the rules (`"rules"`: added, removed, or changed with the fields that differ: outcome,
    message, fix, feature, params, layout_effect, source, each side's outcome, message and source) and the
    `layout` keys that differ. With an adapter: the prediction of each release (`"load_failure"`: the rules that
    make loading fail, per release) and per module of the adapter `{"module", "old", "new"}`, each `exact`,
    `dropped`, `wrong` or `load failure` (the release refuses the whole adapter), only the modules whose
    prediction differs unless `all_modules`. Raises UsageError (an unknown release, two engines), and what reading
    the adapter raises."""
    from lora_convert.engines.rules import diff_layouts, diff_rules, engine_info, resolve_engine

    releases_ = [resolve_engine(old), resolve_engine(new)]
    if releases_[0].engine != releases_[1].engine:
        raise UsageError(
            f"engines diff compares two releases of one engine, got {releases_[0].spec} and {releases_[1].spec}.",
            hint="Name two releases of the same engine, e.g. `lora-convert engines diff vllm==0.33.0 vllm==0.34.0`.",
        )
    specs = [r.spec for r in releases_]
    out: dict[str, Any] = {"old": specs[0], "new": specs[1], "labels": [engine_info(s)["label"] for s in specs]}
    if adapter is None:
        changes = diff_rules(*specs)
        out["rules"] = [{**c, "old": _rule_summary(c["old"]), "new": _rule_summary(c["new"])} for c in changes]
        out["layout"] = diff_layouts(*specs)
        return out
    return {**out, **_prediction_diff(specs, adapter, base, all_modules, cache_dir, token)}


def _prediction_diff(specs, adapter, base, all_modules, cache_dir, token) -> dict[str, Any]:
    """The per-module part of `engines_diff`: the adapter read once, each release's prediction of it."""
    from lora_convert.pipeline.commands import predict, prepared

    spec = _adapter_spec(adapter)
    adapter_ = prepared(spec, base=_optional_path(base, "base"), cache_dir=cache_dir, token=token)
    # predict() takes a prepared adapter as it is (the base it was prepared with)
    old, new = (predict(s, adapter_, base or "") for s in specs)

    def outcome(prediction, module: str) -> str:
        return "load failure" if prediction.load_failure else prediction.modules.get(module, "exact")

    names = list(dict.fromkeys([*old.modules, *new.modules]))
    rows = [{"module": m, "old": outcome(old, m), "new": outcome(new, m)} for m in names]
    return {
        "adapter": spec,
        "load_failure": {"old": list(old.load_failure), "new": list(new.load_failure)},
        "unchecked": {"old": old.unchecked, "new": new.unchecked},
        "modules_total": len(rows),
        "modules_differing": sum(r["old"] != r["new"] for r in rows),
        "modules": rows if all_modules else [r for r in rows if r["old"] != r["new"]],
    }
