"""What every feature detector looks at (the adapter, the bound architecture, the base config) and the small
formatting helpers their placeholders share."""

from __future__ import annotations

from lora_convert.text import spans

MAX_EXAMPLES = 3
MAX_KEYS = 50


class Context:
    """The adapter, the architecture (or None), the base text config and the data scan (or None)."""

    def __init__(self, adapter, arch, text_config: dict, scan, engine: str):
        self.adapter = adapter
        self.arch = arch
        self.config = dict(getattr(arch, "config", None) or text_config or {})
        self.scan = scan
        self.engine = engine
        self.family = getattr(arch, "family", None)
        self.modules = [m for m in adapter.modules]
        top = dict(getattr(arch, "top_config", None) or text_config or {})
        self.classes = tuple(a for a in top.get("architectures") or () if isinstance(a, str))

    def num_layers(self) -> int | None:
        if self.arch is not None:
            return int(self.arch.num_layers)
        n = self.config.get("num_hidden_layers")
        return n if isinstance(n, int) else None

    def container(self, mod) -> str:
        """`self_attn` for `self_attn.q_proj`; `mlp.experts` for an expert module."""
        local = mod.local_name or mod.module
        return local.rsplit(".", 1)[0] if "." in local else ""

    def match(self, mod):
        """The schema's place for `mod` (group and covered slices), or None without a base or a place."""
        return self.arch.resolve(mod) if self.arch is not None else None


def examples(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_EXAMPLES])
    return shown + (f" (+{len(items) - MAX_EXAMPLES} more)" if len(items) > MAX_EXAMPLES else "")


def layers_text(layers) -> str:
    return spans(sorted(set(layers)))


def module_keys(mods) -> list[str]:
    """Every key of `mods` (a finding shows the first MAX_KEYS; the per-module prediction needs them all)."""
    return [k for m in mods for k in m.keys]


def in_families(ctx: Context, params: dict) -> bool:
    """A rule's `families` condition: true for a listed family, and for an unknown one unless `unknown_family` is
    false; never for a family in `not_families` (a shape the rule's engine code does not build for that family)."""
    if ctx.family is not None and ctx.family in params.get("not_families", ()):
        return False
    families = params.get("families")
    return not families or ctx.family in families or (ctx.family is None and params.get("unknown_family", True))


def in_containers(ctx: Context, mod, containers) -> bool:
    """Whether `mod` sits in one of `containers` (`mixer` matches `mixer` and `backbone.mixer`)."""
    place = ctx.container(mod)
    return any(place == c or place.endswith("." + c) for c in containers)


def in_classes(ctx: Context, params: dict) -> bool:
    """A rule's model-class conditions on the base config's `architectures`: `classes` (one of them) and
    `not_classes` (none of them). Unknown classes (no base) pass `not_classes` and fail `classes`."""
    if params.get("classes") and not set(ctx.classes) & set(params["classes"]):
        return False
    return not (params.get("not_classes") and set(ctx.classes) & set(params["not_classes"]))
