"""The `engine` check (with --engine): what that serving engine release would do with the adapter.

One rule file per engine release (lora_convert/engines/<engine>-<version>.json) holds two kinds of rule, and this
check evaluates both:
- feature rules (lora_convert/engines/profiles.py): properties of the adapter as PEFT wrote it -- its config, its
  key names, which companions are missing -- most of which `normalize --layout ENGINE` fixes;
- `planned_group` rules: module groups of the plan `normalize` builds from headers that the engine cannot serve
  in any layout. `normalize --layout ENGINE` refuses exactly these groups (it reads the same rules through
  lora_convert/convert/layout_rules.py), so validate's findings and normalize's refusals cannot disagree.

`predict_engine` turns the same findings into one word per PEFT module (exact / dropped / wrong) or a load failure:
what the proof tests (tests/test_proof_*.py) compare with the engines' own code.

Rules that cannot be evaluated (no base to plan against, an adapter that cannot be planned, an invalid config) are
the error `engine-rules.unchecked` (`engine-rules.unchecked-allowed` with --allow-unchecked), as for shapes: an
engine verdict that was not reached is never a pass.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from lora_convert.check.context import Check, CheckContext, Outcome, not_checked, unchecked_text
from lora_convert.codes import finding
from lora_convert.engines.profiles import compute_features, evaluate_engine, rule_finding
from lora_convert.engines.rules import PLANNED_GROUP, load_rules, resolve_engine
from lora_convert.engines.server_args import effects as server_effects
from lora_convert.errors import LoraConvertError
from lora_convert.findings import Finding
from lora_convert.text import spans


def run(ctx: CheckContext) -> Outcome:
    engine = ctx.options.engine
    if engine == "none":
        return Outcome(skipped="--engine none")
    if not ctx.adapter.config.is_valid:
        # The rules reason about ranks and scalings; on placeholder values they would invent findings.
        why = "adapter_config.json is invalid"
        return _not_evaluated(ctx, why, "Fix adapter_config.json (its findings say how)")
    findings = evaluate_engine(engine, ctx.adapter, ctx.arch, ctx.text_config, scan=ctx.scan)
    server = ctx.options.server_args
    if server is not None:  # the flags are known: they decide what the rules assumed about their defaults
        replaced = {f"engine.{server.release.engine}.{rule_id}" for rule_id in server.replaced_rules()}
        findings = [f for f in findings if f.code not in replaced]
        findings += [e.finding for e in server_effects(server, ctx.adapter, ctx.options.tp, base_classes(ctx.arch))]
    planned, why_not = planned_group_refusals(engine, ctx.prepared)
    if why_not is None:
        return Outcome(findings + [r.finding for r in planned])
    if ctx.arch is None:
        fix = "Pass --base with a base model whose family has a schema (`lora-convert schemas list`)"
    elif ctx.stacked:
        fix = (
            f"A stacked output (lora_layout.json) is the kernels' layout; for {engine}, validate the output of "
            f"`lora-convert normalize ADAPTER -o OUT --layout {resolve_engine(engine).engine}` instead"
        )
    else:
        fix = "Fix the errors reported for the adapter itself"
    return _not_evaluated(ctx, f"the module-group rules: {why_not}", fix, findings)


def _not_evaluated(ctx: CheckContext, why: str, fix: str, findings=()) -> Outcome:
    """The error `engine-rules.unchecked` (with --allow-unchecked the warning `engine-rules.unchecked-allowed`): what
    the engine would do with (part of) the adapter is unknown, so the verdict cannot claim it."""
    engine = ctx.options.engine
    message = (
        f"The {engine} rules were not all evaluated: {why}. What {engine} would do with the modules they cover "
        "is unknown, so this report cannot say the adapter is served correctly."
    )
    allowed = ctx.options.allow_unchecked
    gap = finding(
        "engine-rules.unchecked-allowed" if allowed else "engine-rules.unchecked",
        **unchecked_text(allowed, message, fix),
    )
    return not_checked(ctx, why, gap, findings)


@dataclass
class GroupRefusal:
    """The groups one planned_group rule refuses, with the PEFT modules that feed them."""

    rule_id: str
    outcome: str
    finding: Finding
    modules: list[str] = field(default_factory=list)


def planned_group_refusals(engine: str, prepared) -> tuple[list[GroupRefusal], str | None]:
    """The planned_group rules of `engine` that match a group of the prepared adapter's plan
    (lora_convert.pipeline.prepared.PreparedAdapter), or (_, why they could not be evaluated): without a bound base
    there is no plan. The plan is the one `normalize --drop-unsupported` builds (shape errors are the shape check's
    findings, not a reason to leave the rules unevaluated)."""
    if not any(r["feature"] == PLANNED_GROUP for r in load_rules(engine)):
        return [], None
    if prepared.arch is None:
        return [], "no base architecture to plan against"
    from lora_convert.convert.engine_layouts import plan_layout

    adapter = prepared.adapter
    try:
        plan = prepared.plan(drop_unsupported=True, shapes=False)
    except LoraConvertError as exc:
        return [], f"the adapter cannot be planned ({exc.message})"
    prefix = f"engine.{resolve_engine(engine).engine}."
    rules = {r["id"]: r for r in load_rules(engine)}
    by_rule: dict[str, list] = defaultdict(list)
    for refused in plan_layout(plan, engine).refused:
        if refused.code.startswith(prefix) and refused.code[len(prefix) :] in rules:
            by_rule[refused.code[len(prefix) :]].append(refused)
    out = []
    for rule_id, refusals in by_rule.items():
        modules, keys, layers = [], [], []
        for r in refusals:
            for s in r.group.slices:
                for src in s.sources():
                    if src.module.module not in modules:
                        modules.append(src.module.module)
                        keys += [k for k in src.module.keys if k not in keys]
            if r.group.layer is not None:
                layers.append(r.group.layer)
        # the message says how many modules and which layers of all the groups the rule refuses, not the first's
        values = {**refusals[0].values, "count": len(modules), "layers": spans(sorted(set(layers))) if layers else "-"}
        finding = rule_finding(engine, rules[rule_id], {**values, "keys": keys}, adapter)
        out.append(GroupRefusal(rule_id, rules[rule_id]["outcome"], finding, modules))
    return out, None


# ------------------------------------------------------------------------------------------------ prediction
# What the engine holds for a module, by rule outcome: "ignored" and "dropped" both leave the base weight alone.
_MODULE_EFFECT = {"dropped": "dropped", "ignored": "dropped", "wrong": "wrong"}


@dataclass
class EnginePrediction:
    """What validate predicts an engine release does with an adapter: the rules (and the `server-args.*` codes of
    the server's flags) that make loading fail (empty: it loads), and per PEFT module `exact`, `dropped` (the
    engine adds nothing) or `wrong` (it adds another delta)."""

    engine: str
    load_failure: list[str]
    modules: dict[str, str]
    unchecked: str | None = None  # a part of the rules that could not be evaluated, and why


def base_classes(arch) -> tuple[str, ...]:
    """The base config's `architectures` (the model class an engine builds), or () without a bound base."""
    top = dict(getattr(arch, "top_config", None) or getattr(arch, "config", None) or {})
    return tuple(a for a in top.get("architectures") or () if isinstance(a, str))


def _peft_module_name(mod) -> str:
    """The module's name as PEFT's named_modules() gives it (a second 3-D parameter of one module is nested in
    `.base_layer`): from its lora_A key, without `base_model.model.`."""
    key = mod.lora_A.key if mod.lora_A is not None else None
    if not key or ".lora_" not in key:
        return mod.module
    name = key.rsplit(".lora_", 1)[0]
    return name[len("base_model.model.") :] if name.startswith("base_model.model.") else name


def predict_engine(engine: str, prepared, scan=None, server_args=None) -> EnginePrediction:
    """The per-module prediction behind `validate --engine` (the same rules, evaluated the same way) for a prepared
    adapter (lora_convert.pipeline.prepared.PreparedAdapter), on a server started with `server_args`
    (lora_convert.engines.server_args.ServerArgs) or, when None, with the release's defaults: a rule whose outcome
    is `needs-flag` (the adapter loads only with a flag the defaults lack, e.g. vLLM's --max-lora-rank above 16)
    is a load failure there."""
    adapter, arch, text_config = prepared.adapter, prepared.arch, prepared.base.text_config
    names = {id(m): _peft_module_name(m) for m in adapter.modules}
    modules = {names[id(m)]: "exact" for m in adapter.modules}
    by_key = {k: names[id(m)] for m in adapter.modules for k in m.keys}
    by_module: dict[str, list[str]] = defaultdict(list)  # a module path -> its PEFT names (two for 3-D experts)
    for m in adapter.modules:
        by_module[m.module].append(names[id(m)])
    rules = {r["id"]: r for r in load_rules(engine)}
    load_failure: list[str] = []

    def mark(rule_id: str, outcome: str, names: list[str], partial: bool = False) -> None:
        if outcome in ("load-failure", "needs-flag"):
            load_failure.append(rule_id)
            return
        effect = _MODULE_EFFECT.get(outcome)
        if effect is None:
            return
        if partial:  # some rows of the module are served, others not: a different delta
            effect = "wrong"
        for name in names or list(modules):  # a rule on the adapter as a whole touches every module
            if name in modules and modules[name] != "wrong":
                modules[name] = effect

    replaced = server_args.replaced_rules() if server_args is not None else set()
    for rule_id, values in compute_features(engine, adapter, arch, text_config, scan).items():
        if rule_id in replaced:
            continue
        keys = values.get("all_keys", values.get("keys", []))
        names = sorted({by_key[k] for k in keys if k in by_key})
        if not names and any(k in adapter.parsed for k in keys):
            # only tensors beside the LoRA modules (whole weights, PEFT's copies, token rows): no module's delta
            # changes, so the rule touches none of them (it may still make loading fail)
            names = [""]
        mark(rule_id, rules[rule_id]["outcome"], names, partial=bool(values.get("partial")))
    if server_args is not None:
        for effect in server_effects(server_args, adapter, server_args.tp, base_classes(arch)):
            if effect.outcome is not None:
                mark(effect.finding.code, effect.outcome, [n for m in effect.modules for n in by_module.get(m, [m])])
    planned, why_not = planned_group_refusals(engine, prepared)
    for refusal in planned:
        mark(refusal.rule_id, refusal.outcome, [n for m in refusal.modules for n in by_module.get(m, [m])])
    return EnginePrediction(engine, load_failure, modules, why_not)


CHECK = Check("engine", run)
