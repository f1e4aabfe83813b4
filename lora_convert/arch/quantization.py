"""Quantized bases: which scheme stores each module family, and how a packed tensor maps back to its logical shape.

The knowledge is data, `lora_convert/arch/quantization.json` (one entry per scheme as `quantization_config` writes
it, with the tensors a quantized Linear or 3-D expert parameter is stored as and the sources); this module reads it.
A LoRA adapter is trained against the logical [out, in] of every module, whatever its storage, so the schema's
shapes stay the reference: `BaseQuantization.classify` says what a group of the bound architecture is stored as
(from the config's lists of unquantized modules), and `BaseQuantization.storage` recognises one checkpoint tensor
name as a form of a scheme and checks its stored shape against the logical one (lora_convert/check/base_checkpoint.py
reads the headers). docs/quantization.md explains both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from lora_convert.arch.expr import evaluate
from lora_convert.errors import SchemaError
from lora_convert.io.shipped_data import BOOL, EXPRESSION, STRING, Choice, ListOf, MapOf, Nullable, Object, load_shipped

DATA_FILE = "quantization.json"


@dataclass(frozen=True)
class Form:
    """One way a scheme stores a module: its shape-bearing tensor (`tensor`: a suffix after the module path, or
    after a 3-D parameter's name for `experts_3d`) and companions."""

    tensor: str
    dtypes: tuple[str, ...]
    stored: tuple[Any, ...]  # expressions over n_out, n_in, E and the params
    logical: tuple[str, ...]  # expressions over d0..d3 and the params
    aux: dict[str, tuple[Any, ...] | None]  # companion suffix -> shape expressions (None: recognised only)
    experts_3d: bool = False


@dataclass(frozen=True)
class Scheme:
    id: str
    quant_method: tuple[str, ...]
    label: str
    params: dict[str, str]
    skip_fields: tuple[str, ...]
    skip_syntax: str
    never: frozenset[str]
    forms: tuple[Form, ...]
    sources: tuple[str, ...]
    when: str | None = None
    formats: tuple[str, ...] = ()
    experts_only: bool = False


@dataclass(frozen=True)
class ActiveScheme:
    """A scheme bound to the base's config: its parameters evaluated, its label filled in."""

    scheme: Scheme
    params: dict[str, Any]
    label: str
    targets: tuple[str, ...] = ()  # compressed-tensors config-group targets (empty: every Linear)


@dataclass(frozen=True)
class Classification:
    """What one module group of the base is stored as: `scheme` None means not quantized, and `why` says why."""

    scheme: ActiveScheme | None
    why: str = ""

    @property
    def text(self) -> str:
        if self.scheme is not None:
            return self.scheme.label
        return "not quantized" + (f" ({self.why})" if self.why else "")


@dataclass
class StorageCheck:
    """One checkpoint tensor recognised as a form of the base's scheme (or a plain weight)."""

    key: str
    role: str  # "main" | "aux" | "plain"
    form: Form | None
    scheme: ActiveScheme | None
    stored: tuple[int, ...]
    expected: tuple[int, ...] | None = None  # the stored shape the logical one implies
    logical: tuple[int, ...] | None = None  # the stored shape mapped back

    @property
    def ok(self) -> bool:
        return self.expected is None or tuple(self.expected) == tuple(self.stored)


# ------------------------------------------------------------------------------------------------ the data
_SHAPE = ListOf(EXPRESSION)  # expressions over n_out, n_in, E and the params (stored) or d0..d3 (logical)
_FORM = Object(
    required={"tensor": STRING, "stored": _SHAPE, "logical": _SHAPE},
    optional={"dtypes": ListOf(STRING), "aux": MapOf(Object(optional={"shape": Nullable(_SHAPE)}))},
)
_SCHEME = Object(
    required={"id": STRING, "quant_method": ListOf(STRING, non_empty=True), "label": STRING},
    optional={
        "params": MapOf(EXPRESSION),
        "skip_fields": ListOf(STRING),
        "skip_syntax": Choice(("transformers", "compressed-tensors", "modelopt")),
        "never": ListOf(STRING),
        "forms": ListOf(_FORM),
        "forms_3d": ListOf(_FORM),
        "sources": ListOf(STRING),
        "when": EXPRESSION,
        "format": ListOf(STRING),
        "experts_only": BOOL,
    },
    label="id",
)
QUANTIZATION_SPEC = Object(required={"schemes": ListOf(_SCHEME)}, optional={"config_fields": ListOf(STRING)})


@cache
def _document() -> dict:
    return load_shipped("lora_convert.arch", DATA_FILE, QUANTIZATION_SPEC, f"lora_convert/arch/{DATA_FILE}")


def _form(raw: dict, experts_3d: bool) -> Form:
    aux = {
        suffix: tuple(spec["shape"]) if spec.get("shape") is not None else None
        for suffix, spec in raw.get("aux", {}).items()
    }
    return Form(
        tensor=raw["tensor"],
        dtypes=tuple(raw.get("dtypes", ())),
        stored=tuple(raw["stored"]),
        logical=tuple(raw["logical"]),
        aux=aux,
        experts_3d=experts_3d,
    )


@cache
def schemes() -> tuple[Scheme, ...]:
    """Every scheme of quantization.json, in file order (the first that matches a config wins)."""
    return tuple(
        Scheme(
            id=raw["id"],
            quant_method=tuple(raw["quant_method"]),
            label=raw["label"],
            params=dict(raw.get("params", {})),
            skip_fields=tuple(raw.get("skip_fields", ())),
            skip_syntax=raw.get("skip_syntax", "transformers"),
            never=frozenset(raw.get("never", ())),
            forms=tuple(
                [_form(f, False) for f in raw.get("forms", [])] + [_form(f, True) for f in raw.get("forms_3d", [])]
            ),
            sources=tuple(raw.get("sources", ())),
            when=raw.get("when"),
            formats=tuple(raw.get("format", ())),
            experts_only=raw.get("experts_only", False),
        )
        for raw in _document()["schemes"]
    )


@cache
def config_fields() -> tuple[str, ...]:
    return tuple(_document().get("config_fields") or ("quantization_config",))


def scheme_ids() -> list[str]:
    return [s.id for s in schemes()]


# ------------------------------------------------------------------------------------------------ the config
def find_quantization_config(top: dict, text: dict | None = None) -> tuple[dict | None, str | None]:
    """The base's quantization_config and where it was found: at the top level of config.json, or inside the
    wrapper's text config (`text_config.quantization_config`)."""
    places = [(top, "config.json")]
    if isinstance(text, dict) and text is not top:
        places.append((text, "text_config"))
    else:
        for name in ("text_config", "llm_config", "language_config"):
            if isinstance(top.get(name), dict):
                places.append((top[name], name))
    for cfg, where in places:
        for name in config_fields():
            qc = cfg.get(name)
            if isinstance(qc, dict) and qc:
                return qc, f"{where} `{name}`" if where != "config.json" else f"config.json `{name}`"
    return None, None


def _fill(template: str, values: dict) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(values.get(m.group(1), m.group(0))), template)


def _bind(scheme: Scheme, scope: dict, targets: tuple[str, ...] = ()) -> ActiveScheme | None:
    try:
        if scheme.when and not evaluate(scheme.when, scope):
            return None
        params = {k: evaluate(v, scope) for k, v in scheme.params.items()}
    except (SchemaError, TypeError, ValueError, ZeroDivisionError, IndexError, KeyError):
        return None
    return ActiveScheme(scheme, params, _fill(scheme.label, params), targets)


def _ct_groups(qc: dict) -> list[tuple[dict, tuple[str, ...], str | None]]:
    """compressed-tensors: each config group's weight args, targets and format (the group's, else the config's)."""
    out = []
    for group in (qc.get("config_groups") or {}).values():
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            continue
        targets = tuple(t for t in group.get("targets") or () if isinstance(t, str))
        out.append((group["weights"], targets, group.get("format") or qc.get("format")))
    return out


class BaseQuantization:
    """The quantization of one base: the bound schemes, the unquantized-module lists, and the lookups."""

    def __init__(self, qc: dict, where: str):
        self.config = qc
        self.where = where
        self.method = str(qc.get("quant_method") or qc.get("quantization_method") or "unknown").lower()
        self.active: list[ActiveScheme] = []
        if self.method == "compressed-tensors":
            for weights, targets, fmt in _ct_groups(qc):
                scope = {**weights, "format": fmt}
                for s in schemes():
                    if self.method in s.quant_method and fmt in s.formats:
                        bound = _bind(s, scope, targets)
                        if bound is not None:
                            self.active.append(bound)
                            break
        else:
            for s in schemes():
                if self.method in s.quant_method:
                    bound = _bind(s, qc)
                    if bound is not None:
                        self.active.append(bound)
                        break
        first = self.active[0].scheme if self.active else None
        self.skip_syntax = first.skip_syntax if first else "transformers"
        self.skip: list[str] = []
        fields = first.skip_fields if first else ("modules_to_not_convert", "ignore", "ignored_layers")
        for name in fields:
            values = qc.get(name)
            if isinstance(values, list):
                self.skip += [v for v in values if isinstance(v, str)]
        self._groups: dict[tuple, Classification] = {}

    @property
    def known(self) -> bool:
        return bool(self.active)

    @property
    def label(self) -> str:
        if not self.active:
            return f"{self.method} (a scheme lora-convert does not know)"
        labels = list(dict.fromkeys(a.label for a in self.active))
        return f"{self.method}: " + "; ".join(labels)

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(src for a in self.active for src in a.scheme.sources))

    # -- which modules are quantized
    def skipped_by(self, path: str) -> str | None:
        """The entry of the unquantized-module lists that names `path`, or None."""
        for pattern in self.skip:
            if _skip_matches(self.skip_syntax, pattern, path):
                return pattern
        return None

    def skip_field(self, pattern: str) -> str:
        """The config list that holds `pattern` (modules_to_not_convert, ignore, ...)."""
        for name in (self.active[0].scheme.skip_fields if self.active else ()) or ("ignore",):
            if pattern in (self.config.get(name) or ()):
                return name
        return "modules_to_not_convert"

    def classify(self, group) -> Classification:
        """What a group of the bound architecture (a GroupSpec) is stored as."""
        key = (group.path, group.kind, tuple(s.name for s in group.slices), group.experts)
        hit = self._groups.get(key)
        if hit is None:
            hit = self._groups[key] = self._classify(group)
        return hit

    def _classify(self, group) -> Classification:
        if not self.active:
            return Classification(None, "unknown scheme")
        scheme = self.active[0]
        if group.kind in scheme.scheme.never:
            return Classification(None, "never quantized by this scheme")
        if scheme.scheme.experts_only and not group.experts:
            return Classification(None, "the scheme quantizes only the routed experts")
        for path in module_paths(group):
            hit = self.skipped_by(path)
            if hit is not None:
                return Classification(None, f"{self.skip_field(hit)}: {hit}")
        for bound in self.active:  # compressed-tensors: the first config group whose targets take the module
            if not bound.targets or any(_target_matches(t, p) for t in bound.targets for p in module_paths(group)):
                return Classification(bound)
        return Classification(None, "no config group targets it")

    def families(self, arch) -> dict[str, list[str]]:
        """Module family (group kind) -> the distinct storage texts of its groups, over every layer type set and
        the top-level groups."""
        out: dict[str, list[str]] = {}
        seen_layers = [layers[0] for _, layers in arch.layer_type_sets() if layers]
        groups = [g for layer in seen_layers for g in arch.groups(layer)] + arch.top_level_groups()
        for g in groups:
            text = self.classify(g).text
            texts = out.setdefault(g.kind, [])
            if text not in texts:
                texts.append(text)
        return out

    # -- checkpoint tensors
    def suffixes(self) -> list[tuple[str, Form | None, ActiveScheme | None, str]]:
        """(suffix, form, scheme, role) for every tensor suffix this base's schemes store, longest first."""
        out: list[tuple[str, Form | None, ActiveScheme | None, str]] = []
        for bound in self.active:
            for form in bound.scheme.forms:
                out.append((form.tensor, form, bound, "main"))
                out += [(suffix, form, bound, "aux") for suffix in form.aux]
        return sorted(out, key=lambda t: -len(t[0]))

    def check(self, key: str, role: str, form: Form, bound: ActiveScheme, stored, dtype: str, n_out, n_in, experts):
        """A StorageCheck of one recognised tensor against the logical [n_out, n_in] (and E for 3-D forms)."""
        scope = {**bound.params, "n_out": n_out, "n_in": n_in, "E": experts}
        scope.update({f"d{i}": d for i, d in enumerate(stored)})
        check = StorageCheck(key, role, form, bound, tuple(stored))
        shapes = form.stored if role == "main" else form.aux.get(_aux_suffix(form, key))
        if shapes is None:
            return check
        try:
            check.expected = tuple(int(evaluate(str(e), scope)) for e in shapes)
            if role == "main":
                check.logical = tuple(int(evaluate(str(e), scope)) for e in form.logical)
        except (SchemaError, TypeError, ValueError, ZeroDivisionError, IndexError):
            check.expected = None
        return check


def _aux_suffix(form: Form, key: str) -> str | None:
    return next((s for s in sorted(form.aux, key=len, reverse=True) if key.endswith(s)), None)


def module_paths(group) -> list[str]:
    """The checkpoint module names a group stands for: its slices' names next to the group's path (per-expert
    names use expert 0), and for routed experts the `experts` container itself (3-D parameters)."""
    parent = group.path.rsplit(".", 1)[0] if "." in group.path else ""
    join = (lambda n: f"{parent}.{n}") if parent else (lambda n: n)
    if group.experts:
        container = parent
        names = [f"{container}.0.{s.name}" for s in group.slices] + [container]
        return names
    return [join(s.name) for s in group.slices] + ([group.path] if len(group.slices) > 1 else [])


def _glob_matches(pattern: str, path: str) -> bool:
    """ModelOpt's exclude entries: a glob (`*` any text, everything else literal) matched in full against the module
    name, against that name without a leading `language_model.`, or against any one of its dot-separated parts."""
    glob = re.compile(".*".join(re.escape(piece) for piece in pattern.split("*")))
    names = [path] + ([path.removeprefix("language_model.")] if path.startswith("language_model.") else [])
    return any(glob.fullmatch(name) or any(glob.fullmatch(part) for part in name.split(".")) for name in names)


def _skip_matches(syntax: str, pattern: str, path: str) -> bool:
    if syntax == "modelopt":
        return _glob_matches(pattern, path)
    if syntax == "compressed-tensors":
        if pattern.startswith("re:"):
            try:
                return re.match(pattern[3:], path) is not None
            except re.error:
                return False
        return pattern == path
    # transformers: from the start at a module boundary, as a regex with that boundary, or as a suffix
    try:
        return bool(re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", path)) or path.endswith(pattern)
    except re.error:
        return path.endswith(pattern)


def _target_matches(target: str, path: str) -> bool:
    if target.startswith("re:"):
        try:
            return re.match(target[3:], path) is not None
        except re.error:
            return False
    if target[:1].isupper():  # a class name (Linear): every Linear the schema lists
        return target in ("Linear", "LinearBase")
    return target == path


def base_quantization(top: dict, text: dict | None = None) -> BaseQuantization | None:
    """The quantization of a base config, or None when it has no quantization_config."""
    qc, where = find_quantization_config(top, text)
    if qc is None:
        return None
    return BaseQuantization(qc, where or "config.json")


__all__ = [
    "ActiveScheme",
    "BaseQuantization",
    "Classification",
    "Form",
    "Scheme",
    "StorageCheck",
    "base_quantization",
    "find_quantization_config",
    "module_paths",
    "scheme_ids",
    "schemes",
]
