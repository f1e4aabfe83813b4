"""The prepared adapter: one adapter read once, with its base, architecture, shape findings and plans.

`prepare` reads the adapter (headers and config only) and returns a `PreparedAdapter`; everything after that is
computed on first use and kept: the resolved base and bound architecture (`base`), the shape check's findings
(`shape_findings`), and the normalize plan for each set of planning choices (`plan`). Every command and check takes
this value instead of a path, so `validate --engine E --smoke` reads and plans an adapter once (tests/test_prepared.py
counts it).

Computing lazily keeps each command's order of errors: `normalize` on an adapter whose adapter_config.json is
invalid reports that before it resolves the base, as a strict read would; `validate` reads the config leniently and
reports every problem as a finding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_convert.errors import UsageError
from lora_convert.io.source import AdapterSource, resolve_adapter_source
from lora_convert.peft.adapter import Adapter, config_error, load_adapter
from lora_convert.peft.mlx_format import FILE_FORMAT as MLX_FORMAT
from lora_convert.peft.mlx_format import is_mlx_adapter, load_mlx_adapter
from lora_convert.pipeline.gguf_base import read_gguf_adapter

# The base, the shape check and the plan import their stages when first asked for: `inspect` asks for none of them
# (docs/benchmarks.md, the 94,000-tensor inspect).
if TYPE_CHECKING:
    from lora_convert.check.base_resolution import BaseResolution
    from lora_convert.check.layout_copies import LayoutCopy
    from lora_convert.convert.plan import Plan
    from lora_convert.findings import Finding

__all__ = ["PreparedAdapter", "prepare"]


@dataclass(eq=False)
class PreparedAdapter:
    """An adapter and what is derived from it, each computed once. `base_spec` is --base as the user gave it (None:
    the adapter's base_model_name_or_path)."""

    adapter: Adapter
    base_spec: str | None = None
    cache_dir: Any = None
    token: str | None = None
    _plans: dict[tuple, Plan] = field(default_factory=dict, init=False, repr=False)

    @property
    def source(self) -> AdapterSource:
        return self.adapter.source

    @cached_property
    def base(self) -> BaseResolution:
        """The base model and its architecture; an explicit --base that names nothing raises, anything else that
        leaves no architecture is in `base.findings` (and `base.error`). An mlx-lm adapter names no base: without
        --base it raises UsageError."""
        if self.base_spec is None and self.adapter.file_format == MLX_FORMAT:
            raise UsageError(
                f"{self.source.describe()} is an mlx-lm adapter (its adapter_config.json has mlx-lm's "
                "lora_parameters and num_layers), and mlx-lm's config names no base model.",
                hint="Pass --base with the base model (a folder or config.json, a Hub id, or a preset).",
            )
        from lora_convert.check.base_resolution import resolve_adapter_base

        return resolve_adapter_base(self.adapter, self.base_spec, cache_dir=self.cache_dir, token=self.token)

    @property
    def arch(self):
        return self.base.arch

    @cached_property
    def shape_findings(self) -> list[Finding]:
        """Every module's shapes against the architecture schema; empty when there is no architecture. The copies
        an engine layout wrote on purpose (`layout_copies`) are reported as such, not as misplaced modules."""
        from lora_convert.check.layout_copies import with_layout_copies
        from lora_convert.check.shape_check import check_shapes

        if self.arch is None:
            return []
        return with_layout_copies(check_shapes(self.adapter, self.arch), self.layout_copies)

    @cached_property
    def layout_copies(self) -> list[LayoutCopy]:
        """The modules lora-convert's own engine-layout output holds twice on purpose, verified (check/layout_copies.py)."""
        from lora_convert.check.layout_copies import find_layout_copies

        return find_layout_copies(self) if self.arch is not None else []

    def require_valid_config(self) -> None:
        """Raise the AdapterConfigError a strict read raises when adapter_config.json has errors."""
        problem = config_error(self.adapter.config, self.source.path / "adapter_config.json")
        if problem is not None:
            raise problem

    def require_arch(self):
        """The bound architecture, or the error that prevented it (the base unresolvable or without a schema)."""
        if self.arch is None:
            raise self.base.error
        return self.arch

    def plan(
        self, *, rank: int | None = None, drop_unsupported: bool = False, layout: str = "stacked", shapes: bool = True
    ) -> Plan:
        """The stacked plan for these choices (built once per distinct choice). `layout` decides whether vision
        modules are kept and modules PEFT cannot apply refused (both `--layout peft`), and which file refusal hints
        name. Raises what makes the adapter unconvertible -- its config, its base, adapter-level problems including
        (with `shapes`) shape errors -- and, unless `drop_unsupported`, the modules the plan refuses."""
        from lora_convert.convert.engine_layouts import keeps_vision
        from lora_convert.convert.layout_rules import PEFT_LAYOUT
        from lora_convert.convert.output_config import listing_file
        from lora_convert.convert.plan import refuse_unusable_adapter

        self.require_valid_config()
        arch = self.require_arch()
        refuse_unusable_adapter(self.adapter, self.shape_findings if shapes else [])
        keep_vision = keeps_vision(layout)
        # The listing file only appears in the refusal raised without drop_unsupported: it is not part of the plan.
        listed_in = None if drop_unsupported else listing_file(layout)
        peft_applies = layout.partition("==")[0] == PEFT_LAYOUT
        key = (rank, drop_unsupported, keep_vision, listed_in, peft_applies)
        if key not in self._plans:
            self._plans[key] = self._build_plan(arch, rank, drop_unsupported, keep_vision, listed_in, peft_applies)
        return self._plans[key]

    def _build_plan(
        self,
        arch,
        rank: int | None,
        drop_unsupported: bool,
        keep_vision: bool,
        listed_in: str | None,
        peft_applies: bool,
    ) -> Plan:
        from lora_convert.convert.plan import build_plan

        plan = build_plan(
            self.adapter,
            arch,
            base_name=self.base.name,
            rank=rank,
            drop_unsupported=drop_unsupported,
            keep_vision=keep_vision,
            listed_in=listed_in,
            peft_applies=peft_applies,
        )
        note = self.base.config.substitution_note
        if note:  # validate's `base.preset`: the plan is the preset's, which the user must know
            plan.notes.append(
                f"{note} Pass --base with the base model's folder or config.json to convert against its exact config."
            )
        return plan


def prepare(
    spec: str | Path | AdapterSource, *, base: str | None = None, cache_dir=None, token: str | None = None
) -> PreparedAdapter:
    """Read an adapter (a folder, a Hub id or a resolved source) once, headers and config only. Raises what leaves
    nothing to read: UsageError / AdapterNotFoundError (no such adapter), AdapterConfigError (adapter_config.json
    unreadable), AdapterFormatError (tensor files unreadable), EnvironmentProblem (the Hub unreachable)."""
    source = (
        spec if isinstance(spec, AdapterSource) else resolve_adapter_source(str(spec), cache_dir=cache_dir, token=token)
    )
    adapter = read_gguf_adapter(spec, source, base, cache_dir=cache_dir, token=token)  # None: not a GGUF adapter
    if adapter is None:
        if is_mlx_adapter(source.path):
            adapter = load_mlx_adapter(source, _schema_family(base, cache_dir=cache_dir, token=token))
        else:
            adapter = load_adapter(source, strict_config=False)
    return PreparedAdapter(adapter, base_spec=base, cache_dir=cache_dir, token=token)


def _schema_family(base: str | None, *, cache_dir=None, token: str | None = None) -> str | None:
    """The schema family of `--base`, which names an mlx-lm adapter's modules in transformers' terms (None without
    a base: mlx-lm's own paths are listed)."""
    if base is None:
        return None
    from lora_convert.arch.base_config import resolve_base  # as the other stages: only an mlx adapter needs it here
    from lora_convert.arch.schema import bind

    return bind(resolve_base(base, cache_dir=cache_dir, token=token)).schema.family
