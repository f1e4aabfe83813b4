"""The `shapes` check: every module against the base's architecture schema (lora_convert/check/shape_check.py),
or a stacked output against its own lora_layout.json. When neither is possible the check does not run, and says so
with the error `shapes.unchecked` (a warning, `shapes.unchecked-allowed`, with --allow-unchecked; see
`lora_convert.check.context.not_checked`): an adapter with a wrong-shaped tensor must not pass a CI gate because its
base was unknown."""

from __future__ import annotations

from lora_convert.check.context import MAX_KEYS, Check, CheckContext, Outcome, not_checked, unchecked_text
from lora_convert.codes import finding
from lora_convert.findings import Finding


def run(ctx: CheckContext) -> Outcome:
    if ctx.stacked:
        return Outcome(stacked_findings(ctx.adapter, ctx.arch))
    if ctx.arch is not None:
        return Outcome(ctx.shape_findings)  # computed once per adapter (pipeline/prepared.py)
    why = ctx.base.no_shapes_why or "no architecture schema"
    message = (
        f"The tensor shapes were not checked against the base model: {why}. A wrong-shaped tensor would go "
        "unnoticed until an engine loads the adapter."
    )
    allowed = ctx.options.allow_unchecked
    gap = finding(
        "shapes.unchecked-allowed" if allowed else "shapes.unchecked",
        **unchecked_text(allowed, message, _unchecked_fix(ctx.base.config)),
    )
    return not_checked(ctx, why, gap)


CHECK = Check("shapes", run)


def _unchecked_fix(base_cfg) -> str:
    if base_cfg is None:
        return (
            "Pass --base with the base model: a folder holding config.json, a config.json file, a Hub id, or a preset "
            "from `lora-convert schemas list`"
        )
    return (
        f"Add a schema for model_type {base_cfg.model_type!r} (docs/schemas.md; `lora-convert schemas list` shows "
        "the supported families), or pass --base with a supported base"
    )


def stacked_findings(adapter, arch) -> list[Finding]:
    """Check a stacked output (lora_layout.json) against its own layout file: every group's A and B shapes."""
    layout = adapter.stacked_layout or {}
    unreadable = _unreadable_layout(layout)
    if unreadable is not None:
        return [unreadable]
    rank, groups, tensors = layout["rank"], layout.get("groups") or [], adapter.index.tensors
    out = _rank_findings(rank, adapter.config.r)
    for group in groups:
        out.extend(_group_findings(group, rank, tensors))
    out.extend(_unlisted_findings(groups, tensors))
    return out


def _unreadable_layout(layout) -> Finding | None:
    """Why lora_layout.json cannot be checked against (not our format; no rank or groups), or None."""
    if not isinstance(layout, dict) or layout.get("format") != "lora-convert/stacked":
        return finding(
            "layout.unknown",
            f"lora_layout.json does not describe a lora-convert stacked layout "
            f"(format {layout.get('format') if isinstance(layout, dict) else None!r}).",
            keys=["lora_layout.json"],
            expected="lora-convert/stacked",
        )
    rank = layout.get("rank")
    if not isinstance(rank, int) or rank <= 0 or not isinstance(layout.get("groups") or [], list):
        return finding(
            "layout.invalid",
            "lora_layout.json lacks a positive `rank` or a `groups` list.",
            keys=["lora_layout.json"],
        )
    return None


def _rank_findings(rank: int, config_r) -> list[Finding]:
    if config_r == rank:
        return []
    return [
        finding(
            "layout.rank-mismatch",
            f"lora_layout.json says rank {rank} but adapter_config.json says r={config_r}.",
            keys=["lora_layout.json", "adapter_config.json"],
            expected=rank,
            actual=config_r,
        )
    ]


def _group_findings(group, rank: int, tensors: dict) -> list[Finding]:
    """One group of the layout: its key, both tensors present, and their shapes as the layout implies them."""
    if not isinstance(group, dict) or not isinstance(group.get("key"), str):
        return [finding("layout.invalid", "lora_layout.json has a group without a `key`.", keys=["lora_layout.json"])]
    key = group["key"]
    a_key, b_key = f"base_model.model.{key}.lora_A.weight", f"base_model.model.{key}.lora_B.weight"
    missing = [
        finding("layout.missing-tensor", f"lora_layout.json lists group {key} but {k} is not in the file.", keys=[k])
        for k in (a_key, b_key)
        if k not in tensors
    ]
    if missing:
        return missing
    slices = group.get("slices") or []
    out_total = sum(int(s.get("out_features") or 0) for s in slices if isinstance(s, dict))
    experts = group.get("experts")
    lead = (experts,) if isinstance(experts, int) and experts else ()  # a 3-D group: [E, ...]
    wanted = ((a_key, lead + (len(slices) * rank, group.get("in_features"))), (b_key, lead + (out_total, rank)))
    return [
        finding(
            "layout.shape",
            f"{k} has shape {list(tensors[k].shape)}; lora_layout.json implies {list(want)}.",
            keys=[k],
            expected=list(want),
            actual=list(tensors[k].shape),
        )
        for k, want in wanted
        if tuple(tensors[k].shape) != tuple(want)
    ]


def _unlisted_findings(groups: list, tensors: dict) -> list[Finding]:
    """Tensors in the file that no group of the layout describes."""
    listed = {
        f"base_model.model.{g['key']}.lora_{f}.weight"
        for g in groups
        if isinstance(g, dict) and isinstance(g.get("key"), str)
        for f in "AB"
    }
    extra = [k for k in tensors if k not in listed]
    if not extra:
        return []
    return [
        finding(
            "layout.unlisted-tensor",
            f"{len(extra)} tensor(s) are not described by lora_layout.json (e.g. {extra[0]}).",
            keys=extra[:MAX_KEYS],
        )
    ]
