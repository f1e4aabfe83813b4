"""The smoke forward's result: per slice, per group and for the run, with its findings and its JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_convert.codes import finding
from lora_convert.findings import Finding

# Relative-error tolerances per stored dtype (||out - ref|| / ||ref||).
TOLERANCES = {"F32": 1e-5, "F16": 2e-3, "BF16": 1.6e-2, "F64": 1e-5}


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
