"""Which layers the smoke forward checks: every layer on a GPU, a sample in the CPU interpreter, or --layers."""

from __future__ import annotations

from dataclasses import dataclass

from lora_convert.errors import UsageError


@dataclass(frozen=True)
class LayerSelection:
    present: list[int]  # the layers that hold LoRA groups
    chosen: list[int]  # the ones checked
    sampled: bool  # a sample was taken where every layer was not asked for

    def holds(self, group) -> bool:
        """Whether the group is checked: it is in a chosen layer, or outside every layer."""
        return group.layer is None or group.layer in self.chosen


def choose_layers(plan, layers: str, interpreter: bool) -> LayerSelection:
    """The layers to check for `--layers` (auto, all or a list); a choice that checks no group is a UsageError."""
    present = sorted({g.layer for g in plan.groups if g.layer is not None})
    if layers == "auto":
        chosen = present if not interpreter else sample_layers(plan.arch, present)
        sampled = interpreter and chosen != present
    else:
        wanted = parse_layers(layers, plan.arch.num_layers)
        chosen = present if wanted is None else [layer for layer in present if layer in wanted]
        sampled = False
    selection = LayerSelection(present, chosen, sampled)
    if not any(selection.holds(g) for g in plan.groups):
        # Only an explicit --layers can select nothing; a run that checked no group must not read as a pass.
        held = ", ".join(map(str, present)) if len(present) <= 12 else f"{present[0]}..{present[-1]}"
        raise UsageError(
            f"--layers {layers} selects none of the layers the adapter has LoRA on ({held}): nothing would be checked.",
            hint="Pick some of those layers, or pass --layers auto or all.",
        )
    return selection


def parse_layers(spec: str, num_layers: int) -> list[int] | None:
    """`all` -> None (every layer); `auto` handled by the caller; `0,3,5-7` -> a list."""
    if spec == "all":
        return None
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise UsageError(
            f"--layers {spec!r} is not a layer list.", hint="Use all, auto, or a list such as 0,3,5-7."
        ) from None
    bad = sorted(x for x in layers if x < 0 or x >= num_layers)
    if bad:
        raise UsageError(
            f"--layers names layer(s) {bad}, but the base model has layers 0..{num_layers - 1}.",
            hint="Pick layers inside that range, or pass --layers all.",
        )
    return sorted(layers)


def sample_layers(arch, present: list[int]) -> list[int]:
    """The first and last layer holding groups, and the first of each layer type."""
    if not present:
        return []
    chosen = {present[0], present[-1]}
    seen: set[frozenset] = set()
    for layer in present:
        kind = arch.layer_types(layer)
        if kind not in seen:
            seen.add(kind)
            chosen.add(layer)
    return sorted(chosen)
