"""`adapter_config.json` and PEFT's rules for it.

Semantics follow PEFT (0.21): a module's rank and alpha come from `rank_pattern` / `alpha_pattern` when a
pattern key K matches its target name T (`re.match(rf"(.*\\.)?({K})$", T)`, first match in dict order), else
from `r` / `lora_alpha`; scaling is alpha / r, or alpha / sqrt(r) with `use_rslora`. T is the module path
without `base_model.model.`; for a 3-D parameter (target_parameters) it is the module path + "." + parameter.

Parsing never stops at the first problem: every field that is missing or of the wrong type becomes a finding,
and the caller decides whether errors are fatal (normalize, inspect) or reported (validate).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_convert.codes import finding
from lora_convert.errors import AdapterConfigError
from lora_convert.findings import Finding, Severity
from lora_convert.io.small_files import read_small_json

# LoRA variants that change what the stored tensors mean; no serving engine computes them, so converting the
# tensors as plain LoRA would be silently wrong. Values: the config field and what it means.
UNSUPPORTED_VARIANTS: dict[str, str] = {
    "use_qalora": "QALoRA (quantization-aware pooling of the input)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "arrow_config": "Arrow (routing among several LoRA experts)",
    "kasa_config": "KaSA (singular-value adaptation)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA (stochastic factors)",
    "alora_invocation_tokens": "activated LoRA (applies only after invocation tokens)",
    "layer_replication": "layer replication (the adapter's model has more layers than the base)",
}
# Initialisation-only fields: they shaped training but not what the saved tensors mean.
# The fields parse_config checks, in the order it checks them; a config that is not an object has all invalid.
CONFIG_FIELDS = (
    "peft_type",
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "target_modules",
    "target_parameters",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "bias",
    "base_model_name_or_path",
)


@dataclass
class PeftConfig:
    raw: dict[str, Any]
    peft_type: str = "LORA"
    r: int = 8
    lora_alpha: float = 8.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    target_modules: list[str] | str | None = None
    target_parameters: list[str] = field(default_factory=list)
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    bias: str = "none"
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    trainable_token_indices: Any = None
    base_model_name_or_path: str | None = None
    variants: dict[str, str] = field(default_factory=dict)  # unsupported variant field -> description
    findings: list[Finding] = field(default_factory=list)
    # Fields whose value in the file is missing or invalid (in file order of the checks). Their attributes
    # above hold placeholders so that the tensors can still be listed; nothing may present those as the config.
    invalid: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def is_valid(self) -> bool:
        return not self.errors

    def rank_known(self, target_name: str) -> bool:
        """Whether rank_for(target_name) is what the file says. An invalid rank_pattern entry might have been
        the first match, so any invalid entry makes every pattern-derived rank unknown."""
        if "rank_pattern" in self.invalid:
            return False
        return match_pattern(self.rank_pattern, target_name) is not None or "r" not in self.invalid

    def scaling_known(self, target_name: str) -> bool:
        """Whether scaling_for(target_name) is what the file says (rank, alpha and use_rslora all known)."""
        if not self.rank_known(target_name) or {"alpha_pattern", "use_rslora"} & set(self.invalid):
            return False
        return match_pattern(self.alpha_pattern, target_name) is not None or "lora_alpha" not in self.invalid

    # --- PEFT semantics -------------------------------------------------------------------------------------
    def rank_for(self, target_name: str) -> int:
        key = match_pattern(self.rank_pattern, target_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, target_name: str) -> float:
        key = match_pattern(self.alpha_pattern, target_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scaling_for(self, target_name: str, rank: int | None = None) -> float:
        """PEFT's scaling for a module; `rank` overrides the config rank (PEFT uses the config rank)."""
        r = rank if rank is not None else self.rank_for(target_name)
        alpha = self.alpha_for(target_name)
        if r <= 0:
            return 0.0
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def pattern_sources(self, target_name: str) -> dict[str, str | None]:
        return {
            "rank_pattern": match_pattern(self.rank_pattern, target_name),
            "alpha_pattern": match_pattern(self.alpha_pattern, target_name),
        }

    def targets_parameter(self, module_path: str, param: str) -> bool:
        """PEFT's target_parameters rule: `<module>.<param>` equals an entry or ends with `.` + entry."""
        full = f"{module_path}.{param}"
        return any(full == t or full.endswith("." + t) for t in self.target_parameters)

    @property
    def has_patterns(self) -> bool:
        return bool(self.rank_pattern or self.alpha_pattern)


def match_pattern(patterns: dict[str, Any], target_name: str) -> str | None:
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", target_name):
                return pattern
        except re.error:
            continue  # reported once by parse_config
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


_JSON_TYPE_NAMES = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: users edit JSON, so `list` or `str` would not tell them much."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _text(value: Any) -> str:
    """A value as the user wrote it in JSON, cut short."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _shown(value: Any) -> Any:
    """`actual` of a finding: scalars as they are (so "8" and 8 stay distinct), containers as short JSON text."""
    return value if value is None or isinstance(value, (str, bool, int, float)) else _text(value)


def parse_config(raw: Any, *, source: str = "adapter_config.json") -> PeftConfig:
    """Build a PeftConfig from the parsed JSON; every problem becomes a finding in `config.findings`.

    A field whose value is missing or invalid keeps a placeholder (so that downstream code can still list the
    tensors) and is named in `config.invalid`; report code must show it as invalid, never as the placeholder.
    """
    if not isinstance(raw, dict):
        cfg = PeftConfig(raw={}, invalid=list(CONFIG_FIELDS))
        cfg.findings.append(
            finding(
                "config.not-an-object",
                f"{source} must hold a JSON object, but it holds {json_type(raw)}: {_text(raw)}.",
                keys=[source],
                expected="a JSON object",
                actual=_shown(raw),
                fix="Save the adapter again with PEFT's save_pretrained; adapter_config.json is one object of fields.",
            )
        )
        return cfg
    return _ConfigParser(raw, source).parse()


class _ConfigParser:
    """parse_config's steps, one field family each; every problem becomes a finding, never an exception."""

    def __init__(self, raw: dict, source: str):
        self.raw = raw
        self.source = source
        self.cfg = PeftConfig(raw=raw)
        self.findings: list[Finding] = []

    def invalid(self, field_name: str, finding: Finding) -> None:
        """Record `finding` and mark the field invalid (it keeps a placeholder)."""
        self.findings.append(finding)
        if field_name not in self.cfg.invalid:
            self.cfg.invalid.append(field_name)

    def wrong_type(self, field_name: str, expected: str, value: Any = None, *, key: str | None = None) -> None:
        source = self.source
        value = self.raw[field_name] if key is None else value
        self.invalid(
            field_name,
            finding(
                "config.wrong-type",
                f"{source}: `{key or field_name}` should be {expected}, got {_text(value)} ({json_type(value)}).",
                keys=[key or field_name],
                expected=expected,
                actual=_shown(value),
                fix=f"Fix `{field_name}` in {source}.",
            ),
        )

    def missing(self, field_name: str, why: str, expected: str, fix: str) -> None:
        source = self.source
        self.invalid(
            field_name,
            finding(
                "config.missing-field",
                f"{source} has no `{field_name}` ({why}).",
                keys=[field_name],
                expected=expected,
                fix=fix,
            ),
        )

    def peft_type(self) -> None:
        """`peft_type`: LORA, assumed when absent."""
        raw, cfg, source = self.raw, self.cfg, self.source
        peft_type = raw.get("peft_type")
        if peft_type is None:
            self.findings.append(
                finding(
                    "config.peft-type-assumed",
                    f"{source} has no `peft_type`; assuming LORA.",
                    keys=["peft_type"],
                    expected="LORA",
                )
            )
        elif not isinstance(peft_type, str):
            self.wrong_type("peft_type", "a string")
        elif peft_type.upper() != "LORA":
            self.findings.append(
                finding(
                    "config.not-lora",
                    f"{source} says peft_type {peft_type!r}; lora-convert handles LoRA adapters only.",
                    keys=["peft_type"],
                    expected="LORA",
                    actual=peft_type,
                )
            )
        else:
            cfg.peft_type = "LORA"

    def rank(self) -> None:
        """`r`: a positive integer."""
        raw, cfg, source = self.raw, self.cfg, self.source
        if "r" not in raw:
            self.missing(
                "r", "the LoRA rank", "a positive integer", 'Add the rank the adapter was trained with, e.g. "r": 16.'
            )
        elif not _is_int(raw["r"]):
            self.wrong_type("r", "a positive integer")
        elif raw["r"] <= 0:
            self.invalid(
                "r",
                finding(
                    "config.rank-not-positive",
                    f"{source}: `r` is {raw['r']}; a LoRA rank must be a positive integer.",
                    keys=["r"],
                    expected="a positive integer",
                    actual=raw["r"],
                    fix="Set r to the rank the adapter was trained with (the tensors' lora_A rows).",
                ),
            )
        else:
            cfg.r = raw["r"]

    def alpha(self) -> None:
        """`lora_alpha`: a positive number (a placeholder of r when invalid)."""
        raw, cfg, source = self.raw, self.cfg, self.source
        if "lora_alpha" not in raw:
            self.missing(
                "lora_alpha",
                "the scaling alpha/r is undefined",
                "a positive number",
                "Add the lora_alpha the adapter was trained with.",
            )
        elif not _is_number(raw["lora_alpha"]):
            self.wrong_type("lora_alpha", "a positive number")
        elif raw["lora_alpha"] <= 0:
            self.invalid(
                "lora_alpha",
                finding(
                    "config.alpha-not-positive",
                    f"{source}: `lora_alpha` is {raw['lora_alpha']}; the scaling alpha/r would "
                    f"{'erase' if raw['lora_alpha'] == 0 else 'negate'} every update.",
                    keys=["lora_alpha"],
                    expected="a positive number",
                    actual=raw["lora_alpha"],
                    fix="Set lora_alpha to the value the adapter was trained with.",
                ),
            )
        else:
            cfg.lora_alpha = float(raw["lora_alpha"])
        if "lora_alpha" in cfg.invalid:
            cfg.lora_alpha = float(cfg.r)  # a placeholder only; `invalid` says so

    def patterns(self) -> None:
        """`rank_pattern` / `alpha_pattern`: valid regex keys to positive numbers."""
        raw, cfg = self.raw, self.cfg
        for name, caster, kind in (
            ("rank_pattern", int, "a positive integer"),
            ("alpha_pattern", float, "a positive number"),
        ):
            value = raw.get(name)
            if value is None:
                continue
            if not isinstance(value, dict):
                self.wrong_type(name, f"an object mapping module patterns to {kind[2:]}s")
                continue
            setattr(cfg, name, self._pattern_entries(name, caster, kind, value))

    def _pattern_entries(self, name: str, caster: type, kind: str, value: dict) -> dict[str, Any]:
        """The valid entries of one pattern map; each invalid one is a finding."""
        source = self.source
        clean: dict[str, Any] = {}
        for pattern, number in value.items():
            key = f"{name}.{pattern}"
            try:
                re.compile(pattern)
            except re.error as exc:
                self.invalid(
                    name,
                    finding(
                        "config.bad-pattern",
                        f"{source}: {name} key {pattern!r} is not a valid regex ({exc}).",
                        keys=[key],
                        expected="a regular expression",
                        actual=pattern,
                        fix=f"Fix the key in {name}; PEFT matches it as a regex against module names.",
                    ),
                )
                continue
            if not (_is_int(number) if caster is int else _is_number(number)):
                self.wrong_type(name, kind, number, key=key)
                continue
            if number <= 0:
                self.invalid(
                    name,
                    finding(
                        "config.rank-not-positive" if caster is int else "config.alpha-not-positive",
                        f"{source}: `{key}` is {number}; it should be {kind}.",
                        keys=[key],
                        expected=kind,
                        actual=number,
                        fix=f"Fix `{key}` in {source}.",
                    ),
                )
                continue
            clean[pattern] = caster(number)
        return clean

    def flags(self) -> None:
        """The boolean switches (use_rslora, use_dora, lora_bias, fan_in_fan_out, inference_mode)."""
        raw, cfg = self.raw, self.cfg
        for name in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "inference_mode"):
            if name in raw and raw[name] is not None and not isinstance(raw[name], bool):
                self.wrong_type(name, "true or false")
            elif name != "inference_mode":
                setattr(cfg, name, bool(raw.get(name) or False))

    def targets(self) -> None:
        """`target_modules`, `target_parameters`, `exclude_modules`."""
        raw, cfg = self.raw, self.cfg
        targets = raw.get("target_modules")
        if targets is None or isinstance(targets, str) or _is_str_list(targets):
            cfg.target_modules = targets
        else:
            self.wrong_type("target_modules", "a list of module names or a regex string")
        tparams = raw.get("target_parameters")
        if tparams is None or _is_str_list(tparams):
            cfg.target_parameters = list(tparams or [])
        else:
            self.wrong_type("target_parameters", "a list of parameter names")
        excluded = raw.get("exclude_modules")
        if excluded is None or isinstance(excluded, str) or _is_str_list(excluded):
            cfg.exclude_modules = excluded
        else:
            self.wrong_type("exclude_modules", "a list of module names, a regex string or null")

    def layers(self) -> None:
        """`layers_to_transform`, `layers_pattern`."""
        raw, cfg = self.raw, self.cfg
        ltt = raw.get("layers_to_transform")
        if ltt is None or (isinstance(ltt, list) and all(_is_int(x) for x in ltt)):
            cfg.layers_to_transform = ltt
        elif _is_int(ltt):
            cfg.layers_to_transform = [ltt]
        else:
            self.wrong_type("layers_to_transform", "a list of layer indices")
        lpat = raw.get("layers_pattern")
        if lpat is None or isinstance(lpat, str) or _is_str_list(lpat):
            cfg.layers_pattern = lpat
        else:
            self.wrong_type("layers_pattern", "a module-list name, a list of them, or null")

    def saved_and_bias(self) -> None:
        """`modules_to_save`, `bias`."""
        raw, cfg, source = self.raw, self.cfg, self.source
        mts = raw.get("modules_to_save")
        if mts is None or _is_str_list(mts):
            cfg.modules_to_save = list(mts or [])
        else:
            self.wrong_type("modules_to_save", "a list of module names or null")
        bias = raw.get("bias", "none")
        if bias in (None, "none", "all", "lora_only"):
            cfg.bias = bias or "none"
        else:
            self.invalid(
                "bias",
                finding(
                    "config.wrong-type",
                    f'{source}: `bias` is {_text(bias)}; PEFT accepts "none", "all" or "lora_only".',
                    keys=["bias"],
                    expected=["none", "all", "lora_only"],
                    actual=_shown(bias),
                    fix=f"Fix `bias` in {source}.",
                ),
            )

    def provenance(self) -> None:
        """`trainable_token_indices`, `base_model_name_or_path`."""
        raw, cfg = self.raw, self.cfg
        cfg.trainable_token_indices = raw.get("trainable_token_indices")
        base = raw.get("base_model_name_or_path")
        if base is not None and not isinstance(base, str):
            self.wrong_type("base_model_name_or_path", "a string or null")
        else:
            cfg.base_model_name_or_path = base

    def variants(self) -> None:
        """LoRA variants no serving engine computes."""
        raw, cfg = self.raw, self.cfg
        for name, description in UNSUPPORTED_VARIANTS.items():
            value = raw.get(name)
            if value not in (None, False, [], {}, 0):
                cfg.variants[name] = description

    def parse(self) -> PeftConfig:
        """Run every step, then attach the findings (rslora last, as a note on the whole config)."""
        for step in (
            self.peft_type,
            self.rank,
            self.alpha,
            self.patterns,
            self.flags,
            self.targets,
            self.layers,
            self.saved_and_bias,
            self.provenance,
            self.variants,
        ):
            step()
        cfg, findings = self.cfg, self.findings
        cfg.findings = findings
        if cfg.use_rslora:
            findings.append(
                finding(
                    "config.rslora",
                    "use_rslora is set: each module's scaling is lora_alpha / sqrt(r).",
                    keys=["use_rslora"],
                )
            )
        return cfg


def load_config_file(path: Path) -> PeftConfig:
    """Read adapter_config.json; a file that is missing, empty or not JSON raises (nothing can be checked)."""
    if not path.exists():
        raise AdapterConfigError(
            f"{path.parent} has no adapter_config.json.",
            hint="A PEFT adapter folder holds adapter_config.json next to adapter_model.safetensors; point at that folder.",
        )
    # A FIFO or device of that name, an LFS pointer, bytes that are not UTF-8 JSON, JSON nested too deeply: all
    # raise AdapterConfigError naming the file. Any top-level type is returned: parse_config reports a non-object.
    raw = read_small_json(
        path,
        AdapterConfigError,
        hint="Fix the JSON syntax, or save the adapter again with PEFT's save_pretrained.",
        expect=None,
    )
    return parse_config(raw, source=path.name)
