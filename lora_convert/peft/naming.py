"""PEFT key grammar: one tensor name -> what it is.

    [base_model.model.] <module path> [.base_layer]* . <factor> [.<adapter name>] [.weight|.bias]

The module path is kept as written (its prefix says which model class and transformers version wrote it:
`model.`, `model.language_model.`, `language_model.model.`, `backbone.`). `layers.N.` gives the layer and
`experts.J.` the expert. A module path that ends in `experts` with no index is PEFT's 3-D ParamWrapper: which
parameter it wraps is *not* in the key and is decided by `adapter.py` from `target_parameters`, registration
order and shapes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from enum import Enum

PEFT_PREFIX = "base_model.model."


class Factor(str, Enum):
    LORA_A = "lora_A"
    LORA_B = "lora_B"
    EMBEDDING_A = "lora_embedding_A"
    EMBEDDING_B = "lora_embedding_B"
    MAGNITUDE = "lora_magnitude_vector"  # DoRA
    LORA_BIAS = "lora_bias"  # `lora_B.bias`, written when lora_bias=True
    FULL_WEIGHT = "full_weight"  # a whole module weight: modules_to_save, or a stray base weight
    FULL_BIAS = "full_bias"  # bias="all"/"lora_only" or a modules_to_save bias
    UNKNOWN = "unknown"


# Segments that mark a vision tower or multimodal projector (Kimi-K2.5, Qwen3.5-VL, LLaVA-style wrappers).
VISION_SEGMENTS = frozenset(
    {
        "vision_tower",
        "visual",
        "vision_model",
        "vision_encoder",
        "mm_projector",
        "multi_modal_projector",
        "vision_projector",
        "image_newline",
        "patch_embed",
        "merger",
    }
)

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"(?:^|\.)experts\.(\d+)(?=\.|$)")
_FACTOR_NAMES = {
    "lora_A": Factor.LORA_A,
    "lora_B": Factor.LORA_B,
    "lora_embedding_A": Factor.EMBEDDING_A,
    "lora_embedding_B": Factor.EMBEDDING_B,
    "lora_magnitude_vector": Factor.MAGNITUDE,
}
_FACTOR_SET = frozenset(_FACTOR_NAMES)


@dataclass(frozen=True)
class ParsedKey:
    key: str
    factor: Factor
    module: str  # module path: no PEFT prefix, no `.base_layer`, no adapter name, no factor
    base_layer_depth: int = 0  # how many `.base_layer` wrappers sit between the module and the factor
    adapter_name: str | None = None  # a leftover segment such as `default` in `lora_A.default.weight`
    has_peft_prefix: bool = True
    layer: int | None = None
    expert: int | None = None
    stack_prefix: str | None = None  # module path before `layers.N` (e.g. `model.language_model`)
    local_name: str = ""  # module path after `layers.N.`, expert index removed (e.g. `mlp.experts.gate_proj`)
    is_vision: bool = False

    @property
    def leaf(self) -> str:
        return self.module.rsplit(".", 1)[-1]

    @property
    def is_fused_experts(self) -> bool:
        """PEFT's 3-D expert wrapper: the module is the `experts` container itself."""
        return self.leaf == "experts"


def parse_key(key: str) -> ParsedKey:
    """Parse one tensor name. Never raises: what does not fit the grammar comes back as Factor.UNKNOWN."""
    # perf: this runs once per tensor (94,000 times for a per-expert DeepSeek-V3 adapter), so it uses plain loops
    # and set operations rather than generator expressions; same grammar, same results (docs/benchmarks.md).
    has_prefix = key.startswith(PEFT_PREFIX)
    rest = key[len(PEFT_PREFIX) :] if has_prefix else key
    fast = _fast_parse(key, rest, has_prefix)
    if fast is not None:
        return fast
    parts = rest.split(".")
    factor_at = None
    if not _FACTOR_SET.isdisjoint(parts):
        for i, part in enumerate(parts):
            if part in _FACTOR_NAMES:
                factor_at = i
                break
    adapter_name = None
    if factor_at is not None:
        name = parts[factor_at]
        tail = parts[factor_at + 1 :]
        factor = _FACTOR_NAMES[name]
        if tail and tail[-1] in ("weight", "bias"):
            suffix = tail[-1]
            tail = tail[:-1]
        else:
            suffix = None
        if len(tail) > 1 or factor_at == 0:
            return _unknown(key, rest, has_prefix)
        if tail:
            adapter_name = tail[0]
        if suffix == "bias":
            if factor is not Factor.LORA_B:
                return _unknown(key, rest, has_prefix)
            factor = Factor.LORA_BIAS
        elif suffix is None and factor in (Factor.LORA_A, Factor.LORA_B):
            # PEFT always writes `.weight` after lora_A/lora_B; without it the name is not PEFT's.
            return _unknown(key, rest, has_prefix)
        module_parts = parts[:factor_at]
    else:
        if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
            return _unknown(key, rest, has_prefix)
        factor = Factor.FULL_WEIGHT if parts[-1] == "weight" else Factor.FULL_BIAS
        module_parts = parts[:-1]
        # modules_to_save copies may still carry their wrapper: `<module>.modules_to_save.<name>.weight`
        if len(module_parts) >= 2 and module_parts[-2] == "modules_to_save":
            adapter_name = module_parts[-1]
            module_parts = module_parts[:-2]
        elif module_parts and module_parts[-1] == "original_module":
            module_parts = module_parts[:-1]
    depth = 0
    while module_parts and module_parts[-1] == "base_layer":
        depth += 1
        module_parts = module_parts[:-1]
    if not module_parts or "" in module_parts:
        return _unknown(key, rest, has_prefix)
    module = ".".join(module_parts)
    return _locate(key, factor, module, depth, adapter_name, has_prefix, module_parts)


# perf: the shape nearly every tensor of a large adapter has, `<stack>.layers.N.<local>[.base_layer]*.lora_A|B.weight`,
# is matched by one regex; the general parser below handles everything else. The fast path declines (returns None)
# whenever the general parser could decide differently: a second `lora_` segment, a vision segment, a local path
# that is all `base_layer`, an empty segment. tests/test_naming.py and the property tests check both paths.
_FAST_RE = re.compile(r"((?:[^.]+\.)*?)layers\.(\d+)\.([^.]+(?:\.[^.]+)*?)((?:\.base_layer)*)\.lora_([AB])\.weight")
_VISION_RE = re.compile("|".join(sorted(VISION_SEGMENTS)))


def _fast_parse(key: str, rest: str, has_prefix: bool) -> ParsedKey | None:
    if rest.count("lora_") != 1 or _VISION_RE.search(rest):
        return None
    m = _FAST_RE.fullmatch(rest)
    if m is None:
        return None
    stack, layer, local, wrappers, ab = m.groups()
    if local.startswith("base_layer"):
        return None
    module = f"{stack}layers.{layer}.{local}"
    expert = None
    expert_match = _EXPERT_RE.search(local) if "experts" in local else None
    if expert_match:
        expert = int(expert_match.group(1))
        local = (
            local[: expert_match.start()]
            + (".experts" if expert_match.start() > 0 else "experts")
            + local[expert_match.end() :]
        )
    return ParsedKey(
        key=key,
        factor=Factor.LORA_A if ab == "A" else Factor.LORA_B,
        module=module,
        base_layer_depth=wrappers.count(".base_layer"),
        adapter_name=None,
        has_peft_prefix=has_prefix,
        layer=int(layer),
        expert=expert,
        stack_prefix=stack[:-1].lstrip(".") if stack else "",
        local_name=local,
        is_vision=False,
    )


def _unknown(key: str, rest: str, has_prefix: bool) -> ParsedKey:
    return ParsedKey(key=key, factor=Factor.UNKNOWN, module=rest, has_peft_prefix=has_prefix)


def _locate(key, factor, module, depth, adapter_name, has_prefix, segments=None) -> ParsedKey:
    if segments is None:
        segments = module.split(".")
    is_vision = not VISION_SEGMENTS.isdisjoint(segments)
    layer = expert = None
    stack_prefix = None
    local = module
    # perf: both regexes need the literal segment, so skip them when it is absent (dense keys have no experts).
    match = _LAYER_RE.search(module + ".") if "layers" in segments else None
    if match and not is_vision:
        layer = int(match.group(1))
        stack_prefix = module[: match.start()].lstrip(".") if match.start() > 0 else ""
        local = (module + ".")[match.end() :].rstrip(".")
    expert_match = _EXPERT_RE.search(local) if layer is not None and "experts" in segments else None
    if expert_match:
        expert = int(expert_match.group(1))
        local = (
            local[: expert_match.start()]
            + (".experts" if expert_match.start() > 0 else "experts")
            + local[expert_match.end() :]
        )
    return ParsedKey(
        key=key,
        factor=factor,
        module=module,
        base_layer_depth=depth,
        adapter_name=adapter_name,
        has_peft_prefix=has_prefix,
        layer=layer,
        expert=expert,
        stack_prefix=stack_prefix,
        local_name=local,
        is_vision=is_vision,
    )


# ------------------------------------------------------------------------------------------ many keys at once
# perf: a large MoE adapter's keys come in a few dozen shapes that differ only in their numbers (the stress
# adapter: 94,306 keys, 16 shapes once `layers.N` and `experts.J` are abstracted), and the grammar never looks
# at a number's value: a whole-number segment is `\d+` to every rule. So `parse_keys` parses one key per shape
# (its *template*: the key with each whole-number segment cut out) and builds the others from their own slices and
# numbers.
# The derivation (a _Recipe) is found by parsing a probe key whose numbers are unique markers, and it is
# verified on the key it was made from; a shape it cannot describe is parsed key by key. tests/test_naming.py
# checks parse_keys against parse_key on a varied key set.
_NUMBER_SEGMENT = re.compile(r"\.([0-9]+)(?=\.)")  # a whole-number segment between two dots
_MAX_TEMPLATE_KEY = 1000  # longer keys are parsed one by one (the markers are longer than the key)
_FIELD_NAMES = tuple(f.name for f in fields(ParsedKey))
_new_object = object.__new__


class _Recipe:
    """How to build the ParsedKey of any key of one template from the key and its `_NUMBER_SEGMENT.split`."""

    __slots__ = ("constants", "slices", "joins", "numbers")

    def __init__(self, constants, slices, joins, numbers) -> None:
        self.constants: dict = constants  # every field -> its value when shared by every key of the template
        self.slices: list[tuple[str, int, int]] = slices  # field -> key[start : len(key) - end]
        self.joins: list[tuple[str, list]] = joins  # field -> "".join(piece or the number at an index)
        self.numbers: list[tuple[str, int]] = numbers  # field -> int(split part at an index)

    def build(self, key: str, parts: list[str]) -> ParsedKey:
        values = self.constants.copy()
        values["key"] = key
        n = len(key)
        for name, start, end in self.slices:
            values[name] = key[start : n - end]
        for name, pieces in self.joins:
            values[name] = "".join([p if type(p) is str else parts[p] for p in pieces])
        for name, at in self.numbers:
            values[name] = int(parts[at])
        # perf: the fields go straight into the instance dict (what the frozen dataclass __init__ does one
        # object.__setattr__ at a time): 0.1 s less on the stress adapter, for ~30 MB more of instance dicts
        # (RSS stays at the level of before the cache). The result equals ParsedKey(**values), field for field.
        parsed = _new_object(ParsedKey)
        parsed.__dict__.update(values)
        return parsed


def _make_recipe(key: str, parts: list[str]) -> _Recipe | None:
    """The recipe of `key`'s template, or None when it cannot be derived (then each key is parsed alone)."""
    width = len(key) + 2  # markers are longer than any literal run of digits in the key
    if width > _MAX_TEMPLATE_KEY:
        return None
    count = len(parts) // 2
    markers = [str(10 ** (width - 1) + i) for i in range(count)]
    index_of = {m: 2 * i + 1 for i, m in enumerate(markers)}  # marker -> its index in `parts`
    probe_parts = list(parts)
    probe_parts[1::2] = markers
    probe_key = _join_split(probe_parts)
    probe = parse_key(probe_key)
    marker_re = re.compile(rf"(\d{{{width}}})")
    constants: dict = dict.fromkeys(_FIELD_NAMES)  # every field, in order; the variable ones are overwritten
    slices: list = []
    joins: list = []
    numbers: list = []
    for name in _FIELD_NAMES:
        if name == "key":
            continue
        value = getattr(probe, name)
        if type(value) is int and str(value) in index_of:
            numbers.append((name, index_of[str(value)]))
        elif type(value) is str and marker_re.search(value):
            start = probe_key.find(value)
            if start >= 0 and not marker_re.search(probe_key[:start] + "." + probe_key[start + len(value) :]):
                slices.append((name, start, len(probe_key) - start - len(value)))
            else:
                pieces = marker_re.split(value)  # literal, marker, literal, ...
                if any(piece not in index_of for piece in pieces[1::2]):
                    return None
                joins.append((name, [index_of[p] if i % 2 else p for i, p in enumerate(pieces) if p]))
        else:
            constants[name] = value
    recipe = _Recipe(constants, slices, joins, numbers)
    return recipe if _same(recipe.build(key, parts), parse_key(key)) else None


def _join_split(parts: list[str]) -> str:
    """The inverse of `_NUMBER_SEGMENT.split`."""
    return "".join(p if i % 2 == 0 else "." + p for i, p in enumerate(parts))


def _same(a: ParsedKey, b: ParsedKey) -> bool:
    return all(type(getattr(a, n)) is type(getattr(b, n)) and getattr(a, n) == getattr(b, n) for n in _FIELD_NAMES)


def parse_keys(keys: Iterable[str]) -> dict[str, ParsedKey]:
    """`{key: parse_key(key) for key in keys}`, equal field for field, parsing each template once (above)."""
    out: dict[str, ParsedKey] = {}
    recipes: dict[tuple[str, ...], _Recipe | None] = {}
    split = _NUMBER_SEGMENT.split
    for key in keys:
        parts = split(key)
        if len(parts) == 1:
            out[key] = parse_key(key)
            continue
        template = tuple(parts[0::2])
        recipe = recipes.get(template, False)
        if recipe is False:
            recipe = recipes[template] = _make_recipe(key, parts)
        out[key] = parse_key(key) if recipe is None else recipe.build(key, parts)
    return out


def module_without_expert(parsed: ParsedKey) -> str:
    """The module path with the expert index taken out (`...experts.3.w1` -> `...experts.w1`)."""
    if parsed.expert is None:
        return parsed.module
    return _EXPERT_RE.sub(".experts", parsed.module, count=1).lstrip(".")
