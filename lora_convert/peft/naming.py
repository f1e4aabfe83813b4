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
    # `<module>.base_layer.weight`: PEFT's copy of a wrapped layer's own base weight, written beside its LoRA when
    # an embedding layer is targeted or the embeddings are tied (`save_embedding_layers`, peft utils/save_and_load.py)
    BASE_LAYER_COPY = "base_layer_copy"
    # `<module>[.token_adapter].trainable_tokens_delta`: PEFT's trainable tokens (`trainable_token_indices`), the new
    # values of some embedding rows (peft tuners/trainable_tokens/layer.py), no LoRA factor
    TRAINABLE_TOKENS = "trainable_tokens_delta"
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
    has_prefix = key.startswith(PEFT_PREFIX)
    rest = key[len(PEFT_PREFIX) :] if has_prefix else key
    parts = rest.split(".")
    factor_at = next((i for i, part in enumerate(parts) if part in _FACTOR_NAMES), None)
    if factor_at is None:
        split = _split_trainable_tokens(parts) or _split_whole_module(parts)
    else:
        split = _split_lora_factor(parts, factor_at)
    if split is None:
        return _unknown(key, rest, has_prefix)
    factor, module_parts, adapter_name = split
    depth = 0
    while module_parts and module_parts[-1] == "base_layer":
        depth += 1
        module_parts = module_parts[:-1]
    if not module_parts or "" in module_parts:
        return _unknown(key, rest, has_prefix)
    if factor is Factor.FULL_WEIGHT and depth:
        factor = Factor.BASE_LAYER_COPY
    return _locate(key, factor, ".".join(module_parts), depth, adapter_name, has_prefix, module_parts)


def _split_lora_factor(parts: list[str], factor_at: int) -> tuple[Factor, list[str], str | None] | None:
    """`<module> . <factor> [.<adapter name>] [.weight|.bias]`: the factor, the module's segments, the adapter name;
    None when the name does not fit."""
    factor = _FACTOR_NAMES[parts[factor_at]]
    tail = parts[factor_at + 1 :]
    suffix = tail.pop() if tail and tail[-1] in ("weight", "bias") else None
    if len(tail) > 1 or factor_at == 0:
        return None
    if suffix == "bias":
        if factor is not Factor.LORA_B:
            return None
        factor = Factor.LORA_BIAS
    elif suffix is None and factor in (Factor.LORA_A, Factor.LORA_B):
        return None  # PEFT always writes `.weight` after lora_A/lora_B; without it the name is not PEFT's
    return factor, parts[:factor_at], tail[0] if tail else None


def _split_trainable_tokens(parts: list[str]) -> tuple[Factor, list[str], None] | None:
    """`<module> [.token_adapter] .trainable_tokens_delta` (PEFT's TrainableTokensLayer, nested as `token_adapter`
    when it sits beside a LoRA tuner); None when the name is not one."""
    if len(parts) < 2 or parts[-1] != Factor.TRAINABLE_TOKENS.value:
        return None
    module_parts = parts[:-2] if parts[-2] == "token_adapter" else parts[:-1]
    return Factor.TRAINABLE_TOKENS, module_parts, None


def _split_whole_module(parts: list[str]) -> tuple[Factor, list[str], str | None] | None:
    """`<module> .weight|.bias`, a whole module's tensor (modules_to_save, bias); None when the name does not fit."""
    if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
        return None
    factor = Factor.FULL_WEIGHT if parts[-1] == "weight" else Factor.FULL_BIAS
    module_parts = parts[:-1]
    adapter_name = None
    # modules_to_save copies may still carry their wrapper: `<module>.modules_to_save.<name>.weight`
    if len(module_parts) >= 2 and module_parts[-2] == "modules_to_save":
        adapter_name = module_parts[-1]
        module_parts = module_parts[:-2]
    elif module_parts and module_parts[-1] == "original_module":
        module_parts = module_parts[:-1]
    return factor, module_parts, adapter_name


def _unknown(key: str, rest: str, has_prefix: bool) -> ParsedKey:
    return ParsedKey(key=key, factor=Factor.UNKNOWN, module=rest, has_peft_prefix=has_prefix)


def _locate(key, factor, module, depth, adapter_name, has_prefix, segments) -> ParsedKey:
    """The key's place in the model: layer, expert, the path before and after `layers.N`, vision tower or not."""
    is_vision = not VISION_SEGMENTS.isdisjoint(segments)
    layer = expert = stack_prefix = None
    local = module
    match = _LAYER_RE.search(module + ".")
    if match and not is_vision:
        layer = int(match.group(1))
        stack_prefix = module[: match.start()].lstrip(".") if match.start() > 0 else ""
        local = (module + ".")[match.end() :].rstrip(".")
        expert, local = _fold_expert(local)
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


def _fold_expert(local: str) -> tuple[int | None, str]:
    """The expert index of a path inside a layer, and the path without it (`mlp.experts.3.w1` -> 3,
    `mlp.experts.w1`)."""
    match = _EXPERT_RE.search(local)
    if match is None:
        return None, local
    folded = local[: match.start()] + (".experts" if match.start() > 0 else "experts") + local[match.end() :]
    return int(match.group(1)), folded


# ------------------------------------------------------------------------------------------ many keys at once
# The fast path of `{key: parse_key(key) for key in keys}`, which stays its test oracle (tests/test_naming.py,
# tests/test_peft_reading_parts.py: equal field for field, on fixture, varied and generated keys).
# A large MoE adapter's keys come in a few dozen shapes that differ only in their numbers (tens of thousands of keys,
# 16 shapes once `layers.N` and `experts.J` are abstracted), and the grammar never looks at a number's value: a
# whole-number segment is `\d+` to every rule. So `parse_keys` parses one key per shape (its *template*: the key
# with each whole-number segment cut out) and builds the others from their own slices and numbers.
# The derivation (a _Recipe) is found by parsing a probe key whose numbers are unique markers, and it is
# verified on the key it was made from; a shape it cannot describe is parsed key by key. What it saves is in
# docs/benchmarks.md ("peft/ and the header reader").
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
        # The fields go straight into the instance dict, where the frozen dataclass's __init__ would set them one
        # object.__setattr__ at a time (docs/benchmarks.md); the result equals ParsedKey(**values), field for field.
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
