"""`lora-convert validate`: every check on one adapter, in one library call.

`validate_adapter` never stops at the first problem: each check appends findings (stable code, severity, keys,
expected vs actual, fix) and the report's verdict is "no error" (and, with `strict`, "no warning"). Only problems
that leave nothing to check raise: a usage error (no such folder, a malformed Hub id, an explicit --base that names
nothing, bad flags: exit 2) or an environment problem (the Hub unreachable for a Hub id: exit 3). A malformed
adapter file is a finding (`files.unreadable` / `config.unreadable`), so CI gets a report and an annotation for it
like for anything else.

Shapes that could not be checked (no base, a base that does not resolve, a family without a schema) are the error
`shapes.unchecked`: an adapter with a wrong-shaped tensor must not pass a CI gate because its base was unknown.
`allow_unchecked=True` (`--allow-unchecked`) makes it a warning. The verdict line and `summary.checks` name the
check groups that ran and, for the others, why not.

Checks, in order (docs/validate.md lists every code):
  config   adapter_config.json fields, variants, DoRA, bias, modules_to_save, fan_in_fan_out, trainable tokens,
           added tokens against the base vocab
  keys     unparseable names, adapter-name segments, full weights, duplicates, vision modules, layers past the end
  pairs    A without B, B without A; ranks of A vs B vs config/patterns
  shapes   the architecture schema (`shape_check.check_shapes`), when the base resolves
  moe      experts missing per layer, projections missing per expert, expert LoRA on dense layers
  data     NaN/Inf, all-zero B, dtypes, magnitude outliers (streams tensors one at a time; `data_scan=False` skips)
  sharding with tp/ep: dimensions that would not divide
  smoke    a forward pass (`lora_convert.smoke.runner`, when installed)
  engine   what the chosen engine would do with each feature (`engine_profiles`, rules in engines/*.json)
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lora_convert.errors import (
    AdapterConfigError,
    AdapterFormatError,
    EnvironmentProblem,
    LoraConvertError,
    UsageError,
)
from lora_convert.text import spans
from lora_convert.findings import Finding, Severity, error, info, sort_findings, warning
from lora_convert.io.source import AdapterSource, resolve_adapter_source

ENGINES = ("none", "sglang", "vllm")
DEVICES = ("auto", "cpu", "cuda")
SMOKE_CPU_LIMIT_BYTES = 50 * 1024 * 1024  # default smoke on a CPU only for adapters up to this size
MAX_KEYS = 50
JSON_SCHEMA_VERSION = 1

CHECKS = ("config", "keys", "pairs", "shapes", "moe", "data", "sharding", "smoke", "engine")


@dataclass
class ValidationReport:
    adapter: str  # what identifies the adapter (folder or Hub id)
    adapter_path: str | None  # the local folder that was read
    base: str | None  # the base model that was checked against (None: unresolved)
    engine: str
    findings: list[Finding] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    strict: bool = False
    allow_unchecked: bool = False

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.WARNING]

    def verdict(self) -> str:
        s = self.summary
        counts = f"{s.get('errors', 0)} error(s), {s.get('warnings', 0)} warning(s), {s.get('infos', 0)} note(s)"
        against = f" against {self.base}" if self.base else " (no base model)"
        engine = f", engine {self.engine}" if self.engine != "none" else ""
        if self.ok:
            head = "OK"
        else:
            head = "FAIL (errors)" if s.get("errors") else "FAIL (warnings under --strict)"
        return f"{head}: {self.adapter}{against}{engine}: {counts}.{checks_sentence(s.get('checks') or {})}"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": JSON_SCHEMA_VERSION,
            "ok": self.ok,
            "adapter": self.adapter,
            "adapter_path": self.adapter_path,
            "base": self.base,
            "engine": self.engine,
            "strict": self.strict,
            "allow_unchecked": self.allow_unchecked,
            "verdict": self.verdict(),
            "findings": [f.to_json() for f in self.findings],
            "summary": self.summary,
        }


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen: set[tuple] = set()
    out = []
    for f in findings:
        ident = (f.code, tuple(f.keys)) if f.keys else (f.code, f.message)
        if ident in seen:
            continue
        seen.add(ident)
        out.append(f)
    return out


def checks_sentence(checks: dict[str, Any]) -> str:
    """ " Checked: a, b. Not run: c (why)." from summary.checks, so a reader sees what an OK covers."""
    ran = checks.get("run") or []
    skipped = checks.get("skipped") or {}
    text = f" Checked: {', '.join(ran)}." if ran else " Checked: nothing."
    if skipped:
        text += " Not run: " + ", ".join(f"{name} ({why})" for name, why in skipped.items()) + "."
    return text


def _ordered_checks(run: list[str], skipped: dict[str, str]) -> dict[str, Any]:
    """summary.checks in the fixed order of CHECKS; every group is in exactly one of the two."""
    ran = [c for c in CHECKS if c in run and c not in skipped]
    return {"run": ran, "skipped": {c: skipped[c] for c in CHECKS if c in skipped}}


def _finish(report: ValidationReport, started: float, extra: dict[str, Any]) -> ValidationReport:
    report.findings = sort_findings(_dedupe(report.findings))
    counts = {sev: sum(1 for f in report.findings if f.severity is sev) for sev in Severity}
    report.ok = counts[Severity.ERROR] == 0 and not (report.strict and counts[Severity.WARNING])
    by_code: dict[str, int] = defaultdict(int)
    for f in report.findings:
        by_code[f.code] += 1
    report.summary = {
        "errors": counts[Severity.ERROR],
        "warnings": counts[Severity.WARNING],
        "infos": counts[Severity.INFO],
        "codes": dict(sorted(by_code.items())),
        **extra,
        "seconds": round(time.monotonic() - started, 3),
    }
    return report


# --------------------------------------------------------------------------------------------------- entry
def validate_adapter(
    spec: str | Path | AdapterSource,
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
    cache_dir: str | Path | None = None,
    token: str | None = None,
    allow_unchecked: bool = False,
) -> ValidationReport:
    """Run every check on one adapter and return the report (never raises for a problem *in* the adapter).

    `allow_unchecked`: shapes that could not be checked are a warning instead of the error `shapes.unchecked`.
    """
    started = time.monotonic()
    engine = (engine or "none").lower()
    if engine not in ENGINES:
        raise UsageError(f"Unknown engine {engine!r}.", hint=f"Use one of: {', '.join(ENGINES)}.")
    if device not in DEVICES:
        raise UsageError(f"Unknown device {device!r}.", hint=f"Use one of: {', '.join(DEVICES)}.")
    for name, value in (("--tp", tp), ("--ep", ep)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UsageError(f"{name} must be a positive integer, got {value!r}.")
    source = spec if isinstance(spec, AdapterSource) else resolve_adapter_source(str(spec), cache_dir=cache_dir, token=token)
    report = ValidationReport(adapter=source.describe(), adapter_path=str(source.path), base=None, engine=engine, strict=strict,
                              allow_unchecked=bool(allow_unchecked))
    run: list[str] = []
    skipped: dict[str, str] = {}

    from lora_convert.peft.adapter import STACKED_LAYOUT_CODES, load_adapter

    try:
        adapter = load_adapter(source, strict_config=False)
    except AdapterConfigError as exc:
        report.findings.append(error("config.unreadable", exc.message, keys=["adapter_config.json"], fix=exc.hint))
        return _finish(report, started, {"checks": {"run": [], "skipped": {c: "adapter_config.json unreadable" for c in CHECKS}}})
    except AdapterFormatError as exc:
        report.findings.append(error("files.unreadable", exc.message, fix=exc.hint))
        return _finish(report, started, {"checks": {"run": [], "skipped": {c: "adapter files unreadable" for c in CHECKS}}})

    findings = report.findings
    stacked = adapter.stacked_layout is not None
    # ---- config, keys, pairs, ranks (from adapter.py) ---------------------------------------------------
    adapter_findings = list(adapter.findings)
    if stacked:
        adapter_findings = [f for f in adapter_findings if f.code not in STACKED_LAYOUT_CODES]
    findings.extend(adapter_findings)
    findings.extend(config_findings(adapter))
    findings.extend(key_findings(adapter))
    run += ["config", "keys", "pairs"]

    # ---- base and architecture ---------------------------------------------------------------------------
    base_cfg, arch, base_problem, no_shapes_why = _resolve_base(adapter, base, cache_dir=cache_dir, token=token)
    text_config: dict = {}
    if base_cfg is not None:
        report.base = base_cfg.name
        text_config = base_cfg.text_config or {}
    if base_problem is not None:
        findings.append(base_problem)
    findings.extend(vocab_findings(adapter, text_config))

    # ---- shapes --------------------------------------------------------------------------------------------
    check_shapes = _optional("lora_convert.arch.shape_check", "check_shapes")
    if stacked:
        findings.extend(stacked_findings(adapter, arch))
        run.append("shapes")
    elif arch is not None and check_shapes is not None:
        findings.extend(check_shapes(adapter, arch))
        run.append("shapes")
    else:
        why = no_shapes_why or "this installation has no shape checks"
        skipped["shapes"] = why + ("; accepted with --allow-unchecked" if allow_unchecked else "")
        findings.append(unchecked_finding(why, base_cfg, allowed=bool(allow_unchecked)))
        findings.extend(fallback_layer_findings(adapter, text_config))
    findings.extend(moe_findings(adapter, arch))
    run.append("moe")

    # ---- data -------------------------------------------------------------------------------------------------
    from lora_convert.check.data_scan import dtype_findings, scan_adapter

    findings.extend(dtype_findings(adapter.index))
    scan = None
    if data_scan:
        from lora_convert.engines.profiles import row_energy_modules

        scan = scan_adapter(adapter, progress=progress, row_energy_modules=row_energy_modules(adapter, arch) if engine != "none" else ())
        scan_findings = scan.findings
        # Zero fills written on purpose by `normalize` are expected zeros, listed in its layout/report file.
        fills_listed_in = "lora_layout.json" if stacked else (
            "lora_convert_report.json" if (adapter.path / "lora_convert_report.json").exists() else None)
        if fills_listed_in:
            for f in scan_findings:
                if f.code == "data.zero-b":
                    f.severity = Severity.INFO
                    f.fix = None
                    count = f.message.split(" lora_B", 1)[0]  # "N of M"
                    f.message = (f"{count} lora_B tensor(s) are all zero: the zero fills "
                                 f"lora-convert normalize wrote for slices the adapter did not have, listed in {fills_listed_in}.")
        findings.extend(scan_findings)
        run.append("data")
    else:
        skipped["data"] = "--no-data"

    # ---- sharding ---------------------------------------------------------------------------------------------
    if tp or ep:
        findings.extend(sharding_findings(adapter, arch, text_config, tp or 1, ep or 1))
        run.append("sharding")
    else:
        skipped["sharding"] = "no --tp/--ep"

    # ---- smoke ------------------------------------------------------------------------------------------------
    smoke_note = _smoke(adapter, arch, base, smoke, device, findings, cache_dir=cache_dir, token=token)
    if smoke_note is None:
        run.append("smoke")
    else:
        skipped["smoke"] = smoke_note

    # ---- engine -----------------------------------------------------------------------------------------------
    if engine != "none" and not adapter.config.is_valid:
        # The rules reason about ranks and scalings; on placeholder values they would invent findings.
        skipped["engine"] = "adapter_config.json is invalid"
    elif engine != "none":
        from lora_convert.engines.profiles import evaluate_engine

        findings.extend(evaluate_engine(engine, adapter, arch, text_config, scan=scan))
        run.append("engine")
    else:
        skipped["engine"] = "--engine none"

    if base_cfg is None or arch is None:
        missing = (["the shape check against the architecture schema", "layers past the end", "the added-token vocab check",
                    "expert counts"] if base_cfg is None else ["the shape check against the architecture schema", "expert counts"])
        for f in findings:
            if f.code in ("base.unresolved", "base.unsupported"):
                f.message = f.message.rstrip(".") + ". Skipped: " + ", ".join(missing) + "."
    extra = {
        "adapter": {
            "files": [p.name for p in adapter.files],
            "file_format": adapter.file_format,
            "layout": "stacked" if stacked else "peft",
            "tensors": len(adapter.index),
            "modules": len(adapter.modules),
            "bytes": adapter.total_bytes,
            "parameters": adapter.total_params,
            "expert_layout": adapter.expert_layout,
            "r": None if "r" in adapter.config.invalid else adapter.config.r,
            "lora_alpha": None if "lora_alpha" in adapter.config.invalid else adapter.config.lora_alpha,
        },
        "base_origin": base_cfg.origin if base_cfg is not None else None,
        "family": getattr(arch, "family", None),
        "checks": _ordered_checks(run, skipped),
        "data_scan": scan.summary() if scan is not None else None,
    }
    return _finish(report, started, extra)


def _optional(module: str, name: str):
    """`module.name`, or None while that part of lora-convert is not installed."""
    if importlib.util.find_spec(module) is None:
        return None
    mod = importlib.import_module(module)
    return getattr(mod, name, None)



def _resolve_base(adapter, spec: str | None, *, cache_dir, token):
    """(BaseConfig | None, Architecture | None, a finding about what is missing | None, why shapes cannot be checked | None).

    An explicit --base that cannot be resolved raises (the user asked for it); an implicit one becomes a warning,
    and the shape check it prevents becomes `shapes.unchecked` (see `unchecked_finding`).
    """
    resolve_base = _optional("lora_convert.arch.base_config", "resolve_base")
    bind = _optional("lora_convert.arch.schema", "bind")
    hint = ("Pass --base with a folder holding config.json, a config.json file, a Hub repo id (org/name), or a preset name "
            "(`lora-convert schemas list`).")
    if resolve_base is None:
        return None, None, warning("base.unresolved", "This installation has no base-config support, so no base model was used.",
                                   fix=hint), "this installation cannot read base configs"
    adapter_base = adapter.config.base_model_name_or_path
    if not spec and not adapter_base:
        return None, None, warning(
            "base.unresolved",
            "No base model: --base was not given and adapter_config.json has no base_model_name_or_path.",
            keys=["base_model_name_or_path"], fix=hint,
        ), "no --base, and adapter_config.json names no base model"
    try:
        base_cfg = resolve_base(spec, adapter_base_name=adapter_base, cache_dir=cache_dir, token=token)
    except LoraConvertError as exc:
        if spec:
            raise
        return None, None, warning(
            "base.unresolved",
            f"The adapter's base_model_name_or_path {adapter_base!r} could not be resolved ({exc.message})",
            keys=["base_model_name_or_path"], actual=adapter_base, fix=hint,
        ), f"the base model {adapter_base!r} could not be resolved"
    if bind is None:
        return (base_cfg, None, warning("base.unsupported", f"Base {base_cfg.name}: this installation has no architecture schemas."),
                "this installation has no architecture schemas")
    try:
        arch = bind(base_cfg)
    except LoraConvertError as exc:
        return base_cfg, None, warning(
            "base.unsupported",
            f"Base {base_cfg.name} (model_type {base_cfg.model_type!r}) has no architecture schema: {exc.message}",
            actual=base_cfg.model_type, fix="`lora-convert schemas list` shows the supported families.",
        ), f"no schema for model_type {base_cfg.model_type!r}"
    return base_cfg, arch, None, None


def unchecked_finding(why: str, base_cfg, *, allowed: bool) -> Finding:
    """`shapes.unchecked`: an error unless the caller accepted unchecked shapes (then a warning)."""
    if base_cfg is None:
        fix = ("Pass --base with the base model: a folder holding config.json, a config.json file, a Hub id, or a preset "
               "from `lora-convert schemas list`")
    else:
        fix = (f"Add a schema for model_type {base_cfg.model_type!r} (docs/schemas.md; `lora-convert schemas list` shows "
               "the supported families), or pass --base with a supported base")
    fix += "; --allow-unchecked accepts the adapter without the shape check." if not allowed else "."
    message = (f"The tensor shapes were not checked against the base model: {why}. A wrong-shaped tensor would go "
               "unnoticed until an engine loads the adapter.")
    if allowed:
        return warning("shapes.unchecked", message + " Accepted with --allow-unchecked.", fix=fix)
    return error("shapes.unchecked", message, fix=fix)


# ------------------------------------------------------------------------------------------------- config
def config_findings(adapter) -> list[Finding]:
    cfg = adapter.config
    raw = cfg.raw
    out: list[Finding] = []
    dora = [m for m in adapter.modules if m.magnitude is not None]
    if cfg.use_dora or dora:
        out.append(error(
            "config.dora",
            f"DoRA adapter (use_dora={cfg.use_dora}, {len(dora)} lora_magnitude_vector tensor(s)): its delta is "
            "m * (W + sBA) / ||W + sBA||, which depends on the base weights, so it is not a plain LoRA delta. "
            "SGLang and vLLM reject DoRA adapters and lora-convert cannot convert one exactly.",
            keys=[m.magnitude.key for m in dora[:MAX_KEYS]] or ["use_dora"], expected="use_dora: false", actual=True,
            fix="Merge the DoRA adapter into the base model (PEFT merge_and_unload), or retrain with use_dora=False.",
        ))
    for name, description in cfg.variants.items():
        out.append(error(
            "config.unsupported-variant",
            f"{name} is set: {description}. The tensors do not mean a plain LoRA delta, and no serving engine computes "
            "this variant.",
            keys=[name], actual=raw.get(name), fix="Merge the adapter into the base model, or retrain as plain LoRA.",
        ))
    bias_keys = [m.lora_bias.key for m in adapter.modules if m.lora_bias is not None]
    if cfg.lora_bias or bias_keys:
        out.append(error(
            "config.lora-bias",
            f"lora_bias is set ({len(bias_keys)} lora_B.bias tensor(s)): vLLM rejects it and SGLang reads the bias as a B "
            "factor.",
            keys=bias_keys[:MAX_KEYS] or ["lora_bias"], expected=False, actual=True,
            fix="lora-convert normalize ADAPTER -o OUT --drop-unsupported (drops the bias; the delta then differs).",
        ))
    if cfg.bias != "none":
        out.append(warning(
            "config.bias",
            f"bias={cfg.bias!r}: the adapter trained the base model's biases; those tensors are full module biases, "
            "which engines reject (vLLM) or ignore (SGLang).",
            keys=["bias"], expected="none", actual=cfg.bias,
        ))
    if cfg.modules_to_save:
        out.append(warning(
            "config.modules-to-save",
            f"modules_to_save={cfg.modules_to_save}: whole copies of these modules were trained and saved; they are not "
            "LoRA, and vLLM rejects them while SGLang ignores them.",
            keys=["modules_to_save"], expected=None, actual=cfg.modules_to_save,
            fix="Merge them into the base model, or normalize with --drop-unsupported to leave them out.",
        ))
    if cfg.fan_in_fan_out:
        out.append(warning(
            "config.fan-in-fan-out",
            "fan_in_fan_out is true: the base layers are Conv1D (GPT-2 style, weight stored [in, out]); engines apply "
            "LoRA to nn.Linear layers and do not transpose the delta.",
            keys=["fan_in_fan_out"], expected=False, actual=True,
        ))
    tti = cfg.trainable_token_indices
    if tti not in (None, [], {}):
        out.append(warning(
            "config.trainable-tokens",
            f"trainable_token_indices is set ({str(tti)[:80]}): the adapter also replaces embedding rows of those tokens; "
            "serving engines do not apply trainable-token deltas.",
            keys=["trainable_token_indices"], actual=tti,
        ))
    targets_invalid = {"target_modules", "target_parameters"} & set(cfg.invalid)
    if cfg.target_modules is None and not cfg.target_parameters and adapter.modules and not targets_invalid:
        out.append(warning("config.no-targets", "adapter_config.json has neither target_modules nor target_parameters; "
                           "engines infer the targets from it.", keys=["target_modules"]))
    elif isinstance(cfg.target_modules, str) and cfg.target_modules not in ("all", "all-linear"):
        out.append(info("config.regex-targets", f"target_modules is the regex {cfg.target_modules!r}; SGLang accepts only "
                        "'all'/'all-linear' as a string.", keys=["target_modules"], actual=cfg.target_modules))
    if cfg.has_patterns:
        out.append(info(
            "config.patterns",
            f"rank_pattern {cfg.rank_pattern or '{}'} / alpha_pattern {cfg.alpha_pattern or '{}'}: modules have their own "
            "rank or scaling (PEFT applies them; check --engine for engines that do not).",
            keys=["rank_pattern", "alpha_pattern"],
        ))
    if cfg.use_rslora:
        pass  # config.rslora (info) comes from peft_config; the engine profiles say who ignores it
    return out


def vocab_findings(adapter, text_config: dict) -> list[Finding]:
    """Added tokens: a vocab-sized embedding/lm_head LoRA wider than the base vocab, or added_tokens.json."""
    out: list[Finding] = []
    vocab = text_config.get("vocab_size") if isinstance(text_config.get("vocab_size"), int) else None
    widths: list[tuple[str, int, list[str]]] = []
    for mod in adapter.modules:
        if mod.layer is not None or mod.lora_A is None or mod.lora_B is None:
            continue
        if mod.kind == "embedding" or mod.leaf in ("embed_tokens", "embeddings", "word_embeddings", "wte"):
            widths.append((mod.module, mod.lora_A.shape[-1], mod.keys))
        elif mod.leaf in ("lm_head", "output", "unembed_tokens"):
            widths.append((mod.module, mod.lora_B.shape[0], mod.keys))
    if vocab is not None:
        for module, width, keys in widths:
            if width > vocab:
                out.append(error(
                    "tokens.added",
                    f"{module} LoRA covers {width} vocabulary rows but the base vocab_size is {vocab}: the adapter was "
                    f"trained with {width - vocab} added token(s). SGLang rejects such adapters and vLLM requires the "
                    "embedding LoRA to match the base vocabulary.",
                    keys=keys, expected=vocab, actual=width,
                    fix="Serve a base model resized to the new vocabulary (merge the adapter), or retrain without added tokens.",
                ))
    if adapter.added_tokens:
        ids = sorted(adapter.added_tokens.values())
        if vocab is None:
            out.append(warning(
                "tokens.added",
                f"added_tokens.json lists {len(ids)} token(s) (ids {ids[0]}..{ids[-1]}); without the base vocab size it "
                "is unknown whether they extend the vocabulary. SGLang rejects adapters that add tokens.",
                keys=["added_tokens.json"], actual=len(ids), fix="Pass --base so the ids can be checked.",
            ))
        else:
            beyond = [i for i in ids if i >= vocab]
            if beyond:
                out.append(error(
                    "tokens.added",
                    f"added_tokens.json adds {len(beyond)} token(s) with ids >= the base vocab_size {vocab} "
                    f"(first {beyond[0]}); the base model has no embedding rows for them. SGLang rejects such adapters.",
                    keys=["added_tokens.json"], expected=f"< {vocab}", actual=beyond[:10],
                    fix="Serve a base model resized to the new vocabulary (merge the adapter), or retrain without added tokens.",
                ))
            else:
                out.append(info("tokens.added-within-vocab", f"added_tokens.json lists {len(ids)} token(s), all inside the "
                                f"base vocab_size {vocab}.", keys=["added_tokens.json"]))
    return out


# ---------------------------------------------------------------------------------------------------- keys
def key_findings(adapter) -> list[Finding]:
    out: list[Finding] = []
    if not adapter.index.tensors:
        out.append(error("keys.empty", f"{', '.join(p.name for p in adapter.files)} holds no tensors.",
                         expected="lora_A/lora_B tensors", actual=0, fix="Save the adapter again."))
        return out
    no_prefix = [k for k, p in adapter.parsed.items() if not p.has_peft_prefix and p.factor.value != "unknown"]
    if no_prefix:
        out.append(warning(
            "keys.no-peft-prefix",
            f"{len(no_prefix)} key(s) lack PEFT's `base_model.model.` prefix (e.g. {no_prefix[0]}); PEFT cannot load "
            "them as an adapter and engines that strip the prefix see different module paths.",
            keys=no_prefix[:MAX_KEYS], expected="base_model.model.<module>...", actual=no_prefix[0],
        ))
    return out


def fallback_layer_findings(adapter, text_config: dict) -> list[Finding]:
    """Vision modules and layers past the end, for when the schema check cannot run."""
    out: list[Finding] = []
    vision = [m for m in adapter.modules if m.is_vision]
    if vision:
        out.append(warning(
            "modules.vision",
            f"{len(vision)} LoRA module(s) sit in a vision tower or multimodal projector (e.g. {vision[0].module}); "
            "text-only serving drops them and SGLang may file `...layers.N` ones under text layer N.",
            keys=[k for m in vision[:MAX_KEYS] for k in m.keys][:MAX_KEYS],
            fix="lora-convert normalize ADAPTER -o OUT --drop-unsupported",
        ))
    n_layers = text_config.get("num_hidden_layers")
    if isinstance(n_layers, int):
        past = [m for m in adapter.modules if m.layer is not None and m.layer >= n_layers]
        if past:
            layers = sorted({m.layer for m in past})
            out.append(error(
                "layers.past-end",
                f"{len(past)} module(s) are on layer(s) {layers} but the base has num_hidden_layers={n_layers} "
                "(layers 0..{0}); MTP/NextN layers are not served with LoRA, and SGLang fails to load the adapter.".format(n_layers - 1),
                keys=[k for m in past[:MAX_KEYS] for k in m.keys][:MAX_KEYS], expected=f"< {n_layers}", actual=layers,
                fix="lora-convert normalize ADAPTER -o OUT --drop-unsupported",
            ))
    return out


# ----------------------------------------------------------------------------------------------------- MoE
def moe_findings(adapter, arch) -> list[Finding]:
    """Per-expert (2-D) layouts: experts missing in a layer, and projections missing for some experts."""
    out: list[Finding] = []
    by_layer: dict[tuple, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    keys_by_layer: dict[tuple, list[str]] = defaultdict(list)
    for mod in adapter.modules:
        if mod.expert is None or mod.layer is None:
            continue
        container = mod.local_name.rsplit(".", 1)[0]  # e.g. mlp.experts
        by_layer[(mod.layer, container)][mod.leaf].add(mod.expert)
        keys_by_layer[(mod.layer, container)].extend(mod.keys)
    if not by_layer:
        return out
    expected = None
    if arch is not None:
        try:
            expected = int(arch.expert_count())
        except Exception:  # noqa: BLE001 - a dense schema or no expert count
            expected = None
    if expected is None:
        expected = 1 + max(e for projs in by_layer.values() for es in projs.values() for e in es)
        guessed = True
    else:
        guessed = False
    missing_experts: dict[int, list[int]] = {}
    missing_proj: list[str] = []
    missing_proj_keys: list[str] = []
    for (layer, container), projs in sorted(by_layer.items()):
        present = set().union(*projs.values())
        gap = sorted(set(range(expected)) - present)
        if gap:
            missing_experts[layer] = gap
        for proj, experts in sorted(projs.items()):
            lacking = sorted(present - experts)
            if lacking:
                missing_proj.append(f"layer {layer} {container}.{proj}: experts {spans(lacking)}")
                missing_proj_keys.extend(keys_by_layer[(layer, container)][:2])
    if missing_experts:
        first = next(iter(missing_experts))
        out.append(warning(
            "experts.missing",
            f"{len(missing_experts)} layer(s) have LoRA on only some routed experts (of {expected}"
            f"{', counted from the adapter' if guessed else ''}); e.g. layer {first} lacks experts "
            f"{spans(missing_experts[first])}. PEFT adapts every expert of a targeted layer; the adapter is incomplete.",
            keys=[k for layer in list(missing_experts)[:5] for k in keys_by_layer[next(c for c in by_layer if c[0] == layer)][:2]],
            expected=expected, actual={str(k): v[:20] for k, v in list(missing_experts.items())[:20]},
        ))
    if missing_proj:
        out.append(warning(
            "experts.missing-projection",
            f"Some experts lack projections that other experts of the same layer have: {'; '.join(missing_proj[:5])}"
            f"{' ...' if len(missing_proj) > 5 else ''}. vLLM requires all three expert projections per expert.",
            keys=missing_proj_keys[:MAX_KEYS], actual=missing_proj[:20],
        ))
    return out


# ------------------------------------------------------------------------------------------------ stacked


def stacked_findings(adapter, arch) -> list[Finding]:
    """Check a stacked output (lora_layout.json) against its own layout file: every group's A and B shapes."""
    out: list[Finding] = []
    layout = adapter.stacked_layout or {}
    if not isinstance(layout, dict) or layout.get("format") != "lora-convert/stacked":
        out.append(error("layout.unknown", f"lora_layout.json does not describe a lora-convert stacked layout "
                         f"(format {layout.get('format') if isinstance(layout, dict) else None!r}).",
                         keys=["lora_layout.json"], expected="lora-convert/stacked"))
        return out
    rank = layout.get("rank")
    groups = layout.get("groups") or []
    if not isinstance(rank, int) or rank <= 0 or not isinstance(groups, list):
        out.append(error("layout.invalid", "lora_layout.json lacks a positive `rank` or a `groups` list.", keys=["lora_layout.json"]))
        return out
    if adapter.config.r != rank:
        out.append(error("layout.rank-mismatch", f"lora_layout.json says rank {rank} but adapter_config.json says r={adapter.config.r}.",
                         keys=["lora_layout.json", "adapter_config.json"], expected=rank, actual=adapter.config.r))
    tensors = adapter.index.tensors
    for group in groups:
        if not isinstance(group, dict) or not isinstance(group.get("key"), str):
            out.append(error("layout.invalid", "lora_layout.json has a group without a `key`.", keys=["lora_layout.json"]))
            continue
        key = group["key"]
        slices = group.get("slices") or []
        c = len(slices)
        out_total = sum(int(s.get("out_features") or 0) for s in slices if isinstance(s, dict))
        in_features = group.get("in_features")
        experts = group.get("experts")
        a_key, b_key = f"base_model.model.{key}.lora_A.weight", f"base_model.model.{key}.lora_B.weight"
        for k in (a_key, b_key):
            if k not in tensors:
                out.append(error("layout.missing-tensor", f"lora_layout.json lists group {key} but {k} is not in the file.",
                                 keys=[k]))
        if a_key not in tensors or b_key not in tensors:
            continue
        lead = (experts,) if isinstance(experts, int) and experts else ()
        want_a = lead + (c * rank, in_features)
        want_b = lead + (out_total, rank)
        for k, want in ((a_key, want_a), (b_key, want_b)):
            got = tensors[k].shape
            if tuple(got) != tuple(want):
                out.append(error("layout.shape", f"{k} has shape {list(got)}; lora_layout.json implies {list(want)}.",
                                 keys=[k], expected=list(want), actual=list(got)))
    listed = {f"base_model.model.{g['key']}.lora_{f}.weight" for g in groups if isinstance(g, dict) and isinstance(g.get("key"), str) for f in "AB"}
    extra = [k for k in tensors if k not in listed]
    if extra:
        out.append(error("layout.unlisted-tensor", f"{len(extra)} tensor(s) are not described by lora_layout.json (e.g. {extra[0]}).",
                         keys=extra[:MAX_KEYS]))
    return out


# ----------------------------------------------------------------------------------------------- sharding
# How tensor parallelism splits each projection (by leaf name); routed experts use the MoE TP size (tp / ep).
ROW_PARALLEL = {"o_proj", "down_proj", "out_proj", "w2", "wo", "dense", "fc2", "c_proj"}
REPLICATED = {"q_a_proj", "kv_a_proj_with_mqa", "fc1_latent_proj", "fc2_latent_proj", "gate", "wq_b", "wk", "weights_proj",
              "shared_expert_gate", "embed_tokens", "embeddings", "word_embeddings", "lm_head", "output"}
HEAD_BASED = {"q_proj", "k_proj", "v_proj", "qkv_proj", "q_b_proj", "kv_b_proj"}
# (config field, which TP it must divide, the module families whose LoRA makes it matter)
HEAD_FIELDS = (
    ("num_attention_heads", "tp", ("self_attn.", "attn.", "mixer.q_proj", "mixer.k_proj", "mixer.v_proj", "mixer.o_proj")),
    ("linear_num_value_heads", "tp", ("linear_attn.",)),
    ("linear_num_key_heads", "tp", ("linear_attn.",)),
    ("mamba_num_heads", "tp", ("mixer.in_proj", "mixer.out_proj")),
    ("n_groups", "tp", ("mixer.in_proj",)),
)


def sharding_findings(adapter, arch, text_config: dict, tp: int, ep: int) -> list[Finding]:
    out: list[Finding] = []
    if tp % ep:
        out.append(error("sharding.ep", f"--ep {ep} does not divide --tp {tp}; the MoE tensor-parallel size would be {tp}/{ep}.",
                         expected=f"a divisor of {tp}", actual=ep))
        return out
    moe_tp = tp // ep
    problems: dict[tuple, dict] = {}

    def note(code, what, dim, value, divisor, key):
        entry = problems.setdefault((code, what, value, divisor), {"keys": [], "dim": dim})
        if len(entry["keys"]) < MAX_KEYS:
            entry["keys"].append(key)

    expert_counts = set()
    for mod in adapter.modules:
        if mod.in_features is None or mod.out_features is None or mod.is_vision:
            continue
        leaf = mod.leaf
        is_expert = mod.expert is not None or mod.kind == "fused_experts"
        if mod.kind == "fused_experts" and mod.experts:
            expert_counts.add(mod.experts)
        size = moe_tp if is_expert else tp
        if size == 1 or leaf in REPLICATED or (leaf in HEAD_BASED and not is_expert) or "indexer." in mod.local_name:
            continue
        name = mod.local_name or mod.module
        row = leaf in ROW_PARALLEL
        out_features = mod.out_features
        if mod.kind == "fused_experts" and leaf in ("gate_up_proj",):
            out_features //= 2  # sharded per half: gate rows and up rows
        dim = mod.in_features if row else out_features
        if dim % size:
            note("sharding.tp", name, "input" if row else "output", dim, size, mod.keys[0] if mod.keys else mod.module)
    if arch is not None and ep > 1:
        try:
            expert_counts.add(int(arch.expert_count()))
        except Exception:  # noqa: BLE001
            pass
    per_expert = {m.expert for m in adapter.modules if m.expert is not None}
    if per_expert and not expert_counts:
        expert_counts.add(max(per_expert) + 1)
    for count in expert_counts:
        if ep > 1 and count % ep:
            out.append(error("sharding.ep", f"{count} routed experts do not divide evenly over --ep {ep}.",
                             expected=f"a multiple of {ep}", actual=count))
    locals_ = [m.local_name for m in adapter.modules]
    for field_name, which, families in HEAD_FIELDS:
        value = text_config.get(field_name)
        if not isinstance(value, int) or value <= 0 or tp == 1:
            continue
        if not any(name.startswith(families) for name in locals_):
            continue
        if value % tp:
            out.append(error("sharding.tp", f"{field_name}={value} is not divisible by --tp {tp}; the adapted modules "
                             "cannot be split across ranks.", keys=[field_name], expected=f"a multiple of {tp}", actual=value))
    kv = text_config.get("num_key_value_heads")
    if isinstance(kv, int) and kv > 0 and tp > 1 and any(m.leaf in ("k_proj", "v_proj", "qkv_proj") for m in adapter.modules):
        if kv % tp and tp % kv:
            out.append(error("sharding.tp", f"num_key_value_heads={kv} neither divides nor is divisible by --tp {tp}; "
                             "KV heads can be neither split nor replicated evenly.", keys=["num_key_value_heads"],
                             expected=f"a multiple or divisor of {tp}", actual=kv))
    for (code, what, value, divisor), entry in sorted(problems.items(), key=lambda kv_: str(kv_[0])):
        out.append(error(
            code,
            f"{what}: its {entry['dim']} dimension {value} is not divisible by the tensor-parallel size {divisor}.",
            keys=entry["keys"], expected=f"a multiple of {divisor}", actual=value,
        ))
    return out


# --------------------------------------------------------------------------------------------------- smoke
def _smoke(adapter, arch, base_spec: str | None, smoke: bool | None, device: str, findings: list[Finding], *,
           cache_dir=None, token=None) -> str | None:
    """Run the smoke forward if asked (or by default where cheap). Returns why it was skipped, or None if it ran."""
    if smoke is False:
        return "--no-smoke"
    if importlib.util.find_spec("lora_convert.smoke.runner") is None:
        make = warning if smoke else info
        findings.append(make("smoke.unavailable", "The smoke forward is not part of this installation, so no forward pass was run"
                             + (" although --smoke asked for one." if smoke else "."),
                             fix="Upgrade lora-convert to a version with `lora_convert.smoke.runner`."))
        return "lora_convert.smoke.runner not installed"
    skip = warning if smoke else info

    def skipped(reason: str, message: str, fix: str | None = None) -> str:
        findings.append(skip("smoke.skipped", message, fix=fix))
        return reason

    if adapter.stacked_layout is not None:
        return skipped("stacked output", "The smoke forward of a stacked output compares it with the adapter it came from; "
                       "validate does not know that adapter.", fix="Run `lora-convert smoke OUT --original ADAPTER`.")
    if arch is None:
        return skipped("no base architecture", "The smoke forward needs the base architecture; none was resolved.", fix="Pass --base.")
    if any(f.severity is Severity.ERROR for f in findings):
        return skipped("the adapter has errors", "The smoke forward was not run because the checks above found errors; "
                       "fix those first.")
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        if smoke:
            raise EnvironmentProblem("--device cuda was given but no CUDA device is available.",
                                     hint="Use --device cpu, or --no-smoke to skip the forward pass.")
        return skipped("no CUDA device", "--device cuda was given but no CUDA device is available; no forward pass was run.")
    chosen = "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"
    if smoke is None and chosen == "cpu" and adapter.total_bytes > SMOKE_CPU_LIMIT_BYTES:
        return skipped("CPU and adapter > 50 MB", f"No GPU, and the adapter is {adapter.total_bytes / 2**20:.0f} MB (> 50 MB): the "
                       "CPU smoke forward is off by default.", fix="Pass --smoke to run it anyway.")
    from lora_convert.smoke import runner as smoke_mod

    try:
        result = smoke_mod.run_smoke(str(adapter.source.path), base=base_spec, device=chosen, cache_dir=cache_dir, token=token)
    except EnvironmentProblem:
        if smoke:
            raise
        return skipped("environment", "The smoke forward could not run on this machine.")
    except LoraConvertError as exc:
        return skipped("not normalizable", f"The smoke forward could not prepare the adapter: {exc.message}", fix=exc.hint)
    found = result.findings() if callable(getattr(result, "findings", None)) else getattr(result, "findings", [])
    findings.extend(f for f in found if isinstance(f, Finding))
    if getattr(result, "groups", None) is not None and not found:
        findings.append(info("smoke.passed", f"Smoke forward on {chosen}: {len(result.groups)} group(s) match PEFT's reference"
                             f" (layers {', '.join(map(str, getattr(result, 'layers_checked', [])[:8]))})."))
    return None


def exit_code(reports: list[ValidationReport]) -> int:
    return 0 if all(r.ok for r in reports) else 1
