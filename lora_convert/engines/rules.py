"""Engine rule files, one per engine release: `lora_convert/engines/<engine>-<version>.json`.

Each file describes one released version of one serving engine (SGLang 0.5.23, vLLM 0.33.0) and is the only
place that knowledge lives: `validate --engine E` evaluates its `rules`, and `normalize --layout E` reads the same
file -- its `layout` key (how groups are cut and named) and every rule whose feature is `planned_group` (the groups
that layout refuses). A file holds

    {"engine": "sglang", "version": "0.5.23", "engine_name", "label", "_note"?, "rules": [...], "layout": {...}}

An engine is named `sglang` (its pinned release: the one file installed for it, or the newest) or
`sglang==0.5.23` (that release). Rules are validated strictly here: unknown fields, features or outcomes are a
SchemaError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from lora_convert.codes import ENGINE_OUTCOMES
from lora_convert.engines.features import FEATURES
from lora_convert.errors import UsageError
from lora_convert.io.shipped_data import (
    ANY,
    BOOL,
    EXPRESSION,
    STRING,
    TEXT,
    Choice,
    ListOf,
    MapOf,
    Object,
    fail,
    load_shipped,
)

ENGINE_PACKAGE = "lora_convert.engines"
OUTCOMES = tuple(ENGINE_OUTCOMES)  # the severity of each outcome is written once, in lora_convert/codes.py
# Rules on planned groups (the plan normalize builds from headers): evaluated by the check and convert stages,
# which own the plan; `params.when` is a condition of lora_convert/convert/layout_rules.py.
PLANNED_GROUP = "planned_group"
# What `normalize --layout E` does about a rule of E that fires (`layout_treatment`).
REWRITES = "rewrites"  # the output is written so that E serves it exactly
REFUSES = "refuses"  # normalize refuses those modules (--drop-unsupported: leaves them out, listed)
KEEPS = "keeps"  # written unchanged: nothing to fix, a server setting, or a property of the base
# Features normalize refuses in the engine layouts, before any engine rule (lora_convert/convert/plan.py): not plain
# LoRA factors (DoRA, biases, whole weights, new tokens), or modules no text layer of the base has.
NORMALIZE_REFUSES = frozenset({"dora", "bias", "full_weights", "added_tokens", "vision_modules", "layers_past_end"})
# Features of the base model, not of the adapter: no layout of the adapter changes them.
BASE_FEATURES = frozenset({"quantized_base", "unknown_quantization"})
_NOTHING_TO_FIX = ("exact", "needs-flag")
_FILE = re.compile(r"^(?P<engine>[a-z][a-z0-9_]*)-(?P<version>\d+(?:\.\d+)*)\.json$")


# ------------------------------------------------------------------------------------------------ the file format
# A condition on a planned group: its vocabulary is documented in lora_convert/convert/layout_rules.py.
WHEN_SPEC = Object(
    optional={
        **{key: ListOf(STRING) for key in ("kind", "name", "leaf", "slices", "family", "architectures")},
        "experts": BOOL,
        "layered": BOOL,
        "width_differs": Object(required={"width": Choice(("in", "first_slice_out")), "from": EXPRESSION}),
    }
)
_RULE = Object(
    required={
        "id": STRING,
        "engine_version": STRING,
        "feature": Choice((*sorted(FEATURES), PLANNED_GROUP)),
        "outcome": Choice(OUTCOMES),
        "message": STRING,
        "fix": TEXT,
        "source": STRING,
    },
    optional={"params": MapOf(ANY), "layout_effect": STRING},  # layout_effect: what normalize does, where not derived
    label="id",
)
_CITED = {"when": WHEN_SPEC, "source": STRING}  # every layout rule cites its source
# How a layout cuts, renames and annotates planned groups: an engine file's `layout`, and convert/peft_layout.json.
LAYOUT_SPEC = Object(
    required={"layout": STRING, "engine": STRING, "served_by": STRING},
    optional={
        "cut": ListOf(
            Object(
                required={**_CITED, "modules": ListOf(Object(required={"name": STRING, "slices": ListOf(STRING)}))},
                optional={"unheld": Object(required={"rule": STRING, "reason": STRING, "source": STRING})},
            )
        ),
        "rename": ListOf(Object(required={**_CITED, "names": MapOf(STRING)})),
        "rename_containers": ListOf(Object(required={**_CITED, "names": MapOf(STRING)})),
        "notes": ListOf(Object(required={**_CITED, "text": STRING})),
        "embedding_leaf": STRING,
        "auto_detected_targets": Object(
            required={"leaves": ListOf(STRING), "note": STRING}, optional={"source": STRING}
        ),
        "target_modules": Choice(("module_leaves", "engine_names")),
        "experts_3d": Object(required={"source": STRING}, optional={"architectures": ListOf(STRING), "all": BOOL}),
        "vision_modules": Object(required={"written": BOOL, "source": STRING}),
    },
)
ENGINE_FILE_SPEC = Object(
    required={
        "engine": STRING,
        "version": STRING,
        "engine_name": STRING,
        "label": STRING,
        "rules": ListOf(_RULE),
        "layout": LAYOUT_SPEC,
    },
    optional={"engine_version": STRING},
)


@dataclass(frozen=True, order=True)
class EngineRelease:
    """One engine release that has a rule file."""

    engine: str
    version: str

    @property
    def file(self) -> str:
        return f"{self.engine}-{self.version}.json"

    @property
    def spec(self) -> str:
        return f"{self.engine}=={self.version}"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


@cache
def releases() -> tuple[EngineRelease, ...]:
    """Every installed rule file, sorted by engine and version."""
    found = []
    for entry in resources.files(ENGINE_PACKAGE).iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(EngineRelease(m["engine"], m["version"]))
    return tuple(sorted(found, key=lambda r: (r.engine, _version_key(r.version))))


def installed_engines() -> list[str]:
    """Every engine with a rule file, sorted."""
    return sorted({r.engine for r in releases()})


def resolve_engine(spec: str) -> EngineRelease:
    """`sglang` (its pinned release: the newest installed) or `sglang==0.5.23`. Raises UsageError."""
    name, _, version = spec.strip().lower().partition("==")
    mine = [r for r in releases() if r.engine == name]
    if not mine:
        raise UsageError(
            f"Unknown engine {spec!r}.",
            hint=f"Use one of: {', '.join(installed_engines())} (or ENGINE==VERSION: "
            f"{', '.join(r.spec for r in releases())}).",
        )
    if not version:
        return mine[-1]
    for r in mine:
        if r.version == version:
            return r
    raise UsageError(
        f"No rules for {name} {version}: lora-convert describes {', '.join(r.spec for r in mine)}.",
        hint=f"Use --engine {name} for the pinned release ({mine[-1].version}); another release's behaviour is "
        "not known here, and guessing it would make the verdict a guess.",
    )


@cache
def load_rules(engine: str) -> tuple[dict, ...]:
    """The rules of one engine release (`sglang`, `sglang==0.5.23`), validated."""
    return tuple(_document(resolve_engine(engine))["rules"])


def engine_info(engine: str) -> dict:
    """The rule file's fields other than its rules and layout (engine name, label, version)."""
    release = resolve_engine(engine)
    return {k: v for k, v in _document(release).items() if k not in ("rules", "layout")}


def layout_document(engine: str) -> dict:
    """The `layout` object of an engine release's file, with that release's planned-group rules as `refuse`."""
    release = resolve_engine(engine)
    doc = _document(release)
    layout = doc["layout"]
    refuse = [r for r in load_rules(engine) if r["feature"] == PLANNED_GROUP]
    return {**layout, "refuse": refuse, "_file": f"engines/{release.file}"}


@cache
def _document(release: EngineRelease) -> dict:
    """The rule file of `release`, checked against ENGINE_FILE_SPEC, then for what the spec cannot say: the name
    and the contents agree, rule ids are unique, a planned_group rule has a `params.when` condition."""
    file = f"engines/{release.file}"
    doc = load_shipped(ENGINE_PACKAGE, release.file, ENGINE_FILE_SPEC, file)
    for key, value in (("engine", release.engine), ("version", release.version)):
        if doc[key] != value:
            raise fail(file, key, f"expected {value!r} (the file name and its contents must agree), got {doc[key]!r}")
    seen: set[str] = set()
    for i, rule in enumerate(doc["rules"]):
        where = f"rules[{i}] ({rule['id']})"
        if rule["id"] in seen:
            raise fail(file, f"{where}.id", f"expected a rule id not used before, got {rule['id']!r} again")
        seen.add(rule["id"])
        if rule["feature"] == PLANNED_GROUP:
            WHEN_SPEC.check((rule.get("params") or {}).get("when"), file, f"{where}.params.when")
    return doc


def layout_treatment(rule: dict) -> str:
    """What `normalize --layout E` does about a rule of engine E that fires: REWRITES, REFUSES or KEEPS. Planned-group
    rules are exactly the groups that layout refuses; a rule with its own `layout_effect` text is one whose modules
    normalize writes unchanged (the text says what it notes instead). The docs' engine tables
    (lora_convert/engines/table.py) and the errors that stop `scan --normalize` (lora_convert/convert/blockers.py)
    both read this."""
    if rule["feature"] == PLANNED_GROUP or rule["feature"] in NORMALIZE_REFUSES:
        return REFUSES
    if rule["outcome"] in _NOTHING_TO_FIX or rule["feature"] in BASE_FEATURES or rule.get("layout_effect"):
        return KEEPS
    return REWRITES
