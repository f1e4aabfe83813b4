"""Engine releases (lora_convert/engines/rules.py): rule files that inherit from another release, naming a release
(`vllm`, `vllm==0.33.0`, `vllm==installed`, an unknown one), and `lora-convert engines list | diff`."""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import case_base_dir, case_dir
from lora_convert.cli import app
from lora_convert.convert import layout_rules
from lora_convert.engines import rules
from lora_convert.errors import SchemaError, UsageError

ENGINES = Path(rules.__file__).parent
CHILD = "vllm==9.0.0"  # a release of the temporary rule folder below, not a real one


def _clear_caches() -> None:
    for cached in (rules.releases, rules._document, rules.load_rules, layout_rules.load_layout_rules):
        cached.cache_clear()


@pytest.fixture
def rule_dir(tmp_path, monkeypatch):
    """A rule folder holding the shipped vllm-0.33.0.json; write(name, document) adds a file to it."""
    shutil.copy(ENGINES / "vllm-0.33.0.json", tmp_path / "vllm-0.33.0.json")
    monkeypatch.setattr(rules, "_rule_files", lambda: tmp_path)
    _clear_caches()

    def write(name: str, document: dict) -> None:
        (tmp_path / name).write_text(json.dumps(document), encoding="utf-8")
        _clear_caches()

    yield write
    monkeypatch.undo()
    _clear_caches()


def _child(**changes) -> dict:
    """A child file of vllm==0.33.0 named vllm-9.0.0.json, with `changes` as its own keys."""
    return {
        "engine": "vllm",
        "version": "9.0.0",
        "extends": "vllm==0.33.0",
        "label": "vLLM 9.0.0",
        "engine_version": "vLLM 9.0.0",
        **changes,
    }


def _parent_rules() -> dict[str, dict]:
    return {r["id"]: r for r in json.loads((ENGINES / "vllm-0.33.0.json").read_text(encoding="utf-8"))["rules"]}


def _relabeled(value, old: str, new: str, key: str = ""):
    """A parent's rule or layout as a child release states it: its texts name the child, its citations stay."""
    if isinstance(value, str):
        return value if key == "source" else value.replace(old, new)
    if isinstance(value, dict):
        return {k: _relabeled(v, old, new, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_relabeled(v, old, new, key) for v in value]
    return value


SHIPPED_CHILDREN = [
    "vllm-0.34.0.json",
    "vllm-0.32.0.json",
    "vllm-0.31.0.json",
    "vllm-0.30.0.json",
    "sglang-0.5.22.json",
    "sglang-0.5.21.json",
    "sglang-0.5.20.json",
    "sglang-0.5.19.json",
]


# ------------------------------------------------------------------------------------------------ inheritance
@pytest.mark.parametrize("name", SHIPPED_CHILDREN)
def test_a_shipped_child_is_its_parent_plus_its_own_changes(name):
    child = json.loads((ENGINES / name).read_text(encoding="utf-8"))
    assert "rules" not in child and "layout" not in child  # no copies
    parent_spec = child["extends"]
    parent = rules._document(rules.resolve_engine(parent_spec))  # resolved: a parent may extend another release
    spec = f"{child['engine']}=={child['version']}"
    relabel = {"old": parent["label"], "new": child["label"]}
    changes = {c["id"]: c for c in child.get("rules_changed", [])}
    removed = {r["id"] for r in child.get("rules_removed", [])}
    expected = [
        {**_relabeled(rule, **relabel), **changes.get(rule["id"], {}), "engine_version": child["engine_version"]}
        for rule in parent["rules"]
        if rule["id"] not in removed
    ] + child.get("rules_added", [])
    assert list(rules.load_rules(spec)) == expected
    layout = {k: v for k, v in rules.layout_document(spec).items() if k not in ("refuse", "_file")}
    assert layout == {**_relabeled(parent["layout"], **relabel), **child.get("layout_changed", {})}
    # every re-citation cites the child release; an inherited citation still names the release it was read in (the
    # parent, or a release the parent inherited it from); an added rule cites the child
    assert all(c["source"].startswith(f"{spec}: ") for c in changes.values())
    assert all(r["source"].startswith(f"{spec}: ") for r in child.get("rules_added", []))
    ancestors = _ancestors(parent_spec)
    added = {r["id"] for r in child.get("rules_added", [])}
    inherited = [r for r in rules.load_rules(spec) if r["id"] not in changes and r["id"] not in added]
    assert all(r["source"].split(": ", 1)[0] in ancestors for r in inherited)


def _ancestors(spec: str) -> list[str]:
    """`spec` and every release it extends, nearest first."""
    chain = [spec]
    while "extends" in (doc := json.loads((ENGINES / rules.resolve_engine(chain[-1]).file).read_text())):
        chain.append(doc["extends"])
    return chain


def test_a_child_changes_removes_adds_and_replaces_layout_keys(rule_dir):
    parent = _parent_rules()
    first, second, third = list(parent)[:3]
    added = {**parent[first], "id": "new-in-nine", "engine_version": "vLLM 9.0.0", "source": "vllm==9.0.0: x.py:1"}
    rule_dir(
        "vllm-9.0.0.json",
        _child(
            rules_changed=[{"id": first, "outcome": "dropped", "source": "vllm==9.0.0: vllm/lora/a.py:10-12"}],
            rules_removed=[{"id": second, "source": "vllm==9.0.0: vllm/lora/b.py:3 (no longer refused)"}],
            rules_added=[added],
            layout_changed={"served_by": "vLLM 9.0.0 (changed)"},
        ),
    )
    resolved = {r["id"]: r for r in rules.load_rules(CHILD)}
    assert list(resolved) == [i for i in parent if i != second] + ["new-in-nine"]
    assert resolved[first] == {
        **_relabeled(parent[first], "vLLM 0.33.0", "vLLM 9.0.0"),
        "engine_version": "vLLM 9.0.0",
        "outcome": "dropped",
        "source": "vllm==9.0.0: vllm/lora/a.py:10-12",
    }
    assert resolved[third] == {
        **_relabeled(parent[third], "vLLM 0.33.0", "vLLM 9.0.0"),
        "engine_version": "vLLM 9.0.0",
    }
    assert resolved["new-in-nine"] == added
    assert rules.layout_document(CHILD)["served_by"] == "vLLM 9.0.0 (changed)"
    changes = {c["id"]: (c["change"], c["fields"]) for c in rules.diff_rules("vllm==0.33.0", CHILD)}
    assert changes == {
        first: ("changed", ["outcome", "source"]),
        second: ("removed", []),
        "new-in-nine": ("added", []),
    }
    assert rules.diff_layouts("vllm==0.33.0", CHILD) == ["served_by"]


def _first_id() -> str:
    return next(iter(_parent_rules()))


@pytest.mark.parametrize(
    ("files", "error"),
    [
        (
            {"vllm-9.0.0.json": _child(extends="vllm==0.29.0")},
            "engines/vllm-9.0.0.json: extends: expected another vllm release with a rule file (vllm==0.33.0), "
            "got 'vllm==0.29.0'",
        ),
        (
            {"vllm-9.0.0.json": _child(extends="sglang==0.5.23")},
            "engines/vllm-9.0.0.json: extends: expected another vllm release with a rule file (vllm==0.33.0), "
            "got 'sglang==0.5.23'",
        ),
        (
            {
                "vllm-9.0.0.json": _child(extends="vllm==9.1.0"),
                "vllm-9.1.0.json": _child(version="9.1.0", extends=CHILD),
            },
            "engines/vllm-9.1.0.json: extends: expected a release that does not extend this one, got a cycle: "
            "vllm==9.0.0 -> vllm==9.1.0 -> vllm==9.0.0",
        ),
        (
            {"vllm-9.0.0.json": _child(rules_changed=[{"id": "no-such-rule", "source": "vllm==9.0.0: a.py:1"}])},
            "engines/vllm-9.0.0.json: rules_changed[0] (no-such-rule).id: expected the id of a rule of vLLM 0.33.0 "
            "to change, got 'no-such-rule'",
        ),
        (
            {"vllm-9.0.0.json": _child(rules_removed=[{"id": "no-such-rule", "source": "vllm==9.0.0: a.py:1"}])},
            "engines/vllm-9.0.0.json: rules_removed[0] (no-such-rule).id: expected the id of a rule of vLLM 0.33.0 "
            "to remove, got 'no-such-rule'",
        ),
        (
            {"vllm-9.0.0.json": _child(rules_changed=[{"id": "FIRST", "outcome": "exact"}])},
            "engines/vllm-9.0.0.json: rules_changed[0] (FIRST): missing required key 'source'",
        ),
        (
            {"vllm-9.0.0.json": _child(rules_changed=[{"id": "FIRST", "source": "s", "outcome": "fine"}])},
            "engines/vllm-9.0.0.json: rules_changed[0] (FIRST).outcome: expected one of "
            + ", ".join(rules.OUTCOMES)
            + ", got string 'fine'",
        ),
    ],
    ids=[
        "unknown-parent",
        "other-engine",
        "cycle",
        "change-unknown-id",
        "remove-unknown-id",
        "change-without-source",
        "bad-field",
    ],
)
def test_a_bad_child_file_is_a_schema_error_naming_the_file_and_the_path(rule_dir, files, error):
    first = _first_id()
    for name, doc in files.items():
        rule_dir(name, json.loads(json.dumps(doc).replace("FIRST", first)))
    with pytest.raises(SchemaError) as info:
        rules.load_rules(CHILD)
    assert info.value.message == error.replace("FIRST", first)


def test_a_child_that_adds_a_rule_its_parent_has_is_a_schema_error(rule_dir):
    parent = _parent_rules()
    first = next(iter(parent))
    again = {**parent[first], "engine_version": "vLLM 9.0.0"}
    rule_dir("vllm-9.0.0.json", _child(rules_added=[again]))
    with pytest.raises(SchemaError) as info:
        rules.load_rules(CHILD)
    assert info.value.message == (
        f"engines/vllm-9.0.0.json: rules_added[0] ({first}).id: expected an id vLLM 0.33.0 does not have (change "
        f"an inherited rule in rules_changed), got {first!r}"
    )


# ------------------------------------------------------------------------------------------------ naming a release
def test_the_bare_engine_is_its_newest_release():
    newest = max((r for r in rules.releases() if r.engine == "vllm"), key=lambda r: rules._version_key(r.version))
    assert newest.version == "0.34.0"
    assert rules.resolve_engine("vllm") == newest
    assert rules.engine_info("vllm")["label"] == "vLLM 0.34.0"
    assert rules.resolve_engine("vllm==0.33.0").spec == "vllm==0.33.0"


@pytest.mark.parametrize(
    ("asked", "nearest"), [("0.29.0", "vllm==0.30.0"), ("0.35.0", "vllm==0.34.0"), ("0.33.9", "vllm==0.33.0")]
)
def test_an_unknown_release_lists_the_known_ones_and_names_the_nearest(asked, nearest):
    with pytest.raises(UsageError) as info:
        rules.resolve_engine(f"vllm=={asked}")
    assert info.value.message == (
        f"No rules for vllm {asked}: lora-convert describes only {_known_vllm()} (the nearest: {nearest})."
    )
    assert f"--engine {nearest}" in info.value.hint and "engines diff" in info.value.hint


def _known_vllm() -> str:
    return "vllm==0.30.0, vllm==0.31.0, vllm==0.32.0, vllm==0.33.0, vllm==0.34.0"  # the shipped rule files


def test_installed_is_the_version_of_the_installed_package(monkeypatch):
    asked = []

    def version(name):
        asked.append(name)
        return "0.33.0+cu128"  # a local version label is not part of the release

    monkeypatch.setattr(metadata, "version", version)
    assert rules.resolve_engine("vllm==installed").spec == "vllm==0.33.0"
    assert asked == ["vllm"]
    monkeypatch.setattr(metadata, "version", lambda name: "0.35.1")
    with pytest.raises(UsageError) as info:
        rules.resolve_engine("vllm==installed")
    assert info.value.message == (
        f"vllm 0.35.1 is installed in this Python, but lora-convert describes only {_known_vllm()} "
        "(the nearest: vllm==0.34.0)."
    )


def test_installed_without_the_package_says_what_to_do(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    with pytest.raises(UsageError) as info:
        rules.resolve_engine("sglang==installed")
    assert info.value.message == (
        "No sglang package is installed in the Python that runs lora-convert, so sglang==installed names no release."
    )
    assert "sglang==0.5.23" in info.value.hint and "environment that serves" in info.value.hint


# ------------------------------------------------------------------------------------------------ the commands
def test_engines_list_marks_the_newest_release():
    runner = CliRunner()
    result = runner.invoke(app, ["engines", "list", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    found = {r["spec"]: r for r in json.loads(result.stdout)}
    assert found["vllm==0.34.0"]["newest"] and not found["vllm==0.33.0"]["newest"]
    assert found["vllm==0.34.0"]["extends"] == "vllm==0.33.0" and found["vllm==0.33.0"]["extends"] is None
    human = runner.invoke(app, ["engines", "list"])
    assert human.exit_code == 0 and "vllm==0.34.0 *" in human.stdout and "vllm==0.33.0 *" not in human.stdout


def test_engines_diff_of_the_shipped_releases_shows_the_recited_rules():
    result = CliRunner().invoke(app, ["engines", "diff", "vllm==0.33.0", "vllm==0.34.0", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    diff = json.loads(result.stdout)
    child = json.loads((ENGINES / "vllm-0.34.0.json").read_text(encoding="utf-8"))
    recited = {c["id"]: ["source"] for c in child["rules_changed"]}
    assert {c["id"]: c["fields"] for c in diff["rules"]} == {**recited, **{c["id"]: [] for c in child["rules_removed"]}}
    assert {c["id"] for c in diff["rules"] if c["change"] == "removed"} == {c["id"] for c in child["rules_removed"]}
    kimi = next(c for c in diff["rules"] if c["id"] == "kimi-k25-no-lora")
    assert kimi["new"]["source"].startswith("vllm==0.34.0: vllm/config/lora.py:140-148")
    assert kimi["old"]["source"].startswith("vllm==0.33.0: vllm/config/lora.py:147-155")


def test_engines_diff_on_an_adapter_shows_each_module_per_release(rule_dir):
    # a child release that no longer refuses GLM-4's fused gate_up_proj: the v5_glm4 adapter then loads
    rule_dir(
        "vllm-9.0.0.json",
        _child(rules_removed=[{"id": "glm4-fused-gate-up", "source": "vllm==9.0.0: a test's release"}]),
    )
    case = "v5_glm4"
    args = [
        "engines",
        "diff",
        "vllm==0.33.0",
        CHILD,
        str(case_dir(case) / "adapter"),
        "--base",
        str(case_base_dir(case)),
    ]
    result = CliRunner().invoke(app, [*args, "--format", "json"])
    assert result.exit_code == 0, result.stderr
    diff = json.loads(result.stdout)
    assert diff["load_failure"] == {"old": ["glm4-fused-gate-up"], "new": []}
    assert diff["modules_total"] == diff["modules_differing"] == len(diff["modules"]) > 0
    assert {(r["old"], r["new"]) for r in diff["modules"]} == {("load failure", "exact")}
    human = CliRunner().invoke(app, args)
    assert human.exit_code == 0, human.stderr
    assert "vLLM 0.33.0: load failure (glm4-fused-gate-up)" in human.stdout and "vLLM 9.0.0: loads" in human.stdout
    same = CliRunner().invoke(app, ["engines", "diff", "vllm==0.33.0", "vllm==0.33.0", *args[4:], "--format", "json"])
    assert json.loads(same.stdout)["modules"] == [] and json.loads(same.stdout)["modules_differing"] == 0


def test_engines_diff_refuses_two_engines_and_unknown_releases():
    runner = CliRunner()
    result = runner.invoke(app, ["engines", "diff", "vllm==0.33.0", "sglang"])
    assert result.exit_code == 2 and "one engine" in result.stderr and "Traceback" not in result.stderr
    result = runner.invoke(app, ["engines", "diff", "vllm==0.29.0", "vllm"])
    assert result.exit_code == 2 and "(the nearest: vllm==0.30.0)" in result.stderr


def test_engines_help_teaches_with_examples():
    result = CliRunner().invoke(app, ["engines", "diff", "--help"])
    assert result.exit_code == 0
    assert "lora-convert engines diff vllm==0.33.0 vllm==0.34.0" in result.stdout.replace("\n", " ")


def test_a_child_file_holds_only_what_differs():
    """No rule file repeats a rule of the release it extends: each keeps only what differs from its parent."""
    children = [r for r in rules.releases() if "extends" in rules.engine_info(r.spec)]
    assert children
    for release in children:
        doc = json.loads((ENGINES / release.file).read_text(encoding="utf-8"))
        assert "rules" not in doc and "layout" not in doc
        parent = {r["id"]: r for r in rules.load_rules(doc["extends"])}
        for change in doc.get("rules_changed", []):
            fields = {k: v for k, v in change.items() if k not in ("id", "_note")}
            assert fields != {k: parent[change["id"]].get(k) for k in fields}, change["id"]
