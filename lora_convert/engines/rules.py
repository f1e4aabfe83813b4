"""Engine rule files, one per engine release: `lora_convert/engines/<engine>-<version>.json`.

Each file describes one released version of one serving engine (SGLang 0.5.23, vLLM 0.34.0) and is the only
place that knowledge lives: `validate --engine E` evaluates its `rules`, and `normalize --layout E` reads the same
file -- its `layout` key (how groups are cut and named) and every rule whose feature is `planned_group` (the groups
that layout refuses). A full file holds

    {"engine": "sglang", "version": "0.5.23", "engine_name", "label", "_note"?, "rules": [...], "layout": {...}}

Releases that share behaviour share rules by inheritance, never by copies. A file that `extends` another release
of the same engine lists only what differs in its own release:

    {"engine": "vllm", "version": "0.34.0", "extends": "vllm==0.33.0", "label": "vLLM 0.34.0",
     "engine_version": "vLLM 0.34.0", "_note": "...",
     "rules_changed": [{"id": "kimi-k25-no-lora", "source": "vllm==0.34.0: vllm/config/lora.py:140-148 ..."}],
     "rules_removed": [{"id": "...", "source": "why the child release does not do this: its file:line"}],
     "rules_added": [<full rules>],
     "layout_changed": {<top-level keys of `layout` that this release replaces>}}

and resolves to the full document (`_document`): the parent's rules in the parent's order, each changed one merged
with its change (fields given replace the parent's), the removed ones left out, the added ones at the end; the
parent's layout with `layout_changed`'s keys replaced. A parent may itself extend another release.

Citations: every rule keeps citing the file:line of the release it was read in (its `source` starts with
`vllm==0.33.0:`). A rule a child inherits unchanged is one whose cited lines say the same in the child release;
where the code moved, the child overrides the rule BY ID with only a new `source` citing its own release's lines
(`rules_changed: [{"id", "source"}]`). Every change and removal must carry a `source`, so that what a child says
differs is backed by its own release's code. Each rule (and each change that re-cites one) also carries an
`anchor`: its source's first `path:line` and a short quote of that line, which tests/test_engine_citations.py finds
in the cited release's own file (the proof cache) and tests/engine_proof/citations.py `locate` finds in the next
release when re-citing (`fill` adds the anchors of new rules). The resolved rules of a release all carry that
release's `engine_version`, and in their message, fix and layout texts the parent's label (`vLLM 0.33.0`: the release
whose behaviour the text states) reads as the child's: inheriting a rule states that the child release does the same.

Strictness: every file is checked by the shipped-data loader (lora_convert/io/shipped_data.py) against its spec
(`ENGINE_FILE_SPEC` or, with `extends`, `CHILD_FILE_SPEC`); an unknown parent, a parent of another engine, a cycle
of `extends`, a change or removal of an id the parent lacks, an added id the parent has, are SchemaErrors naming
the file and the JSON path.

An engine is named `sglang` (its newest release that has a rule file), `sglang==0.5.23` (that release) or
`sglang==installed` (the release of the package installed in this Python, importlib.metadata; a local version
label such as `+cu128` is ignored). A release without a rule file is a UsageError that lists the known releases and
names the nearest (the newest known one older than it, else the oldest).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import metadata, resources

from lora_convert.codes import ENGINE_OUTCOMES, NORMALIZE_REFUSED_FEATURES
from lora_convert.engines.features import FEATURES
from lora_convert.errors import UsageError
from lora_convert.io import shipped_data
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
    check,
    fail,
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
# Features of the base model, not of the adapter: no layout of the adapter changes them.
BASE_FEATURES = frozenset({"quantized_base", "unknown_quantization", "quantization_method"})
# Of those, the ones that fire whatever modules the adapter holds: a load failure there refuses every layout of it.
WHOLE_BASE_FEATURES = frozenset({"quantization_method"})
_NOTHING_TO_FIX = ("exact", "needs-flag")
_FILE = re.compile(r"^(?P<engine>[a-z][a-z0-9_]*)-(?P<version>\d+(?:\.\d+)*)\.json$")
_VERSION = re.compile(r"^\d+(?:\.\d+)*$")
INSTALLED = "installed"  # `--engine vllm==installed`: the release of the package installed in this Python


# ------------------------------------------------------------------------------------------------ the file format
# A condition on a planned group: its vocabulary is documented in lora_convert/convert/layout_rules.py.
WHEN_SPEC = Object(
    optional={
        **{key: ListOf(STRING) for key in ("kind", "name", "leaf", "slices", "family", "architectures")},
        "experts": BOOL,
        "layered": BOOL,
        "width_differs": Object(required={"width": Choice(("in", "first_slice_out")), "from": EXPRESSION}),
        "not_architectures": ListOf(STRING),
        "config_differs": Object(required={"field": STRING, "from": STRING}),
        "vision_tower": Object(required={"model_types": ListOf(STRING)}),
        "base_has_kind": ListOf(STRING),
    }
)
_RULE_REQUIRED = {
    "id": STRING,
    "engine_version": STRING,
    "feature": Choice((*sorted(FEATURES), PLANNED_GROUP)),
    "outcome": Choice(OUTCOMES),
    "message": STRING,
    "fix": TEXT,
    "source": STRING,
}
_RULE_OPTIONAL = {
    "params": MapOf(ANY),
    "layout_effect": STRING,
    "anchor": Object(required={"at": STRING, "text": STRING}),
}  # layout_effect: what normalize does, where not derived; anchor: the source's first `path:line` and a short quote
# of it, so that the citation can be checked and re-located in another release (tests/engine_proof/citations.py)
_RULE = Object(required=_RULE_REQUIRED, optional=_RULE_OPTIONAL, label="id")
# A child release's change of an inherited rule: its id, a `source` citing the child release, the fields that differ
# (engine_version is always the child's).
_RULE_CHANGE = Object(
    required={"id": STRING, "source": STRING},
    optional={
        k: v for k, v in {**_RULE_REQUIRED, **_RULE_OPTIONAL}.items() if k not in ("id", "source", "engine_version")
    },
    label="id",
)
_RULE_REMOVAL = Object(required={"id": STRING, "source": STRING}, label="id")
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
        "target_modules": Choice(("module_leaves", "module_paths_beside_vision", "engine_names")),
        "experts_3d": Object(required={"source": STRING}, optional={"architectures": ListOf(STRING), "all": BOOL}),
        "vision_modules": Object(required={"written": BOOL, "source": STRING}),
        # PEFT's own rewrite of target_modules on transformers 5 (peft_layout.json only; engine_layouts.py reads it)
        "converted_targets": Object(
            required={
                "groups": ListOf(Object(required={"model_types": ListOf(STRING), "targets": MapOf(STRING)})),
                "note": STRING,
                "source": STRING,
            }
        ),
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
# A file that `extends` another release of its engine: only what differs (the module docstring says how it resolves).
CHILD_FILE_SPEC = Object(
    required={"engine": STRING, "version": STRING, "extends": STRING, "label": STRING, "engine_version": STRING},
    optional={
        "engine_name": STRING,
        "rules_changed": ListOf(_RULE_CHANGE),
        "rules_removed": ListOf(_RULE_REMOVAL),
        "rules_added": ListOf(_RULE),
        "layout_changed": Object(optional={**LAYOUT_SPEC.required, **LAYOUT_SPEC.optional}),
    },
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


def _rule_files():
    """The folder holding the rule files (an importlib.resources Traversable; tests point it elsewhere)."""
    return resources.files(ENGINE_PACKAGE)


@cache
def releases() -> tuple[EngineRelease, ...]:
    """Every installed rule file, sorted by engine and version."""
    found = []
    for entry in _rule_files().iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(EngineRelease(m["engine"], m["version"]))
    return tuple(sorted(found, key=lambda r: (r.engine, _version_key(r.version))))


def installed_engines() -> list[str]:
    """Every engine with a rule file, sorted."""
    return sorted({r.engine for r in releases()})


# ------------------------------------------------------------------------------------------------ naming a release
def resolve_engine(spec: str) -> EngineRelease:
    """`sglang` (its newest release with a rule file), `sglang==0.5.23` or `sglang==installed` (the release of the
    package installed in this Python). Raises UsageError, naming the known releases and the nearest one."""
    name, _, version = spec.strip().lower().partition("==")
    mine = [r for r in releases() if r.engine == name]
    if not mine:
        raise UsageError(
            f"Unknown engine {spec!r}.",
            hint=f"Use one of: {', '.join(installed_engines())} (or ENGINE==VERSION: "
            f"{', '.join(r.spec for r in releases())}, or ENGINE==installed).",
        )
    if not version:
        return mine[-1]
    installed = version == INSTALLED
    if installed:
        version = _installed_version(name, mine)
    for r in mine:
        if r.version == version:
            return r
    known = ", ".join(r.spec for r in mine)
    nearest = nearest_release(name, version)
    where = f"{name} {version} is installed in this Python, but" if installed else f"No rules for {name} {version}:"
    raise UsageError(
        f"{where} lora-convert describes only {known} (the nearest: {nearest.spec}).",
        hint=f"Name a described release (`--engine {nearest.spec}`, or `--engine {name}` for the newest, "
        f"{mine[-1].version}) and check that its LoRA code is yours (`lora-convert engines diff`); another "
        "release's behaviour is not known here, and guessing it would make the verdict a guess.",
    )


def nearest_release(engine: str, version: str) -> EngineRelease:
    """The described release of `engine` nearest to `version`: the newest one not newer than it (whose code it most
    likely grew from), else the oldest. A version that is not dotted numbers gets the newest."""
    mine = [r for r in releases() if r.engine == engine]
    if not _VERSION.match(version):
        return mine[-1]
    older = [r for r in mine if _version_key(r.version) <= _version_key(version)]
    return older[-1] if older else mine[0]


def _installed_version(engine: str, mine: list[EngineRelease]) -> str:
    """The version of the `engine` package installed in this Python (its local label, `+cu128`, left out)."""
    try:
        version = metadata.version(engine)
    except metadata.PackageNotFoundError:
        raise UsageError(
            f"No {engine} package is installed in the Python that runs lora-convert, so {engine}=={INSTALLED} names "
            "no release.",
            hint=f"Run lora-convert in the environment that serves the adapter, or name the release you serve with: "
            f"{', '.join(r.spec for r in mine)} (`--engine {engine}` is the newest).",
        ) from None
    return version.split("+", 1)[0]


# ------------------------------------------------------------------------------------------------ reading a release
@cache
def load_rules(engine: str) -> tuple[dict, ...]:
    """The rules of one engine release (`sglang`, `sglang==0.5.23`), validated and resolved."""
    return tuple(_document(resolve_engine(engine))["rules"])


def engine_info(engine: str) -> dict:
    """The rule file's fields other than its rules and layout (engine name, label, version, `extends`)."""
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
    """The rule file of `release`, resolved (its `extends` chain applied) and checked."""
    return _resolve(release, ())


def _resolve(release: EngineRelease, children: tuple[EngineRelease, ...]) -> dict:
    """The full document of `release`; `children`: the releases that extend it on the way here (a cycle check)."""
    file = f"engines/{release.file}"
    raw = shipped_data.read_resource(_rule_files().joinpath(release.file), file)
    child = isinstance(raw, dict) and "extends" in raw
    doc = check(raw, CHILD_FILE_SPEC if child else ENGINE_FILE_SPEC, file)
    for key, value in (("engine", release.engine), ("version", release.version)):
        if doc[key] != value:
            raise fail(file, key, f"expected {value!r} (the file name and its contents must agree), got {doc[key]!r}")
    if child:
        parent = _parent(doc["extends"], release, children, file)
        return _apply_changes(doc, _resolve(parent, (*children, release)), file)
    _check_rules([(f"rules[{i}] ({rule['id']})", rule) for i, rule in enumerate(doc["rules"])], file)
    return doc


def _parent(extends: str, release: EngineRelease, children: tuple[EngineRelease, ...], file: str) -> EngineRelease:
    """The release `extends` names: another release of the same engine that has a rule file, not in a cycle."""
    mine = [r for r in releases() if r.engine == release.engine and r != release]
    parent = next((r for r in mine if r.spec == extends.strip()), None)
    if parent is None:
        known = ", ".join(r.spec for r in mine) or "none"
        raise fail(
            file, "extends", f"expected another {release.engine} release with a rule file ({known}), got {extends!r}"
        )
    if parent in children:
        chain = " -> ".join(r.spec for r in (*children[children.index(parent) :], release, parent))
        raise fail(file, "extends", f"expected a release that does not extend this one, got a cycle: {chain}")
    return parent


def _apply_changes(doc: dict, parent: dict, file: str) -> dict:
    """`parent` (a resolved document) with a child file's changes applied (the module docstring says how)."""
    by_id = {rule["id"]: rule for rule in parent["rules"]}

    def parent_rule(where: str, rule_id: str, what: str) -> None:
        if rule_id not in by_id:
            raise fail(file, where, f"expected the id of a rule of {parent['label']} to {what}, got {rule_id!r}")

    removed = set()
    for i, removal in enumerate(doc.get("rules_removed", [])):
        parent_rule(f"rules_removed[{i}] ({removal['id']}).id", removal["id"], "remove")
        removed.add(removal["id"])
    changes = {}
    for i, change in enumerate(doc.get("rules_changed", [])):
        where = f"rules_changed[{i}] ({change['id']}).id"
        parent_rule(where, change["id"], "change")
        if change["id"] in removed or change["id"] in changes:
            raise fail(file, where, f"expected an id changed once and not removed, got {change['id']!r} again")
        changes[change["id"]] = change
    for i, added in enumerate(doc.get("rules_added", [])):
        if added["engine_version"] != doc["engine_version"]:
            where = f"rules_added[{i}] ({added['id']}).engine_version"
            raise fail(file, where, f"expected {doc['engine_version']!r} (the file's), got {added['engine_version']!r}")
        if added["id"] in by_id:
            raise fail(
                file,
                f"rules_added[{i}] ({added['id']}).id",
                f"expected an id {parent['label']} does not have (change an inherited rule in rules_changed), "
                f"got {added['id']!r}",
            )
    relabel = _relabeler(parent["label"], doc["label"])
    rules = [
        {**relabel(rule), **changes.get(rule["id"], {}), "engine_version": doc["engine_version"]}
        for rule in parent["rules"]
        if rule["id"] not in removed
    ]
    changed_at = {change["id"]: i for i, change in enumerate(doc.get("rules_changed", []))}
    _check_rules([(f"rules_changed[{changed_at[r['id']]}] ({r['id']})", r) for r in rules if r["id"] in changes], file)
    _check_rules([(f"rules_added[{i}] ({r['id']})", r) for i, r in enumerate(doc.get("rules_added", []))], file)
    layout = {**relabel(parent["layout"]), **doc.get("layout_changed", {})}
    check(layout, LAYOUT_SPEC, file)
    resolved = {k: v for k, v in parent.items() if k not in ("_note", "extends")}
    own = {k: v for k, v in doc.items() if not k.startswith(("rules_", "layout_"))}
    return {**resolved, **own, "rules": rules + list(doc.get("rules_added", [])), "layout": layout}


def _relabeler(old: str, new: str):
    """A function giving a rule or layout object of release `old` whose texts (not its `source` citations) name
    release `new` instead: an inherited text states what the child release does."""

    def relabel(value, key=""):
        if isinstance(value, str):
            return value if key == "source" else value.replace(old, new)
        if isinstance(value, dict):
            return {k: relabel(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [relabel(v, key) for v in value]
        return value

    return relabel


def _check_rules(located: list[tuple[str, dict]], file: str) -> None:
    """What the spec cannot say about rules (each given with its path in the file, `rules[3] (id)`): ids are unique,
    a planned_group rule has a `params.when` condition."""
    seen: set[str] = set()
    for where, rule in located:
        if rule["id"] in seen:
            raise fail(file, f"{where}.id", f"expected a rule id not used before, got {rule['id']!r} again")
        seen.add(rule["id"])
        if rule["feature"] == PLANNED_GROUP:
            WHEN_SPEC.check((rule.get("params") or {}).get("when"), file, f"{where}.params.when")


# ------------------------------------------------------------------------------------------------ comparing releases
RULE_FIELDS = ("outcome", "message", "fix", "feature", "params", "layout_effect", "source")


def diff_rules(old: str, new: str) -> list[dict]:
    """The rules that differ between two releases (`vllm==0.33.0`, `vllm==0.34.0`), in `new`'s order then the
    removed ones: `{"id", "change": "added" | "removed" | "changed", "fields": [the RULE_FIELDS that differ], "old":
    rule or None, "new": rule or None}`. Texts are compared with each release naming itself (an inherited message
    that differs only by the release's label is the same message); a rule whose only difference is its `source` is
    one whose cited lines moved."""
    old_doc, new_doc = _document(resolve_engine(old)), _document(resolve_engine(new))
    relabel = _relabeler(old_doc["label"], new_doc["label"])
    before = {rule["id"]: rule for rule in old_doc["rules"]}
    after = {rule["id"]: rule for rule in new_doc["rules"]}
    out = []
    for rule_id, rule in after.items():
        if rule_id not in before:
            out.append({"id": rule_id, "change": "added", "fields": [], "old": None, "new": rule})
            continue
        was = relabel(before[rule_id])
        fields = [f for f in RULE_FIELDS if was.get(f) != rule.get(f)]
        if fields:
            out.append({"id": rule_id, "change": "changed", "fields": fields, "old": before[rule_id], "new": rule})
    out += [
        {"id": rule_id, "change": "removed", "fields": [], "old": rule, "new": None}
        for rule_id, rule in before.items()
        if rule_id not in after
    ]
    return out


def diff_layouts(old: str, new: str) -> list[str]:
    """The top-level keys of the two releases' `layout` objects that differ (texts compared as in diff_rules)."""
    old_doc, new_doc = _document(resolve_engine(old)), _document(resolve_engine(new))
    was = _relabeler(old_doc["label"], new_doc["label"])(old_doc["layout"])
    now = new_doc["layout"]
    return sorted(k for k in set(was) | set(now) if k != "_note" and was.get(k) != now.get(k))


def layout_treatment(rule: dict) -> str:
    """What `normalize --layout E` does about a rule of engine E that fires: REWRITES, REFUSES or KEEPS. Planned-group
    rules are exactly the groups that layout refuses; a rule with its own `layout_effect` text is one whose modules
    normalize writes unchanged (the text says what it notes instead). The docs' engine tables
    (lora_convert/engines/table.py) and the errors that stop `scan --normalize` (lora_convert/convert/blockers.py)
    both read this."""
    # normalize refuses some features' modules in every layout, before any engine rule (lora_convert/convert/plan.py):
    # not plain LoRA factors (DoRA, biases, whole weights, new tokens), or modules no text layer of the base has
    if rule["feature"] == PLANNED_GROUP or rule["feature"] in NORMALIZE_REFUSED_FEATURES:
        return REFUSES
    if rule["outcome"] in _NOTHING_TO_FIX or rule["feature"] in BASE_FEATURES or rule.get("layout_effect"):
        return KEEPS
    return REWRITES
