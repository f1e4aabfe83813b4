"""A module whose output rows the schema splits into named slices, of which an engine applies LoRA to only some
(the rule's `kept` slices): how many rows, and how much of the trained delta, the engine loses."""

from __future__ import annotations

from lora_convert.engines.features.context import (
    Context,
    examples,
    in_containers,
    in_families,
    layers_text,
    module_keys,
)


def split_modules(ctx: Context, params: dict) -> list:
    """The modules a `partial_row_split` rule is about: its `leaves` inside its `containers`."""
    leaves, within = set(params["leaves"]), tuple(params["containers"])
    return [m for m in ctx.modules if m.leaf in leaves and in_containers(ctx, m, within) and not m.is_vision]


def f_partial_row_split(ctx: Context, params: dict):
    if not in_families(ctx, params):
        return None
    mods = split_modules(ctx, params)
    if not mods:
        return None
    out = {
        "count": len(mods),
        "layers": layers_text([m.layer for m in mods if m.layer is not None]),
        "keys": module_keys(mods),
        "examples": examples([m.module for m in mods]),
        "partial": True,  # the engine serves some rows of these modules: a different delta, not none
    }
    kept_names = set(params["kept"])
    match = next((x for x in map(ctx.match, mods) if x is not None), None)
    if match is None:
        dropped, sizes = _dropped_from_schema(ctx, params, mods[0])
        out["share_text"] = (
            f"the {'/'.join(dropped)} rows ({sizes} of them; pass --base for the numbers)"
            if dropped
            else f"the rows outside {', '.join(params['kept'])} (pass --base for the numbers)"
        )
        return out
    covered = [match.group.slices[i] for i in match.slice_indices]
    total = sum(s.out_features for s in covered)
    lost_ranges = _row_ranges(covered, lambda name: name not in kept_names)
    lost = sum(stop - start for start, stop in lost_ranges)
    dropped_names = "/".join(s.name for s in covered if s.name not in kept_names)
    out.update(
        {
            "rows_total": total,
            "rows_kept": total - lost,
            "rows_lost": lost,
            "row_share_lost": f"{100 * lost / total:.1f}%",
        }
    )
    share = _delta_share(ctx, mods, total, lost_ranges)
    if share is None:
        out["share_text"] = (
            f"{lost} of the {total} output rows ({out['row_share_lost']}) are {dropped_names} rows "
            "(run with the data scan on for the share of the delta itself)"
        )
    else:
        percent, have = share
        out["delta_share_lost"] = percent
        out["share_text"] = (
            f"{percent} of the {mods[0].leaf} delta (squared Frobenius norm of B @ A, over {have} "
            f"module(s)) sits in the {lost} {dropped_names} rows of {total}"
        )
    return out


def _row_ranges(slices, wanted) -> list[tuple[int, int]]:
    """[start, stop) output rows of the slices whose name `wanted` accepts, in row order."""
    ranges, offset = [], 0
    for s in slices:
        if wanted(s.name):
            ranges.append((offset, offset + s.out_features))
        offset += s.out_features
    return ranges


def _delta_share(ctx: Context, mods, total: int, lost_ranges) -> tuple[str, int] | None:
    """The share of the delta (squared Frobenius norm of B @ A per output row, from the data scan) that sits in
    the lost rows, over the modules the scan measured; None without a scan."""
    energy = ctx.scan.row_energy if ctx.scan is not None else {}
    lost = whole = 0.0
    have = 0
    for m in mods:
        rows = energy.get(m.module)
        if rows and len(rows) == total:
            whole += sum(rows)
            lost += sum(sum(rows[start:stop]) for start, stop in lost_ranges)
            have += 1
    if not have or whole <= 0:
        return None
    return f"{100 * lost / whole:.1f}%", have


def _dropped_from_schema(ctx: Context, params: dict, mod) -> tuple[list[str], str]:
    """Without a base: the dropped slices' names and `out` expressions from the rule's family schema."""
    from lora_convert.arch.schema import load_schema

    kept = set(params["kept"])
    for family in params.get("families", []):
        for group in load_schema(family).groups:
            for alias, covered, _ in group.sources():
                if alias == mod.local_name:
                    slices = [group.slices[i] for i in covered if group.slices[i].name not in kept]
                    return [s.name for s in slices], " + ".join(s.out for s in slices)
    return [], ""
