"""The base model of a validate run: resolved once, before the checks, from --base or base_model_name_or_path.

An explicit --base that cannot be resolved raises (the user asked for it); an implicit one that does not resolve,
or a base whose family has no schema, is a warning naming the checks it leaves out, and the shape check it
prevents becomes `shapes.unchecked` (lora_convert/check/shapes.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_convert.arch.base_config import resolve_base
from lora_convert.arch.schema import bind
from lora_convert.codes import finding
from lora_convert.errors import InternalError, LoraConvertError
from lora_convert.findings import Finding

BASE_HINT = (
    "Pass --base with a folder holding config.json, a config.json file, a Hub repo id (org/name), or a preset "
    "name (`lora-convert schemas list`)."
)
NEEDS_ARCH = ["the shape check against the architecture schema", "expert counts"]
NEEDS_BASE = [
    "the shape check against the architecture schema",
    "layers past the end",
    "the added-token vocab check",
    "expert counts",
]


@dataclass
class BaseResolution:
    config: Any = None  # lora_convert.arch.base_config.BaseConfig, or None
    arch: Any = None  # lora_convert.arch.schema.Architecture, or None
    findings: list[Finding] = field(default_factory=list)  # base.unresolved / base.unsupported
    no_shapes_why: str | None = None  # why the shapes cannot be checked against the base
    error: LoraConvertError | None = None  # what prevented an architecture (raised by commands that need one)

    @property
    def name(self) -> str | None:
        return self.config.name if self.config is not None else None

    @property
    def text_config(self) -> dict:
        return (self.config.text_config or {}) if self.config is not None else {}


def _skipped(message: str, missing: list[str]) -> str:
    return message.rstrip(".") + ". Skipped: " + ", ".join(missing) + "."


def resolve_adapter_base(adapter, spec: str | None, *, cache_dir=None, token=None) -> BaseResolution:
    """Resolve the base (`spec`: --base, else the adapter's base_model_name_or_path) and bind its architecture.
    An explicit --base that names nothing raises; every other failure is a finding, and the error is kept."""
    adapter_base = adapter.config.base_model_name_or_path
    if not spec and not adapter_base:
        return _no_base(spec)
    try:
        base_cfg = resolve_base(spec, adapter_base_name=adapter_base, cache_dir=cache_dir, token=token)
    except LoraConvertError as exc:
        if spec:
            raise
        return _unresolved(adapter_base, exc)
    try:
        arch = bind(base_cfg)
    except LoraConvertError as exc:
        return _without_schema(base_cfg, exc)
    return BaseResolution(
        config=base_cfg, arch=arch, findings=preset_note(base_cfg) + base_model_findings(base_cfg, arch)
    )


def _no_base(spec: str | None) -> BaseResolution:
    message = "No base model: --base was not given and adapter_config.json has no base_model_name_or_path."
    return BaseResolution(
        error=_resolution_error(spec),
        findings=[
            finding("base.unresolved", _skipped(message, NEEDS_BASE), keys=["base_model_name_or_path"], fix=BASE_HINT)
        ],
        no_shapes_why="no --base, and adapter_config.json names no base model",
    )


def _unresolved(adapter_base: str, exc: LoraConvertError) -> BaseResolution:
    message = f"The adapter's base_model_name_or_path {adapter_base!r} could not be resolved ({exc.message})"
    return BaseResolution(
        findings=[
            finding(
                "base.unresolved",
                _skipped(message, NEEDS_BASE),
                keys=["base_model_name_or_path"],
                actual=adapter_base,
                fix=BASE_HINT,
            )
        ],
        no_shapes_why=f"the base model {adapter_base!r} could not be resolved",
        error=exc,
    )


def _without_schema(base_cfg, exc: LoraConvertError) -> BaseResolution:
    message = f"Base {base_cfg.name} (model_type {base_cfg.model_type!r}) has no architecture schema: {exc.message}"
    unsupported = finding(
        "base.unsupported",
        _skipped(message, NEEDS_ARCH),
        actual=base_cfg.model_type,
        fix="`lora-convert schemas list` shows the supported families.",
    )
    return BaseResolution(
        config=base_cfg,
        findings=[unsupported, *preset_note(base_cfg), *base_model_findings(base_cfg, None)],
        no_shapes_why=f"no schema for model_type {base_cfg.model_type!r}",
        error=exc,
    )


def _resolution_error(spec: str | None) -> LoraConvertError:
    """The error resolving no base at all raises (an empty --base, or none given and none named by the adapter)."""
    try:
        resolve_base(spec)
    except LoraConvertError as exc:
        return exc
    raise InternalError("resolve_base found a base where there is none to resolve.")


def preset_note(base_cfg) -> list[Finding]:
    """`base.preset` when a shipped preset stands in for the base asked for (docs/validate.md promises the note):
    the verdict is then about the preset's config, which the reader must know."""
    if not base_cfg.substitution:
        return []
    return [
        finding(
            "base.preset",
            base_cfg.substitution_note,
            fix="Pass --base with the base model's folder or config.json to check against its exact config.",
        )
    ]


def base_model_findings(base_cfg, arch) -> list[Finding]:
    """The base's quantization per module family and its checkpoint index, from config and shard headers only
    (lora_convert/check/base_checkpoint.py): info when quantized, errors only for a checkpoint that contradicts
    its config."""
    from lora_convert.check.base_checkpoint import base_findings

    return base_findings(base_cfg, arch)
